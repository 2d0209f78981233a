"""Per-GPU memory of a megarl run and a parallel layout for it, before any GPU is touched.

    megarl plan --model qwen2.5-32b --gpus 32                 # suggest a layout
    megarl plan --hf-dir /ckpt/Qwen3-32B --gpus 16 --json plan.json
    megarl plan --config run.yaml --world-size 16 --model qwen2.5-32b [section.key=value ...]
    megarl plan --list-models

`print_plan(cfg, world_size)` prints the same for a full configuration (`megarl train
--dry-run`). Built-in shapes, from the published config.json of each checkpoint (no download):
qwen2.5-math-7b, qwen2.5-32b, qwen3-4b, qwen3-8b, qwen3-32b, llama-3.1-8b.

Memory of one trainer GPU, P = parameters held by the rank (its pipeline stage's layers split
over TP, plus the embedding on the first stage and the output layer on the last):
* weights: 2 B x P (bf16; 4 B for float32);
* gradients: Megatron's contiguous grad buffer, 4 B x P with grad_reduce_in_fp32 or a float32
  model, else 2 B x P; never sharded;
* optimizer (Adam): fp32 main params + two moments, 12 B x P (8 B for a float32 model, which
  needs no main copy; 16 B with bf16 grads, which need an fp32 main-grad copy), divided by
  DP x CP with the distributed optimizer. This reproduces the table of Megatron-core's
  distributed-optimizer guide: 6 + 12/d bytes per parameter for bf16 params and fp32 grads.
* activations, per token of a micro-batch (T = algorithm.micro_batch_tokens / CP) and layer,
  in the model dtype: the residual input and the norm output before attention and before the
  MLP (4h, divided by TP with sequence parallelism), q/k/v fed to flash attention (q + 2kv),
  the attention output (q), the SwiGLU input (2f) and output (f), all divided by TP; Qwen3 adds
  q and k before their norms (q + kv). Flash attention never stores the score matrix, so
  selective recomputation (which targets it) is counted as none. Full recomputation keeps only
  each recomputed chunk's input (h, /TP with SP) plus one chunk's full activations while it
  is recomputed. Under the 1F1B schedule the first stage holds PP micro-batches of its L/PP
  layers, i.e. L layers' worth; interleaving (vpp) multiplies that by 1 + (PP-1)/(PP x vpp)
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models").
* logits (last stage): the bf16 logits of the micro-batch and their gradient, 2 x T x V/TP x
  2 B, plus the float32 chunk buffer of the vocab-parallel ops, 1.125 x chunk x V/TP x 4 B
  (one [chunk, V/TP] buffer plus an eighth for a sub-block, see megarl.ops.token_stats);
* a fixed 2 GiB for the CUDA context, NCCL buffers and library workspaces.
The layout fits when the total is at most (1 - margin) of the GPU memory (margin 0.1 by
default, for allocator fragmentation). With kl_coef > 0 the reference policy lives in host
memory: the rank's weights twice (the reference and the swap backup, MegatronActor).

An SGLang server of TP = t holds 2 B x N / t of weights per GPU; its KV cache gets
mem_fraction_static x GPU memory minus that, at 2 (K, V) x L x max(kv heads / t, 1) x
head_dim x 2 B per token and GPU. GPU memory is in GiB (an "80GB" H100 has about 79.6 GiB;
the margin covers the difference).

Suggestions: the servers get the smallest TP whose weights fill at most half of the static
pool, and (disaggregated) half of the nodes, or half of the GPUs of a single node; the trainer
gets the smallest TP x PP that fits, TP within a node before PP across nodes, with full
recomputation when needed. Colocated, the actor's weights, gradients and optimizer state stay
on the GPU while the servers generate, so a server's weights and as much KV cache must fit
beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, TextIO

from megarl.config import ConfigError, MegarlConfig, ParallelConfig, load_config
from megarl.models.hf import shape_from_hf_config, shape_from_hf_dir
from megarl.models.shape import ModelShape
from megarl.parallel.topology import check_topology, padded_vocab_size

GIB = 2**30
RUNTIME_RESERVE_GIB = 2.0
CHUNK_BUFFER_FACTOR = 1.125
DEFAULT_GPU_MEMORY_GIB = 80.0
_QWEN2 = dict(model_type="qwen2", hidden_act="silu", vocab_size=152064, tie_word_embeddings=False)
_QWEN3 = dict(model_type="qwen3", hidden_act="silu", vocab_size=151936, head_dim=128,
              num_key_value_heads=8, rope_theta=1e6, max_position_embeddings=40960)
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-math-7b": dict(_QWEN2, hidden_size=3584, intermediate_size=18944,
                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                            rope_theta=1e4, max_position_embeddings=4096),
    "qwen2.5-32b": dict(_QWEN2, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, rope_theta=1e6,
                        max_position_embeddings=32768),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
    "qwen3-32b": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", hidden_act="silu", vocab_size=128256,
                         hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=5e5,
                         max_position_embeddings=131072, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
}
"""Published config.json values of each checkpoint (what changes memory and layout)."""


class PlanError(ValueError):
    """The request cannot be planned (no layout fits, too few GPUs, an unknown model)."""


def builtin_shape(name: str) -> ModelShape:
    """The shape of a built-in model name (case-insensitive)."""
    config = BUILTIN_MODELS.get(name.lower())
    if config is None:
        raise PlanError(f"--model {name!r} is not built in; choose from "
                        f"{', '.join(BUILTIN_MODELS)} or pass --hf-dir / --hf-config")
    return shape_from_hf_config(config, where=f"built-in model {name}")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What one trainer GPU's memory depends on besides the model and the layout."""

    dtype: str = "bfloat16"
    micro_batch_tokens: int = 16384
    logits_chunk_tokens: int = 4096
    recompute: Optional[str] = None
    """None, "selective" or "full" (model.recompute_granularity)."""
    recompute_num_layers: int = 1
    distributed_optimizer: bool = True
    grad_reduce_in_fp32: bool = True
    kl_coef: float = 0.0
    vocab_divisible_by: int = 128

    @classmethod
    def from_config(cls, cfg: MegarlConfig) -> "TrainSettings":
        return cls(dtype=cfg.model.dtype, micro_batch_tokens=cfg.algorithm.micro_batch_tokens,
                   logits_chunk_tokens=cfg.algorithm.logits_chunk_tokens,
                   recompute=cfg.model.recompute_granularity,
                   recompute_num_layers=cfg.model.recompute_num_layers,
                   distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
                   grad_reduce_in_fp32=cfg.optimizer.grad_reduce_in_fp32,
                   kl_coef=cfg.algorithm.kl_coef,
                   vocab_divisible_by=cfg.model.make_vocab_size_divisible_by)

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Trainer parallelism: TP x PP x CP x DP ranks."""

    tp: int
    pp: int
    dp: int
    cp: int = 1
    vpp: Optional[int] = None
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        vpp = f" x VPP {self.vpp}" if self.vpp else ""
        sp = ", sequence parallel" if self.sequence_parallel else ""
        return (f"{self.world_size} trainer GPUs = TP {self.tp} x PP {self.pp}{vpp} x CP "
                f"{self.cp} x DP {self.dp}{sp}")


@dataclass(kw_only=True)
class MemoryItem:
    """One line of the memory table: what, how many bytes, and the arithmetic behind them."""

    name: str
    bytes: float
    formula: str


@dataclass(kw_only=True)
class TrainerMemory:
    """One trainer GPU at its worst pipeline stage."""

    stage: str
    params_per_rank: int
    items: list[MemoryItem]
    host_bytes_per_rank: float
    """Reference policy in host memory (kl_coef > 0), else 0."""

    @property
    def total(self) -> float:
        return sum(item.bytes for item in self.items)

    @property
    def resident(self) -> float:
        """Weights, gradients and optimizer state: on the GPU for the whole run."""
        return sum(item.bytes for item in self.items[:3])


# --- the formulas --------------------------------------------------------------------------


def _attention_dims(shape: ModelShape) -> tuple[int, int]:
    """Query width and key (= value) width of one layer."""
    return shape.num_attention_heads * shape.head_dim, shape.num_query_groups * shape.head_dim


def layer_parameters(shape: ModelShape, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank (norm weights are replicated)."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    q, kv = _attention_dims(shape)
    split = h * (q + 2 * kv) + q * h + 3 * h * f + ((q + 2 * kv) if shape.qkv_bias else 0)
    replicated = 2 * h + (2 * shape.head_dim if shape.qk_layernorm else 0)
    return split // tp + replicated


def stage_parameters(shape: ModelShape, layout: Layout, divisible_by: int = 128) -> dict[str, int]:
    """Parameters per rank of the first and the last pipeline stage (one entry when PP = 1).

    The first stage holds the embedding, the last the final norm and the output layer; with
    tied embeddings and PP > 1 Megatron keeps a copy of the embedding on the last stage."""
    layers = shape.num_layers // layout.pp * layer_parameters(shape, layout.tp)
    vocab = padded_vocab_size(shape.vocab_size, layout.tp, divisible_by) * shape.hidden_size
    vocab //= layout.tp
    if layout.pp == 1:
        return {"only": layers + vocab + shape.hidden_size
                + (0 if shape.tie_word_embeddings else vocab)}
    return {"first": layers + vocab, "last": layers + vocab + shape.hidden_size}


def layer_activation_elements(shape: ModelShape, layout: Layout) -> float:
    """Elements one layer keeps for backward per token, without recomputation."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    q, kv = _attention_dims(shape)
    split = (q + 2 * kv) + q + 3 * f + ((q + kv) if shape.qk_layernorm else 0)
    return 4 * h / (layout.tp if layout.sequence_parallel else 1) + split / layout.tp


