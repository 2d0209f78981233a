"""megarl.ops on 2 and 4 gloo ranks against the float64 single-process reference.

Each rank takes its vocab shard of the same full logits; the test compares the per-token
outputs (which every rank must hold identically) and the concatenated shard gradients with
`tests.unit.test_ops_reference.reference`, with the tolerances stated in
tests/unit/test_ops_token_stats.py, and checks that every output and the gradient are
bit-identical to the single-shard run (spec 1.4 asks it of the nucleus; exact fixed-point sums
give it everywhere). All cases of one world size run in one harness call.

Shape legend: T tokens, V padded vocab.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from megarl.ops import vocab_parallel_token_stats
from tests.harness import run_distributed
from tests.unit.test_ops_reference import reference
from tests.unit.test_ops_token_stats import assert_matches, edge_rows

VOCAB = 96  # divisible by 1, 2 and 4 ranks; not by 128: per-element exact masses
WIDE = 4608  # 9 x 128 x 4: 128-id mass blocks and block-pruned candidates at every TP size
STATS = ("log_probs", "entropy", "nucleus_entropy")
OUTPUTS = STATS + ("nucleus_mass", "nucleus_size")


def _case(name, logits, targets, weights, **kwargs):
    return dict(name=name, logits=logits, targets=targets, weights=weights, kwargs=kwargs)


def _tie_rows(vocab=VOCAB):
    """Equal top values spread over every shard; p makes the nucleus end inside the tie."""
    rows = torch.full((3, vocab), -3.0)
    rows[0, ::11] = 2.0  # ids 0, 11, 22, ... : the tie crosses every shard boundary
    rows[1, 20:30] = 1.0  # a tie straddling the 2-rank boundary at 24 and 4-rank at 24/48
    rows[1, 70:74] = 1.0
    rows[2, ::2] = 0.5  # half the vocab tied
    return rows


def _llm_like_rows(rows, vocab, seed):
    """A low bulk, a head of a few boosted ids per row (300 on some rows: nuclei past the
    first candidate stage), and some flat rows (nuclei past every stage: exact search)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 2
    for r in range(rows):
        size = 300 if r % 5 == 2 else int(torch.randint(1, 40, (1,), generator=g))
        head = torch.randint(0, vocab, (size,), generator=g)
        logits[r, head] += 8 + 4 * torch.rand(head.shape[0], generator=g)
    logits[::5] = torch.randn(len(range(0, rows, 5)), vocab, generator=g) * 0.3
    return logits


def cases() -> list[dict]:
    g = torch.Generator().manual_seed(20)
    rand = torch.randn(5, 7, VOCAB, generator=g) * 3
    targets = torch.arange(35).reshape(5, 7) * 2 % 70  # every shard's ids, real vocab 70
    w = tuple(torch.randn(5, 7, generator=g) for _ in range(3))
    edge = torch.cat([edge_rows(VOCAB), _tie_rows()])
    edge_targets = torch.arange(edge.shape[0]) * 13 % VOCAB
    edge_w = tuple(torch.randn(edge.shape[0], generator=g) for _ in range(3))
    wide = _llm_like_rows(20, WIDE, seed=21)
    wide_targets = torch.arange(20) * 223 % 4500
    wide_w = tuple(torch.randn(20, generator=g) for _ in range(3))
    return [
        # real vocab 70: at TP=4 rank 2 is partly and rank 3 entirely padding
        _case("fp32_padded", rand, targets, w, real_vocab_size=70, temperature=0.8,
              nucleus_top_p=0.7, chunk_size=4),
        _case("bf16_exclusive", rand.bfloat16(), targets, w, real_vocab_size=70,
              nucleus_top_p=0.6, nucleus_rule="exclusive", chunk_size=3),
        _case("fallback_k3", rand, targets, (w[0], None, w[2]), real_vocab_size=70,
              nucleus_top_p=0.95, nucleus_top_k=3, chunk_size=8),
        _case("entropy_grad_only", rand, targets, (None, w[1], None), nucleus_top_p=0.5),
        _case("edge_inclusive_k2", edge, edge_targets, edge_w, nucleus_top_p=0.77,
              nucleus_top_k=2, chunk_size=2),
        _case("edge_exclusive", edge, edge_targets, edge_w, nucleus_top_p=0.77,
              nucleus_rule="exclusive", temperature=1.3),
        _case("edge_bf16_small_p", edge.bfloat16(), edge_targets, edge_w, nucleus_top_p=0.13,
              nucleus_rule="exclusive", nucleus_top_k=2),
        _case("empty", torch.zeros(0, VOCAB), torch.zeros(0, dtype=torch.long),
              (torch.zeros(0),) * 3, nucleus_top_p=0.9),
        _case("wide_fp32", wide, wide_targets, wide_w, real_vocab_size=4500,
              nucleus_top_p=0.8, chunk_size=5),
        _case("wide_bf16_exclusive", wide.bfloat16(), wide_targets, wide_w,
              real_vocab_size=4500, nucleus_top_p=0.9, nucleus_rule="exclusive", temperature=0.7,
              nucleus_top_k=300),
    ]


