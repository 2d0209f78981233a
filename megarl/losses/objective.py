"""The policy objective the actor calls: surrogate + KL penalty + entropy intervention.

Legend: T = tokens of one micro-batch, flattened.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .batch import MicroBatch
from .interventions import Intervention, LossInputs, StepContext, build_intervention
from .kl import KLPenalty, kl_estimate
from .metrics import Metrics
from .policy import ClippedSurrogate, SurrogateOutput
from .reduce import Aggregator, StepNormalizers, all_reduce


class PolicyObjective:
    """`L = agg(l_pg) + kl_coef * agg(k(lp, lp_ref)) + intervention term`, per micro-batch as
    its exact share of the optimizer step's loss (see `megarl.losses` for the calling order).
    """

    def __init__(self, *, surrogate: ClippedSurrogate, aggregator: Aggregator,
                 intervention: Intervention, kl: Optional[KLPenalty] = None,
                 temperature: float = 1.0, nucleus_rule: str = "inclusive",
                 nucleus_top_k: int = 1024, chunk_size: Optional[int] = None) -> None:
        self.surrogate = surrogate
        self.aggregator = aggregator
        self.intervention = intervention
        self.kl = kl
        self.request = intervention.stats_request()
        kwargs: dict[str, Any] = dict(temperature=temperature, log_probs=True, entropy=True)
        if self.request.nucleus_top_p is not None:
            kwargs.update(nucleus_top_p=self.request.nucleus_top_p, nucleus_rule=nucleus_rule,
                          nucleus_top_k=nucleus_top_k)
        if chunk_size is not None:
            kwargs["chunk_size"] = chunk_size
        self._stats_kwargs = kwargs
        self.num_steps = 0
        self.num_iterations = 0

    @property
    def stats_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `megarl.ops.vocab_parallel_token_stats` (add `targets`,
        `tp_group`, `real_vocab_size`). The full entropy is always computed (for metrics);
        the nucleus only when the intervention asks for it."""
        return dict(self._stats_kwargs)

    def begin_iteration(self, micro_batches: Sequence[MicroBatch],
                        dp_group: Optional[dist.ProcessGroup] = None) -> None:
        """Once per training step, after the old-log-prob pass, with this rank's micro-batches
        of the whole rollout batch. Collective over `dp_group` (None: one DP rank)."""
        self.intervention.begin_iteration([mb.flat() for mb in micro_batches], dp_group)
        self.num_iterations += 1

    def begin_step(self, micro_batches: Sequence[MicroBatch],
                   dp_group: Optional[dist.ProcessGroup] = None) -> StepContext:
        """Before an optimizer step, with this rank's micro-batches of it: the global
        normalisers (all-reduced over `dp_group`) and the intervention's per-step values."""
        flat = [mb.flat() for mb in micro_batches]
        step = StepContext(index=self.num_steps, aggregator=self.aggregator, dp_group=dp_group,
                           normalizers=StepNormalizers.compute(flat, dp_group))
        self.intervention.begin_step(flat, step)
        return step

    def __call__(self, stats: Any, batch: MicroBatch, step: StepContext) -> tuple[torch.Tensor, Metrics]:
        """This micro-batch's loss (its share of the step's loss) and metrics.

        `stats` has the op outputs (`log_probs`, `entropy`, and `nucleus_entropy`,
        `nucleus_mass`, `nucleus_size` when requested) in the micro-batch's token layout.
        """
        batch = batch.flat()
        inputs = self._inputs(stats, batch, step)
        mask = batch.mask
        share = batch.num_seqs / max(step.normalizers.num_seqs, 1.0)
        metrics = Metrics()
        loss = inputs.agg(inputs.surrogate.token_loss)
        metrics.add("loss/policy", loss, share)
        if self.kl is not None and self.kl.coef > 0:
            if batch.ref_log_probs is None:
                raise ValueError("algorithm.kl_coef > 0 needs MicroBatch.ref_log_probs")
            kl_T = self.kl.token_values(inputs.log_probs, batch.ref_log_probs, mask)
            kl_term = self.kl.coef * inputs.agg(kl_T)
            loss = loss + kl_term
            metrics.add("loss/kl", kl_term, share)
            metrics.add_mean("kl/ref", kl_T, mask)
        term, extra = self.intervention.loss(inputs)
        if not isinstance(term, torch.Tensor) or term.dim() != 0 or not isinstance(extra, Metrics):
            raise TypeError(f"{type(self.intervention).__name__}.loss must return "
                            "(0-d tensor, Metrics)")
        loss = loss + term
        metrics.add("loss/intervention", term, share)
        metrics.add("loss/total", loss, share)
        self._token_metrics(metrics, stats, inputs)
        entropy_sum = torch.where(mask, inputs.entropy.detach().double(), 0.0).sum()
        step.entropy_sum = entropy_sum if step.entropy_sum is None else step.entropy_sum + entropy_sum
        return loss, metrics.update(extra)

    def end_step(self, step: StepContext) -> None:
        """After the optimizer step: the step's mean entropy (all-reduced over the step's DP
        group; collective) and the intervention's update (e.g. AER's alpha)."""
        total = step.entropy_sum
        if total is None:
            total = torch.zeros((), dtype=torch.float64)
        total = all_reduce(total.clone().reshape(1), step.dp_group)
        step.entropy_mean = float(total[0]) / max(step.normalizers.num_tokens, 1.0)
        self.intervention.end_step(step)
        self.num_steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Counters and the intervention's state (identical on every rank)."""
        return {"num_steps": self.num_steps, "num_iterations": self.num_iterations,
                "intervention": self.intervention.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self.num_iterations = int(state["num_iterations"])
        self.intervention.load_state_dict(dict(state["intervention"]))

    # ----------------------------------------------------------------------------------------

    def _inputs(self, stats: Any, batch: MicroBatch, step: StepContext) -> LossInputs:
        def flat(name: str, required: bool) -> Optional[torch.Tensor]:
            value = getattr(stats, name, None)
            if value is None and required:
                raise ValueError(f"token stats lack {name!r}: compute them with "
                                 "PolicyObjective.stats_kwargs")
            # Outside the mask the ops may give -inf (padding targets) or nan; a `where` keeps
            # those out of every later product, and its backward sends exactly 0 there.
            return None if value is None else torch.where(batch.mask, value.reshape(-1), 0.0)

        log_probs = flat("log_probs", True)
        mask = batch.mask
        weights = self.aggregator.token_weights(mask, batch.seq_ids, batch.num_seqs,
                                                step.normalizers)
        surrogate: SurrogateOutput = self.surrogate(log_probs, batch.old_log_probs,
                                                    batch.advantages, mask)
        return LossInputs(batch=batch, log_probs=log_probs, entropy=flat("entropy", True),
                          nucleus_entropy=flat("nucleus_entropy",
                                               self.request.nucleus_top_p is not None),
                          surrogate=surrogate, weights=weights, step=step)

    def _token_metrics(self, metrics: Metrics, stats: Any, inputs: LossInputs) -> None:
        mask, sur = inputs.mask, inputs.surrogate
        metrics.add_mean("entropy/mean", inputs.entropy, mask)
        if self.request.nucleus_top_p is not None:
            metrics.add_mean("entropy/nucleus_mean", inputs.nucleus_entropy, mask)
            for name in ("nucleus_size", "nucleus_mass"):
                value = getattr(stats, name, None)
                if value is not None:
                    metrics.add_mean(f"entropy/{name}", value.reshape(-1).float(), mask)
        metrics.add_mean("ppo/clip_frac_low", sur.clip_low.float(), mask)
        metrics.add_mean("ppo/clip_frac_high", sur.clip_high.float(), mask)
        metrics.add_mean("ppo/dual_clip_frac", sur.dual_clip.float(), mask)
        metrics.add_mean("ppo/ratio_mean", sur.ratio, mask)
        safe_old = torch.where(mask, inputs.batch.old_log_probs, inputs.log_probs.detach())
        metrics.add_mean("kl/approx", kl_estimate(inputs.log_probs.detach(), safe_old, "k3"), mask)


def build_loss(algorithm_cfg, entropy_cfg, rollout_cfg, seed: int) -> PolicyObjective:
    """The run's policy objective from the `algorithm`, `entropy` and `rollout` sections
    (clip bounds, aggregation, KL; the intervention; temperature and the Dr.GRPO length)."""
    intervention = build_intervention(entropy_cfg, seed=seed)
    kl = None
    if algorithm_cfg.kl_coef > 0:
        kl = KLPenalty(algorithm_cfg.kl_coef, algorithm_cfg.kl_estimator)
    return PolicyObjective(
        surrogate=ClippedSurrogate.from_config(algorithm_cfg, clip=intervention.clip_surrogate),
        aggregator=Aggregator(algorithm_cfg.loss_agg_mode, rollout_cfg.max_new_tokens),
        intervention=intervention, kl=kl, temperature=rollout_cfg.temperature,
        nucleus_rule=entropy_cfg.nucleus_rule, nucleus_top_k=entropy_cfg.nucleus_top_k,
        chunk_size=algorithm_cfg.logits_chunk_tokens,
    )
