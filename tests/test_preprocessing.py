"""Tests of input validation, min-max scaling and the positional encoding."""

import numpy as np
import pytest
import torch

import gacc
from engine_fixtures import SPATIAL_SHAPE, make_volume
from gacc.preprocessing import (
    MinMaxScaling,
    check_cluster_xyzp,
    check_data_xyzt,
    check_mask,
    foreground_indices,
    positional_encoding,
)


@pytest.fixture
def volume():
    return make_volume()


# ----------------------------------------------------------------------
# check_data_xyzt


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float32, np.float16, np.int16, np.uint8, bool],
    ids=lambda dtype: np.dtype(dtype).name,
)
def test_data_dtypes_become_float32(dtype):
    data = (np.arange(2 * 3 * 4 * 5) % 7).reshape(2, 3, 4, 5).astype(dtype)
    checked = check_data_xyzt(data)
    assert checked.dtype == np.float32
    assert checked.shape == (2, 3, 4, 5)
    assert np.array_equal(checked, data.astype(np.float32))


def test_data_torch_tensor_accepted(volume):
    data, _ = volume
    checked = check_data_xyzt(torch.from_numpy(data))
    assert np.array_equal(checked, data)


@pytest.mark.parametrize("shape", [(9, 10, 8), (9, 10, 8, 3, 2), (90,)], ids=["3d", "5d", "1d"])
def test_data_wrong_rank(shape):
    with pytest.raises(gacc.InvalidInputError, match=r"must be 4D .* got \d+D"):
        check_data_xyzt(np.random.default_rng(0).random(shape))


