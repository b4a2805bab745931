"""Training widget: background training, pause, stop, continue, errors, closing."""

import time

import numpy as np
import pytest
import torch
from qtpy.QtCore import QThreadPool, QTimer

import gacc
from napari_gacc import _metadata as md
from napari_gacc._annotations import new_annotation_layer
from napari_gacc._layers import cluster_table
from napari_gacc._results import find_probability_layer, prediction_label_layers
from napari_gacc._training_widget import TrainingWidget

pytestmark = pytest.mark.gui

SHAPE = (7, 8, 9)
N_VOLUMES = 6


@pytest.fixture(autouse=True)
def _recovery_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_GACC_RECOVERY_DIR", str(tmp_path / "recovery"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny training steps run far slower with several intra-op threads on a
    # busy machine, because the threads spin waiting for each other.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _synthetic_data(seed=0):
    """Two overlapping blobs with distinct time courses, plus noise."""
    rng = np.random.default_rng(seed)
    inside_first = np.zeros(SHAPE, dtype=bool)
    inside_first[:4] = True
    inside_second = np.zeros(SHAPE, dtype=bool)
    inside_second[3:, :5] = True
    courses = rng.normal(size=(2, N_VOLUMES))
    data_xyzt = rng.normal(scale=0.3, size=SHAPE + (N_VOLUMES,))
    data_xyzt += inside_first[..., None] * courses[0] + inside_second[..., None] * courses[1]
    return data_xyzt.astype(np.float32), inside_first, inside_second


@pytest.fixture
def trained_setup(make_napari_viewer):
    """Viewer with a data layer and one painted annotation layer per overlapping cluster."""
    viewer = make_napari_viewer()
    data_xyzt, inside_first, inside_second = _synthetic_data()
    data_layer = viewer.add_image(np.moveaxis(data_xyzt, -1, 0), name="bold", scale=(1, 2, 2, 2))
    table = cluster_table(["first", "second"])
    first = new_annotation_layer(data_layer, table, name="paint 1")
    second = new_annotation_layer(data_layer, table, name="paint 2")
    # Annotate every other slab; the rest stays unknown.
    first.data[0:7:2][inside_first[0:7:2]] = 1
    first.data[0:7:2][~inside_first[0:7:2] & ~inside_second[0:7:2]] = 255
    second.data[0:7:2][inside_second[0:7:2]] = 2
    viewer.add_layer(first)
    viewer.add_layer(second)
    widget = TrainingWidget(viewer)
    widget.num_clusters.setValue(3)
    widget.set_size.setValue(4)
    widget.batch_size.setValue(4)
    widget.seed.setValue(0)
    widget.device.setCurrentText("cpu")
    viewer.window.add_dock_widget(widget)
    return viewer, widget


def _wait_until_idle(qtbot, widget, timeout=60000):
    qtbot.waitUntil(
        lambda: not widget.is_training() and widget._predict_worker is None, timeout=timeout
    )
    assert QThreadPool.globalInstance().waitForDone(10000)
    qtbot.wait(20)


def test_training_runs_and_predicts(trained_setup, qtbot):
    viewer, widget = trained_setup
    widget.epochs.setValue(2)
    widget.num_batches.setValue(3)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)

    with qtbot.waitSignal(widget.prediction_shown, timeout=60000):
        worker = widget.start()
        assert worker is not None
        assert widget.is_training()
    timer.stop()

    assert widget.model is not None
    assert widget.model.n_steps_ == 6
    curves = widget.loss_plot.curves()
    assert {"supervised", "generator", "discriminator"} <= set(curves)
    assert curves["supervised"][0] == list(range(1, 7))
    # The GUI event loop kept running while the worker trained.
    assert len(ticks) >= 3

    proba = find_probability_layer(viewer.layers, "bold")
    assert proba.data.shape == (3,) + SHAPE
    assert md.gacc_info(proba)["model"] is widget.model
    labels = prediction_label_layers(viewer.layers, proba)
    assert labels
    assert {"voxels", "volume_mm3", "dice"} <= set(labels[0].features.columns)
    _wait_until_idle(qtbot, widget)