def activation_bytes(shape: ModelShape, layout: Layout, s: TrainSettings,
                     first_stage: bool) -> tuple[float, str]:
    """Activation bytes of one stage's rank and how they were counted."""
    tokens = s.micro_batch_tokens / layout.cp
    per_layer = layer_activation_elements(shape, layout) * tokens * s.dtype_bytes
    stage_layers = shape.num_layers // layout.pp
    held = stage_layers  # layer-micro-batches kept at once
    if first_stage and layout.pp > 1:
        held = shape.num_layers * (1 + (layout.pp - 1) / (layout.pp * layout.vpp)
                                   if layout.vpp else 1)
    if s.recompute != "full":
        return held * per_layer, f"{held:g} layers x {tokens:g} tok x {per_layer / tokens:,.0f} B"
    n = min(s.recompute_num_layers, stage_layers)
    sp = layout.tp if layout.sequence_parallel else 1
    kept = math.ceil(held / n) * shape.hidden_size / sp * tokens * s.dtype_bytes
    return kept + n * per_layer, (f"{math.ceil(held / n)} chunk inputs x {tokens:g} tok x "
                                  f"{shape.hidden_size / sp * s.dtype_bytes:g} B + {n} layer(s) "
                                  "recomputed")


def _logits_items(shape: ModelShape, layout: Layout, s: TrainSettings) -> list[MemoryItem]:
    tokens = s.micro_batch_tokens / layout.cp
    v_local = padded_vocab_size(shape.vocab_size, layout.tp, s.vocab_divisible_by) // layout.tp
    chunk = min(s.logits_chunk_tokens, tokens)
    return [MemoryItem(name="logits + grad", bytes=2 * tokens * v_local * s.dtype_bytes,
                       formula=f"2 x {tokens:g} tok x {v_local} x {s.dtype_bytes} B"),
            MemoryItem(name="logits chunk (fp32)", bytes=CHUNK_BUFFER_FACTOR * chunk * v_local * 4,
                       formula=f"{CHUNK_BUFFER_FACTOR} x {chunk:g} x {v_local} x 4 B")]


