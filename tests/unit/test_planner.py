"""`megarl plan`: memory figures against hand calculations, layout suggestions, the CLI."""

from __future__ import annotations

import json

import pytest

from megarl.cli import main
from megarl.config import ConfigError, from_dict
from megarl.parallel import memory
from megarl.parallel.memory import (
    GIB, Layout, PlanError, TrainSettings, builtin_shape, estimate_memory, estimate_rollout,
    stage_parameters,
)
from megarl.parallel.planner import (
    candidate_layouts, fitting_layout, plan_for_config, print_plan, suggest,
)

QWEN7B = builtin_shape("qwen2.5-math-7b")
QWEN32B = builtin_shape("qwen2.5-32b")
# Qwen2.5-Math-7B: hidden 3584, MLP 18944, 28 layers, 28 heads and 4 KV heads of 128, q/k/v
# bias, vocab 152064 (a multiple of 128 x 4 already), untied embeddings.
Q, KV = 28 * 128, 4 * 128
SPLIT_7B = 3584 * (Q + 2 * KV) + Q * 3584 + 3 * 3584 * 18944 + (Q + 2 * KV)


def _items(memory):
    return {item.name.split(" (")[0]: item.bytes for item in memory.items}


@pytest.mark.parametrize("name, published", [
    ("qwen2.5-math-7b", 7.62e9), ("qwen2.5-32b", 32.76e9), ("qwen3-32b", 32.76e9),
    ("llama-3.1-8b", 8.03e9), ("qwen3-8b", 8.19e9), ("qwen3-4b", 4.02e9)])
def test_builtin_shapes_have_their_published_sizes(name, published):
    assert abs(builtin_shape(name).num_parameters - published) / published < 0.005


