"""The Megatron actor: the policy's log-prob passes and PPO-style train steps on this rank.

Every trainer rank holds the same list of `Sample`s (broadcast by the trainer). The actor
splits them deterministically: mini-batches by prompt groups, each mini-batch over data-parallel
ranks by token count, each rank's share into micro-batches by token budget. All ranks of a
model replica (TP and PP) therefore agree on every micro-batch without talking to each other.

Logits exist only on the last pipeline stage; there the vocab-parallel ops turn them into
per-token log-probs and entropies, the behaviour/reference log-probs are attached to the
samples, and the policy objective (`megarl.losses`) produces each micro-batch's share of the
step's loss. Megatron runs in per-token-loss mode with a zero token count (see
`megarl.models.megatron_config`), so it neither rescales the loss nor averages over DP.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from megarl.actor.experience import Sample
from megarl.actor.optimizer import build_optimizer
from megarl.actor.packing import (
    ModelInputs, balance_over_ranks, build_packed, build_padded, plan_micro_batches,
)
from megarl.config import MegarlConfig
from megarl.losses import MicroBatch, Metrics, PolicyObjective
from megarl.models import megatron_config
from megarl.models.builder import build_model_chunks, wrap_ddp
from megarl.models.shape import ModelShape
from megarl.parallel.groups import ParallelContext


@dataclass
class _Micro:
    samples: list[Sample]
    inputs: ModelInputs
    batch: Optional[MicroBatch] = None   # loss inputs, built on the last stage after the passes


@dataclass
class IterationPlan:
    """This rank's share of one rollout batch: micro-batches per mini-batch (optimizer step)."""

    mini_batches: list[list[_Micro]]
    samples: list[Sample] = field(default_factory=list)   # every sample this rank processes


