"""Per-GPU memory of a megarl run and a parallel layout for it, before any GPU is touched.

    megarl plan --model qwen2.5-32b --gpus 32                 # suggest a layout
    megarl plan --hf-dir /ckpt/Qwen3-32B --gpus 16 --json plan.json
    megarl plan --config run.yaml --world-size 16 --model qwen2.5-32b [section.key=value ...]
    megarl plan --list-models

`print_plan(cfg, world_size)` prints the same for a full configuration (`megarl train
--dry-run`). Built-in shapes, from the published config.json of each checkpoint (no download):
qwen2.5-math-7b, qwen2.5-32b, qwen3-4b, qwen3-8b, qwen3-32b, llama-3.1-8b.

The memory formulas live in `megarl.parallel.memory`.

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

from megarl.parallel.memory import (
    BUILTIN_MODELS, DEFAULT_GPU_MEMORY_GIB, GIB, RUNTIME_RESERVE_GIB, Layout, PlanError, RolloutPlan,
    TrainerMemory, TrainSettings, builtin_shape, estimate_memory, estimate_rollout,
    server_weight_bytes,
)


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
        if shape.num_attention_heads % tp == 0 and server_weight_bytes(shape, tp) <= pool / 2:
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
            colocated = 2 * server_weight_bytes(shape, tp)
            found = fitting_layout(shape, gpus, settings, limit_bytes=limit,
                                   gpus_per_node=gpus_per_node, colocated_bytes=colocated)
            if found is not None:
                server_tp = tp
                break
    if found is None:
        # More GPUs also allow a colocated server of a whole node.
        colocated = colocated and 2 * server_weight_bytes(shape, gpus_per_node)
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