def _state_items(params: int, layout: Layout, s: TrainSettings) -> list[MemoryItem]:
    """Weights, gradient buffer and Adam state of `params` parameters on one rank."""
    fp32_grads = s.grad_reduce_in_fp32 or s.dtype_bytes == 4
    grad_bytes = 4 if fp32_grads else 2
    # fp32 main params (not for a float32 model) + Adam m and v + an fp32 main-grad copy when
    # the grad buffer is bf16.
    state_bytes = (0 if s.dtype_bytes == 4 else 4) + 8 + (0 if fp32_grads else 4)
    shards = layout.dp * layout.cp if s.distributed_optimizer else 1
    how = "distributed over DP x CP" if s.distributed_optimizer else "replicated"
    return [
        MemoryItem(name=f"weights ({s.dtype})", bytes=s.dtype_bytes * params,
                   formula=f"{s.dtype_bytes} B x {params:,} params"),
        MemoryItem(name="gradient buffer", bytes=grad_bytes * params,
                   formula=f"{grad_bytes} B x params"),
        MemoryItem(name="optimizer state", bytes=state_bytes * params / shards,
                   formula=f"{state_bytes} B x params / {shards} ({how})"),
    ]


def estimate_memory(shape: ModelShape, layout: Layout, s: TrainSettings) -> TrainerMemory:
    """Memory of one trainer GPU at the pipeline stage that needs the most."""
    best: Optional[TrainerMemory] = None
    for stage, params in stage_parameters(shape, layout, s.vocab_divisible_by).items():
        items = _state_items(params, layout, s)
        act, how = activation_bytes(shape, layout, s, first_stage=stage != "last")
        recompute = s.recompute if s.recompute == "full" else "none"
        items.append(MemoryItem(name=f"activations ({recompute} recompute)", bytes=act,
                                formula=how))
        if stage != "first":
            items += _logits_items(shape, layout, s)
        items.append(MemoryItem(name="runtime reserve", bytes=RUNTIME_RESERVE_GIB * GIB,
                                formula="CUDA context, NCCL, workspaces"))
        host = 2 * s.dtype_bytes * params if s.kl_coef > 0 else 0.0
        memory = TrainerMemory(stage=stage, params_per_rank=params, items=items,
                               host_bytes_per_rank=host)
        if best is None or memory.total > best.total:
            best = memory
    assert best is not None
    return best


@dataclass(kw_only=True)
class RolloutPlan:
    """The generation servers and what one of their GPUs holds."""

    mode: str
    num_servers: int
    server_tp: int
    where: str
    weights_bytes_per_gpu: float
    kv_bytes_per_gpu: float
    kv_tokens_per_server: int
    sequence_tokens: int

    @property
    def gpus(self) -> int:
        return self.num_servers * self.server_tp

    @property
    def fits(self) -> bool:
        return self.kv_tokens_per_server >= self.sequence_tokens