class MegatronActor:
    """Policy model chunks, optimizer and passes of one trainer rank."""

    def __init__(self, cfg: MegarlConfig, shape: ModelShape, ctx: ParallelContext,
                 objective: PolicyObjective, *, pad_id: int, total_optimizer_steps: int) -> None:
        if ctx.cp > 1:
            raise NotImplementedError(
                "parallel.cp > 1: the actor does not split sequences over context-parallel "
                "ranks yet; use tp/pp/dp"
            )
        from megatron.core.distributed import finalize_model_grads

        self.cfg, self.shape, self.ctx, self.objective = cfg, shape, ctx, objective
        self.pad_id = pad_id
        chunks = build_model_chunks(shape, cfg.model, cfg.parallel, ctx)
        self.model = wrap_ddp(chunks, cfg.optimizer, cfg.model)
        config = self.model[0].config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [c.no_sync for c in self.model]
        if len(self.model) == 1:
            config.no_sync_func = config.no_sync_func[0]
        self.optimizer, self.scheduler = build_optimizer(
            self.model, cfg.optimizer, cfg.model, total_optimizer_steps
        )
        # Megatron's interleaved schedule exchanges activation/gradient shapes in one batched
        # call; with two stages the previous and next rank are the same peer and the shapes
        # get swapped. With a virtual pipeline every micro-batch of a schedule call therefore
        # has one shape, which only the padded layout can give.
        self.uniform_shapes = ctx.vpp is not None
        self.packed = megatron_config.use_transformer_engine(cfg.model) and not self.uniform_shapes
        self._reference: Optional[list[torch.Tensor]] = None
        self.num_skipped_steps = 0
        self.consecutive_skipped_steps = 0

    # ---------------------------------------------------------------------------------------
    # Planning

    def plan(self, samples: Sequence[Sample], iteration: int) -> IterationPlan:
        """Mini-batches of whole prompt groups, this DP rank's share of each, micro-batched."""
        groups = sorted({s.group for s in samples})
        per_mini = self.cfg.algorithm.prompts_per_mini_batch or len(groups)
        random.Random(self.cfg.trainer.seed * 1_000_003 + iteration).shuffle(groups)
        plan = IterationPlan(mini_batches=[])
        for start in range(0, len(groups), per_mini):
            chosen = set(groups[start:start + per_mini])
            mini = [s for s in samples if s.group in chosen]
            mine = [mini[i] for i in balance_over_ranks(mini, self.ctx.dp)[self.ctx.dp_rank]]
            plan.mini_batches.append(self._micro_batches(mine))
            plan.samples.extend(mine)
        return plan

    def _micro_batches(self, samples: list[Sample]) -> list[_Micro]:
        if not samples:
            raise RuntimeError(
                f"data-parallel rank {self.ctx.dp_rank} got no sample in a mini-batch: use more "
                f"prompts per mini-batch than data-parallel ranks ({self.ctx.dp})"
            )
        budget = self.cfg.algorithm.micro_batch_tokens
        groups = plan_micro_batches([s.num_tokens for s in samples], budget,
                                    padded=not self.packed,
                                    multiple_of=self.ctx.pp if self.ctx.vpp else 1)
        pad_to = self.ctx.tp if self.cfg.parallel.sequence_parallel else 1
        longest = max(s.num_tokens for s in samples) if self.uniform_shapes else 0
        rows = max(len(g) for g in groups) if self.uniform_shapes else 0
        micro = []
        for g in groups:
            chosen = [samples[i] for i in g]
            if self.packed:
                inputs = build_packed(chosen, self.pad_id, pad_to)
            else:
                inputs = build_padded(chosen, self.pad_id, pad_to, min_length=longest,
                                      min_rows=rows)
            micro.append(_Micro(chosen, inputs))
        return micro

    # ---------------------------------------------------------------------------------------
    # Log-prob passes

    @torch.no_grad()
    def compute_log_probs(self, plan: IterationPlan, *, reference: bool = False) -> None:
        """Attach old (or reference) log-probs to this rank's samples (last stage only)."""
        if reference:
            self._swap_reference_in()
        try:
            micro = [m for mini in plan.mini_batches for m in mini]
            self._schedule(micro, partial(self._record, reference), forward_only=True)
        finally:
            if reference:
                self._swap_reference_out()

    def _record(self, reference: bool, micro: _Micro, logits: torch.Tensor):
        from megarl.ops import vocab_parallel_token_stats

        kwargs = self.objective.stats_kwargs
        if reference:
            kwargs.update(entropy=False, nucleus_top_p=None)
        stats = vocab_parallel_token_stats(
            logits, micro.inputs.targets.to(logits.device), tp_group=self.ctx.tp_group,
            real_vocab_size=self.shape.vocab_size, **kwargs,
        )
        # One device-to-host copy per statistic and micro-batch, then host-side slicing.
        host = {name: value.float().cpu() for name, value in
                (("log_probs", stats.log_probs), ("entropy", stats.entropy),
                 ("nucleus_entropy", stats.nucleus_entropy)) if value is not None}
        for sample, (row, start, end) in zip(micro.samples, micro.inputs.response_slices):
            if reference:
                sample.ref_log_probs = host["log_probs"][row, start:end].clone()
                continue
            sample.old_log_probs = host["log_probs"][row, start:end].clone()
            if "entropy" in host:
                sample.old_entropy = host["entropy"][row, start:end].clone()
            if "nucleus_entropy" in host:
                sample.old_nucleus_entropy = host["nucleus_entropy"][row, start:end].clone()
        return _zero_loss(logits)

    # ---------------------------------------------------------------------------------------
    # Training

    def train(self, plan: IterationPlan) -> list[dict[str, float]]:
        """PPO epochs over the plan's mini-batches; one optimizer step each. Returns the metrics
        of every optimizer step (on every rank: they are sent from the last stage)."""
        last = self.ctx.is_last_stage
        if last:
            for mini in plan.mini_batches:
                for m in mini:
                    m.batch = self._loss_inputs(m)
            self.objective.begin_iteration(
                [m.batch for mini in plan.mini_batches for m in mini], self.ctx.dp_group
            )
        history = []
        for _ in range(self.cfg.algorithm.ppo_epochs):
            for mini in plan.mini_batches:
                step = (self.objective.begin_step([m.batch for m in mini], self.ctx.dp_group)
                        if last else None)
                for chunk in self.model:
                    chunk.zero_grad_buffer()
                self.optimizer.zero_grad()
                outputs = self._schedule(mini, partial(self._loss, step), forward_only=False)
                applied, grad_norm = self._optimizer_step()
                metrics: dict[str, float] = {}
                if last:
                    if applied:
                        self.objective.end_step(step)
                    merged = Metrics()
                    for out in outputs:
                        merged.update(out["metrics"])
                    metrics = merged.reduce(self.ctx.dp_group)
                metrics = self.from_last_stage(metrics)
                metrics.update({"optim/grad_norm": grad_norm, "optim/lr": self.current_lr(),
                                "optim/step_applied": float(applied)})
                history.append(metrics)
        return history

    def _loss(self, step, micro: _Micro, logits: torch.Tensor):
        from megarl.ops import vocab_parallel_token_stats

        stats = vocab_parallel_token_stats(
            logits, micro.inputs.targets.to(logits.device), tp_group=self.ctx.tp_group,
            real_vocab_size=self.shape.vocab_size, **self.objective.stats_kwargs,
        )
        loss, metrics = self.objective(stats, _to_device(micro.batch, logits.device), step)
        return loss, torch.zeros((), dtype=torch.int, device=logits.device), {"metrics": metrics}

    def _loss_inputs(self, micro: _Micro) -> MicroBatch:
        """Per-token loss inputs of a micro-batch, in the logits layout."""
        x = micro.inputs
        shape = x.tokens.shape
        per_token = {name: torch.zeros(shape) for name in
                     ("advantages", "old_log_probs", "ref_log_probs", "old_entropy",
                      "old_nucleus_entropy")}
        use_rollout = self.cfg.algorithm.use_rollout_logprobs
        present = set()
        for sample, (row, start, end) in zip(micro.samples, x.response_slices):
            per_token["advantages"][row, start:end] = sample.advantage
            old = (torch.tensor(sample.rollout_log_probs) if use_rollout
                   else sample.old_log_probs)
            values = {"old_log_probs": old, "ref_log_probs": sample.ref_log_probs,
                      "old_entropy": sample.old_entropy,
                      "old_nucleus_entropy": sample.old_nucleus_entropy}
            for name, value in values.items():
                if value is not None:
                    per_token[name][row, start:end] = value
                    present.add(name)
        if "old_log_probs" not in present and any(s.trainable() for s in micro.samples):
            raise RuntimeError("train() before compute_log_probs(): no behaviour log-probs")
        counted = [s for s in micro.samples if s.trainable()]
        return MicroBatch(
            mask=x.loss_mask, seq_ids=x.seq_ids, num_seqs=x.num_seqs,
            seq_group_ids=torch.tensor([s.group for s in counted], dtype=torch.long),
            seq_rewards=torch.tensor([s.reward for s in counted], dtype=torch.float32),
            **{name: per_token[name] if name in present or name == "advantages" else None
               for name in per_token},
        )

    def _optimizer_step(self) -> tuple[bool, float]:
        """Step unless any rank has a non-finite gradient (then skip it, everywhere)."""
        bad = torch.zeros(1, device=self.ctx.device)
        for chunk in self.model:
            for buf in chunk.buffers + chunk.expert_parallel_buffers:
                if not torch.isfinite(buf.grad_data).all():
                    bad.fill_(1.0)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            self.optimizer.zero_grad()
            self.num_skipped_steps += 1
            self.consecutive_skipped_steps += 1
            return False, float("nan")
        self.consecutive_skipped_steps = 0
        applied, grad_norm, _ = self.optimizer.step()
        if applied:
            self.scheduler.step(1)
        return bool(applied), float(grad_norm) if grad_norm is not None else 0.0

    def offload_for_rollout(self) -> None:
        """Colocated mode: give this GPU to the servers while they generate. Optimizer state goes
        to host memory and gradient buffers are freed (they hold nothing between steps); the
        weights stay, since the next weight sync reads them."""
        self.optimizer.offload_to_cpu()
        for chunk in self.model:
            chunk.offload_grad_buffers()

    def restore_for_training(self) -> None:
        """Undo `offload_for_rollout` (gradient buffers come back zeroed)."""
        for chunk in self.model:
            chunk.restore_grad_buffers()
        self.optimizer.restore_from_cpu()

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---------------------------------------------------------------------------------------
    # Shared machinery

    def _schedule(self, micro: list[_Micro], loss_fn, *, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        rows = max(m.inputs.shape[0] for m in micro)
        length = max(m.inputs.shape[1] for m in micro)
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_fn),
            data_iterator=[iter(micro) for _ in self.model], model=self.model,
            num_microbatches=len(micro), seq_length=length, micro_batch_size=rows,
            forward_only=forward_only,
        )

    def _forward_step(self, loss_fn, data_iterator, model):
        micro: _Micro = next(data_iterator)
        x, dev = micro.inputs, self.ctx.device
        packed = x.packed_seq_params
        if packed is not None:
            packed = _packed_to(packed, dev)
        output = model(x.tokens.to(dev), x.position_ids.to(dev), None,
                       packed_seq_params=packed)
        return output, partial(loss_fn, micro)

    def from_last_stage(self, obj: Any) -> Any:
        """`obj` as the last pipeline stage of this rank's pipeline has it (collective over the
        pipeline group); losses, metrics and intervention state live there."""
        if self.ctx.pp == 1:
            return obj
        from megatron.core import parallel_state as ps

        box = [obj]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=self.ctx.pp_group)
        return box[0]

    # ---------------------------------------------------------------------------------------
    # Reference policy: the initial weights, kept in host memory and swapped in for its pass.

    def snapshot_reference(self) -> None:
        """Keep the current weights as the reference policy (call before the first update)."""
        pin = torch.cuda.is_available()
        self._reference = [p.detach().to("cpu", copy=True).pin_memory() if pin
                           else p.detach().clone() for p in self._parameters()]
        self._backup = [torch.empty_like(t) for t in self._reference]

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [p for chunk in self.model for p in chunk.module.parameters()]

    def _swap_reference_in(self) -> None:
        if self._reference is None:
            raise RuntimeError("no reference weights: call snapshot_reference() first")
        for param, ref, backup in zip(self._parameters(), self._reference, self._backup):
            backup.copy_(param.data, non_blocking=True)
            param.data.copy_(ref, non_blocking=True)

    def _swap_reference_out(self) -> None:
        for param, backup in zip(self._parameters(), self._backup):
            param.data.copy_(backup, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _zero_loss(logits: torch.Tensor):
    zero = torch.zeros((), device=logits.device)
    return zero, torch.zeros((), dtype=torch.int, device=logits.device), {}


def _to_device(batch: MicroBatch, device: torch.device) -> MicroBatch:
    if device.type == "cpu":
        return batch
    values = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
              for k, v in vars(batch).items()}
    return MicroBatch(**values)


def _packed_to(params: Any, device: torch.device) -> Any:
    for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        value = getattr(params, name, None)
        if isinstance(value, torch.Tensor):
            setattr(params, name, value.to(device))
    return params
