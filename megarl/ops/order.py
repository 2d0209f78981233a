"""The total order of spec 1.4 as int64 keys, and sums over a nucleus' members.

Order: probability descending, then smaller global id. Probabilities order exactly like the
raw logits, so the order is taken on the raw values (never on rounded probabilities, which
can tie where the logits do not): an element's key is
(order-preserving bits of its float32 logit << 24) + (2**24 - 1 - id), and "key >= t" means
"comes no later than the element with key t".
"""

from __future__ import annotations

import torch

ID_BITS = 24
ID_MASK = (1 << ID_BITS) - 1
MIN_KEY = -(1 << 62)  # below every element's key


def order_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (value descending, id ascending) as keys descending."""
    v = values.float() + 0.0  # -0.0 -> +0.0: equal floats must get equal keys
    bits = v.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (ordered << ID_BITS) + (ID_MASK - ids)


def _value_of_ordered(ordered: torch.Tensor) -> torch.Tensor:
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    return bits.view(torch.float32)


def cut_of_key(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cut_value, cut_id) such that key(x, id) >= keys iff x > v or (x == v and id <= g)."""
    return _value_of_ordered(keys >> ID_BITS), ID_MASK - (keys & ID_MASK)


def member_sums(member: torch.Tensor, e: torch.Tensor, y: torch.Tensor):
    """(sum_N e, sum_N e * y, |N|) per row (float64 results of float32 sums, which torch
    takes pairwise); `where`, not a product: e * y is NaN at -inf logits outside N."""
    e_in = torch.where(member, e, 0.0)
    ey_in = torch.where(member, e * y, 0.0)
    return e_in.sum(-1).double(), ey_in.sum(-1).double(), member.sum(-1).double()
