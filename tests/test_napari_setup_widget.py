"""Setup widget: data choice, annotation layers, atlas import, cluster table, counts."""

import nibabel as nib
import numpy as np
import pytest
from qtpy.QtCore import QThreadPool

from napari_gacc import _metadata as md
from napari_gacc._annotations import is_annotation_layer
from napari_gacc._io import read_nifti
from napari_gacc._setup_widget import SetupWidget

pytestmark = pytest.mark.gui

SHAPE = (7, 8, 9)
AFFINE = np.array(
    [[0.0, -2.0, 0.0, 10.0], [3.0, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture
def data_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(rng.random(SHAPE + (5,)).astype(np.float32), AFFINE), str(path))
    return path


@pytest.fixture
def viewer_with_data(make_napari_viewer, data_path):
    viewer = make_napari_viewer()
    viewer.open(str(data_path), plugin="napari-gacc")
    return viewer


def _wait_for(qtbot, worker):
    """Wait until ``worker`` (and any other pooled worker) ends and its signals arrive."""
    assert worker is not None
    assert QThreadPool.globalInstance().waitForDone(10000)
    qtbot.wait(50)


def test_setup_picks_4d_data(viewer_with_data):
    viewer = viewer_with_data
    viewer.add_image(np.zeros((4, 5, 6)), name="3d image")
    widget = SetupWidget(viewer)
    assert widget.data_layer() is viewer.layers["bold"]
    assert widget.data_combo.count() == 1
    assert "5 volumes of 8 x 7 x 9 voxels" in widget.data_info.text()


def test_new_layer_paint_and_counts(viewer_with_data, qtbot):
    viewer = viewer_with_data
    widget = SetupWidget(viewer)

    layer = widget.add_annotation_layer()

    assert is_annotation_layer(layer)
    assert layer.data.shape == (8, 7, 9)
    np.testing.assert_array_equal(layer.scale, viewer.layers["bold"].scale[1:])
    assert viewer.layers.selection.active is layer
    assert layer.mode == "paint"
    assert layer.selected_label == 1
    assert widget.clusters()[0][0] == "cluster 1"

    widget.add_cluster("visual")
    assert [name for name, _ in widget.clusters()] == ["cluster 1", "visual"]
    assert list(layer.features["name"])[1:3] == ["cluster 1", "visual"]

    layer.data[0, 0, :3] = 1
    layer.data[1, 0, :2] = 2
    layer.data[2, 0, 0] = 255
    worker = widget.update_counts()
    _wait_for(qtbot, worker)
    qtbot.waitUntil(lambda: widget.counts()[0] == [3, 2], timeout=5000)
    assert widget.counts()[1] == [3, 4]
    assert "6 voxels annotated" in widget.summary.text()

    widget.paint_background()
    assert layer.selected_label == 255


def test_cluster_name_and_colour_edits(viewer_with_data):
    widget = SetupWidget(viewer_with_data)
    layer = widget.add_annotation_layer()
    widget.cluster_table.item(0, 1).setText("motor")
    widget.set_cluster_color(0, "#ff0000")
    assert widget.clusters() == [("motor", "#ff0000")]
    np.testing.assert_allclose(layer.colormap.map(1)[:3], [1.0, 0.0, 0.0])


def test_remove_last_cluster_erases_label(viewer_with_data):
    widget = SetupWidget(viewer_with_data)
    layer = widget.add_annotation_layer()
    widget.add_cluster()
    layer.data[0, 0, 0] = 2
    widget.remove_last_cluster()
    assert len(widget.clusters()) == 1
    assert layer.data[0, 0, 0] == 0


def test_unused_layer_left_out(viewer_with_data, qtbot):
    widget = SetupWidget(viewer_with_data)
    first = widget.add_annotation_layer()
    second = widget.add_annotation_layer()
    first.data[0, 0, 0] = 1
    second.data[0, 0, 1] = 1
    widget.layer_table.item(1, 0).setCheckState(0)  # Qt.Unchecked
    assert md.gacc_info(second)["use"] is False
    _wait_for(qtbot, widget.update_counts())
    qtbot.waitUntil(lambda: widget.counts()[0] == [1], timeout=5000)


def test_import_probabilistic_atlas(viewer_with_data, tmp_path, qtbot):
    viewer = viewer_with_data
    widget = SetupWidget(viewer)
    atlas = np.zeros(SHAPE + (3,), dtype=np.float32)
    atlas[:4, ..., 0] = 0.9
    atlas[2:6, ..., 1] = 0.8  # overlaps cluster 0
    atlas[6, ..., 2] = 0.3  # below the threshold
    atlas[6, 0, 0, 2] = 0.7
    path = tmp_path / "atlas_probseg.nii.gz"
    nib.save(nib.Nifti1Image(atlas, AFFINE), str(path))

    worker = widget.import_atlas(path)
    _wait_for(qtbot, worker)
    qtbot.waitUntil(lambda: len(widget.clusters()) == 3, timeout=5000)

    layers = [layer for layer in viewer.layers if is_annotation_layer(layer)]
    assert len(layers) == 2
    assert [name for name, _ in widget.clusters()] == ["volume_0", "volume_1", "volume_2"]
    # Display voxel (x, y, z) is file voxel (y, 7 - x, z).
    display_inside = {
        int(value) for layer in layers for value in np.unique(layer.data[7 - 0, 3])
    }
    assert {1, 2} <= display_inside
    values_at_overlap = sorted(int(layer.data[7, 3, 0]) for layer in layers)
    assert values_at_overlap == [1, 2]
    assert sum(int((layer.data == 3).sum()) for layer in layers) == 1


def test_import_label_atlas_after_painting(viewer_with_data, tmp_path, qtbot):
    viewer = viewer_with_data
    widget = SetupWidget(viewer)
    painted = widget.add_annotation_layer()
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[0] = 4
    labels[1] = 9
    path = tmp_path / "regions_dseg.nii.gz"
    nib.save(nib.Nifti1Image(labels, AFFINE), str(path))

    _wait_for(qtbot, widget.import_atlas(path))
    qtbot.waitUntil(lambda: len(widget.clusters()) == 3, timeout=5000)

    assert [name for name, _ in widget.clusters()] == ["cluster 1", "label_4", "label_9"]
    imported = viewer.layers["regions_dseg"]
    assert imported.data[7, 0, 0] == 2  # file voxel (0, 0, 0)
    assert imported.data[7, 1, 0] == 3  # file voxel (1, 0, 0)
    assert imported.data[0, 5, 0] == 255
    assert list(painted.features["name"]) == list(imported.features["name"])


def test_import_rejects_other_grid(viewer_with_data, tmp_path, qtbot):
    widget = SetupWidget(viewer_with_data)
    path = tmp_path / "small_dseg.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.int16), np.eye(4)), str(path))
    errors = []
    widget.import_failed.connect(errors.append)
    _wait_for(qtbot, widget.import_atlas(path))
    assert errors and "grid" in errors[0]
    assert widget.clusters() == []


def test_data_layer_round_trip_through_reader(data_path):
    [(data, kwargs, _)] = read_nifti(str(data_path))
    assert kwargs["metadata"][md.GACC_KEY]["role"] == md.ROLE_DATA
    assert data.shape == (5, 8, 7, 9)


def test_slice_plane_sets_axis_order(viewer_with_data):
    viewer = viewer_with_data
    widget = SetupWidget(viewer)
    widget.plane_combo.setCurrentText("axial")
    assert viewer.dims.order == (0, 3, 2, 1)
    assert tuple(viewer.camera.orientation2d) == ("up", "right")
    widget.plane_combo.setCurrentText("sagittal")
    assert viewer.dims.order == (0, 1, 3, 2)