def estimate_rollout(shape: ModelShape, *, mode: str, num_servers: int, server_tp: int,
                     gpu_memory_gib: float, mem_fraction: float, sequence_tokens: int,
                     where: str) -> RolloutPlan:
    """Weights and KV-cache capacity of SGLang servers of `server_tp` GPUs (bf16)."""
    weights = 2 * shape.num_parameters / server_tp
    kv_per_token = (2 * shape.num_layers * max(shape.num_query_groups / server_tp, 1)
                    * shape.head_dim * 2)
    budget = max(mem_fraction * gpu_memory_gib * GIB - weights, 0.0)
    return RolloutPlan(mode=mode, num_servers=num_servers, server_tp=server_tp, where=where,
                       weights_bytes_per_gpu=weights, kv_bytes_per_gpu=budget,
                       kv_tokens_per_server=int(budget // kv_per_token),
                       sequence_tokens=sequence_tokens)


# --- plans -----------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Plan:
    """A layout, its memory per GPU, the rollout side, and whether it all fits."""

    model: str
    shape: ModelShape
    layout: Layout
    settings: TrainSettings
    memory: TrainerMemory
    rollout: Optional[RolloutPlan]
    gpu_memory_gib: float
    margin: float
    gpus_per_node: int = 8
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """What makes the plan unusable besides memory (e.g. servers on the trainer's GPUs)."""

    @property
    def limit_bytes(self) -> float:
        return (1 - self.margin) * self.gpu_memory_gib * GIB

    @property
    def trainer_fits(self) -> bool:
        return self.memory.total <= self.limit_bytes

    @property
    def fits(self) -> bool:
        return (self.trainer_fits and not self.problems
                and (self.rollout is None or self.rollout.fits))

    def to_dict(self) -> dict[str, Any]:
        """Everything the table shows, in bytes, for `--json`."""
        padded = padded_vocab_size(self.shape.vocab_size, self.layout.tp,
                                   self.settings.vocab_divisible_by)
        rollout = None
        if self.rollout is not None:
            rollout = {**asdict(self.rollout), "gpus": self.rollout.gpus,
                       "fits": self.rollout.fits}
        return {
            "model": {"name": self.model, "family": self.shape.family,
                      "num_parameters": self.shape.num_parameters,
                      "num_layers": self.shape.num_layers, "hidden_size": self.shape.hidden_size,
                      "vocab_size": self.shape.vocab_size, "padded_vocab_size": padded},
            "layout": {**asdict(self.layout), "trainer_gpus": self.layout.world_size,
                       "gpus_per_node": self.gpus_per_node},
            "settings": asdict(self.settings),
            "trainer_memory": {
                "stage": self.memory.stage, "params_per_rank": self.memory.params_per_rank,
                "items": [asdict(item) for item in self.memory.items],
                "total_bytes": self.memory.total, "gpu_memory_gib": self.gpu_memory_gib,
                "limit_bytes": self.limit_bytes, "fits": self.trainer_fits},
            "host_memory": {"reference_bytes_per_rank": self.memory.host_bytes_per_rank,
                            "reference_bytes_per_node": self.memory.host_bytes_per_rank
                            * min(self.gpus_per_node, self.layout.world_size)},
            "rollout": rollout,
            "fits": self.fits,
            "notes": list(self.notes),
            "problems": list(self.problems),
        }


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def render(plan: Plan) -> str:
    """The plan as a table for people."""
    shape, layout, memory = plan.shape, plan.layout, plan.memory
    padded = padded_vocab_size(shape.vocab_size, layout.tp, plan.settings.vocab_divisible_by)
    nodes = math.ceil(layout.world_size / plan.gpus_per_node)
    stage = {"only": "", "first": ", first pipeline stage", "last": ", last pipeline stage"}
    lines = [
        f"model:   {plan.model} ({shape.family}, {shape.num_parameters / 1e9:.2f} B parameters, "
        f"{shape.num_layers} layers, hidden {shape.hidden_size}, vocab {shape.vocab_size} -> "
        f"{padded} padded)",
        f"layout:  {layout.describe()} ({nodes} node(s) of {plan.gpus_per_node})",
        f"memory per trainer GPU (GiB{stage[memory.stage]}, {memory.params_per_rank:,} "
        "parameters on the rank):",
    ]
    width = max(len(item.name) for item in memory.items)
    for item in memory.items:
        lines.append(f"  {item.name:<{width}}  {_gib(item.bytes):>7}   {item.formula}")
    verdict = "fits" if plan.trainer_fits else "DOES NOT FIT"
    lines.append(f"  {'total':<{width}}  {_gib(memory.total):>7}   of {plan.gpu_memory_gib:g} "
                 f"GiB, limit {_gib(plan.limit_bytes)} with a {plan.margin:.0%} margin: {verdict}")
    if memory.host_bytes_per_rank:
        per_node = memory.host_bytes_per_rank * min(plan.gpus_per_node, layout.world_size)
        lines.append(f"host memory: reference policy {_gib(memory.host_bytes_per_rank)} GiB per "
                     f"rank, {_gib(per_node)} GiB per node (kl_coef > 0)")
    if plan.rollout is not None:
        lines += _render_rollout(plan.rollout)
    lines += [f"note: {note}" for note in plan.notes]
    lines += [f"PROBLEM: {problem}" for problem in plan.problems]
    return "\n".join(lines)


def _render_rollout(r: RolloutPlan) -> list[str]:
    line = (f"rollout: {r.mode}, {r.num_servers} SGLang server(s) x TP {r.server_tp} = {r.gpus} "
            f"GPUs ({r.where})")
    sequences = r.kv_tokens_per_server // r.sequence_tokens
    verdict = "fits" if r.fits else "DOES NOT FIT: raise rollout.server_tp"
    return [line, f"  per server GPU: weights {_gib(r.weights_bytes_per_gpu)} GiB, KV cache "
            f"{_gib(r.kv_bytes_per_gpu)} GiB = {r.kv_tokens_per_server:,} tokens per server "
            f"({sequences} sequences of {r.sequence_tokens}): {verdict}"]


# --- layout suggestions ----------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(shape: ModelShape, gpus: int, gpus_per_node: int = 8,
                      divisible_by: int = 128) -> list[Layout]:
    """Layouts `check_topology` accepts on `gpus` trainer GPUs, TP inside a node (sequence
    parallel with it), PP across: smallest model-parallel size first, then the least PP."""
    layouts = []
    for tp in _divisors(gpus_per_node):
        for pp in _divisors(shape.num_layers):
            if gpus % (tp * pp):
                continue
            try:
                dp = check_topology(ParallelConfig(tp=tp, pp=pp), gpus, shape, divisible_by)
            except ConfigError:
                continue
            layouts.append(Layout(tp=tp, pp=pp, dp=dp, sequence_parallel=tp > 1))
    return sorted(layouts, key=lambda lay: (lay.tp * lay.pp, lay.pp))


