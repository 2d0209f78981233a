"""The Megatron actor on CPU: log-probs equal the Hugging Face model's, and a train step gives
the same weights and metrics in every parallel layout and micro-batch size.

A tiny Qwen2 checkpoint (GQA, QKV bias, padded vocabulary) is loaded into the actor at each
layout; the reference for the log-probs is transformers' own forward in float64.
"""

from __future__ import annotations

import random

import pytest
import torch

from megarl.actor.actor import MegatronActor
from megarl.actor.experience import Sample
from megarl.checkpoint.export import export_hf_weights
from megarl.checkpoint.model_io import load_hf_into_model
from megarl.config import from_dict
from megarl.losses import build_loss
from megarl.models.hf import shape_from_hf_dir
from megarl.models.tiny import save_random_hf_checkpoint, tiny_config
from megarl.parallel import init_distributed
from megarl.trainer.advantages import compute_advantages
from tests.harness import run_distributed

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    save_random_hf_checkpoint(tiny_config("qwen2", num_hidden_layers=4), path, seed=3)
    return str(path)


def _samples(num_prompts=4, per_prompt=4, seed=0, nan_advantage=False):
    rng = random.Random(seed)
    samples = []
    for g in range(num_prompts):
        prompt = [rng.randrange(1, 300) for _ in range(rng.randint(3, 6))]
        for _ in range(per_prompt):
            response = [rng.randrange(1, 300) for _ in range(rng.randint(2, 9))]
            samples.append(Sample(prompt_ids=prompt, response_ids=response, group=g,
                                  reward=float(rng.random() < 0.5)))
    rewards = torch.tensor([s.reward for s in samples])
    groups = torch.tensor([s.group for s in samples])
    for s, a in zip(samples, compute_advantages(rewards, groups, "grpo").tolist()):
        s.advantage = a
    if nan_advantage:
        samples[1].advantage = float("nan")
    return samples