def test_data_empty():
    with pytest.raises(gacc.InvalidInputError, match=r"empty: shape \(3, 0, 4, 5\)"):
        check_data_xyzt(np.zeros((3, 0, 4, 5)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_data_non_finite_allowed(volume, bad):
    # Non-finite values are checked on the foreground only, by foreground_indices.
    data, _ = volume
    data = data.copy()
    data[1, 2, 3, 4] = bad
    data[0, 0, 0, 0] = bad
    checked = check_data_xyzt(data)
    assert checked is data
    assert np.count_nonzero(~np.isfinite(checked)) == 2


def test_data_all_nan():
    with pytest.raises(gacc.InvalidInputError, match="only NaN or infinite"):
        check_data_xyzt(np.full((3, 4, 5, 2), np.nan))


def test_data_constant():
    with pytest.raises(gacc.InvalidInputError, match=r"constant \(every value is 2.5\)"):
        check_data_xyzt(np.full((3, 4, 5, 2), 2.5))


def test_data_not_numeric():
    with pytest.raises(gacc.InvalidInputError, match="must be numeric"):
        check_data_xyzt(np.full((3, 4, 5, 2), "a"))


def test_data_complex_rejected():
    data = np.ones((3, 4, 5, 2), dtype=np.complex64)
    data[0, 0, 0, 0] = 2 + 1j
    with pytest.raises(gacc.InvalidInputError, match="complex"):
        check_data_xyzt(data)


def test_data_beyond_float32():
    # Finite float64 values too large for float32 get their own message,
    # not the one about NaN or infinite values.
    data = np.ones((3, 4, 5, 2))
    data[1, 1, 1, 1] = 1e300
    with pytest.raises(gacc.InvalidInputError, match="float32"):
        check_data_xyzt(data)


def test_data_nibabel_image_rejected(volume):
    nibabel = pytest.importorskip("nibabel")
    data, _ = volume
    image = nibabel.Nifti1Image(data, np.eye(4))
    with pytest.raises(gacc.InvalidInputError, match="get_fdata"):
        check_data_xyzt(image)


# ----------------------------------------------------------------------
# check_cluster_xyzp


def test_clusters_values_and_known(volume):
    _, clusters = volume
    clusters = clusters.copy()
    clusters[0, 0, 0, 1] = np.nan
    values, known = check_cluster_xyzp(clusters, SPATIAL_SHAPE, 4)
    assert values.dtype == np.float32
    assert known.dtype == bool
    assert values.shape == clusters.shape
    assert not known[0, 0, 0, 1]
    assert values[0, 0, 0, 1] == 0.0
    assert known.sum() == clusters.size - 1


def test_clusters_known_mask_combined(volume):
    _, clusters = volume
    clusters = clusters.copy()
    clusters[0, 0, 0, 0] = np.nan
    known_mask = np.ones(clusters.shape, dtype=bool)
    known_mask[1, 1, 1, 2] = False
    _, known = check_cluster_xyzp(clusters, SPATIAL_SHAPE, 4, known_mask)
    assert not known[0, 0, 0, 0]
    assert not known[1, 1, 1, 2]
    assert known.sum() == clusters.size - 2


def test_clusters_probabilistic_kept(volume):
    _, clusters = volume
    soft = clusters * 0.7 + 0.1
    values, _ = check_cluster_xyzp(soft, SPATIAL_SHAPE, 3)
    np.testing.assert_allclose(values, soft, rtol=1e-6)


@pytest.mark.parametrize(
    "cluster_shape, message",
    [
        pytest.param((9, 10, 8), r"must be 4D .* got 3D shape \(9, 10, 8\)", id="3d"),
        pytest.param((9, 10, 8, 2, 1), r"must be 4D .* got 5D", id="5d"),
        pytest.param((9, 10, 7, 2), r"spatial shape \(9, 10, 7\) but data_xyzt has \(9, 10, 8\)",
                     id="spatial-mismatch"),
        pytest.param((10, 9, 8, 2), r"spatial shape \(10, 9, 8\)", id="swapped-axes"),
        pytest.param((9, 10, 8, 0), r"P=0 clusters", id="no-cluster"),
        pytest.param((9, 10, 8, 5), r"P=5 clusters, more than num_clusters=4", id="too-many"),
    ],
)
def test_clusters_bad_shape(cluster_shape, message):
    clusters = np.zeros(cluster_shape, dtype=np.float32)
    with pytest.raises(gacc.InvalidInputError, match=message):
        check_cluster_xyzp(clusters, SPATIAL_SHAPE, 4)


@pytest.mark.parametrize("bad", [1.5, -0.2, 255.0], ids=["above-one", "negative", "label-255"])
def test_clusters_outside_unit_range(volume, bad):
    _, clusters = volume
    clusters = clusters.copy()
    clusters[2, 3, 4, 1] = bad
    with pytest.raises(gacc.InvalidInputError, match=r"must lie in \[0, 1\]"):
        check_cluster_xyzp(clusters, SPATIAL_SHAPE, 4)


def test_clusters_infinite(volume):
    _, clusters = volume
    clusters = clusters.copy()
    clusters[0, 1, 2, 0] = np.inf
    with pytest.raises(gacc.InvalidInputError, match="infinite"):
        check_cluster_xyzp(clusters, SPATIAL_SHAPE, 4)


def test_clusters_all_unknown():
    clusters = np.full(SPATIAL_SHAPE + (2,), np.nan)
    with pytest.raises(gacc.InvalidInputError, match="no known entry"):
        check_cluster_xyzp(clusters, SPATIAL_SHAPE, 4)


def test_clusters_all_masked_out(volume):
    _, clusters = volume
    with pytest.raises(gacc.InvalidInputError, match="no known entry"):
        check_cluster_xyzp(clusters, SPATIAL_SHAPE, 4, np.zeros(clusters.shape, dtype=bool))


def test_known_mask_wrong_shape(volume):
    _, clusters = volume
    with pytest.raises(gacc.InvalidInputError, match=r"known_mask has shape \(9, 10, 8\)"):
        check_cluster_xyzp(clusters, SPATIAL_SHAPE, 4, np.ones(SPATIAL_SHAPE, dtype=bool))


# ----------------------------------------------------------------------
# Masks and the foreground


def test_mask_float_zero_one():
    mask = np.zeros(SPATIAL_SHAPE)
    mask[1, 2, 3] = 1.0
    checked = check_mask(mask, SPATIAL_SHAPE)
    assert checked.dtype == bool
    assert checked.sum() == 1


@pytest.mark.parametrize(
    "mask, message",
    [
        pytest.param(np.ones((9, 10, 7), bool), r"shape \(9, 10, 7\) but data_xyzt", id="shape"),
        pytest.param(np.ones((9, 10, 8, 1), bool), r"shape \(9, 10, 8, 1\)", id="4d"),
        pytest.param(np.zeros(SPATIAL_SHAPE, bool), "selects no voxel", id="empty"),
        pytest.param(np.full(SPATIAL_SHAPE, 0.5), r"only 0 and 1; found values \[0.5\]",
                     id="fractional"),
    ],
)
def test_mask_invalid(mask, message):
    with pytest.raises(gacc.InvalidInputError, match=message):
        check_mask(mask, SPATIAL_SHAPE)


def test_foreground_default_nonzero():
    data = np.zeros((3, 4, 5, 2), dtype=np.float32)
    data[0, 1, 2, 1] = 1.0
    data[2, 3, 4, 0] = -1.0
    indices = foreground_indices(data)
    expected = np.ravel_multi_index(([0, 2], [1, 3], [2, 4]), (3, 4, 5))
    assert np.array_equal(indices, expected)


def test_foreground_explicit_mask(volume):
    data, _ = volume
    mask = np.zeros(SPATIAL_SHAPE, dtype=bool)
    mask[4:, 2:7, 1] = True
    indices = foreground_indices(data, mask)
    assert np.array_equal(indices, np.flatnonzero(mask))


def test_foreground_all_zero():
    with pytest.raises(gacc.InvalidInputError, match="zero everywhere"):
        foreground_indices(np.zeros((3, 4, 5, 2)))


# ----------------------------------------------------------------------
# MinMaxScaling


def test_scaling_to_range():
    rng = np.random.default_rng(0)
    voxels = rng.normal(5.0, 3.0, size=(50, 4)).astype(np.float32)
    scaling = MinMaxScaling((-1.0, 2.0)).fit(voxels)
    scaled = scaling.transform(voxels)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled.min(axis=0), -1.0, atol=1e-6)
    np.testing.assert_allclose(scaled.max(axis=0), 2.0, atol=1e-6)
    expected = (voxels - voxels.min(axis=0)) / np.ptp(voxels, axis=0) * 3.0 - 1.0
    np.testing.assert_allclose(scaled, expected, rtol=1e-5, atol=1e-6)


def test_scaling_reuses_fitted_range():
    voxels = np.array([[0.0, 10.0], [2.0, 20.0]], dtype=np.float32)
    scaling = MinMaxScaling().fit(voxels)
    shifted = scaling.transform(voxels + 1.0)
    np.testing.assert_allclose(shifted, [[0.5, 0.1], [1.5, 1.1]], rtol=1e-6)


def test_scaling_constant_feature(caplog):
    voxels = np.array([[1.0, 3.0], [1.0, 5.0]], dtype=np.float32)
    scaling = MinMaxScaling((0.0, 1.0)).fit(voxels)
    assert "1 of 2 features are constant" in caplog.text
    scaled = scaling.transform(voxels)
    assert np.all(np.isfinite(scaled))
    np.testing.assert_array_equal(scaled[:, 0], [0.0, 0.0])


def test_scaling_none_is_identity():
    voxels = np.array([[1.0, -3.0], [7.0, 5.0]], dtype=np.float64)
    scaling = MinMaxScaling(None).fit(voxels)
    scaled = scaling.transform(voxels)
    assert scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled, voxels.astype(np.float32))


