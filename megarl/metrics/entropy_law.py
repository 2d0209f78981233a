"""The entropy-performance law R = -a exp(H) + b (spec section 4).

Cui et al. (2025) observe that during RL without an entropy intervention the reward R and the
policy entropy H follow this curve, so the reward reachable once entropy is exhausted (H = 0) is
`b - a`. The law is linear in x = exp(H), so a and b are the ordinary least-squares line
R = b - a x, in closed form:

    a = -cov(x, R) / var(x),    b = mean(R) + a mean(x).

`EntropyLawFitter` keeps the running means and co-moments (Welford's update, which stays exact
where the textbook sum-of-squares formula cancels catastrophically) so the trainer can refit
every step in O(1) and report `entropy_law/a`, `entropy_law/b` and `entropy_law/ceiling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

METRIC_PREFIX = "entropy_law"
ENTROPY_KEY = "entropy/mean"
REWARD_KEY = "reward/mean"
"""The step metrics the law is fitted to, by the trainer online and by `megarl report`."""


@dataclass(frozen=True)
class EntropyLawFit:
    """A fitted law R = -a exp(H) + b."""

    a: float
    b: float
    r2: float
    """Share of the reward's variance the law explains (1 = points exactly on the curve)."""

    num_points: int

    @property
    def ceiling(self) -> float:
        """The predicted reward at zero entropy, b - a."""
        return self.b - self.a

    def predict(self, entropy: float) -> float:
        return -self.a * math.exp(entropy) + self.b

    def metrics(self, prefix: str = METRIC_PREFIX) -> dict[str, float]:
        return {f"{prefix}/a": self.a, f"{prefix}/b": self.b,
                f"{prefix}/ceiling": self.ceiling, f"{prefix}/r2": self.r2}


class EntropyLawFitter:
    """Online least-squares fit of the law from (entropy, reward) pairs.

        fitter = EntropyLawFitter(min_points=cfg.trainer.entropy_law_min_steps)
        metrics |= fitter.update(metrics["entropy/mean"], metrics["reward/mean"])

    `update` returns the law's metrics once `min_points` pairs are in and the entropies are not
    all equal, and an empty dict before. Its state is a handful of floats, saved with
    `state_dict` in checkpoints so a resumed run keeps fitting on the same points.
    """

    def __init__(self, min_points: int = 5) -> None:
        if min_points < 2:
            raise ValueError(f"min_points={min_points}: a line needs at least 2 points")
        self.min_points = min_points
        self._count = 0
        self._mean_x = 0.0
        self._mean_r = 0.0
        self._m_xx = 0.0  # sum of (x - mean_x)^2
        self._m_rr = 0.0
        self._m_xr = 0.0

    def add(self, entropy: float, reward: float) -> None:
        """Take one (entropy, reward) pair; non-finite pairs are ignored."""
        if not (math.isfinite(entropy) and math.isfinite(reward)):
            return
        x = math.exp(entropy)
        self._count += 1
        dx = x - self._mean_x
        dr = reward - self._mean_r
        self._mean_x += dx / self._count
        self._mean_r += dr / self._count
        # The co-moment update uses the old deviation of one variable and the new of the other.
        self._m_xx += dx * (x - self._mean_x)
        self._m_rr += dr * (reward - self._mean_r)
        self._m_xr += dx * (reward - self._mean_r)

    def fit(self) -> Optional[EntropyLawFit]:
        """The current fit, or None with too few points or no spread in entropy."""
        if self._count < self.min_points or self._m_xx <= 1e-12 * max(self._mean_x ** 2, 1e-300):
            return None
        slope = self._m_xr / self._m_xx
        a = -slope
        b = self._mean_r - slope * self._mean_x
        residual = self._m_rr - slope * self._m_xr
        r2 = 1.0 - residual / self._m_rr if self._m_rr > 0 else 1.0
        return EntropyLawFit(a=a, b=b, r2=r2, num_points=self._count)

    def update(self, entropy: float, reward: float) -> dict[str, float]:
        """`add`, then the law's metrics if a fit exists."""
        self.add(entropy, reward)
        fit = self.fit()
        return {} if fit is None else fit.metrics()

    def state_dict(self) -> dict[str, float]:
        return {"count": self._count, "mean_x": self._mean_x, "mean_r": self._mean_r,
                "m_xx": self._m_xx, "m_rr": self._m_rr, "m_xr": self._m_xr}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._count = int(state["count"])
        self._mean_x, self._mean_r = float(state["mean_x"]), float(state["mean_r"])
        self._m_xx, self._m_rr = float(state["m_xx"]), float(state["m_rr"])
        self._m_xr = float(state["m_xr"])


def fit_entropy_law(entropies: Iterable[float], rewards: Iterable[float]) -> Optional[EntropyLawFit]:
    """Fit the law to paired sequences; None with fewer than 2 usable points or no entropy
    spread."""
    fitter = EntropyLawFitter(min_points=2)
    for entropy, reward in zip(entropies, rewards, strict=True):
        fitter.add(float(entropy), float(reward))
    return fitter.fit()
