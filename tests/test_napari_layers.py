"""Layer helpers of the napari plugin: axis order, annotations, cluster tables."""

import numpy as np
import pytest
from napari.layers import Image

from gacc.exceptions import InvalidInputError
from napari_gacc import _metadata as md
from napari_gacc._annotations import (
    apply_cluster_table,
    collect_ground_truth,
    data_xyzt_of,
    known_voxel_counts,
    new_annotation_layer,
)
from napari_gacc._layers import (
    annotations_to_cluster_xyzp,
    background_label,
    binary_to_label_arrays,
    cluster_table,
    cluster_xyzp_to_annotations,
    engine_to_layer,
    group_non_overlapping,
    layer_to_engine,
    overlap_counts,
)

SHAPE_XYZT = (7, 8, 9, 5)


def test_engine_layer_axis_round_trip():
    rng = np.random.default_rng(0)
    data_xyzt = rng.random(SHAPE_XYZT)
    layer = engine_to_layer(data_xyzt)
    assert layer.shape == (5, 7, 8, 9)
    assert layer[3, 1, 2, 4] == data_xyzt[1, 2, 4, 3]
    np.testing.assert_array_equal(layer_to_engine(layer), data_xyzt)


def test_background_label_is_dtype_max():
    assert background_label(np.uint8) == 255
    assert background_label(np.uint16) == 65535
    with pytest.raises(InvalidInputError, match="integer data"):
        background_label(np.float32)


def test_annotations_complete_convention():
    first = np.zeros((7, 8, 9), dtype=np.uint8)
    second = np.zeros((7, 8, 9), dtype=np.uint8)
    first[0, 0, 0] = 2  # inside cluster 2 only
    first[1, 0, 0] = 2
    second[1, 0, 0] = 3  # inside clusters 2 and 3
    second[2, 0, 0] = 255  # inside none

    cluster_xyzp = annotations_to_cluster_xyzp([first, second], 3)

    assert cluster_xyzp.shape == (7, 8, 9, 3)
    np.testing.assert_array_equal(cluster_xyzp[0, 0, 0], [0, 1, 0])
    np.testing.assert_array_equal(cluster_xyzp[1, 0, 0], [0, 1, 1])
    np.testing.assert_array_equal(cluster_xyzp[2, 0, 0], [0, 0, 0])
    assert np.isnan(cluster_xyzp[3, 0, 0]).all()
    assert np.isnan(cluster_xyzp).sum() == (7 * 8 * 9 - 3) * 3


def test_annotations_partial_convention():
    labels = np.zeros((7, 8, 9), dtype=np.uint8)
    labels[0, 0, 0] = 2
    labels[2, 0, 0] = 255
    cluster_xyzp = annotations_to_cluster_xyzp([labels], 3, complete=False)
    assert np.isnan(cluster_xyzp[0, 0, 0, 0])
    assert cluster_xyzp[0, 0, 0, 1] == 1
    np.testing.assert_array_equal(cluster_xyzp[2, 0, 0], [0, 0, 0])


def test_annotations_reject_unknown_label():
    labels = np.zeros((7, 8, 9), dtype=np.uint8)
    labels[0, 0, 0] = 4
    with pytest.raises(InvalidInputError, match="contains label 4 but the cluster table has 3"):
        annotations_to_cluster_xyzp([labels], 3, names=["paint"])


def test_annotations_reject_other_grid():
    with pytest.raises(InvalidInputError, match="all annotation layers must lie on the data grid"):
        annotations_to_cluster_xyzp(
            [np.zeros((7, 8, 9), np.uint8), np.zeros((7, 9, 8), np.uint8)], 2
        )


def test_grouping_separates_overlapping_clusters():
    binary = np.zeros((7, 8, 9, 4), dtype=bool)
    binary[0:3, ..., 0] = True
    binary[2:5, ..., 1] = True  # overlaps 0
    binary[4:7, ..., 2] = True  # overlaps 1
    binary[6, 0, 0, 3] = True  # overlaps 2

    counts = overlap_counts(binary)
    assert counts[0, 1] == 8 * 9
    assert counts[0, 2] == 0
    groups = group_non_overlapping(counts)

    assert sorted(sum(groups, [])) == [0, 1, 2, 3]
    for group in groups:
        for i in group:
            for j in group:
                assert i == j or counts[i, j] == 0
    assert len(groups) == 2


