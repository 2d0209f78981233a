"""Per-token KL estimators between the current policy and another one (spec section 2).

With `delta = lp - lp_other` (log-probs of the sampled token):
  k1 = delta                        (unbiased, high variance, can be negative)
  k2 = delta^2 / 2                  (biased, low variance)
  k3 = exp(-delta) + delta - 1      (unbiased, low variance, always >= 0; Schulman's estimator)
The KL penalty to the reference policy is `kl_coef * agg(k)`; k3 to the behaviour policy is
also the `kl/approx` metric.
"""

from __future__ import annotations

import torch

from .policy import MAX_LOG_RATIO

ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(log_probs: torch.Tensor, other_log_probs: torch.Tensor, estimator: str) -> torch.Tensor:
    """The per-token estimate of KL(pi || pi_other) (differentiable w.r.t. `log_probs`)."""
    delta = log_probs - other_log_probs
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta.square()
    if estimator == "k3":
        # exp(-delta) overflows for very unlikely tokens; the clamp keeps the value finite.
        delta = delta.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        return torch.exp(-delta) + delta - 1.0
    raise ValueError(f"KL estimator {estimator!r} is not one of {ESTIMATORS}")


class KLPenalty:
    """`coef * agg(k(lp, lp_ref))` for the configured estimator."""

    def __init__(self, coef: float, estimator: str) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"KL estimator {estimator!r} is not one of {ESTIMATORS}")
        if coef < 0:
            raise ValueError(f"kl coefficient must be >= 0, got {coef}")
        self.coef, self.estimator = coef, estimator

    def token_values(self, log_probs_T: torch.Tensor, ref_log_probs_T: torch.Tensor,
                     mask_T: torch.Tensor) -> torch.Tensor:
        """The unweighted per-token KL estimate [T], 0 outside the mask."""
        safe_ref = torch.where(mask_T, ref_log_probs_T, log_probs_T.detach())
        return torch.where(mask_T, kl_estimate(log_probs_T, safe_ref, self.estimator), 0.0)
