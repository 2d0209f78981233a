"""SIREN (Jiang et al. 2025; spec section 3.4): anchored, masked nucleus-entropy regularisation.

`H_sel` = mean over the step's responses of the mean H_p over each response's kept tokens
(H_p > the response's q-quantile of H_p, linear interpolation; a response with none kept
contributes 0 and still counts). `L = L_pg + lambda * (H_sel - H_anchor)^2`.

Exact over micro-batches and data parallelism. `H_sel` is a mean over every response of the
optimizer step, so the square is not a sum over micro-batches. Its gradient is
`2 lambda (H_sel - H_anchor) dH_sel`, and `dH_sel` is a sum over micro-batches. Each
micro-batch therefore returns the linearised term
    c * (x - stopgrad(x)) + lambda * (H_hat - H_anchor)^2 * S_mb / S_step,
with `x` its share of `H_sel` (its responses' kept means / S_step), `c = 2 lambda (H_hat -
H_anchor)` a detached coefficient, and `H_hat` the step's global `H_sel` measured in
`begin_step` from the old-log-prob pass's nucleus entropies (`MicroBatch.old_nucleus_entropy`),
all-reduced over data parallelism. Summed over micro-batches and DP ranks, the value is
`lambda (H_hat - H_anchor)^2` and the gradient is `2 lambda (H_hat - H_anchor) dH_sel`,
whatever the micro-batch or DP size. For the first optimizer step of an on-policy iteration
the old pass ran the current parameters, so `H_hat = H_sel` and this is the exact gradient of
the quadratic; on later optimizer steps of the same rollout batch `H_hat` is the behaviour
policy's value (stale by the policy's drift within the iteration, like the PPO ratio's
reference). `H_anchor` is `H_sel` of the first training step's whole rollout batch (the initial
policy), measured in `begin_iteration` from the same old-pass values, unless given.

Ablations: no anchor (`-lambda * H_sel`, linear, so exact without `H_hat`), full entropy H
instead of H_p, no trajectory mask (every valid token kept).

Legend: T = tokens of one micro-batch, flattened; S = its responses.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..batch import MicroBatch
from ..metrics import Metrics
from ..reduce import all_reduce, per_token, segment_quantile, seq_mean_weights
from .base import Intervention, LossInputs, StatsRequest, StepContext


class Siren(Intervention):
    """SIREN's regulariser; see the module docstring for how it is made exact."""

    name = "siren"

    def __init__(self, config, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed)
        self.anchor: Optional[float] = config.siren_anchor

    def state_dict(self) -> dict:
        return {"anchor": self.anchor}

    def stats_request(self) -> StatsRequest:
        top_p = self.config.siren_top_p if self.config.siren_use_nucleus else None
        return StatsRequest(entropy=True, nucleus_top_p=top_p)

    def kept_tokens(self, values_T: torch.Tensor, mask_T: torch.Tensor, seq_ids_T: torch.Tensor,
                    num_seqs: int) -> torch.Tensor:
        """The peak-entropy tokens [T]: valid and above their response's quantile."""
        if not self.config.siren_use_mask:
            return mask_T
        tau_S = segment_quantile(values_T, mask_T, seq_ids_T, num_seqs,
                                 self.config.siren_mask_quantile)
        tau_T = per_token(tau_S, mask_T, seq_ids_T)
        return mask_T & (values_T.detach().double() > tau_T)

    def selected_sum(self, values_T: torch.Tensor, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over responses of the mean of `values_T` over kept tokens, kept mask [T])."""
        kept = self.kept_tokens(values_T, batch.mask, batch.seq_ids, batch.num_seqs)
        weights = seq_mean_weights(kept, batch.seq_ids, batch.num_seqs, 1.0).to(values_T.dtype)
        return torch.where(kept, values_T * weights, 0.0).sum(), kept

    def measure(self, micro_batches: Sequence[MicroBatch], dp_group) -> float:
        """Global H_sel of the old-pass values over these micro-batches and the DP group."""
        field = "old_nucleus_entropy" if self.config.siren_use_nucleus else "old_entropy"
        device = micro_batches[0].mask.device if micro_batches else torch.device("cpu")
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        for mb in micro_batches:
            values = getattr(mb, field)
            if values is None:
                raise ValueError(
                    f"entropy.intervention=siren needs MicroBatch.{field} from the old-log-prob "
                    "pass (run the ops with PolicyObjective.stats_kwargs there and store "
                    "TokenStats." + field.removeprefix("old_") + "); "
                    "algorithm.use_rollout_logprobs=true skips that pass")
            selected, _ = self.selected_sum(values.reshape(-1).double(), mb.flat())
            totals[0] += selected.detach().double()
            totals[1] += mb.num_seqs
        all_reduce(totals, dp_group)
        return float(totals[0] / totals[1].clamp(min=1.0))

    def begin_iteration(self, micro_batches: Sequence[MicroBatch], dp_group) -> None:
        if self.config.siren_use_anchor and self.anchor is None:
            self.anchor = self.measure(micro_batches, dp_group)

    def begin_step(self, micro_batches: Sequence[MicroBatch], step: StepContext) -> None:
        if self.config.siren_use_anchor:
            step.extras["siren/h_hat"] = self.measure(micro_batches, step.dp_group)

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, Metrics]:
        cfg = self.config
        values = inputs.nucleus_entropy if cfg.siren_use_nucleus else inputs.entropy
        selected, kept = self.selected_sum(values, inputs.batch)
        total_seqs = max(inputs.step.normalizers.num_seqs, 1.0)
        share = selected / total_seqs  # this micro-batch's part of H_sel
        metrics = Metrics()
        metrics.add("siren/selected_entropy", selected, inputs.batch.num_seqs)
        metrics.add("siren/kept_frac", kept.sum(), inputs.mask.sum())
        if not cfg.siren_use_anchor:
            return -cfg.siren_coef * share, metrics
        if self.anchor is None or "siren/h_hat" not in inputs.step.extras:
            raise RuntimeError("SIREN: begin_iteration and begin_step must run before the loss")
        gap = inputs.step.extras["siren/h_hat"] - self.anchor
        value = cfg.siren_coef * gap * gap * inputs.batch.num_seqs / total_seqs
        term = 2.0 * cfg.siren_coef * gap * (share - share.detach()) + value
        metrics.add("siren/anchor", self.anchor)
        metrics.add("siren/step_selected_entropy", inputs.step.extras["siren/h_hat"])
        return term, metrics
