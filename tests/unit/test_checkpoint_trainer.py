"""Which checkpoint a run resumes from, and the checks before it is read: no torch.distributed,
no model; directories laid out as `Checkpointer` writes them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from megarl.trainer.checkpoint import COMPLETE, LATEST, Checkpointer, CheckpointError


def checkpointer(tmp_path: Path, resume: str = "auto", keep_last: int = 2) -> Checkpointer:
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(dir=str(tmp_path / "ckpt"), resume=resume,
                                                     keep_last=keep_last, save_optimizer=True))
    return Checkpointer(cfg, SimpleNamespace(rank=0), tmp_path)


def write_checkpoint(root: Path, step: int, *, partial: bool = False) -> Path:
    """A sealed checkpoint directory with a few files (or an unsealed `.partial` one)."""
    path = root / (f"step_{step:06d}" + (".partial" if partial else ""))
    (path / "dist").mkdir(parents=True)
    (path / "rng").mkdir()
    (path / "dist" / "__0_0.distcp").write_bytes(b"x" * 100)
    (path / "rng" / "rank_0.pt").write_bytes(b"r" * 10)
    (path / "trainer.pt").write_bytes(b"t" * 20)
    Checkpointer._seal(path, step)
    return path


def test_auto_resumes_from_the_checkpoint_latest_names(tmp_path):
    ck = checkpointer(tmp_path)
    assert ck.find() is None   # nothing yet: a fresh start
    write_checkpoint(ck.dir, 3)
    newest = write_checkpoint(ck.dir, 6)
    (ck.dir / LATEST).write_text("step_000006\n")
    assert ck.find() == newest
    assert checkpointer(tmp_path, resume="never").find() is None
    assert checkpointer(tmp_path, resume=str(ck.dir / "step_000003")).find() == \
        ck.dir / "step_000003"


def test_a_truncated_or_missing_file_is_an_error_naming_it(tmp_path):
    ck = checkpointer(tmp_path)
    write_checkpoint(ck.dir, 3)
    path = write_checkpoint(ck.dir, 6)
    (ck.dir / LATEST).write_text("step_000006\n")
    shard = path / "dist" / "__0_0.distcp"
    shard.write_bytes(b"x" * 40)
    with pytest.raises(CheckpointError, match="truncated or damaged") as info:
        ck.find()
    assert str(shard) in str(info.value) and "40 bytes, 100 when written" in str(info.value)
    assert str(ck.dir / "step_000003") in str(info.value)   # where to go instead
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard} is missing"):
        ck.find()


def test_unsealed_corrupt_seal_or_pointer_are_errors_never_a_fresh_start(tmp_path):
    ck = checkpointer(tmp_path)
    path = write_checkpoint(ck.dir, 2)
    (ck.dir / LATEST).write_text("step_000002\n")
    (path / COMPLETE).write_text('{"step": 2, "fil')
    with pytest.raises(CheckpointError, match=f"{path / COMPLETE} is corrupt"):
        ck.find()
    (path / COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="is incomplete"):
        ck.find()
    (ck.dir / LATEST).write_text("\x00\x00garbage")
    with pytest.raises(CheckpointError, match=f"{ck.dir / LATEST} is corrupt"):
        ck.find()
    (ck.dir / LATEST).unlink()
    with pytest.raises(CheckpointError, match="none is sealed"):
        ck.find()
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpointer(tmp_path, resume=str(tmp_path / "nowhere")).find()


def test_a_sealed_checkpoint_newer_than_latest_wins(tmp_path):
    """A crash between the rename and the pointer update loses no finished step."""
    ck = checkpointer(tmp_path)
    write_checkpoint(ck.dir, 3)
    (ck.dir / LATEST).write_text("step_000003\n")
    newer = write_checkpoint(ck.dir, 6)
    write_checkpoint(ck.dir, 9, partial=True)   # never renamed: ignored
    assert ck.find() == newer
    (ck.dir / LATEST).unlink()
    assert ck.find() == newer


def test_prune_keeps_the_newest_complete_ones_and_drops_stale_partials(tmp_path):
    ck = checkpointer(tmp_path, keep_last=2)
    for step in (10, 999_999, 1_000_000):   # by step: "step_1000000" sorts before "step_999999"
        write_checkpoint(ck.dir, step)
    (ck.dir / "step_000007").mkdir()  # not sealed: not a checkpoint, left alone
    write_checkpoint(ck.dir, 200, partial=True)
    ck._prune()
    assert sorted(p.name for p in ck.dir.iterdir()) == ["step_000007", "step_1000000",
                                                         "step_999999"]