def fitting_layout(shape: ModelShape, gpus: int, settings: TrainSettings, *, limit_bytes: float,
                   gpus_per_node: int = 8, colocated_bytes: float = 0.0,
                   ) -> Optional[tuple[Layout, TrainSettings]]:
    """The first candidate layout within `limit_bytes` (with full recomputation when the
    settings' own is not enough: a smaller model-parallel size beats avoiding recomputation);
    None when nothing fits. `colocated_bytes`: what a colocated server needs per GPU beside
    the actor's resident state while it generates."""
    tries = [settings]
    if settings.recompute != "full":
        tries.append(replace(settings, recompute="full"))
    for layout in candidate_layouts(shape, gpus, gpus_per_node, settings.vocab_divisible_by):
        for s in tries:
            memory = estimate_memory(shape, layout, s)
            generation = memory.resident + colocated_bytes + RUNTIME_RESERVE_GIB * GIB
            if memory.total <= limit_bytes and (not colocated_bytes or generation <= limit_bytes):
                return layout, s
    return None


def _too_few_gpus(model: str, shape: ModelShape, gpus: int, settings: TrainSettings,
                  limit_bytes: float, gpus_per_node: int, colocated_bytes: float) -> PlanError:
    """The error for a trainer that does not fit, naming the smallest GPU count that does."""
    counts = [n for n in range(gpus + 1, gpus_per_node + 1)]
    counts += [n * gpus_per_node for n in range(max(2, gpus // gpus_per_node + 1), 129)]
    for n in counts:
        found = fitting_layout(shape, n, settings, limit_bytes=limit_bytes,
                               gpus_per_node=gpus_per_node, colocated_bytes=colocated_bytes)
        if found is not None:
            layout, s = found
            full = " with full recomputation" if s.recompute == "full" else ""
            return PlanError(f"{model} does not fit on {gpus} trainer GPU(s) with "
                             f"{_gib(limit_bytes)} GiB usable each; it needs at least {n} "
                             f"(TP {layout.tp} x PP {layout.pp} x DP {layout.dp}{full})")
    return PlanError(f"{model} does not fit on {gpus} trainer GPU(s), nor on "
                     f"{counts[-1]}, with {_gib(limit_bytes)} GiB usable each")


def pick_server_tp(shape: ModelShape, gpu_memory_gib: float, mem_fraction: float,
                   gpus_per_node: int = 8) -> int:
    """The smallest SGLang TP whose weights take at most half of the server's static pool
    (the other half, at least, is KV cache)."""
    pool = mem_fraction * gpu_memory_gib * GIB
    for tp in _divisors(gpus_per_node):
        if shape.num_attention_heads % tp == 0 and 2 * shape.num_parameters / tp <= pool / 2:
            return tp
    raise PlanError(f"no SGLang server of at most {gpus_per_node} GPUs holds the model with "
                    f"room for a KV cache ({mem_fraction} x {gpu_memory_gib:g} GiB per GPU)")


def split_gpus(gpus: int, server_tp: int, gpus_per_node: int,
               rollout_gpus: Optional[int]) -> int:
    """GPUs for the rollout servers in disaggregated mode: given, or half the nodes (half the
    GPUs on one node), in whole servers; the rest train."""
    if rollout_gpus is None:
        if gpus >= 2 * gpus_per_node:
            rollout_gpus = gpus // gpus_per_node // 2 * gpus_per_node
        else:
            rollout_gpus = gpus // 2 // server_tp * server_tp
    if rollout_gpus < server_tp or rollout_gpus % server_tp or rollout_gpus >= gpus:
        raise PlanError(f"--gpus {gpus}: cannot give whole SGLang servers of TP {server_tp} "
                        f"({rollout_gpus} rollout GPUs) and keep trainer GPUs; disaggregated "
                        "mode needs more GPUs (or use --mode colocated)")
    return rollout_gpus


def suggest(model: str, shape: ModelShape, gpus: int, settings: TrainSettings, *,
            gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB, gpus_per_node: int = 8,
            mode: str = "disaggregated", rollout_gpus: Optional[int] = None,
            server_tp: Optional[int] = None, mem_fraction: float = 0.8,
            sequence_tokens: int = 4096, margin: float = 0.1) -> Plan:
    """A layout for `gpus` GPUs: servers and trainer split (disaggregated) or shared
    (colocated), the smallest model-parallel trainer layout that fits, its memory."""
    if gpus < 1 or gpus_per_node < 1:
        raise PlanError(f"--gpus ({gpus}) and --gpus-per-node ({gpus_per_node}) must be >= 1")
    limit = (1 - margin) * gpu_memory_gib * GIB
    trainer_gpus, found, colocated = gpus, None, 0.0
    if mode == "disaggregated":
        server_tp = server_tp or pick_server_tp(shape, gpu_memory_gib, mem_fraction,
                                                gpus_per_node)
        trainer_gpus -= split_gpus(gpus, server_tp, gpus_per_node, rollout_gpus)
        found = fitting_layout(shape, trainer_gpus, settings, limit_bytes=limit,
                               gpus_per_node=gpus_per_node)
    else:  # the smallest server TP whose weights and as much KV cache fit beside the actor
        for tp in [server_tp] if server_tp else [t for t in _divisors(gpus_per_node)
                                                 if gpus % t == 0]:
            colocated = 2 * 2 * shape.num_parameters / tp
            found = fitting_layout(shape, gpus, settings, limit_bytes=limit,
                                   gpus_per_node=gpus_per_node, colocated_bytes=colocated)
            if found is not None:
                server_tp = tp
                break
    if found is None:
        # More GPUs also allow a colocated server of a whole node.
        colocated = colocated and 2 * 2 * shape.num_parameters / gpus_per_node
        err = _too_few_gpus(model, shape, trainer_gpus, settings, limit, gpus_per_node, colocated)
        if trainer_gpus < gpus:
            err = PlanError(f"{err}; the other {gpus - trainer_gpus} of --gpus {gpus} run SGLang "
                            "servers (--rollout-gpus)")
        raise err
    layout, used = found
    notes = [] if used == settings else [
        "fits only with full activation recomputation (model.recompute_granularity=full)"]
    memory = estimate_memory(shape, layout, used)
    server_gpus, where = gpus - trainer_gpus, "their own GPUs"
    if mode == "colocated":
        server_gpus, where = gpus, "the trainer's GPUs"
        mem_fraction = _colocated_fraction(memory, gpu_memory_gib, limit, notes)
    rollout = estimate_rollout(shape, mode=mode, num_servers=server_gpus // server_tp,
                               server_tp=server_tp, gpu_memory_gib=gpu_memory_gib,
                               mem_fraction=mem_fraction, sequence_tokens=sequence_tokens,
                               where=where)
    return Plan(model=model, shape=shape, layout=layout, settings=used, memory=memory,
                rollout=rollout, gpu_memory_gib=gpu_memory_gib, margin=margin,
                gpus_per_node=gpus_per_node, notes=notes)


def _colocated_fraction(memory: TrainerMemory, gpu_memory_gib: float, limit: float,
                        notes: list[str]) -> float:
    """The largest SGLang static share left beside the actor's resident state (colocated)."""
    resident = memory.resident
    fraction = max(0.0, (limit - resident - RUNTIME_RESERVE_GIB * GIB) / (gpu_memory_gib * GIB))
    notes.append(f"colocated: the actor keeps {_gib(resident)} GiB per GPU while the servers "
                 f"generate, so rollout.mem_fraction_static must be at most {fraction:.2f}")
    return fraction


# --- a full configuration (megarl train --dry-run, megarl plan --config) ---------------------


def plan_for_config(cfg: MegarlConfig, world_size: int, *, shape: Optional[ModelShape] = None,
                    model: Optional[str] = None, gpu_memory_gib: Optional[float] = None,
                    margin: float = 0.1, gpus_per_node: int = 8) -> Plan:
    """The plan of `cfg` run on `world_size` trainer ranks; the shape comes from
    `cfg.model.hf_dir` unless given. Raises ConfigError for a layout the model refuses."""
    if shape is None:
        shape, _ = shape_from_hf_dir(cfg.model.hf_dir)
    model = model or Path(cfg.model.hf_dir).name
    gpu_memory_gib = gpu_memory_gib or _local_gpu_memory_gib()
    divisible_by = cfg.model.make_vocab_size_divisible_by
    dp = check_topology(cfg.parallel, world_size, shape, divisible_by)
    p = cfg.parallel
    layout = Layout(tp=p.tp, pp=p.pp, dp=dp, cp=p.cp, vpp=p.vpp,
                    sequence_parallel=p.sequence_parallel)
    settings = TrainSettings.from_config(cfg)
    memory = estimate_memory(shape, layout, settings)
    plan = Plan(model=model, shape=shape, layout=layout, settings=settings, memory=memory,
                rollout=None, gpu_memory_gib=gpu_memory_gib, margin=margin,
                gpus_per_node=gpus_per_node)
    plan.rollout = _rollout_for_config(cfg, plan)
    if not plan.trainer_fits:
        found = fitting_layout(shape, world_size, settings, limit_bytes=plan.limit_bytes,
                               gpus_per_node=gpus_per_node)
        if found is None:
            plan.notes.append(f"no layout of {world_size} trainer GPUs fits: use more GPUs")
        else:
            lay, s = found
            plan.notes.append(
                f"a layout that fits: parallel.tp={lay.tp} parallel.pp={lay.pp} "
                f"parallel.sequence_parallel={str(lay.sequence_parallel).lower()}"
                + (" model.recompute_granularity=full" if s.recompute != settings.recompute
                   else ""))
    return plan


def _rollout_for_config(cfg: MegarlConfig, plan: Plan) -> Optional[RolloutPlan]:
    """The configured servers' memory; also records servers placed on trainer GPUs."""
    r = cfg.rollout
    if r.backend == "dev" or cfg.trainer.replay_dir is not None:
        plan.notes.append("rollout: no GPU servers (dev backend or replay)")
        return None
    servers = len(r.server_urls) or r.num_servers
    if r.server_urls:
        more = f" ... {r.server_urls[-1]}" if len(r.server_urls) > 1 else ""
        where = f"started elsewhere: {r.server_urls[0]}{more}"
    elif r.mode == "colocated":
        where = "the trainer's GPUs"
    else:
        first, last = r.base_gpu_id, r.base_gpu_id + servers * r.server_tp - 1
        where = f"GPUs {first}-{last} of trainer rank 0's node"
        local_ranks = min(plan.layout.world_size, plan.gpus_per_node)
        if first < local_ranks or last >= plan.gpus_per_node:
            plan.problems.append(
                f"rollout.base_gpu_id={first}: servers on GPUs {first}-{last} collide with "
                f"trainer local ranks 0-{local_ranks - 1} (local rank r uses GPU r) or pass "
                f"GPU {plan.gpus_per_node - 1}; use GPUs {local_ranks}-{plan.gpus_per_node - 1}")
    if plan.shape.num_attention_heads % r.server_tp:
        plan.problems.append(f"rollout.server_tp={r.server_tp} does not divide the model's "
                             f"{plan.shape.num_attention_heads} attention heads")
    fraction = r.mem_fraction_static
    if r.mode == "colocated":
        limit = _colocated_fraction(plan.memory, plan.gpu_memory_gib, plan.limit_bytes, [])
        if fraction > limit:
            plan.problems.append(f"rollout.mem_fraction_static={fraction} leaves no room for "
                                 f"the actor's resident state: use at most {limit:.2f}")
    return estimate_rollout(plan.shape, mode=r.mode, num_servers=servers, server_tp=r.server_tp,
                            gpu_memory_gib=plan.gpu_memory_gib, mem_fraction=fraction,
                            sequence_tokens=cfg.data.max_prompt_tokens + r.max_new_tokens,
                            where=where)


def _local_gpu_memory_gib() -> float:
    """This machine's GPU memory when it has one (a dry run on a GPU node), else 80 GiB."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return DEFAULT_GPU_MEMORY_GIB


def print_plan(cfg: MegarlConfig, world_size: int, *, file: Optional[TextIO] = None,
               **options: Any) -> Plan:
    """Print the layout and per-GPU memory of `cfg` on `world_size` trainer ranks (global
    rank 0 only: under torchrun every rank calls this). Options as `plan_for_config`."""
    from megarl.parallel.groups import launch_env

    plan = plan_for_config(cfg, world_size, **options)
    if launch_env().rank == 0:
        print(render(plan), file=file or sys.stdout, flush=True)
    return plan


# --- megarl plan -----------------------------------------------------------------------------

# Flags of the suggestion mode and the config keys that replace them with --config.
_SUGGESTION_FLAGS = {
    "gpus": "--world-size", "micro_batch_tokens": "algorithm.micro_batch_tokens",
    "logits_chunk_tokens": "algorithm.logits_chunk_tokens", "dtype": "model.dtype",
    "recompute": "model.recompute_granularity", "kl_coef": "algorithm.kl_coef",
    "mode": "rollout.mode", "rollout_gpus": "rollout.num_servers",
    "server_tp": "rollout.server_tp", "mem_fraction_static": "rollout.mem_fraction_static",
    "seq_len": "data.max_prompt_tokens and rollout.max_new_tokens",
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help=f"built-in shape: {', '.join(BUILTIN_MODELS)}")
    model.add_argument("--hf-dir", help="Hugging Face model directory (its config.json)")
    model.add_argument("--hf-config", help="a Hugging Face config.json file")
    model.add_argument("--list-models", action="store_true", help="list the built-in shapes")
    parser.add_argument("--config", type=Path, help="plan this megarl YAML config (with "
                        "--world-size; without --model/--hf-* the shape comes from model.hf_dir)")
    parser.add_argument("--world-size", type=positive_int, help="trainer ranks of --config")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of --config")
    parser.add_argument("--gpus", type=positive_int, help="GPUs to plan for (servers + trainer)")
    parser.add_argument("--gpus-per-node", type=positive_int, default=8,
                        help="GPUs per node: TP stays within one (8)")
    parser.add_argument("--gpu-memory-gb", type=float, default=DEFAULT_GPU_MEMORY_GIB,
                        help="memory per GPU in GiB (80: H100/A100 80GB)")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="share of GPU memory kept free (fragmentation)")
    parser.add_argument("--micro-batch-tokens", type=positive_int,
                        help="tokens per micro-batch (16384)")
    parser.add_argument("--logits-chunk-tokens", type=positive_int,
                        help="tokens per logits chunk (4096)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"))
    parser.add_argument("--recompute", choices=("none", "selective", "full"))
    parser.add_argument("--kl-coef", type=float, help="> 0 keeps a reference model in host memory")
    parser.add_argument("--mode", choices=("disaggregated", "colocated"))
    parser.add_argument("--rollout-gpus", type=positive_int,
                        help="GPUs for servers (disaggregated)")
    parser.add_argument("--server-tp", type=positive_int, help="TP of each SGLang server")
    parser.add_argument("--mem-fraction-static", type=float, help="SGLang static share (0.8)")
    parser.add_argument("--seq-len", type=positive_int, help="prompt + response tokens (4096)")
    parser.add_argument("--json", type=Path, help="also write the plan as JSON here")


def run(args: argparse.Namespace) -> int:
    if args.list_models:
        for name in BUILTIN_MODELS:
            shape = builtin_shape(name)
            print(f"{name:<16} {shape.family:<6} {shape.num_parameters / 1e9:6.2f} B")
        return 0
    try:
        plan = _plan_from_args(args)
    except (ValueError, OSError) as exc:  # ConfigError and PlanError are ValueErrors
        print(f"megarl plan: {exc}", file=sys.stderr)
        return 2
    print(render(plan), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    if not plan.fits:
        print("megarl plan: the plan does not fit (see above)", file=sys.stderr)
    return 0 if plan.fits else 1


def _plan_from_args(args: argparse.Namespace) -> Plan:
    if not args.gpu_memory_gb > 0:
        raise PlanError(f"--gpu-memory-gb {args.gpu_memory_gb} is out of range: must be > 0")
    if not 0 <= args.margin < 1:
        raise PlanError(f"--margin {args.margin} is out of range: must be in [0, 1)")
    if args.config is not None:
        given = [flag for flag in _SUGGESTION_FLAGS if getattr(args, flag) is not None]
        if given:
            raise PlanError(f"--{given[0].replace('_', '-')} plans without --config; with "
                            f"--config set {_SUGGESTION_FLAGS[given[0]]} instead")
        if args.world_size is None:
            raise PlanError("--config needs --world-size (the trainer ranks of the launch)")
        cfg = load_config(args.config, args.overrides)
        name, shape = _shape_from_args(args, cfg)
        return plan_for_config(cfg, args.world_size, shape=shape, model=name,
                               gpu_memory_gib=args.gpu_memory_gb, margin=args.margin,
                               gpus_per_node=args.gpus_per_node)
    if args.overrides or args.world_size is not None:
        raise PlanError("section.key=value overrides and --world-size need --config")
    if args.gpus is None:
        raise PlanError("--gpus is required (or plan a config with --config --world-size)")
    name, shape = _shape_from_args(args, None)
    defaults = TrainSettings()
    settings = TrainSettings(
        dtype=args.dtype or defaults.dtype,
        micro_batch_tokens=args.micro_batch_tokens or defaults.micro_batch_tokens,
        logits_chunk_tokens=args.logits_chunk_tokens or defaults.logits_chunk_tokens,
        recompute=None if args.recompute in (None, "none") else args.recompute,
        kl_coef=args.kl_coef or 0.0)
    return suggest(name, shape, args.gpus, settings,
                   gpu_memory_gib=args.gpu_memory_gb,
                   gpus_per_node=args.gpus_per_node, mode=args.mode or "disaggregated",
                   rollout_gpus=args.rollout_gpus, server_tp=args.server_tp,
                   mem_fraction=args.mem_fraction_static or 0.8,
                   sequence_tokens=args.seq_len or 4096, margin=args.margin)


def _shape_from_args(args: argparse.Namespace,
                     cfg: Optional[MegarlConfig]) -> tuple[str, ModelShape]:
    """(name, shape) from --model, --hf-dir, --hf-config, or the config's model.hf_dir."""
    if args.model:
        return args.model, builtin_shape(args.model)
    if args.hf_dir:
        return Path(args.hf_dir).name, shape_from_hf_dir(args.hf_dir)[0]
    if args.hf_config:
        path = Path(args.hf_config)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"--hf-config {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise PlanError(f"--hf-config {path}: not valid JSON ({err})") from None
        return path.parent.name or path.name, shape_from_hf_config(config, where=str(path))
    if cfg is None:
        raise PlanError("name the model: --model NAME, --hf-dir DIR or --hf-config FILE")
    if not (Path(cfg.model.hf_dir) / "config.json").is_file():
        raise ConfigError("model.hf_dir", f"{cfg.model.hf_dir} has no config.json; pass "
                          f"--model NAME to plan without the checkpoint "
                          f"({', '.join(BUILTIN_MODELS)})")
    return Path(cfg.model.hf_dir).name, shape_from_hf_dir(cfg.model.hf_dir)[0]
