"""Tests for gacc.splits: determinism, hidden entries and known entries."""

import numpy as np
import pytest

from gacc.exceptions import InvalidInputError
from gacc.splits import hide_clusters, hide_region, hide_slices, hide_voxels

SHAPE = (7, 8, 9)


@pytest.fixture
def clusters():
    """Four overlapping boxes in a (7, 8, 9) volume, with one unknown entry."""
    cluster_xyzp = np.zeros(SHAPE + (4,), dtype=np.float32)
    cluster_xyzp[1:4, 1:5, 0:3, 0] = 1
    cluster_xyzp[2:6, 3:7, 2:6, 1] = 1
    cluster_xyzp[0:7, 0:2, 4:9, 2] = 1
    cluster_xyzp[4:7, 5:8, 6:9, 3] = 1
    cluster_xyzp[0, 0, 0, 1] = np.nan
    return cluster_xyzp


@pytest.fixture
def mask():
    mask = np.ones(SHAPE, dtype=bool)
    mask[:, 7, :] = False
    return mask


SPLITS = {
    "slices": lambda c, m, seed: hide_slices(c, n_known_slices=2, mask=m, random_state=seed),
    "shared-slices": lambda c, m, seed: hide_slices(
        c, axis=1, n_known_slices=3, mask=m, per_cluster=False, random_state=seed
    ),
    "voxels": lambda c, m, seed: hide_voxels(c, known_fraction=0.1, mask=m, random_state=seed),
    "region": lambda c, m, seed: hide_region(c, axis=0, known_fraction=0.5, mask=m),
}


@pytest.mark.parametrize("name", SPLITS, ids=list(SPLITS))
def test_split_hides_and_keeps_entries(name, clusters, mask):
    split = SPLITS[name](clusters, mask, 0)
    partial = split.cluster_xyzp
    known = split.known_mask
    held_out = split.held_out_mask
    assert partial.shape == clusters.shape
    assert known.shape == clusters.shape
    assert held_out.shape == clusters.shape
    # Known entries are copied unchanged, every other entry is NaN.
    np.testing.assert_array_equal(partial[known], clusters[known])
    assert np.all(np.isnan(partial[~known]))
    # Held-out entries are the known reference entries inside the mask not given.
    assert not np.any(known & held_out)
    expected_held_out = mask[..., np.newaxis] & ~np.isnan(clusters) & ~known
    np.testing.assert_array_equal(held_out, expected_held_out)
    assert not np.any(known[~mask])
    assert held_out.any()
    assert known.any()


@pytest.mark.parametrize("name", SPLITS, ids=list(SPLITS))
def test_split_is_deterministic(name, clusters, mask):
    first = SPLITS[name](clusters, mask, 3)
    second = SPLITS[name](clusters, mask, 3)
    np.testing.assert_array_equal(first.known_mask, second.known_mask)
    np.testing.assert_array_equal(first.cluster_xyzp, second.cluster_xyzp)


def test_split_does_not_modify_input(clusters, mask):
    original = clusters.copy()
    hide_slices(clusters, mask=mask, random_state=0)
    hide_clusters(clusters, n_hidden=2, mask=mask, random_state=0)
    np.testing.assert_array_equal(clusters, original)


def test_slices_seeds_differ(clusters):
    draws = {tuple(np.concatenate(hide_slices(clusters, n_known_slices=2,
                                              random_state=seed).known_slices))
             for seed in range(10)}
    assert len(draws) > 1


def test_slices_known_along_axis(clusters, mask):
    split = hide_slices(clusters, axis=2, n_known_slices=2, mask=mask, random_state=1)
    for p, slices in enumerate(split.known_slices):
        assert len(slices) == 2
        known_z = np.flatnonzero(split.known_mask[..., p].any(axis=(0, 1)))
        np.testing.assert_array_equal(known_z, slices)
        # A known slice is known on every voxel of the mask (except NaN entries).
        for z in slices:
            expected = mask[:, :, z] & ~np.isnan(clusters[:, :, z, p])
            np.testing.assert_array_equal(split.known_mask[:, :, z, p], expected)


def test_slices_have_known_members(clusters, mask):
    for seed in range(5):
        split = hide_slices(clusters, n_known_slices=1, mask=mask, random_state=seed)
        members = np.nan_to_num(split.cluster_xyzp) >= 0.5
        assert members.any(axis=(0, 1, 2)).all()


@pytest.mark.parametrize("seed", range(5))
def test_shared_slices_cover_every_cluster(clusters, seed):
    # Along axis 2 the clusters span z = 0-2, 2-5, 4-8 and 6-8. Slice 4 or 5
    # covers two clusters, like slice 2, but leaves two that share no slice,
    # so a single greedy pass can fail where slices {2, 6..8} cover all four.
    split = hide_slices(clusters, axis=2, n_known_slices=2, per_cluster=False,
                        random_state=seed)
    members = np.nan_to_num(split.cluster_xyzp) >= 0.5
    assert members.any(axis=(0, 1, 2)).all()
    for slices in split.known_slices:
        np.testing.assert_array_equal(slices, split.known_slices[0])