def test_continue_training_warm_starts(trained_setup, qtbot):
    viewer, widget = trained_setup
    widget.epochs.setValue(1)
    widget.num_batches.setValue(2)
    widget.predict_after.setChecked(False)
    with qtbot.waitSignal(widget.training_finished, timeout=60000):
        widget.start()
    model = widget.model
    viewer.layers["paint 1"].data[1, 0, 0] = 1

    with qtbot.waitSignal(widget.training_finished, timeout=60000):
        widget.start(warm_start=True)

    assert widget.model is model
    assert model.n_steps_ == 4
    assert len(widget.loss_plot.curves()["generator"][0]) == 4
    _wait_until_idle(qtbot, widget)


def test_pause_resume_and_stop(trained_setup, qtbot):
    viewer, widget = trained_setup
    widget.epochs.setValue(1000)
    widget.num_batches.setValue(10)
    widget.predict_after.setChecked(False)
    widget.start()
    qtbot.waitUntil(lambda: widget.run.steps_done >= 2, timeout=30000)

    widget.toggle_pause()
    qtbot.waitUntil(lambda: widget.worker.is_paused, timeout=10000)
    assert widget.pause_button.text() == "Resume"
    paused_at = widget.run.steps_done
    qtbot.wait(300)
    assert widget.run.steps_done == paused_at

    widget.toggle_pause()
    qtbot.waitUntil(lambda: widget.run.steps_done > paused_at, timeout=10000)
    with qtbot.waitSignal(widget.training_finished, timeout=30000) as blocker:
        widget.stop()
    steps = blocker.args[0]
    assert 2 <= steps < 10000
    assert widget.model is not None
    assert widget.model.n_steps_ == steps
    assert not widget.is_training()
    _wait_until_idle(qtbot, widget)


def test_stop_while_paused(trained_setup, qtbot):
    viewer, widget = trained_setup
    widget.epochs.setValue(1000)
    widget.predict_after.setChecked(False)
    widget.start()
    qtbot.waitUntil(lambda: widget.run.steps_done >= 1, timeout=30000)
    widget.toggle_pause()
    qtbot.waitUntil(lambda: widget.worker.is_paused, timeout=10000)
    with qtbot.waitSignal(widget.training_finished, timeout=30000):
        widget.stop()
    _wait_until_idle(qtbot, widget)


def test_parameters_and_default_mask(make_napari_viewer):
    viewer = make_napari_viewer()
    data_layer = viewer.add_image(np.zeros((N_VOLUMES,) + SHAPE, np.float32), name="bold")
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[1:6] = 1
    viewer.add_labels(mask, name="brain", metadata={md.GACC_KEY: {"role": md.ROLE_MASK}})
    widget = TrainingWidget(viewer)
    assert widget.data_combo.current_layer() is data_layer
    assert widget.mask_combo.current_layer() is viewer.layers["brain"]

    assert not widget.balance.isChecked()
    assert widget.num_clusters.value() == 50
    widget.seed.setValue(-1)
    parameters = widget.model_parameters()
    assert parameters["random_state"] is None
    assert parameters["class_weight"] is None
    model = gacc.GACC(**parameters)
    assert model.num_clusters == widget.num_clusters.value()


def test_default_k_follows_cluster_table(make_napari_viewer):
    viewer = make_napari_viewer()
    data_layer = viewer.add_image(np.zeros((N_VOLUMES,) + SHAPE, np.float32), name="bold")
    widget = TrainingWidget(viewer)
    assert widget.num_clusters.value() == 50

    names = [f"region {index}" for index in range(60)]
    viewer.add_layer(new_annotation_layer(data_layer, cluster_table(names), name="paint"))
    assert widget.num_clusters.value() == 70

    widget.num_clusters.setValue(64)
    viewer.layers.remove("paint")
    assert widget.num_clusters.value() == 64