def _config(hf_dir, tp, pp, dp, *, budget=10_000, intervention="siren", kl_coef=0.0, vpp=None):
    return from_dict({
        "model": {"hf_dir": hf_dir, "dtype": "float32", "make_vocab_size_divisible_by": 32},
        "parallel": {"tp": tp, "pp": pp, "vpp": vpp},
        # Adam scales each element's update to about lr however small its gradient is, so
        # rounding-level gradient differences between layouts become update differences of
        # order lr; a small lr keeps the comparison about the computation, not that noise.
        "optimizer": {"lr": 1e-4, "use_distributed_optimizer": dp > 1},
        "rollout": {"samples_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 16},
        "algorithm": {"prompts_per_mini_batch": 2, "micro_batch_tokens": budget,
                      "kl_coef": kl_coef},
        "entropy": {"intervention": intervention, "siren_top_p": 0.9},
        "trainer": {"seed": 5},
    })


def _actor(hf_dir, tp, pp, dp, **kwargs):
    cfg = _config(hf_dir, tp, pp, dp, **kwargs)
    shape, _ = shape_from_hf_dir(hf_dir)
    ctx = init_distributed(cfg.parallel, shape, seed=cfg.trainer.seed)
    objective = build_loss(cfg.algorithm, cfg.entropy, cfg.rollout, seed=cfg.trainer.seed)
    actor = MegatronActor(cfg, shape, ctx, objective, pad_id=0, total_optimizer_steps=4)
    load_hf_into_model(actor.model, hf_dir, ctx, shape)
    return actor, shape, ctx


def _log_probs(hf_dir, tp, pp):
    actor, _, ctx = _actor(hf_dir, tp, pp, 1, budget=40)   # several padded micro-batches
    samples = _samples()
    plan = actor.plan(samples, iteration=0)
    assert len([m for mini in plan.mini_batches for m in mini]) > 2
    actor.compute_log_probs(plan)
    if not ctx.is_last_stage:
        return None
    return [s.old_log_probs for s in samples]


def _train(hf_dir, tp, pp, dp, budget, kl_coef, nan_advantage=False, vpp=None):
    actor, shape, ctx = _actor(hf_dir, tp, pp, dp, budget=budget, kl_coef=kl_coef, vpp=vpp)
    if kl_coef > 0:
        actor.snapshot_reference()
    samples = _samples(nan_advantage=nan_advantage)
    plan = actor.plan(samples, iteration=0)
    actor.compute_log_probs(plan)
    if kl_coef > 0:
        actor.compute_log_probs(plan, reference=True)
    history = actor.train(plan)
    weights = {name: t.clone() for name, t in export_hf_weights(actor.model, shape, ctx)}
    ref_equal_old = None
    if kl_coef > 0 and ctx.is_last_stage:
        ref_equal_old = all(torch.allclose(s.ref_log_probs, s.old_log_probs, atol=1e-6)
                            for s in plan.samples)
    return {"history": history, "weights": weights or None, "skipped": actor.num_skipped_steps,
            "ref_equal_old": ref_equal_old}


def _hf_log_probs(hf_dir, samples):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            start = len(s.prompt_ids) - 1
            targets = torch.tensor(s.response_ids)
            out.append(logp[start:start + len(targets)].gather(1, targets[:, None])[:, 0])
    return out


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_log_probs_match_transformers(hf_dir, tp, pp):
    results = run_distributed(_log_probs, tp * pp, args=(hf_dir, tp, pp))
    ours = next(r for r in results if r is not None)
    expected = _hf_log_probs(hf_dir, _samples())
    for got, want in zip(ours, expected):
        assert got.shape == want.shape
        assert (got.double() - want).abs().max() < 1e-4, f"tp={tp} pp={pp}"


def test_train_step_is_the_same_in_every_layout(hf_dir):
    [ref] = run_distributed(_train, 1, args=(hf_dir, 1, 1, 1, 10_000, 0.02))
    assert ref["ref_equal_old"], "the reference policy must equal the behaviour policy at step 0"
    assert len(ref["history"]) == 2 and all(h["optim/step_applied"] == 1.0 for h in ref["history"])
    for key in ("loss/total", "entropy/mean", "entropy/nucleus_mean", "siren/selected_entropy",
                "kl/ref"):
        assert key in ref["history"][0], key
    from safetensors.torch import load_file
    initial = load_file(f"{hf_dir}/model.safetensors")
    moved = max((ref["weights"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 5e-5, "training did not change the weights"
    layouts = [(2, 1, 1, 10_000), (1, 2, 1, 40), (1, 1, 2, 10_000), (2, 1, 2, 40),
               (2, 2, 1, 40)]
    # The interleaved pipeline (PP2 x VPP2) needs a multiple of PP micro-batches of one shape.
    layouts = [(tp, pp, dp, budget, None) for tp, pp, dp, budget in layouts] + [(1, 2, 1, 40, 2)]
    for tp, pp, dp, budget, vpp in layouts:
        results = run_distributed(_train, tp * pp * dp,
                                  args=(hf_dir, tp, pp, dp, budget, 0.02, False, vpp))
        where = f"tp={tp} pp={pp} vpp={vpp} dp={dp} budget={budget}"
        weights = results[0]["weights"]
        assert sorted(weights) == sorted(ref["weights"]), where
        for name, tensor in ref["weights"].items():
            diff = (weights[name] - tensor).abs().max().item()
            assert diff < TOL, f"{where}: {name} differs by {diff}"
        for got, want in zip(results[0]["history"], ref["history"]):
            for key in ("loss/total", "entropy/mean", "optim/grad_norm"):
                assert abs(got[key] - want[key]) < TOL * max(1.0, abs(want[key])), (where, key)


def test_non_finite_gradient_skips_the_step_everywhere(hf_dir):
    results = run_distributed(_train, 2, args=(hf_dir, 2, 1, 1, 10_000, 0.0, True))
    for r in results:
        assert r["skipped"] >= 1
    assert results[0]["history"][0]["optim/step_applied"] == 0.0
