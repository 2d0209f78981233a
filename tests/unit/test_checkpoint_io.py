"""Safetensors reading/writing by tensor name, and outputs that appear complete or not at all."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megarl.checkpoint.hf_io import HFCheckpoint, ShardedSafetensorsWriter
from megarl.checkpoint.output import check_output, staged_output


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 4, generator=g).to(torch.bfloat16),
            "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(7, generator=g)}


def _plan(tensors):
    return [(n, t.shape, t.dtype) for n, t in tensors.items()]


def test_sharded_write_then_lazy_read_is_exact(tmp_path):
    tensors = _tensors()
    writer = ShardedSafetensorsWriter(tmp_path, _plan(tensors), max_shard_bytes=30)
    writer.add_all(tensors.items())
    paths = writer.finish()
    assert [p.name for p in paths] == ["model-00001-of-00003.safetensors",
                                       "model-00002-of-00003.safetensors",
                                       "model-00003-of-00003.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["b"] == "model-00002-of-00003.safetensors"
    assert index["metadata"]["total_size"] == 24 + 40 + 28
    checkpoint = HFCheckpoint(tmp_path)
    assert checkpoint.shape("a") == (3, 4) and checkpoint.dtype("a") == torch.bfloat16
    for name, tensor in tensors.items():
        assert torch.equal(checkpoint.read(name), tensor)
        assert torch.equal(load_file(tmp_path / index["weight_map"][name])[name], tensor)
    with pytest.raises(KeyError, match="no tensor named d"):
        checkpoint.read("d")


def test_single_file_and_the_plan_is_enforced(tmp_path):
    tensors = _tensors()
    writer = ShardedSafetensorsWriter(tmp_path, _plan(tensors), max_shard_bytes=10**6)
    writer.add_all(tensors.items())
    assert [p.name for p in writer.finish()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["c"], tensors["c"])
    writer = ShardedSafetensorsWriter(tmp_path / "x", _plan(tensors), max_shard_bytes=10)
    with pytest.raises(ValueError, match=r"expected a \(3, 4\) torch.bfloat16 next, got c"):
        writer.add("c", tensors["c"])
    with pytest.raises(ValueError, match="expected a .* got a \\(3, 4\\) torch.float32"):
        writer.add("a", tensors["a"].float())
    with pytest.raises(ValueError, match="3 planned tensors were not written"):
        writer.finish()
    with pytest.raises(ValueError, match="names a tensor twice"):
        ShardedSafetensorsWriter(tmp_path, _plan(tensors) * 2, 10)


def test_truncated_file_is_caught_from_its_header(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated \(expected \d+ bytes"):
        HFCheckpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated"):
        HFCheckpoint(tmp_path)


def test_missing_files_and_tensors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        HFCheckpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="found pytorch_model.bin; only safetensors"):
        HFCheckpoint(tmp_path)
    save_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")
    index = {"weight_map": {"a": "one.safetensors", "b": "one.safetensors",
                            "c": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="two.safetensors: listed in .* but missing"):
        HFCheckpoint(tmp_path)
    index["weight_map"].pop("c")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"one.safetensors: lacks \['b'\]"):
        HFCheckpoint(tmp_path)


def test_staged_output_refuses_existing_and_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with staged_output(out, overwrite=False) as staging:
        (staging / "x").write_text("1")
        assert not out.exists()
    assert (out / "x").read_text() == "1"
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        check_output(out, overwrite=False)
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(out, overwrite=True) as staging:
            (staging / "x").write_text("2")
            raise RuntimeError("boom")
    assert (out / "x").read_text() == "1"  # the old output survives a failed replacement
    with staged_output(out, overwrite=True) as staging:
        (staging / "y").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind
