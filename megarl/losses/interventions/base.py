"""The one interface every entropy intervention implements (spec section 3), built in or user's.

An intervention is a loss module: it declares the token statistics it needs, receives the
per-token tensors of each micro-batch and returns its loss term plus metrics. Its term is
added to the policy surrogate's aggregate, so an intervention that changes the surrogate
itself (Clip-Cov zeroes some tokens' loss) returns the change as a term; one that needs the
unclipped surrogate (KL-Cov) says so with `clip_surrogate = False`.

State (anchors, coefficients, random streams) lives in the intervention, is identical on
every rank (it is only ever changed from values all-reduced over data parallelism, or from
counters every rank advances alike) and goes into checkpoints through
`state_dict()` / `load_state_dict()`.

Legend: T = tokens of one micro-batch, flattened.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.distributed as dist

from ..batch import MicroBatch
from ..metrics import Metrics
from ..policy import SurrogateOutput
from ..reduce import Aggregator, StepNormalizers


@dataclass(frozen=True)
class StatsRequest:
    """Token statistics an intervention needs besides the sampled tokens' log-probs."""

    entropy: bool = False
    """The full-vocabulary entropy H (differentiable)."""

    nucleus_top_p: Optional[float] = None
    """The nucleus entropy H_p at this top-p (differentiable); None: not computed."""


@dataclass
class StepContext:
    """One optimizer step, from `begin_step` to `end_step` (made by the policy objective)."""

    index: int
    """Optimizer steps completed before this one (counted across resumes)."""

    normalizers: StepNormalizers
    """Valid tokens and responses of the whole step, over all micro-batches and DP ranks."""

    aggregator: Aggregator
    """The policy loss's aggregation (the `agg` of spec formulas)."""

    dp_group: Optional[dist.ProcessGroup]
    """The data-parallel group (None: one rank)."""

    entropy_sum: Optional[torch.Tensor] = None
    """Sum of H over this rank's valid tokens seen so far in this step (detached)."""

    entropy_mean: Optional[float] = None
    """The step's global mean token entropy; set by the objective before `end_step`."""

    extras: dict[str, Any] = field(default_factory=dict)
    """Room for interventions' per-step values (e.g. SIREN's measured H_sel)."""


@dataclass
class LossInputs:
    """What an intervention receives for one micro-batch. All per-token tensors are [T]."""

    batch: MicroBatch
    """The micro-batch, flattened (mask, seq_ids, advantages, old log-probs, ...)."""

    log_probs: torch.Tensor
    """Current log-probs of the sampled tokens (differentiable)."""

    entropy: Optional[torch.Tensor]
    """Full entropy H (differentiable), when requested."""

    nucleus_entropy: Optional[torch.Tensor]
    """Nucleus entropy H_p (differentiable), when requested."""

    surrogate: SurrogateOutput
    """The policy surrogate of this micro-batch (token losses, ratio, clip flags)."""

    weights: torch.Tensor
    """Aggregation weights: `(x * weights).sum()` is this micro-batch's share of `agg(x)`."""

    step: StepContext
    """The optimizer step this micro-batch belongs to."""

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.mask

    def agg(self, values_T: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the step aggregate of `values_T` (valid tokens only)."""
        return torch.where(self.batch.mask, values_T * self.weights, 0.0).sum()


class Intervention(abc.ABC):
    """Base class of entropy interventions (built-in and user ones).

    Constructed as `cls(config, seed=seed, **options)` with the `EntropyConfig`, the run's
    seed and `entropy.options`. Calling sequence (driven by `PolicyObjective`):
    `begin_iteration` once per training step after the old-log-prob pass, then per optimizer
    step `begin_step`, `loss` once per micro-batch, `end_step` after the optimizer step.
    Every hook but `loss` is collective over the data-parallel group.
    """

    name: ClassVar[str] = "custom"
    clip_surrogate: ClassVar[bool] = True
    """False when the intervention needs the unclipped surrogate `-A r` (KL-Cov)."""

    def __init__(self, config, *, seed: int = 0) -> None:
        self.config = config
        self.seed = seed

    def stats_request(self) -> StatsRequest:
        """The statistics `loss` needs (their kwargs reach `vocab_parallel_token_stats`)."""
        return StatsRequest()

    def begin_iteration(self, micro_batches: Sequence[MicroBatch],
                        dp_group: Optional[dist.ProcessGroup]) -> None:
        """Once per training step, with this rank's micro-batches of the whole rollout batch
        (old-pass statistics filled in). Measure anchors, per-prompt weights."""

    def begin_step(self, micro_batches: Sequence[MicroBatch], step: StepContext) -> None:
        """Before the micro-batches of an optimizer step (this rank's, flattened)."""

    @abc.abstractmethod
    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        """This micro-batch's loss term (its share of the step's term) and metrics."""

    def end_step(self, step: StepContext) -> None:
        """After the optimizer step; `step.entropy_mean` holds the step's mean entropy."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (plain Python values, identical on every rank)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned. By default each key is the name of the
        attribute it came from (override when that is not so)."""
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise KeyError(f"{type(self).__name__}: unexpected state keys {sorted(unknown)}")
        for key, value in state.items():
            setattr(self, key, value)


def zero_loss(inputs: LossInputs) -> torch.Tensor:
    """A zero scalar on the inputs' device and dtype (the term of an inactive intervention)."""
    return inputs.log_probs.new_zeros(())
