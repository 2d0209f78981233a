"""The building blocks of megarl.ops that the end-to-end tests reach only indirectly."""

from __future__ import annotations

import torch

from megarl.ops import nucleus, nucleus_search
from megarl.ops.order import cut_of_key, order_keys
from megarl.ops.softmax_stats import MASS_BLOCK, block_sums, to_fixed


def test_keys_order_by_value_then_smaller_id_and_treat_signed_zeros_alike():
    values = torch.tensor([-1.5, -0.0, 0.0, 2.0, 2.0, float("-inf"), 1e-30, -1e-30])
    ids = torch.arange(8)
    keys = order_keys(values, ids)
    order = torch.argsort(keys, descending=True).tolist()
    assert order == [3, 4, 6, 1, 2, 7, 0, 5]
    v, g = cut_of_key(keys)
    assert torch.equal(v, values + 0.0) and torch.equal(g, ids)


def test_block_sums_are_split_invariant_and_close_to_element_sums():
    e = torch.rand(5, 4 * MASS_BLOCK + 37, generator=torch.Generator().manual_seed(0)) ** 6
    bits = 40

    def fixed(v, block=MASS_BLOCK):
        return to_fixed(block_sums(v, block), bits)

    whole = fixed(e)
    for cut in (MASS_BLOCK, 2 * MASS_BLOCK, 4 * MASS_BLOCK):
        assert torch.equal(fixed(e[:, :cut]) + fixed(e[:, cut:]), whole)
    elementwise = fixed(e, block=1)
    assert torch.equal(fixed(e[:, :37], 1) + fixed(e[:, 37:], 1), elementwise)
    assert ((whole - elementwise).abs().double() / whole.double() < 1e-6).all()


def test_bucket_shift_is_the_smallest_covering_power_of_two():
    widths = torch.tensor([2, 255, 256, 257, 512, 513, (1 << 53) + 1, (1 << 56) - 1, 1 << 56])
    shift = nucleus_search._bucket_shift(widths)
    assert ((256 << shift) >= widths).all()
    assert ((shift == 0) | ((256 << (shift - 1).clamp(min=0)) < widths)).all()


def test_local_top_keeps_everything_above_its_frontier_with_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 6, (40, 3000), generator=g).float()  # heavy ties
    x[:, 7] = 9.0
    for k in (1, 5, 32):
        values, cols, frontier = nucleus._local_top(x, k)
        assert torch.equal(x.gather(1, cols), values)
        for r in range(x.shape[0]):
            above = set((x[r] > frontier[r]).nonzero().flatten().tolist())
            assert above <= set(cols[r].tolist())
