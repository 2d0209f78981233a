"""Memory formulas of the planner: what one trainer GPU and one SGLang server hold.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from megarl.config import MegarlConfig
from megarl.models.hf import shape_from_hf_config
from megarl.models.shape import ModelShape
from megarl.parallel.topology import padded_vocab_size

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


def server_weight_bytes(shape: ModelShape, server_tp: int) -> float:
    """The bf16 weights one GPU of an SGLang server of TP = `server_tp` holds."""
    return 2 * shape.num_parameters / server_tp


def estimate_rollout(shape: ModelShape, *, mode: str, num_servers: int, server_tp: int,
                     gpu_memory_gib: float, mem_fraction: float, sequence_tokens: int,
                     where: str) -> RolloutPlan:
    """Weights and KV-cache capacity of SGLang servers of `server_tp` GPUs (bf16)."""
    weights = server_weight_bytes(shape, server_tp)
    kv_per_token = (2 * shape.num_layers * max(shape.num_query_groups / server_tp, 1)
                    * shape.head_dim * 2)
    budget = max(mem_fraction * gpu_memory_gib * GIB - weights, 0.0)
    return RolloutPlan(mode=mode, num_servers=num_servers, server_tp=server_tp, where=where,
                       weights_bytes_per_gpu=weights, kv_bytes_per_gpu=budget,
                       kv_tokens_per_server=int(budget // kv_per_token),
                       sequence_tokens=sequence_tokens)
