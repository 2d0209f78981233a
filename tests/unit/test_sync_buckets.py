"""Bucketing of (name, tensor) streams: sizes, SGLang's alignment rule, no copy for big tensors,
byte-exact round trips, bounded memory, strategy choice per rank."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megarl.config import SyncConfig
from megarl.sync.base import DrainWeightSync, make_weight_sync
from megarl.sync.buckets import iter_buckets, unpack_flat
from megarl.sync.verify import Fingerprints, tensor_checksum

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int64]


def stream(specs):
    gen = torch.Generator().manual_seed(0)
    for i, (dtype, numel) in enumerate(specs):
        t = torch.randn(numel, generator=gen) * 100
        yield f"w{i}", t.to(dtype)


@settings(max_examples=60, deadline=None)
@given(specs=st.lists(st.tuples(st.sampled_from(DTYPES), st.integers(0, 50)), max_size=12),
       bucket_bytes=st.integers(1, 160))
def test_flattened_buckets_round_trip_and_respect_limits(specs, bucket_bytes):
    originals = list(stream(specs))
    seen = []
    for bucket in iter_buckets(iter(originals), bucket_bytes):
        assert len(bucket) >= 1 and bucket.flat.numel() == bucket.nbytes
        assert len(bucket) == 1 or bucket.nbytes <= bucket_bytes
        offset = 0
        for (name, tensor), (exp_name, expected) in zip(unpack_flat(bucket),
                                                        originals[len(seen):]):
            assert offset % tensor.element_size() == 0  # the receiver's alignment rule
            assert name == exp_name and tensor.dtype == expected.dtype
            assert torch.equal(tensor.view(torch.uint8), expected.view(torch.uint8))
            offset += tensor.numel() * tensor.element_size()
        seen += bucket.names  # consume before advancing: the buffer is reused
    assert seen == [name for name, _ in originals]


def test_misaligned_tensor_starts_a_new_bucket():
    named = [("a", torch.ones(3, dtype=torch.bfloat16)), ("b", torch.ones(2, dtype=torch.float32))]
    buckets = [b.names for b in iter_buckets(iter(named), 1024)]
    assert buckets == [["a"], ["b"]]  # 6 bytes of bf16, then fp32 would sit at offset 6


def test_large_tensor_travels_alone_without_a_copy():
    big = torch.arange(100, dtype=torch.float32)
    named = [("small", torch.ones(2)), ("big", big), ("after", torch.ones(2))]
    buckets = list(b for b in iter_buckets(iter(named), 64))
    assert [b.names for b in buckets] == [["small"], ["big"], ["after"]]
    assert buckets[1].flat.data_ptr() == big.data_ptr()


def test_unflattened_buckets_keep_the_tensors():
    named = list(stream([(torch.float32, 4)] * 5))
    buckets = list(iter_buckets(iter(named), 40, flattened=False))
    assert [len(b) for b in buckets] == [2, 2, 1]
    assert all(b.flat is None for b in buckets)
    assert buckets[0].tensors[0].data_ptr() == named[0][1].data_ptr()  # no copy


def test_non_contiguous_and_bad_items():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    (bucket,) = iter_buckets(iter([("t", t)]), 1024)
    assert torch.equal(unpack_flat(bucket)[0][1], t)
    with pytest.raises(TypeError, match="weight 'x'"):
        list(iter_buckets(iter([("x", [1.0])]), 64))
    with pytest.raises(ValueError):
        list(iter_buckets(iter([]), 0))


def test_fingerprints_detect_single_bit_changes():
    t = torch.randn(4, 3).to(torch.bfloat16)
    prints = Fingerprints()
    prints.add("t", t)
    flipped = t.clone()
    flipped.view(torch.int16)[3, 2] ^= 1
    assert prints.compare_checksums("s", {"t": tensor_checksum(t)}) == []
    assert prints.compare_checksums("s", {"t": tensor_checksum(flipped)}) == ["s: t"]
    assert prints.compare_rows("s", "t", t.float().tolist()) == []
    assert prints.compare_rows("s", "t", flipped.float().tolist()) == []  # beyond the first rows
    flipped.view(torch.int16)[0, 0] ^= 1
    assert prints.compare_rows("s", "t", flipped.float().tolist()) != []


def test_only_rank_zero_broadcasts():
    drain = make_weight_sync(SyncConfig(), ["http://127.0.0.1:1"], rank=3)
    assert isinstance(drain, DrainWeightSync)
    consumed = []

    def export():
        for i in range(3):
            consumed.append(i)  # a producer's collectives run here on every rank
            yield f"w{i}", torch.ones(2)

    stats = drain.update(export(), version="1")
    assert consumed == [0, 1, 2] and stats.num_tensors == 3 and stats.num_bytes == 24