def test_cluster_xyzp_annotation_round_trip():
    rng = np.random.default_rng(3)
    cluster_xyzp = (rng.random(SHAPE_XYZT) > 0.7).astype(np.float32)
    # Unknown voxels: a whole slab unknown for every cluster.
    cluster_xyzp[5:] = np.nan

    label_arrays, groups = cluster_xyzp_to_annotations(cluster_xyzp)

    assert len(label_arrays) == len(groups) > 1
    back = annotations_to_cluster_xyzp(label_arrays, SHAPE_XYZT[-1])
    np.testing.assert_array_equal(np.isnan(back), np.isnan(cluster_xyzp))
    np.testing.assert_array_equal(np.nan_to_num(back, nan=-1), np.nan_to_num(cluster_xyzp, nan=-1))


def test_binary_to_label_arrays_values():
    binary = np.zeros((3, 4, 5, 2), dtype=bool)
    binary[0, 0, 0, 1] = True
    background = np.zeros((3, 4, 5), dtype=bool)
    background[2, 3, 4] = True
    [labels] = binary_to_label_arrays(binary, [[0, 1]], background=background)
    assert labels.dtype == np.uint8
    assert labels[0, 0, 0] == 2
    assert labels[2, 3, 4] == 255


def test_cluster_table_rows():
    table = cluster_table(["motor", "visual"], ["#ff0000", "#00ff00"])
    assert list(table["index"]) == [0, 1, 2, 255]
    assert list(table["name"]) == ["unknown", "motor", "visual", "background"]
    with pytest.raises(InvalidInputError, match="one colour each"):
        cluster_table(["motor"], ["#ff0000", "#00ff00"])


def _data_layer():
    rng = np.random.default_rng(0)
    data = rng.random((5, 7, 8, 9)).astype(np.float32)
    return Image(data, scale=(1, 2, 2, 3), translate=(0, -5, 1, 2), name="bold")


def test_new_annotation_layer_on_data_grid():
    data_layer = _data_layer()
    table = cluster_table(["a", "b"])
    layer = new_annotation_layer(data_layer, table, name="paint")
    assert layer.data.shape == (7, 8, 9)
    assert layer.data.dtype == np.uint8
    np.testing.assert_array_equal(layer.scale, (2, 2, 3))
    np.testing.assert_array_equal(layer.translate, (-5, 1, 2))
    assert md.layer_role(layer) == md.ROLE_ANNOTATION
    assert list(layer.features["name"]) == ["unknown", "a", "b", "background"]
    np.testing.assert_allclose(layer.colormap.map(255)[:3], [0.5, 0.5, 0.5], atol=0.01)


def test_apply_cluster_table_widens_layers():
    data_layer = _data_layer()
    layer = new_annotation_layer(data_layer, cluster_table(["a"]), name="paint")
    layer.data[0, 0, 0] = 255
    layer.data[0, 0, 1] = 1
    names = [f"c{k}" for k in range(300)]

    apply_cluster_table([data_layer, layer], names, None)

    assert layer.data.dtype == np.uint16
    assert layer.data[0, 0, 0] == 65535
    assert layer.data[0, 0, 1] == 1
    assert len(layer.features) == 302


def test_collect_ground_truth_and_counts():
    data_layer = _data_layer()
    table = cluster_table(["a", "b"])
    first = new_annotation_layer(data_layer, table, name="one")
    second = new_annotation_layer(data_layer, table, name="two")
    first.data[0, 0, :4] = 1
    second.data[0, 0, :2] = 2
    first.data[6, 7, 8] = 255
    layers = [data_layer, first, second]

    cluster_xyzp, names = collect_ground_truth(layers, (7, 8, 9))
    inside, outside = known_voxel_counts(cluster_xyzp)

    assert names == ["a", "b"]
    np.testing.assert_array_equal(inside, [4, 2])
    np.testing.assert_array_equal(outside, [1, 3])

    md.gacc_info(second)["use"] = False
    cluster_xyzp, _ = collect_ground_truth(layers, (7, 8, 9))
    np.testing.assert_array_equal(known_voxel_counts(cluster_xyzp)[0], [4, 0])


def test_collect_ground_truth_without_annotations():
    with pytest.raises(InvalidInputError, match="No annotation layer"):
        collect_ground_truth([_data_layer()], (7, 8, 9))


def test_data_xyzt_of_moves_volume_axis_last():
    data_layer = _data_layer()
    data_xyzt = data_xyzt_of(data_layer)
    assert data_xyzt.shape == SHAPE_XYZT
    assert data_xyzt.flags.c_contiguous
    assert data_xyzt[1, 2, 3, 4] == data_layer.data[4, 1, 2, 3]