def test_7b_at_tp4_dp2_matches_the_hand_calculation():
    layout = Layout(tp=4, pp=1, dp=2, sequence_parallel=True)
    params = 28 * (SPLIT_7B // 4 + 2 * 3584) + 2 * (152064 * 3584 // 4) + 3584
    assert stage_parameters(QWEN7B, layout) == {"only": params} and params == 1_904_057_344

    memory = estimate_memory(QWEN7B, layout, TrainSettings())
    items = _items(memory)
    assert items["weights"] == 2 * params
    assert items["gradient buffer"] == 4 * params            # fp32 grad buffer, not sharded
    assert items["optimizer state"] == 12 * params / 2       # fp32 main + m + v over DP = 2
    # Per token and layer: 4h / TP (sequence parallel) + (q + 2kv + q + 2f + f) / TP, in bf16.
    per_token_layer = 2 * (4 * 3584 / 4 + (Q + 2 * KV + Q + 3 * 18944) / 4)
    assert per_token_layer == 39_680
    assert items["activations"] == 28 * 16384 * per_token_layer
    assert items["logits + grad"] == 2 * 16384 * (152064 // 4) * 2
    assert items["logits chunk"] == 1.125 * 4096 * (152064 // 4) * 4
    assert items["runtime reserve"] == 2 * GIB
    total = params * (2 + 4 + 6) + 28 * 16384 * 39_680 + 2 * 16384 * 38016 * 2 \
        + 1.125 * 4096 * 38016 * 4 + 2 * GIB
    assert memory.total == pytest.approx(total)
    assert memory.total / GIB == pytest.approx(43.21, abs=0.01)


def test_full_recomputation_keeps_layer_inputs_and_one_layer():
    layout = Layout(tp=2, pp=1, dp=2, sequence_parallel=True)
    s = TrainSettings(recompute="full")
    per_layer = 2 * (4 * 3584 / 2 + (2 * Q + 2 * KV + 3 * 18944) / 2) * 16384
    inputs = 28 * 16384 * (3584 / 2) * 2
    assert _items(estimate_memory(QWEN7B, layout, s))["activations"] == inputs + per_layer
    # Selective recomputation targets the attention scores, which flash attention never keeps.
    none = estimate_memory(QWEN7B, layout, TrainSettings()).total
    assert estimate_memory(QWEN7B, layout, TrainSettings(recompute="selective")).total == none


def test_pipeline_stages_and_interleaving():
    layout = Layout(tp=8, pp=2, dp=1, sequence_parallel=True)
    layer = (5120 * (5120 + 2 * 1024) + 5120 * 5120 + 3 * 5120 * 27648 + 5120 + 2048) // 8 \
        + 2 * 5120
    emb = 152576 * 5120 // 8  # 152064 padded to a multiple of 128 x 8
    assert stage_parameters(QWEN32B, layout) == {"first": 32 * layer + emb,
                                                  "last": 32 * layer + emb + 5120}
    per_layer = 2 * (4 * 5120 + 2 * 5120 + 2 * 1024 + 3 * 27648) / 8 * 16384
    first = memory.activation_bytes(QWEN32B, layout, TrainSettings(), first_stage=True)[0]
    last = memory.activation_bytes(QWEN32B, layout, TrainSettings(), first_stage=False)[0]
    assert first == 64 * per_layer   # 1F1B: PP = 2 micro-batches of 32 layers
    assert last == 32 * per_layer
    interleaved = Layout(tp=8, pp=2, vpp=2, dp=1, sequence_parallel=True)
    assert memory.activation_bytes(QWEN32B, interleaved, TrainSettings(), True)[0] \
        == 64 * (1 + 1 / 4) * per_layer
    estimate = estimate_memory(QWEN32B, layout, TrainSettings())
    assert estimate.stage == "first"   # 64 layers of activations outweigh the logits


@pytest.mark.parametrize("settings, per_param", [
    (TrainSettings(), 2 + 4 + 12 / 4),                                # bf16, fp32 grads
    (TrainSettings(grad_reduce_in_fp32=False), 2 + 2 + 16 / 4),      # + fp32 main grads
    (TrainSettings(dtype="float32"), 4 + 4 + 8 / 4),                  # no main copy
    (TrainSettings(distributed_optimizer=False), 2 + 4 + 12),
])
def test_optimizer_bytes_per_parameter_follow_megatron(settings, per_param):
    layout = Layout(tp=4, pp=1, dp=4, sequence_parallel=True)
    memory = estimate_memory(QWEN7B, layout, settings)
    assert memory.resident == pytest.approx(per_param * memory.params_per_rank)


def test_reference_policy_lives_in_host_memory():
    layout = Layout(tp=2, pp=1, dp=2)
    memory = estimate_memory(QWEN7B, layout, TrainSettings(kl_coef=0.01))
    assert memory.host_bytes_per_rank == 2 * 2 * memory.params_per_rank  # reference + backup
    assert estimate_memory(QWEN7B, layout, TrainSettings()).host_bytes_per_rank == 0


def test_rollout_server_kv_capacity():
    r = estimate_rollout(QWEN7B, mode="disaggregated", num_servers=4, server_tp=1,
                         gpu_memory_gib=80, mem_fraction=0.8, sequence_tokens=4096, where="x")
    weights = 2 * QWEN7B.num_parameters
    kv_per_token = 2 * 28 * 4 * 128 * 2          # K and V, layers, KV heads, head dim, bf16
    assert r.kv_tokens_per_server == (0.8 * 80 * GIB - weights) // kv_per_token
    assert r.fits and r.gpus == 4


def test_candidate_layouts_follow_the_divisibility_rules():
    tps = {lay.tp for lay in candidate_layouts(QWEN7B, 16)}
    assert tps == {1, 2, 4}                      # 4 KV heads: TP 8 cannot split them
    for lay in candidate_layouts(QWEN32B, 32):
        assert 64 % lay.pp == 0 and lay.world_size == 32 and lay.sequence_parallel == (lay.tp > 1)


def test_32b_needs_model_parallelism_and_more_than_eight_80gb_gpus():
    limit = 0.9 * 80 * GIB
    # Without model parallelism the weights, grads and DP-sharded Adam state alone are too big.
    assert 32.76e9 * (2 + 4 + 12 / 16) > limit
    layout, _ = fitting_layout(QWEN32B, 16, TrainSettings(), limit_bytes=limit)
    assert (layout.tp, layout.pp, layout.dp) == (8, 1, 2)
    # Eight GPUs hold 32.76e9 / 8 parameters each: 18 bytes of state apiece is 68.7 GiB.
    assert fitting_layout(QWEN32B, 8, TrainSettings(), limit_bytes=limit) is None


def test_7b_on_one_node_matches_the_example_launcher():
    plan = suggest("qwen2.5-math-7b", QWEN7B, 8, TrainSettings())
    assert (plan.layout.tp, plan.layout.pp, plan.layout.dp) == (2, 1, 2)
    assert plan.settings.recompute == "full" and plan.fits
    assert (plan.rollout.num_servers, plan.rollout.server_tp) == (4, 1)


def test_too_few_gpus_is_a_clear_error():
    with pytest.raises(PlanError, match="does not fit on 4 trainer GPU.*needs at least 16"):
        suggest("qwen2.5-32b", QWEN32B, 8, TrainSettings())
    with pytest.raises(PlanError, match="disaggregated mode needs more GPUs"):
        suggest("qwen2.5-32b", QWEN32B, 1, TrainSettings())


def _config(**parallel):
    return from_dict({"model": {"hf_dir": "/nonexistent/Qwen2.5-Math-7B",
                                "recompute_granularity": "full"},
                      "parallel": {"tp": 2, "sequence_parallel": True, **parallel},
                      "rollout": {"num_servers": 4, "base_gpu_id": 4}})


def test_print_plan_of_a_config(capsys):
    plan = print_plan(_config(), 4, shape=QWEN7B, model="qwen2.5-math-7b", gpu_memory_gib=80)
    out = capsys.readouterr().out
    assert "layout:  4 trainer GPUs = TP 2 x PP 1 x CP 1 x DP 2" in out
    assert "activations (full recompute)" in out and "total" in out
    assert "4 SGLang server(s) x TP 1 = 4 GPUs (GPUs 4-7" in out
    assert plan.fits and not plan.problems
    with pytest.raises(ConfigError, match="parallel.tp: 8 does not divide the 28"):
        plan_for_config(_config(tp=8), 8, shape=QWEN7B, gpu_memory_gib=80)


def test_servers_on_trainer_gpus_or_splitting_heads_unevenly_are_problems():
    cfg = from_dict({"model": {"hf_dir": "/x"}, "rollout": {"num_servers": 4}})
    plan = plan_for_config(cfg, 4, shape=QWEN7B, gpu_memory_gib=80)
    assert not plan.fits and "rollout.base_gpu_id=0" in plan.problems[0]
    cfg = from_dict({"model": {"hf_dir": "/x"}, "rollout": {"server_urls": ["http://a:1"],
                                                          "server_tp": 8}})
    plan = plan_for_config(cfg, 4, shape=QWEN7B, gpu_memory_gib=80)
    assert plan.problems == ["rollout.server_tp=8 does not divide the model's 28 attention heads"]


def test_cli_suggests_and_writes_json(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert main(["plan", "--model", "qwen2.5-math-7b", "--gpus", "8", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["layout"]["tp"] == 2 and data["fits"]
    items = {item["name"]: item["bytes"] for item in data["trainer_memory"]["items"]}
    assert items["optimizer state"] == 12 * data["trainer_memory"]["params_per_rank"] / 2
    assert "memory per trainer GPU" in capsys.readouterr().out


def test_cli_config_mode(tmp_path, capsys):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("model:\n  hf_dir: /nonexistent/m\nparallel:\n  tp: 2\n"
                    "rollout:\n  num_servers: 4\n  base_gpu_id: 4\n")
    args = ["plan", "--config", str(yaml), "--world-size", "4", "--gpu-memory-gb", "80"]
    assert main(args + ["--model", "qwen2.5-math-7b", "model.recompute_granularity=full"]) == 0
    assert "DP 2" in capsys.readouterr().out
    assert main(args + ["--model", "qwen2.5-math-7b"]) == 1        # no recompute: too big
    assert "parallel.sequence_parallel=true" in capsys.readouterr().out
    assert main(args) == 2                                         # no checkpoint, no --model
    assert "model.hf_dir: /nonexistent/m has no config.json" in capsys.readouterr().err
    assert main(args + ["--model", "qwen2.5-math-7b", "--micro-batch-tokens", "8"]) == 2
    assert "set algorithm.micro_batch_tokens" in capsys.readouterr().err
    assert main(args + ["--model", "qwen2.5-math-7b", "parallel.tpp=2"]) == 2
    assert "parallel.tpp: command line: unknown key" in capsys.readouterr().err
    assert main(args + ["--model", "qwen2.5-math-7b", "--margin", "1.5"]) == 2
    assert "--margin 1.5 is out of range: must be in [0, 1)" in capsys.readouterr().err


def test_cli_reads_an_hf_config_file(tmp_path, capsys):
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(dict(
        model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=300,
        max_position_embeddings=4096)))
    assert main(["plan", "--hf-config", str(path), "--gpus", "2", "--gpu-memory-gb", "4"]) == 0
    assert "model:   tiny (qwen3" in capsys.readouterr().out
    assert main(["plan", "--hf-config", str(tmp_path / "none.json"), "--gpus", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err
