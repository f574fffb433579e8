"""The epoch shuffle gives grain's order (so every stream measured with grain's shuffle is unchanged), fast."""

import pickle

import grain
import numpy as np
import pytest
from grain._src.python.experimental.index_shuffle.python import index_shuffle_module

from medssl_jax.data.shuffle import EpochShuffle, epoch_permutation

SEEDS = (0, 1, 123456789, 2**32 - 1)


def _grain_order(length, seed, indices):
    return np.array([index_shuffle_module.index_shuffle(int(i), max_index=length - 1, seed=seed, rounds=4)
                     for i in indices])


@pytest.mark.parametrize("length", [1, 2, 3, 6, 11, 55, 128, 129, 546, 4097])
def test_epoch_permutation_is_grains_index_shuffle(length):
    for seed in SEEDS:
        np.testing.assert_array_equal(epoch_permutation(length, seed), _grain_order(length, seed, range(length)))


def test_large_epochs_walk_each_element_and_agree_with_the_table():
    length = 70000  # an 18-bit block: the table path by default, the per-element walk below table_bits=16
    walked = epoch_permutation(length, 5, table_bits=16)
    np.testing.assert_array_equal(walked, epoch_permutation(length, 5))
    sample = np.random.default_rng(0).integers(0, length, 400)
    np.testing.assert_array_equal(walked[sample], _grain_order(length, 5, sample))


@pytest.mark.parametrize("length", [65537, 262145])
def test_every_epoch_is_a_permutation_also_where_grains_block_is_a_bit_short(length):
    # 4**k + 1 elements: grain's ceil(log2) block cannot hold the last index (one element never drawn).
    for table_bits in (20, 16):
        order = epoch_permutation(length, 3, table_bits=table_bits)
        np.testing.assert_array_equal(np.sort(order), np.arange(length))


def _with_draw(x, rng):
    """The element and a draw from the rng a downstream random_map gets for it."""
    return int(x), int(rng.integers(1 << 30))


@pytest.mark.parametrize("length,seed", [(6, 0), (55, 12345), (546, 2**32 - 1)])
def test_dataset_gives_grains_shuffle_and_downstream_randomness_across_epochs(length, seed):
    ours = EpochShuffle(grain.MapDataset.range(length).seed(seed)).repeat(None).random_map(_with_draw)
    grains = grain.MapDataset.range(length).seed(seed).shuffle().repeat(None).random_map(_with_draw)
    positions = range(4 * length)
    assert [ours[i] for i in positions] == [grains[i] for i in positions]
    restored = pickle.loads(pickle.dumps(ours))  # as Grain's worker processes receive it
    assert [restored[i] for i in positions] == [ours[i] for i in positions]


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="length=0"):
        epoch_permutation(0, 1)
    with pytest.raises(ValueError, match="rounds=3"):
        epoch_permutation(10, 1, rounds=3)
    with pytest.raises(ValueError, match="needs a seed"):
        EpochShuffle(grain.MapDataset.range(5))