def test_scaling_extreme_values_finite():
    # Values near the float32 limits must not overflow while being scaled.
    voxels = np.array([[-3e38, 1.0], [3e38, 2.0], [0.0, 1.5]], dtype=np.float32)
    scaled = MinMaxScaling().fit(voxels).transform(voxels)
    assert np.all(np.isfinite(scaled))
    np.testing.assert_allclose(scaled[:, 0], [0.0, 1.0, 0.5], atol=1e-6)


@pytest.mark.parametrize("feature_range", [None, (0.0, 1.0), (-2.0, 3.5)], ids=str)
def test_scaling_state_round_trip(feature_range):
    voxels = np.random.default_rng(1).normal(size=(20, 3)).astype(np.float32)
    scaling = MinMaxScaling(feature_range).fit(voxels)
    restored = MinMaxScaling.from_state_dict(scaling.state_dict())
    assert restored.feature_range == scaling.feature_range
    np.testing.assert_array_equal(restored.data_min_, scaling.data_min_)
    np.testing.assert_array_equal(restored.data_max_, scaling.data_max_)
    other = voxels * 2.0 + 1.0
    np.testing.assert_array_equal(restored.transform(other), scaling.transform(other))


@pytest.mark.parametrize(
    "feature_range", [(1.0, 1.0), (2.0, 0.0), (0.0,), (0.0, 1.0, 2.0), "ab"],
    ids=["equal", "reversed", "one-value", "three-values", "string"],
)
def test_scaling_invalid_range(feature_range):
    with pytest.raises(gacc.InvalidInputError, match="min_max_scale_range"):
        MinMaxScaling(feature_range)


# ----------------------------------------------------------------------
# positional_encoding


def test_positional_encoding_shape_and_range():
    flat = np.arange(int(np.prod(SPATIAL_SHAPE)))
    encoding = positional_encoding(flat, SPATIAL_SHAPE, num_frequencies=5)
    assert encoding.shape == (flat.size, 30)
    assert encoding.dtype == np.float32
    assert encoding.min() >= -1.0
    assert encoding.max() <= 1.0


def test_positional_encoding_distinct_positions():
    flat = np.arange(int(np.prod(SPATIAL_SHAPE)))
    encoding = positional_encoding(flat, SPATIAL_SHAPE, num_frequencies=3)
    assert len(np.unique(encoding.round(5), axis=0)) == flat.size


def test_positional_encoding_values():
    # Voxel (i, j, k) has relative coordinates ((i, j, k) + 0.5) / shape. For
    # each axis, the encoding contains the sines, then the cosines, of the
    # coordinate times pi * 2**f.
    shape = (4, 6, 5)
    flat = np.array([np.ravel_multi_index((1, 4, 2), shape)])
    encoding = positional_encoding(flat, shape, num_frequencies=2)[0]
    relative = (np.array([1, 4, 2]) + 0.5) / np.array(shape)
    angles = relative[:, None] * np.pi * np.array([1.0, 2.0])
    expected = np.concatenate((np.sin(angles), np.cos(angles)), axis=1).reshape(-1)
    np.testing.assert_allclose(encoding, expected, atol=1e-6)


def test_positional_encoding_axis_order():
    # Swapping two axes of a voxel's index changes its encoding.
    shape = (6, 6, 6)
    first = positional_encoding(np.array([np.ravel_multi_index((1, 4, 2), shape)]), shape)
    swapped = positional_encoding(np.array([np.ravel_multi_index((4, 1, 2), shape)]), shape)
    assert not np.allclose(first, swapped)
