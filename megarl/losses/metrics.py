"""Loss metrics as named sums with counts, so micro-batches and data-parallel ranks combine exactly.

Every metric is a pair (sum, count) and its value is sum / count. Adding the pairs of all
micro-batches of an optimizer step and all-reducing them over the data-parallel group gives
exactly the step's value, whatever the micro-batch or DP layout, for the kinds used here:
  * token means (e.g. `entropy/mean`): sum over valid tokens, count = valid tokens;
  * sequence means (e.g. `siren/selected_entropy`): sum over responses, count = responses;
  * loss contributions (`loss/*`): the micro-batch's contribution, count = its share of the
    step's responses, so the counts add up to 1 and the value is the step's loss;
  * per-micro-batch statistics that do not add (covariance quantiles `cov/p50`...): the
    statistic with count 1, i.e. their mean over micro-batches and ranks;
  * state values identical on every rank (`siren/anchor`, `aer/alpha`): value with count 1.
Metric names depend only on the configuration, never on the data, so every rank holds the
same names and one all-reduce of the stacked pairs combines them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .reduce import all_reduce


class Metrics:
    """Named (sum, count) pairs; `update` adds another set, `reduce` gives the values."""

    def __init__(self) -> None:
        self._pairs: dict[str, torch.Tensor] = {}

    def add(self, name: str, total, count=1.0) -> None:
        """Add `total` (tensor or number, detached) with weight `count` to metric `name`."""
        device = next((v.device for v in (total, count) if isinstance(v, torch.Tensor)), None)
        pair = torch.stack([_as_scalar(total, device), _as_scalar(count, device)])
        if name in self._pairs:
            self._pairs[name] = self._pairs[name] + pair.to(self._pairs[name].device)
        else:
            self._pairs[name] = pair

    def add_mean(self, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the masked token mean of `values` (sum over `mask`, count of `mask`)."""
        values = values.detach().double()  # float64 sums: combining is exact to rounding
        self.add(name, torch.where(mask, values, 0.0).sum(), mask.sum())

    def update(self, other: "Metrics") -> "Metrics":
        for name, pair in other._pairs.items():
            self.add(name, pair[0], pair[1])
        return self

    def names(self) -> list[str]:
        return sorted(self._pairs)

    def pair(self, name: str) -> tuple[float, float]:
        total, count = self._pairs[name].tolist()
        return total, count

    def reduce(self, group: Optional[dist.ProcessGroup] = None) -> dict[str, float]:
        """sum / count per metric after summing the pairs over `group` (None: no reduction).

        Collective over `group`: every rank must call it with the same metric names.
        A metric whose count is 0 reads as nan.
        """
        names = self.names()
        if not names:
            return {}
        device = self._pairs[names[0]].device
        stacked = torch.stack([self._pairs[n].to(device) for n in names])
        all_reduce(stacked, group)
        values = (stacked[:, 0] / stacked[:, 1]).tolist()
        return dict(zip(names, values))

    def __contains__(self, name: str) -> bool:
        return name in self._pairs

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={self.pair(n)[0]:.4g}/{self.pair(n)[1]:.4g}" for n in self.names())
        return f"Metrics({inner})"


def _as_scalar(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)
