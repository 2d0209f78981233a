"""Megatron-core on CPU: a tiny GPT built through megarl trains identically in every layout.

The reference runs in one process. Every parallel layout starts from the reference's initial
weights (sharded with megarl.checkpoint.megatron_layout), trains 2 optimizer steps with
Megatron's schedules and optimizer (the distributed optimizer where DP > 1), and must reproduce
the reference's losses and updated parameters (gathered) within 1e-5 in float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megarl.actor.optimizer import build_optimizer
from megarl.checkpoint import megatron_layout as layout
from megarl.config import ModelConfig, OptimizerConfig, ParallelConfig
from megarl.models.builder import build_model_chunks, wrap_ddp
from megarl.models.shape import ModelShape
from megarl.parallel import init_distributed
from tests.harness import run_distributed

SEQ, GLOBAL_BATCH, MICRO_BATCH = 16, 8, 2
TOL = 1e-5


def _shape(tied: bool) -> ModelShape:
    # Grouped-query attention with 2 groups, SwiGLU, RMSNorm, RoPE; vocab 200 needs padding.
    return ModelShape(
        family="custom", num_layers=4, hidden_size=64, ffn_hidden_size=96,
        num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=200,
        max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=tied,
    )


def _batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 200, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(2)]


def _train(tp, pp, vpp, tied, init_state):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    shape = _shape(tied)
    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    model_cfg = ModelConfig(hf_dir="unused", dtype="float32")
    ctx = init_distributed(parallel, shape, seed=1)
    optim = OptimizerConfig(lr=1e-4, clip_grad=1.0, weight_decay=0.1,
                            use_distributed_optimizer=ctx.dp > 1)
    chunks = build_model_chunks(shape, model_cfg, parallel, ctx)
    if init_state is None:
        initial = _full_state(chunks, ctx, tied)
    else:
        _load_full_state(chunks, init_state, ctx)
        initial = None
    model = wrap_ddp(chunks, optim, model_cfg)
    for chunk in model:
        chunk.config.finalize_model_grads_func = finalize_model_grads
    optimizer, scheduler = build_optimizer(model, optim, model_cfg, total_steps=2)

    losses = []
    for tokens in _batches():
        rows = tokens.chunk(ctx.dp)[ctx.dp_rank]
        micro = list(rows.split(MICRO_BATCH))
        iterators = [iter(micro) for _ in model] if vpp else iter(micro)
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iterators,
            model=model if vpp else model[0], num_microbatches=len(micro), seq_length=SEQ,
            micro_batch_size=MICRO_BATCH, forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step failed"
        scheduler.step(1)
        local = torch.tensor([sum(float(o["loss_sum"]) for o in outputs)], dtype=torch.float64)
        dist.all_reduce(local, group=ctx.dp_group)
        losses.append((float(local), float(grad_norm)))
    final = _full_state(model, ctx, tied)
    return {"initial": initial, "final": final, "losses": losses if ctx.is_last_stage else None}


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    labels = torch.roll(tokens, -1, dims=1)
    output = model(tokens, positions, None, labels=labels)

    def loss_func(per_token_loss):
        # Normalised over the whole global batch, as megarl's losses are; Megatron's
        # per-token mode with a zero count then leaves the sum alone.
        loss = per_token_loss.float().sum() / (GLOBAL_BATCH * SEQ)
        return loss, torch.zeros((), dtype=torch.int), {"loss_sum": loss.detach()}

    return output, loss_func


def _full_state(chunks, ctx, tied):
    """Full (TP-gathered) tensors by global name, from the TP rank 0 of each stage."""
    state = {}
    for chunk in chunks:
        offset = layout.layer_offset(chunk)
        inner = chunk.module if hasattr(chunk, "module") else chunk
        for name, param in inner.named_parameters():
            if tied and name == "output_layer.weight":
                continue  # a copy of the word embeddings kept on the last stage
            shards = [torch.empty_like(param.data) for _ in range(ctx.tp)]
            dist.all_gather(shards, param.data.contiguous(), group=ctx.tp_group)
            if ctx.tp_rank == 0 and ctx.dp_rank == 0:
                state[layout.renumber(name, offset)] = layout.gather(name, shards).clone()
    return state


def _load_full_state(chunks, full, ctx):
    for chunk in chunks:
        offset = layout.layer_offset(chunk)
        for name, param in chunk.named_parameters():
            key = layout.renumber(name, offset)
            if key not in full and name == "output_layer.weight":
                key = "embedding.word_embeddings.weight"
            param.data.copy_(layout.shard(name, full[key], ctx.tp_rank, ctx.tp))


def _merge(results):
    merged = {}
    for r in results:
        merged.update(r["final"])
    losses = next(r["losses"] for r in results if r["losses"] is not None)
    return merged, losses


LAYOUTS = [
    # (tp, pp, vpp, world_size)
    (2, 1, None, 2),
    (1, 2, None, 2),
    (2, 2, None, 4),
    (1, 1, None, 2),  # DP = 2 with the distributed optimizer
    (1, 2, 2, 2),     # interleaved pipeline
]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_parallel_layouts_match_one_process(tied):
    [reference] = run_distributed(_train, 1, args=(1, 1, None, tied, None))
    initial, ref_final, ref_losses = reference["initial"], *_merge([reference])
    assert len(initial) == len(ref_final) > 10
    assert all(torch.isfinite(torch.tensor(l)).all() for l in ref_losses)
    moved = max((ref_final[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-5, "the optimizer did not change the weights"

    layouts = LAYOUTS if not tied else [(1, 2, None, 2), (2, 2, None, 4)]
    for tp, pp, vpp, world in layouts:
        final, losses = _merge(run_distributed(_train, world, args=(tp, pp, vpp, tied, initial)))
        where = f"tp={tp} pp={pp} vpp={vpp} dp={world // (tp * pp)}"
        assert sorted(final) == sorted(ref_final), where
        for (loss, norm), (ref_loss, ref_norm) in zip(losses, ref_losses):
            assert abs(loss - ref_loss) < TOL, f"{where}: loss {loss} != {ref_loss}"
            assert abs(norm - ref_norm) < TOL * max(1.0, ref_norm), f"{where}: grad norm"
        for name, tensor in ref_final.items():
            diff = (final[name] - tensor).abs().max().item()
            assert diff < TOL, f"{where}: {name} differs by {diff}"