def run_case(case, rank, size, group):
    """Forward + backward of one case on this rank's shard: (outputs, shard gradient)."""
    v_loc = case["logits"].shape[-1] // size
    x = case["logits"][..., rank * v_loc:(rank + 1) * v_loc].clone().requires_grad_(True)
    before = x.detach().clone()
    stats = vocab_parallel_token_stats(x, case["targets"], tp_group=group, entropy=True,
                                       **case["kwargs"])
    terms = [(w * getattr(stats, n)).sum() for w, n in zip(case["weights"], STATS)
             if w is not None]
    sum(terms).backward()
    assert torch.equal(x.detach(), before), "input modified"
    return {n: getattr(stats, n).detach() for n in OUTPUTS}, x.grad


def _worker_all_cases(case_list, tp):
    """On every rank: run the cases in TP groups of `tp` consecutive ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    group = groups[rank // tp]
    return [run_case(c, rank % tp, tp, group) for c in case_list]


@contextlib.contextmanager
def count_collectives():
    """Count torch.distributed collectives by kind (all_reduce split by op)."""
    counts: dict[str, int] = {}
    names = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather",
             "broadcast", "reduce_scatter_tensor")
    real = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            key = name
            if name == "all_reduce":
                op = kwargs.get("op", args[1] if len(args) > 1 else dist.ReduceOp.SUM)
                key = f"all_reduce_{'max' if op == dist.ReduceOp.MAX else 'sum'}"
            counts[key] = counts.get(key, 0) + 1
            return fn(*args, **kwargs)
        return counted

    for name, fn in real.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def _worker_collective_counts():
    """Collectives of a fused log-prob + entropy call, forward and backward apart."""
    size = dist.get_world_size()
    v_loc, rank = VOCAB // size, dist.get_rank()
    logits = torch.randn(300, VOCAB, generator=torch.Generator().manual_seed(3))
    x = logits[:, rank * v_loc:(rank + 1) * v_loc].clone().requires_grad_(True)
    targets = torch.arange(300) % VOCAB
    with count_collectives() as fwd:
        stats = vocab_parallel_token_stats(x, targets, tp_group=dist.group.WORLD, entropy=True,
                                           chunk_size=16)
    with count_collectives() as bwd:
        (stats.log_probs.sum() + stats.entropy.sum()).backward()
    return fwd, bwd


def _check(case, per_rank):
    """All ranks agree; values and gradients match the reference; nucleus = single shard's."""
    outputs = [o for o, _ in per_rank]
    for other in outputs[1:]:
        for n in OUTPUTS:
            assert torch.equal(other[n], outputs[0][n]), f"{case['name']}: ranks differ on {n}"
    grad = torch.cat([g for _, g in per_rank], dim=-1)
    vocab = grad.shape[-1]
    kw = case["kwargs"]
    ref = reference(case["logits"].reshape(-1, vocab), case["targets"].reshape(-1),
                    temperature=kw.get("temperature", 1.0), real_vocab=kw.get("real_vocab_size"),
                    top_p=kw["nucleus_top_p"], rule=kw.get("nucleus_rule", "inclusive"),
                    weights=tuple(None if w is None else w.reshape(-1) for w in case["weights"]))
    stats = type("Stats", (), {n: outputs[0][n] for n in OUTPUTS})
    assert_matches(stats, grad, ref, case["logits"].dtype)
    # every sum is exact fixed point: the same bits as on one shard, gradients included
    single, single_grad = run_case(case, 0, 1, None)
    for n in OUTPUTS:
        assert torch.equal(single[n], outputs[0][n]), f"{case['name']}: {n} depends on TP"
    assert torch.equal(single_grad, grad), f"{case['name']}: gradient depends on TP"


@pytest.mark.parametrize("world, tp", [(2, 2), (4, 4), (4, 2)])
def test_matches_reference_and_single_shard(world, tp):
    case_list = cases()
    results = run_distributed(_worker_all_cases, world, args=(case_list, tp), timeout=240)
    for i, case in enumerate(case_list):
        for first in range(0, world, tp):  # every TP group gets the same answer
            _check(case, [results[r][i] for r in range(first, first + tp)])


@pytest.mark.parametrize("world", [2, 4])
def test_log_prob_and_entropy_use_one_max_and_one_sum_and_no_backward_communication(world):
    for fwd, bwd in run_distributed(_worker_collective_counts, world, timeout=120):
        assert fwd == {"all_reduce_max": 1, "all_reduce_sum": 1}
        assert bwd == {}


def _worker_strided_collectives():
    from megarl.ops.shard import VocabShard

    shard = VocabShard.of(4, dist.group.WORLD, None)
    rank = dist.get_rank()
    base = torch.arange(12, dtype=torch.int64).reshape(3, 4) * (rank + 1)
    view = base[:, :3]  # strided: rows are 4 apart
    shard.all_reduce_sum(view)
    low = (torch.arange(6.0).reshape(2, 3) + rank).t()
    shard.all_reduce_min(low)
    return base, low


def test_collectives_accept_strided_views():
    full = torch.arange(12).reshape(3, 4)
    for rank, (base, low) in enumerate(run_distributed(_worker_strided_collectives, 2, timeout=60)):
        assert torch.equal(base[:, :3], full[:, :3] * 3)  # 1x + 2x
        assert torch.equal(base[:, 3], full[:, 3] * (rank + 1))  # outside the view: untouched
        assert torch.equal(low, torch.arange(6.0).reshape(2, 3).t())