def test_slices_warn_for_thin_cluster(clusters):
    with pytest.warns(UserWarning, match="members on 3 slices only"):
        split = hide_slices(clusters, axis=2, n_known_slices=4, random_state=0)
    assert len(split.known_slices[0]) == 4
    assert set(range(3)) <= set(split.known_slices[0].tolist())


def test_slices_warn_for_empty_cluster(clusters):
    clusters[..., 3] = 0
    with pytest.warns(UserWarning, match="no member"):
        hide_slices(clusters, n_known_slices=2, random_state=0)


def test_voxels_fraction_and_members(clusters, mask):
    split = hide_voxels(clusters, known_fraction=0.05, mask=mask, random_state=2)
    n_mask = mask.sum()
    n_known = split.known_voxels.sum()
    assert round(0.05 * n_mask) <= n_known <= round(0.05 * n_mask) + clusters.shape[-1]
    # Each known voxel is known for every cluster (except NaN entries).
    np.testing.assert_array_equal(split.known_mask[..., 0], split.known_voxels)
    members = np.nan_to_num(split.cluster_xyzp) >= 0.5
    assert members.any(axis=(0, 1, 2)).all()


def test_region_cut_near_fraction(clusters, mask):
    # Each of the 7 slices contains 1/7 of the mask; 4/7 is the share nearest 0.55.
    split = hide_region(clusters, axis=0, known_fraction=0.55, mask=mask)
    assert split.cut_index == 4
    assert split.known_share == pytest.approx(4 / 7)
    assert split.known_mask[:4, 0, 1].all()
    assert not split.known_mask[4:].any()


def test_region_high_side(clusters):
    split = hide_region(clusters, axis=1, known_fraction=0.25, known_side="high")
    assert split.cut_index == 6
    assert not split.known_mask[:, :6].any()
    assert split.known_mask[:, 6:, :, 0].all()


def test_clusters_hidden_and_given(clusters, mask):
    split = hide_clusters(clusters, n_hidden=2, mask=mask, random_state=5)
    assert split.hidden_clusters.size == 2
    np.testing.assert_array_equal(
        np.sort(np.concatenate([split.given_clusters, split.hidden_clusters])), np.arange(4)
    )
    given_clusters = split.given_clusters
    assert split.cluster_xyzp.shape == SHAPE + (2,)
    inside = np.broadcast_to(mask[..., np.newaxis], split.cluster_xyzp.shape)
    np.testing.assert_array_equal(split.cluster_xyzp[inside], clusters[..., given_clusters][inside])
    assert np.all(np.isnan(split.cluster_xyzp[~inside]))
    np.testing.assert_array_equal(split.reference, clusters[..., split.hidden_clusters])
    assert not split.held_out_mask[..., given_clusters].any()
    hidden = split.hidden_clusters
    expected = mask[..., np.newaxis] & ~np.isnan(clusters[..., hidden])
    np.testing.assert_array_equal(split.held_out_mask[..., hidden], expected)


def test_clusters_explicit_indices(clusters):
    split = hide_clusters(clusters, hidden=[3, 1])
    np.testing.assert_array_equal(split.hidden_clusters, [1, 3])
    np.testing.assert_array_equal(split.given_clusters, [0, 2])


def test_clusters_skip_empty_candidates(clusters):
    clusters[..., 0] = 0
    for seed in range(5):
        split = hide_clusters(clusters, n_hidden=3, random_state=seed)
        assert 0 not in split.hidden_clusters


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: hide_slices(c[..., 0]), "4D"),
        (lambda c: hide_slices(c, axis=3), "axis=3"),
        (lambda c: hide_slices(c, n_known_slices=0), "n_known_slices=0"),
        (lambda c: hide_slices(c, n_known_slices=10), "from 1 to 9"),
        (lambda c: hide_slices(c, mask=np.ones((7, 8), dtype=bool)), "mask has shape"),
        (lambda c: hide_slices(c, mask=np.zeros(SHAPE, dtype=bool)), "no voxel"),
        (lambda c: hide_voxels(c, known_fraction=1.5), "known_fraction=1.5"),
        (lambda c: hide_region(c, known_side="left"), "known_side"),
        (lambda c: hide_clusters(c, n_hidden=5), "n_hidden=5"),
        (lambda c: hide_clusters(c, hidden=[4]), "hidden="),
    ],
    ids=["3d-input", "bad-axis", "zero-slices", "too-many-slices", "mask-shape",
         "empty-mask", "bad-fraction", "bad-side", "too-many-hidden", "bad-index"],
)
def test_splits_reject_invalid_input(clusters, call, message):
    with pytest.raises(InvalidInputError, match=message):
        call(clusters)