def test_invalid_input_shows_error(trained_setup, qtbot, monkeypatch):
    viewer, widget = trained_setup
    errors = []
    monkeypatch.setattr("napari_gacc._training_widget.show_error", errors.append)
    widget.num_clusters.setValue(1)
    assert widget.start() is None
    assert "set K to at least 2" in errors[-1]
    widget.num_clusters.setValue(3)
    assert widget.start(warm_start=True) is None
    assert "press Start first" in errors[-1]


def test_non_finite_loss_keeps_model(trained_setup, qtbot, monkeypatch):
    viewer, widget = trained_setup
    widget.epochs.setValue(1)
    widget.num_batches.setValue(2)
    widget.predict_after.setChecked(False)
    with qtbot.waitSignal(widget.training_finished, timeout=60000):
        widget.start()
    model = widget.model
    errors = []
    monkeypatch.setattr("napari_gacc._training_widget.show_error", errors.append)

    def failing_step(self, batch):
        raise gacc.NonFiniteLossError("The generator loss is nan at step 3.")

    monkeypatch.setattr(gacc.GACC, "_run_step", failing_step)
    with qtbot.waitSignal(widget.training_finished, timeout=60000):
        widget.start(warm_start=True)

    assert widget.model is model
    assert model.n_steps_ == 2
    assert "last finite step" in errors[-1]
    _wait_until_idle(qtbot, widget)


def test_save_and_load_model(trained_setup, qtbot, tmp_path):
    viewer, widget = trained_setup
    widget.epochs.setValue(1)
    widget.num_batches.setValue(2)
    widget.predict_after.setChecked(False)
    with qtbot.waitSignal(widget.training_finished, timeout=60000):
        widget.start()
    path = tmp_path / "model.pt"
    widget.save_model(path)
    assert path.exists()

    other = TrainingWidget(viewer)
    loaded = other.load_model(path)
    assert loaded.n_steps_ == 2
    assert other.num_clusters.value() == 3
    assert len(other.loss_plot.curves()["generator"][0]) == 2
    _wait_until_idle(qtbot, widget)


def test_closing_viewer_mid_training(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    data_xyzt, inside_first, _ = _synthetic_data()
    data_layer = viewer.add_image(np.moveaxis(data_xyzt, -1, 0), name="bold")
    layer = new_annotation_layer(data_layer, cluster_table(["first"]), name="paint")
    layer.data[inside_first] = 1
    viewer.add_layer(layer)
    widget = TrainingWidget(viewer)
    widget.num_clusters.setValue(2)
    widget.device.setCurrentText("cpu")
    widget.epochs.setValue(100000)
    viewer.window.add_dock_widget(widget)
    widget.start()
    run = widget.run
    qtbot.waitUntil(lambda: run.steps_done >= 1, timeout=30000)

    viewer.close()

    assert run.stop_event.is_set()
    assert run.done_event.wait(30)
    assert run.steps_done < 100000 * 10
    assert QThreadPool.globalInstance().waitForDone(10000)


def test_loss_plot_throttles_redraws(qtbot):
    from napari_gacc._loss_plot import REDRAW_INTERVAL_MS, LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.show()
    qtbot.waitExposed(plot)
    qtbot.wait(REDRAW_INTERVAL_MS + 100)
    before = plot.redraw_count
    for step in range(1, 201):
        plot.append(step, {"generator": 1.0 / step, "supervised": 0.0})
    qtbot.wait(2 * REDRAW_INTERVAL_MS + 100)

    assert 1 <= plot.redraw_count - before <= 3
    steps, values = plot.curves()["generator"]
    assert steps == list(range(1, 201))
    assert values[-1] == pytest.approx(1.0 / 200)
    plot.log_scale.setChecked(False)
    assert plot.axes.get_yscale() == "linear"
