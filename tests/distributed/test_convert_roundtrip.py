"""HF -> Megatron -> HF for Qwen2.5 (tied), Qwen3 and Llama 3.1 tiny models, on gloo ranks.

- the converted checkpoint (written at TP=1 with TP=2 vocabulary padding) gives the HF model's
  logits within 1e-4 (float32) at TP in {1, 2} x PP in {1, 2};
- converting back gives the original safetensors bit for bit;
- the converter run on two ranks writes an equivalent checkpoint;
- a conversion that fails half-way leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megarl.config import ParallelConfig
from megarl.models.hf import shape_from_hf_dir
from megarl.models.tiny import save_random_hf_checkpoint, tiny_config
from tests.harness import run_distributed

TOL = 1e-4
FAMILIES = {"qwen2": dict(tie_word_embeddings=True), "qwen3": {}, "llama": {}}


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 300, (n,), generator=g) for n in (12, 7)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (HF dir, HF logits per prompt)."""
    base = tmp_path_factory.mktemp("convert")
    out = {}
    for family, overrides in FAMILIES.items():
        model = save_random_hf_checkpoint(tiny_config(family, **overrides), base / family, seed=1)
        with torch.no_grad():
            out[family] = (base / family, [model(p[None]).logits[0] for p in _prompts()])
    return out


@pytest.fixture(scope="module")
def converted(models):
    """family -> Megatron checkpoint converted in one process."""
    dirs = {f: hf.parent / f"{f}-megatron" for f, (hf, _) in models.items()}
    run_distributed(_convert, 1, args=({f: hf for f, (hf, _) in models.items()}, dirs, 2),
                    timeout=240)
    return dirs


def _convert(hf_dirs, out_dirs, tp):
    from megarl.checkpoint.convert import hf_to_megatron

    for family, hf_dir in hf_dirs.items():
        hf_to_megatron(hf_dir, out_dirs[family], tp=tp, progress="off")


def _logits(megatron_dirs, hf_dirs, tp, pp):
    from megatron.core import parallel_state as ps

    from megarl.checkpoint.verify import megatron_logits

    out = {}
    for family, megatron_dir in megatron_dirs.items():
        shape, _ = shape_from_hf_dir(hf_dirs[family])
        out[family] = megatron_logits(megatron_dir, _prompts(), shape, ParallelConfig(tp=tp, pp=pp))
        ps.destroy_model_parallel()
    return out


def _check_logits(results, models, where):
    found = [r for r in results if r[next(iter(r))] is not None]
    assert len(found) == 1, "exactly one rank returns the logits"
    for family, logits in found[0].items():
        for ours, ref in zip(logits, models[family][1], strict=True):
            diff = (ours - ref).abs().max().item()
            assert diff < TOL, f"{family} {where}: logits differ by {diff}"
            assert torch.equal(ours.argmax(-1), ref.argmax(-1)), f"{family} {where}: top-1"


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_converted_checkpoint_reproduces_hf_logits(models, converted, tp, pp):
    hf_dirs = {f: hf for f, (hf, _) in models.items()}
    results = run_distributed(_logits, tp * pp, args=(converted, hf_dirs, tp, pp), timeout=240)
    _check_logits(results, models, f"tp={tp} pp={pp}")


def _back_to_hf(megatron_dirs, hf_dirs, out_dirs):
    from megarl.checkpoint.convert import megatron_to_hf

    for family, megatron_dir in megatron_dirs.items():
        megatron_to_hf(megatron_dir, out_dirs[family], hf_dirs[family], progress="off",
                       max_shard_bytes=40_000)


def _assert_same_safetensors(original_dir, new_dir):
    original = load_file(original_dir / "model.safetensors")
    new = {}
    for name in os.listdir(new_dir):
        if name.endswith(".safetensors"):
            new.update(load_file(new_dir / name))
    assert sorted(new) == sorted(original)
    for name, tensor in original.items():
        assert new[name].dtype == tensor.dtype and torch.equal(new[name], tensor), name


def test_megatron_back_to_hf_is_bit_identical(models, converted):
    hf_dirs = {f: hf for f, (hf, _) in models.items()}
    out = {f: d.parent / f"{f}-back" for f, d in converted.items()}
    run_distributed(_back_to_hf, 1, args=(converted, hf_dirs, out), timeout=240)
    for family, hf_dir in hf_dirs.items():
        _assert_same_safetensors(hf_dir, out[family])
        assert (out[family] / "model.safetensors.index.json").is_file()  # several shards
        assert (out[family] / "config.json").read_text() == (hf_dir / "config.json").read_text()


def _convert_on_two_ranks_then_run(hf_dir, out_dir):
    _convert({"qwen3": hf_dir}, {"qwen3": out_dir}, tp=2)
    return _logits({"qwen3": out_dir}, {"qwen3": hf_dir}, tp=2, pp=1)


def test_converter_shares_the_layers_among_ranks(models):
    hf_dir = models["qwen3"][0]
    out_dir = hf_dir.parent / "qwen3-two-ranks"
    results = run_distributed(_convert_on_two_ranks_then_run, 2, args=(hf_dir, out_dir),
                              timeout=240)
    _check_logits(results, {"qwen3": models["qwen3"]}, "converted by 2 ranks")
    distcp = [n for n in os.listdir(out_dir) if n.endswith(".distcp")]
    assert {n[1:6] for n in distcp} == {"00000", "00001"}, distcp  # u<rank>-<unit>__...


def _fail_half_way(hf_dir, out_dir):
    from megarl.checkpoint import dist_io
    from megarl.checkpoint.convert import hf_to_megatron

    original = dist_io.StreamingCheckpointWriter.write_unit

    def write_unit(self, state):
        if self.units == 2:
            raise OSError("disk full (simulated)")
        original(self, state)

    dist_io.StreamingCheckpointWriter.write_unit = write_unit
    try:
        hf_to_megatron(hf_dir, out_dir, progress="off")
    except OSError as err:
        return str(err)
    finally:
        dist_io.StreamingCheckpointWriter.write_unit = original
    return None


def test_failed_conversion_leaves_nothing(models):
    hf_dir = models["llama"][0]
    before = sorted(os.listdir(hf_dir.parent))
    [error] = run_distributed(_fail_half_way, 1, args=(hf_dir, hf_dir.parent / "broken"))
    assert error == "disk full (simulated)"
    assert sorted(os.listdir(hf_dir.parent)) == before


def test_megatron_to_hf_refuses_a_config_of_another_model(models, converted, tmp_path):
    from megarl.checkpoint.convert import megatron_to_hf
    from megarl.checkpoint.manifest import MANIFEST

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((models["qwen3"][0] / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="does not describe the model in .*num_layers: 4 != 3"):
        megatron_to_hf(converted["qwen3"], tmp_path / "out", wrong)
    # Without megarl's manifest the stored tensors themselves are checked.
    bare = tmp_path / "bare"
    shutil.copytree(converted["qwen3"], bare)
    (bare / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"does not match the config: .* has shape \(4, .*"
                       r"the config implies \(3, "):
        megatron_to_hf(bare, tmp_path / "out", wrong)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "wrong"]
