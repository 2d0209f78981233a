"""Bad input to the converters: a clear error naming the file or key, before any tensor is
converted, and nothing left in the output's folder."""

from __future__ import annotations

import json
import os

import pytest

from megarl.checkpoint.convert import hf_to_megatron, main_hf_to_megatron, megatron_to_hf, run_tool
from megarl.config import ConfigError
from megarl.models.tiny import save_random_hf_checkpoint, tiny_config


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / "hf"
    save_random_hf_checkpoint(tiny_config("qwen2", num_hidden_layers=2), path)
    return path


def _edit_config(hf_dir, **changes):
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


def _fails(hf_dir, error, match, **kwargs):
    out = hf_dir.parent / "out"
    before = sorted(os.listdir(hf_dir.parent))
    with pytest.raises(error, match=match):
        hf_to_megatron(hf_dir, out, progress="off", **kwargs)
    assert sorted(os.listdir(hf_dir.parent)) == before, "the failed conversion left files"


def test_missing_safetensors(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    _fails(hf_dir, FileNotFoundError, "neither model.safetensors nor model.safetensors.index")


def test_truncated_safetensors(hf_dir):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    _fails(hf_dir, ValueError, r"model.safetensors: truncated \(expected")


def test_config_that_does_not_match_the_weights(hf_dir):
    _edit_config(hf_dir, num_hidden_layers=1)
    _fails(hf_dir, ValueError, r"weights do not match the config \(qwen2, 1 layers(.|\n)*"
           r"unexpected \(\d+\): model.layers.1")
    _edit_config(hf_dir, num_hidden_layers=2, intermediate_size=128)
    _fails(hf_dir, ValueError, r"wrong shape \(6\): model.layers.0.mlp.gate_proj.weight \(96, 64\)"
           r" \(config implies \(128, 64\)\)")


def test_unsupported_architectures(hf_dir):
    _edit_config(hf_dir, model_type="mistral")
    _fails(hf_dir, ValueError, "model_type 'mistral' is not supported; megarl converts llama, "
           "qwen2, qwen3")
    _edit_config(hf_dir, model_type="qwen2", use_sliding_window=True)
    _fails(hf_dir, ValueError, "use_sliding_window=True cannot be represented")


def test_impossible_layout(hf_dir):
    _fails(hf_dir, ConfigError, "parallel.tp: 4 does not divide the 2 key/value heads", tp=4)
    _fails(hf_dir, ConfigError, "parallel.pp: .*2 layers cannot be split evenly over pp = 4", pp=4)


def test_existing_output_is_refused_unless_overwrite(hf_dir, capsys):
    out = hf_dir.parent / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match="out already exists; pass --overwrite"):
        hf_to_megatron(hf_dir, out, progress="off")
    argv = ["--hf-dir", str(hf_dir), "--output-dir", str(out)]
    assert run_tool(lambda: main_hf_to_megatron(argv)) == 1
    assert capsys.readouterr().err.startswith(f"error: {out} already exists")
    with pytest.raises(FileExistsError, match="already exists"):
        megatron_to_hf(hf_dir, out, hf_dir, progress="off")
    assert (out / "keep").read_text() == "mine"


def test_megatron_to_hf_needs_a_megatron_checkpoint(hf_dir):
    with pytest.raises(FileNotFoundError, match="not a Megatron torch_dist checkpoint"):
        megatron_to_hf(hf_dir, hf_dir.parent / "back", hf_dir, progress="off")
    assert not (hf_dir.parent / "back").exists()


def test_verify_conversion_exits_non_zero_past_tolerance(hf_dir, monkeypatch, capsys):
    import torch

    from megarl.checkpoint import verify
    from megarl.cli import build_parser

    reference = [torch.zeros(5, 300), torch.zeros(3, 300)]
    for logits in reference:
        logits[:, 7] = 1.0
    monkeypatch.setattr(verify, "hf_logits", lambda *a: reference)
    ours = [r.clone() for r in reference]
    monkeypatch.setattr(verify, "run_megatron", lambda *a: ours)
    argv = ["verify-conversion", "--hf-dir", str(hf_dir), "--megatron-dir", str(hf_dir)]
    args = build_parser(load=["verify-conversion"]).parse_args(argv + ["--atol", "1e-4"])
    assert verify.run(args) == 0 and capsys.readouterr().out.rstrip().endswith("OK")
    ours[1][2, 7] = 0.5  # one token's logit off by 0.5 (top-1 still agrees)
    assert verify.run(args) == 1
    out = capsys.readouterr().out
    assert "max |logit difference|: 5.000e-01 (tolerance 0.0001)" in out and "FAILED" in out
    ours[1][2, 9] = 2.0  # and now top-1 disagrees on 1 of 8 tokens
    args = build_parser(load=["verify-conversion"]).parse_args(argv + ["--atol", "10"])
    assert verify.run(args) == 1
    assert "top-1 agreement: 87.50% (7/8; required 99%)" in capsys.readouterr().out


def test_verify_conversion_names_inputs_it_cannot_compare(hf_dir, tmp_path, capsys):
    from megarl.checkpoint import verify
    from megarl.cli import build_parser

    (hf_dir.parent / "empty").mkdir()
    argv = ["verify-conversion", "--hf-dir", str(hf_dir.parent / "empty"), "--megatron-dir", "x"]
    args = build_parser(load=["verify-conversion"]).parse_args(argv)
    assert verify.run(args) == 2
    assert "no config.json" in capsys.readouterr().err
