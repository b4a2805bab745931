"""Tests of the set sampling shared by training and prediction."""

import numpy as np
import pytest
import torch

from gacc.sampling import (
    draw_local_training_sets,
    draw_training_sets,
    local_partition,
    prediction_sets,
)

# Voxel counts that take each branch of draw_training_sets: permutations for
# at most 4 * N voxels, draws with duplicate repair above that.
SMALL_AND_LARGE = [pytest.param(20, id="permutation"), pytest.param(501, id="redraw")]


@pytest.mark.parametrize("n_voxels", SMALL_AND_LARGE)
def test_training_sets_shape_and_range(n_voxels):
    sets = draw_training_sets(n_voxels, 13, 7, torch.Generator().manual_seed(0))
    assert sets.shape == (13, 7)
    assert sets.dtype == torch.int64
    assert int(sets.min()) >= 0
    assert int(sets.max()) < n_voxels


@pytest.mark.parametrize("n_voxels", SMALL_AND_LARGE + [pytest.param(33, id="just-above")])
def test_training_sets_distinct_voxels(n_voxels):
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        sets = draw_training_sets(n_voxels, 32, 8, generator)
        for row in sets.tolist():
            assert len(set(row)) == len(row)


def test_training_sets_whole_foreground():
    # A foreground of exactly N voxels gives every voxel in every set.
    sets = draw_training_sets(8, 5, 8, torch.Generator().manual_seed(2))
    for row in sets.tolist():
        assert sorted(row) == list(range(8))


@pytest.mark.parametrize("n_voxels", SMALL_AND_LARGE)
def test_training_sets_uniform(n_voxels):
    # Each voxel is drawn about equally often. A chi-square statistic over
    # the counts has mean n_voxels - 1; the bound is loose, so a sampler that
    # favours some voxels (for example by its duplicate repair) still fails.
    generator = torch.Generator().manual_seed(3)
    counts = np.zeros(n_voxels)
    for _ in range(400):
        sets = draw_training_sets(n_voxels, 32, 8, generator)
        counts += np.bincount(sets.reshape(-1).numpy(), minlength=n_voxels)
    expected = counts.sum() / n_voxels
    chi_square = ((counts - expected) ** 2 / expected).sum()
    degrees = n_voxels - 1
    assert chi_square < degrees + 6 * np.sqrt(2 * degrees)
    assert counts.min() > 0


@pytest.mark.parametrize("n_voxels", SMALL_AND_LARGE)
def test_training_sets_repeat_with_seed(n_voxels):
    first = draw_training_sets(n_voxels, 4, 6, torch.Generator().manual_seed(7))
    second = draw_training_sets(n_voxels, 4, 6, torch.Generator().manual_seed(7))
    other = draw_training_sets(n_voxels, 4, 6, torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    "n_voxels, set_size",
    [
        pytest.param(48, 8, id="multiple"),
        pytest.param(50, 8, id="not-multiple"),
        pytest.param(8, 8, id="one-set"),
        pytest.param(11, 8, id="under-two-sets"),
        pytest.param(15, 8, id="one-short-of-two-sets"),
        pytest.param(997, 7, id="large-prime"),
    ],
)
def test_prediction_sets_cover_once(n_voxels, set_size):
    repeats = 5
    expected_sets = -(-n_voxels // set_size)
    seen = 0
    for sets, counted in prediction_sets(n_voxels, set_size, repeats, seed=0):
        seen += 1
        assert sets.shape == (expected_sets, set_size)
        assert counted.shape == sets.shape
        assert counted.dtype == bool
        assert int(sets.min()) >= 0
        assert int(sets.max()) < n_voxels

        # Every voxel is counted exactly once per repeat.
        counts = np.bincount(sets[counted], minlength=n_voxels)
        assert np.array_equal(counts, np.ones(n_voxels, dtype=int))

        # Only fill-in voxels are left uncounted, and no voxel appears twice in a set.
        assert int((~counted).sum()) == expected_sets * set_size - n_voxels
        for row in sets:
            assert len(set(row.tolist())) == set_size
    assert seen == repeats


def test_prediction_sets_repeat_with_seed():
    first = [sets.copy() for sets, _ in prediction_sets(30, 4, 3, seed=5)]
    second = [sets.copy() for sets, _ in prediction_sets(30, 4, 3, seed=5)]
    other = [sets.copy() for sets, _ in prediction_sets(30, 4, 3, seed=6)]
    for a, b in zip(first, second):
        assert np.array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_prediction_repeats_differ():
    # Each repeat puts a voxel in another random context.
    partitions = [sets.copy() for sets, _ in prediction_sets(40, 8, 3, seed=0)]
    assert not np.array_equal(partitions[0], partitions[1])
    assert not np.array_equal(partitions[1], partitions[2])


# ----------------------------------------------------------------------
# Local sets, drawn from small cubes


def _scattered_foreground(shape=(9, 10, 8), fraction=0.6, seed=0):
    """Return (n_voxels, 3) voxel indices of a random foreground, in C order."""
    mask = np.random.default_rng(seed).random(shape) < fraction
    return np.stack(np.unravel_index(np.flatnonzero(mask), shape), axis=1)


@pytest.mark.parametrize("window", [2, 3, 5, 20])
def test_local_prediction_sets_cover_once(window):
    ijk = _scattered_foreground()
    n_voxels = len(ijk)
    seen = 0
    for sets, counted in prediction_sets(n_voxels, 8, 4, seed=0, ijk=ijk, window=window):
        seen += 1
        assert sets.shape[1] == 8
        assert counted.shape == sets.shape
        assert int(sets.min()) >= 0
        assert int(sets.max()) < n_voxels
        counts = np.bincount(sets[counted], minlength=n_voxels)
        assert np.array_equal(counts, np.ones(n_voxels, dtype=int))
    assert seen == 4


@pytest.mark.parametrize("window", [2, 3, 5])
def test_local_sets_stay_in_window(window):
    # Every voxel of a set, fill-in voxels included, lies in one cube of
    # `window` voxels per side.
    ijk = _scattered_foreground()
    for sets, _ in prediction_sets(len(ijk), 8, 4, seed=1, ijk=ijk, window=window):
        extent = ijk[sets].max(axis=1) - ijk[sets].min(axis=1)  # (n_sets, 3)
        assert int(extent.max()) < window


def test_local_partition_offsets_vary():
    # The cubes move between repeats, so a voxel meets other neighbours.
    ijk = _scattered_foreground()
    partitions = [sets.copy() for sets, _ in prediction_sets(len(ijk), 8, 3, seed=0, ijk=ijk,
                                                             window=3)]
    assert not np.array_equal(partitions[0], partitions[1])


def test_local_training_sets():
    ijk = _scattered_foreground()
    first = draw_local_training_sets(ijk, 16, 8, 3, torch.Generator().manual_seed(4))
    second = draw_local_training_sets(ijk, 16, 8, 3, torch.Generator().manual_seed(4))
    other = draw_local_training_sets(ijk, 16, 8, 3, torch.Generator().manual_seed(5))
    assert first.shape == (16, 8)
    assert first.dtype == torch.int64
    assert int(first.min()) >= 0
    assert int(first.max()) < len(ijk)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    extent = ijk[first.numpy()].max(axis=1) - ijk[first.numpy()].min(axis=1)
    assert int(extent.max()) < 3


def test_local_single_voxel():
    ijk = np.array([[4, 2, 7]])
    sets, counted = local_partition(ijk, 5, 3, np.random.default_rng(0))
    assert sets.tolist() == [[0, 0, 0, 0, 0]]
    assert counted.tolist() == [[True, False, False, False, False]]
