"""Backward of the nucleus entropy (spec 1.4): -q (z - sum_N q z) inside N, 0 outside.

In terms of this package's y' = log p (see softmax_stats), the gradient of g * H_p is
exp(y') * (a2 + b2 * y') on members of N and 0 elsewhere, with per-row a2, b2 from the
saved scalars. Small nuclei (the usual case) keep the list of their members' global ids from
the forward, so their gradient touches only those entries; rows with larger nuclei find
their members again by comparing the logits with the saved cut. No communication.

Shape legend: T tokens, B rows of a block, V real local columns, P member entries.
"""

from __future__ import annotations

import numpy as np
import torch

from megarl.ops.shard import VocabShard

SPARSE_MEMBERS = 128
"""Nuclei up to this size keep their member ids for a sparse backward."""


def membership(x_BV: torch.Tensor, cut_value_B: torch.Tensor, cut_local_B: torch.Tensor,
               split_B: list[bool]) -> torch.Tensor:
    """Nucleus membership of local columns: x > v, or x == v and column <= the cut column.

    This is the order of spec 1.4 (probability descending, smaller id first) on raw logits,
    which order exactly like probabilities and never round two different values together.
    Only rows where a tie at v straddles the cut (`split_B`) need the column test.
    """
    member = x_BV >= cut_value_B.unsqueeze(1)
    rows = [i for i, s in enumerate(split_B) if s]
    if rows:
        r = torch.tensor(rows, device=x_BV.device)
        x, v = x_BV[r], cut_value_B[r].unsqueeze(1)
        cols = torch.arange(x_BV.shape[1], device=x_BV.device).unsqueeze(0)
        member[r] = (x > v) | ((x == v) & (cols <= cut_local_B[r].unsqueeze(1)))
    return member


def _term(y: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """exp(y') * (a2 + b2 * y'): one formula (no fused multiply-add) for sparse and dense rows,
    so a row's gradient has the same bits whichever path its TP size sends it down."""
    return torch.exp(y) * (a2 + b2 * y)


class NucleusGrad:
    """The nucleus term of one backward call, handed out block by block."""

    def __init__(self, a2_T: torch.Tensor, b2_T: torch.Tensor, saved: dict, shard: VocabShard,
                 temperature: float):
        self.a2, self.b2 = a2_T, b2_T
        self.row_max, self.log_s, self.temperature = saved["row_max"], saved["log_s"], temperature
        self.cut_value = saved["cut_value"]
        self.cut_local = saved["cut_id"] - shard.start
        ids = saved["member_ids"]
        local = (ids >= shard.start) & (ids < shard.start + shard.real_local)
        self.rows = saved["member_rows"][local]  # sorted by row (forward sorts them)
        self.cols = ids[local] - shard.start
        # one host copy per call, so that blocks slice their entries without device syncs
        self.rows_host = self.rows.cpu().numpy()
        self.dense = saved["dense"].nonzero().squeeze(1).tolist()
        self.split = set(saved["split"].nonzero().squeeze(1).tolist())

    def terms(self, x_BV: torch.Tensor, row0: int, y_BV: torch.Tensor | None = None):
        """The term's values for rows [row0, row0 + B). y' is read from `y_BV` (before it is
        reused) or, without one, computed from the logits where needed, in the same float32
        operations as `softmax_stats.shift_into` followed by `- log S`."""
        rows = x_BV.shape[0]
        lo, hi = np.searchsorted(self.rows_host, [row0, row0 + rows]).tolist()
        r, c = self.rows[lo:hi] - row0, self.cols[lo:hi]
        g = r + row0
        v = y_BV[r, c] if y_BV is not None else self._y(x_BV[r, c], g)
        sparse = (r, c, _term(v, self.a2[g], self.b2[g]))
        dense_rows = [d for d in self.dense if row0 <= d < row0 + rows]
        if not dense_rows:
            return sparse, None
        d = torch.tensor(dense_rows, device=x_BV.device)
        x = x_BV[d - row0]
        member = membership(x, self.cut_value[d], self.cut_local[d],
                            [i in self.split for i in dense_rows])
        y = y_BV[d - row0] if y_BV is not None else self._y(x, d.unsqueeze(1))
        inside = _term(y, self.a2[d].unsqueeze(1), self.b2[d].unsqueeze(1))
        return sparse, (d - row0, torch.where(member, inside, 0.0))  # where: y' = -inf outside N

    def _y(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        y = x.float() - self.row_max[rows]
        if self.temperature != 1.0:
            y = y / self.temperature
        return y - self.log_s[rows]

    @staticmethod
    def apply(p_BV: torch.Tensor, terms) -> None:
        """Add the terms from `terms` into a block of the gradient."""
        (r, c, values), dense = terms
        p_BV.index_put_((r, c), values.to(p_BV.dtype), accumulate=True)
        if dense is not None:
            rows, values = dense
            p_BV.index_add_(0, rows, values.to(p_BV.dtype))
