"""The total order of spec 1.4 as int64 keys, and exact sums over a nucleus' members.

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


def member_sums(member: torch.Tensor, e: torch.Tensor, y: torch.Tensor, bits: int):
    """(sum_N e, sum_N e * y, |N|) per row, int64, the sums in fixed point with `bits`
    fraction bits: exact, so the same for any list length or TP size. `where`, not a
    product: e * y is NaN at -inf logits outside N."""
    scale = float(2 ** bits)
    e_in = torch.where(member, (e * scale).long(), 0)
    ey_in = torch.where(member, (e * y * scale).long(), 0)
    return e_in.sum(-1), ey_in.sum(-1), member.sum(-1)
