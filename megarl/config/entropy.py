"""`entropy`: the entropy intervention and its parameters.

Formulas and defaults are those of `specs/entropy-methods.md`: entropy bonus (3.1), Clip-Cov
(3.2), KL-Cov (3.3), SIREN (3.4) and AER (3.5, megarl's interpretation of the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError, check_choice, check_non_negative, check_positive, check_range

BUILTIN_INTERVENTIONS = ("none", "entropy_bonus", "clip_cov", "kl_cov", "siren", "aer")
# What a user intervention class must provide (the interface of
# megarl.losses.interventions.Intervention, checked here without importing the losses).
INTERVENTION_METHODS = ("stats_request", "begin_iteration", "begin_step", "loss", "end_step",
                        "state_dict", "load_state_dict")


@dataclass(kw_only=True)
class EntropyConfig:
    intervention: str = "none"
    """none, entropy_bonus, clip_cov, kl_cov, siren, aer, or a user intervention given as a
    dotted path `package.module:ClassName`."""

    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options passed to a user intervention."""

    entropy_coef: float = 1e-3
    """Entropy bonus beta: the loss gets -beta * agg(H). 0 switches the bonus off."""

    clip_cov_ratio: float = 2e-4
    """Clip-Cov: share of valid tokens whose gradient is cut. (The published recipes also widen
    the PPO window: algorithm.clip_eps_low = clip_eps_high = 1 and dual_clip_c = 10.)"""

    cov_lb: float = 1.0
    """Clip-Cov: lower bound on a token's covariance for it to be a candidate."""

    cov_ub: float = 5.0
    """Clip-Cov: upper bound on a token's covariance for it to be a candidate."""

    cov_scope: str = "local"
    """Clip-Cov and KL-Cov covariance means: local (this rank's micro-batch) or global (the
    whole data-parallel group)."""

    kl_cov_ratio: float = 2e-4
    """KL-Cov: share of valid tokens (top covariance) that get the KL penalty."""

    kl_cov_coef: float = 1.0
    """KL-Cov: coefficient of |lp - lp_old| on the selected tokens."""

    siren_top_p: float = 0.8
    """SIREN: top-p of the nucleus whose entropy is regularised."""

    siren_mask_quantile: float = 0.8
    """SIREN: per-response quantile of nucleus entropy above which tokens are kept."""

    siren_coef: float = 0.005
    """SIREN: lambda, the weight of the anchored regulariser (H_sel - H_anchor)^2."""

    siren_anchor: Optional[float] = None
    """SIREN: a fixed anchor entropy; null measures it on the first training step."""

    siren_use_anchor: bool = True
    """SIREN ablation: false replaces the anchored term by -lambda * H_sel."""

    siren_use_nucleus: bool = True
    """SIREN ablation: false uses the full-vocabulary entropy instead of the nucleus entropy."""

    siren_use_mask: bool = True
    """SIREN ablation: false keeps every token instead of the per-response peak-entropy ones."""

    nucleus_rule: str = "inclusive"
    """Nucleus membership: inclusive (the standard top-p set, at least one token) or exclusive
    (SIREN's public code: tokens whose cumulative mass is strictly below p)."""

    nucleus_top_k: int = 1024
    """Candidates per tensor-parallel rank when finding the nucleus; rows whose nucleus does not
    fit fall back to an exact search."""

    aer_target_ratio: float = 0.4
    """AER: target entropy as a fraction of the initial entropy H_0."""

    aer_lr: float = 1e-3
    """AER: step size of the coefficient update alpha += lr * (H_target - H)."""

    aer_alpha_init: float = 0.0
    """AER: initial entropy coefficient alpha."""

    aer_alpha_max: float = 1e-2
    """AER: upper clip of alpha."""

    aer_weighting: str = "difficulty"
    """AER per-prompt weights: difficulty (1 - group accuracy, mean 1 over the batch) or uniform."""

    aer_skip_uniform_groups: bool = True
    """AER: prompts whose group rewards are all equal get weight 0."""

    aer_initial_entropy: Optional[float] = None
    """AER: a fixed H_0; null measures it on the first training step."""

    def validate(self) -> None:
        if self.intervention not in BUILTIN_INTERVENTIONS and ":" not in self.intervention:
            raise ConfigError(
                "entropy.intervention",
                f"{self.intervention!r} is not one of {', '.join(BUILTIN_INTERVENTIONS)} "
                "nor a dotted path 'package.module:ClassName'",
            )
        if self.options and self.intervention in BUILTIN_INTERVENTIONS:
            raise ConfigError(
                "entropy.options",
                f"{sorted(self.options)} given, but options are only passed to a user intervention "
                f"(a dotted path); {self.intervention!r} takes its settings from entropy.* fields",
            )
        for name in ("entropy_coef", "kl_cov_coef", "siren_coef", "aer_lr", "aer_alpha_init",
                     "aer_alpha_max"):
            check_non_negative("entropy", name, getattr(self, name))
        check_range("entropy", "clip_cov_ratio", self.clip_cov_ratio, low=0, high=1, low_open=True)
        check_range("entropy", "kl_cov_ratio", self.kl_cov_ratio, low=0, high=1, low_open=True)
        if not self.cov_lb < self.cov_ub:
            raise ConfigError(
                "entropy.cov_lb", f"{self.cov_lb!r} must be below entropy.cov_ub ({self.cov_ub!r})"
            )
        check_choice("entropy", "cov_scope", self.cov_scope, ("local", "global"))
        check_range("entropy", "siren_top_p", self.siren_top_p, low=0, high=1, low_open=True)
        check_range("entropy", "siren_mask_quantile", self.siren_mask_quantile, low=0, high=1)
        check_non_negative("entropy", "siren_anchor", self.siren_anchor)
        check_choice("entropy", "nucleus_rule", self.nucleus_rule, ("inclusive", "exclusive"))
        check_positive("entropy", "nucleus_top_k", self.nucleus_top_k)
        check_positive("entropy", "aer_target_ratio", self.aer_target_ratio)
        if self.aer_alpha_init > self.aer_alpha_max:
            raise ConfigError(
                "entropy.aer_alpha_init",
                f"{self.aer_alpha_init!r} is above entropy.aer_alpha_max ({self.aer_alpha_max!r})",
            )
        check_choice("entropy", "aer_weighting", self.aer_weighting, ("difficulty", "uniform"))
        check_non_negative("entropy", "aer_initial_entropy", self.aer_initial_entropy)
        if ":" in self.intervention:
            self._check_user_intervention()

    def _check_user_intervention(self) -> None:
        """Import the dotted path and check it names a class with the intervention methods."""
        import inspect

        from .validate import load_dotted  # validate imports the root config, which imports us

        cls = load_dotted(self.intervention, "entropy.intervention")
        if not inspect.isclass(cls):
            raise ConfigError("entropy.intervention", f"{self.intervention!r} is {cls!r}, not a "
                              "class (subclass megarl.losses.interventions.Intervention)")
        missing = [m for m in INTERVENTION_METHODS if not callable(getattr(cls, m, None))]
        if missing:
            raise ConfigError("entropy.intervention",
                              f"{self.intervention!r} lacks {', '.join(missing)}: subclass "
                              "megarl.losses.interventions.Intervention")
