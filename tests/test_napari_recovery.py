"""Crash recovery: autosave during training, restore in a new viewer, clean-up."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from qtpy.QtCore import QThreadPool

from napari_gacc import _metadata as md
from napari_gacc._annotations import annotation_layers, new_annotation_layer
from napari_gacc._layers import cluster_table
from napari_gacc._recovery import (
    ANNOTATIONS_FILE,
    MODEL_FILE,
    SESSION_FILE,
    find_orphaned_sessions,
    load_annotations,
)
from napari_gacc._training_widget import TrainingWidget

pytestmark = pytest.mark.gui

SHAPE = (7, 8, 9)
N_VOLUMES = 5


@pytest.fixture(autouse=True)
def recovery_root(tmp_path, monkeypatch):
    root = tmp_path / "recovery"
    monkeypatch.setenv("NAPARI_GACC_RECOVERY_DIR", str(root))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield root
    torch.set_num_threads(previous)


def _add_annotated_data(viewer):
    rng = np.random.default_rng(0)
    data_layer = viewer.add_image(
        rng.normal(size=(N_VOLUMES,) + SHAPE).astype(np.float32), name="bold", scale=(1, 2, 2, 3)
    )
    table = cluster_table(["first", "second"], ["#ff0000", "#00ff00"])
    first = new_annotation_layer(data_layer, table, name="paint 1")
    second = new_annotation_layer(data_layer, table, name="paint 2")
    first.data[:3, :, 2] = 1
    first.data[3:, :, 2] = 255
    second.data[2:5, :4, 2] = 2
    md.gacc_info(second)["complete"] = False
    viewer.add_layer(first)
    viewer.add_layer(second)
    return data_layer


def _trained_widget(viewer, qtbot):
    widget = TrainingWidget(viewer)
    widget.num_clusters.setValue(3)
    widget.set_size.setValue(4)
    widget.batch_size.setValue(4)
    widget.epochs.setValue(1)
    widget.num_batches.setValue(3)
    widget.seed.setValue(0)
    widget.device.setCurrentText("cpu")
    widget.predict_after.setChecked(False)
    viewer.window.add_dock_widget(widget)
    with qtbot.waitSignal(widget.training_finished, timeout=60000):
        widget.start()
    assert QThreadPool.globalInstance().waitForDone(10000)
    return widget


def test_training_autosaves_annotations_and_model(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _add_annotated_data(viewer)
    widget = _trained_widget(viewer, qtbot)

    folder = widget.recovery.folder
    assert (folder / ANNOTATIONS_FILE).is_file()
    assert (folder / MODEL_FILE).is_file()
    snapshot, info = load_annotations(folder)
    assert snapshot.layer_names == ["paint 1", "paint 2"]
    assert snapshot.complete == [True, False]
    assert snapshot.cluster_names == ["first", "second"]
    assert info["data_layer_name"] == "bold"
    np.testing.assert_array_equal(snapshot.label_arrays[0], viewer.layers["paint 1"].data)
    np.testing.assert_array_equal(snapshot.label_arrays[1], viewer.layers["paint 2"].data)
    # No leftover temporary files from the atomic writes.
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [ANNOTATIONS_FILE, MODEL_FILE, SESSION_FILE]
    )


def test_restore_after_crash(make_napari_viewer, qtbot):
    crashed_viewer = make_napari_viewer()
    _add_annotated_data(crashed_viewer)
    crashed = _trained_widget(crashed_viewer, qtbot)
    expected_layers = {
        name: np.array(crashed_viewer.layers[name].data) for name in ("paint 1", "paint 2")
    }
    expected_state = {
        name: tensor.clone() for name, tensor in crashed.model.networks_.state_dict().items()
    }

    # The crashed session never cleaned up; a new viewer opens the same data.
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    viewer.add_image(
        rng.normal(size=(N_VOLUMES,) + SHAPE).astype(np.float32), name="bold", scale=(1, 2, 2, 3)
    )
    widget = TrainingWidget(viewer)
    assert widget.recovery_notice.isVisibleTo(widget)
    assert widget._orphan_folder == crashed.recovery.folder

    restored = widget.restore_recovery()

    assert [layer.name for layer in restored] == ["paint 1", "paint 2"]
    for layer in restored:
        np.testing.assert_array_equal(layer.data, expected_layers[layer.name])
        assert list(layer.features["name"])[1:3] == ["first", "second"]
        assert tuple(layer.scale) == (2, 2, 3)
    assert md.gacc_info(viewer.layers["paint 2"])["complete"] is False
    assert len(annotation_layers(viewer.layers)) == 2
    assert widget.model.n_steps_ == 3
    for name, tensor in widget.model.networks_.state_dict().items():
        torch.testing.assert_close(tensor, expected_state[name])
    assert widget.num_clusters.value() == 3
    assert not widget.recovery_notice.isVisibleTo(widget)
    # The restored folder stays until the work is saved.
    assert crashed.recovery.folder.is_dir()


def test_save_model_removes_autosave(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    _add_annotated_data(viewer)
    widget = _trained_widget(viewer, qtbot)
    assert widget.recovery.folder.is_dir()

    widget.save_model(tmp_path / "model.pt")

    assert not widget.recovery.folder.exists()


def test_discard_button_removes_orphan(make_napari_viewer, qtbot, recovery_root):
    viewer = make_napari_viewer()
    _add_annotated_data(viewer)
    crashed = _trained_widget(viewer, qtbot)
    widget = TrainingWidget(viewer)
    assert widget._orphan_folder == crashed.recovery.folder

    widget.discard_recovery_button.click()

    assert not crashed.recovery.folder.exists()
    assert not widget.recovery_notice.isVisibleTo(widget)


def test_orphans_skip_live_sessions(recovery_root):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    sessions = {"dead": int(finished.stdout), "live": os.getppid(), "own": os.getpid()}
    for name, pid in sessions.items():
        folder = recovery_root / name
        folder.mkdir(parents=True)
        (folder / SESSION_FILE).write_text(json.dumps({"pid": pid}))
        (folder / ANNOTATIONS_FILE).write_bytes(b"")
    (recovery_root / "empty").mkdir()

    found = {folder.name for folder in find_orphaned_sessions()}

    assert found == {"dead", "own"}


def test_setup_widget_points_to_training(make_napari_viewer, qtbot):
    from napari_gacc._setup_widget import SetupWidget

    viewer = make_napari_viewer()
    _add_annotated_data(viewer)
    crashed = _trained_widget(viewer, qtbot)
    setup = SetupWidget(viewer)
    assert setup.recovery_notice.isVisibleTo(setup)

    setup.open_training_button.click()

    training = [
        widget for widget in viewer.window.dock_widgets.values()
        if isinstance(widget, TrainingWidget) and widget is not crashed
    ]
    assert len(training) == 1
    assert training[0]._orphan_folder == crashed.recovery.folder
    assert not setup.recovery_notice.isVisibleTo(setup)
