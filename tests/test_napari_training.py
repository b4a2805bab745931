"""Training jobs of the napari plugin without Qt: wrapping, closing, messages, ETA."""

import numpy as np
import pytest
import torch

import gacc
from napari_gacc._annotations import AnnotationSnapshot
from napari_gacc._training import (
    TrainingFailedError,
    TrainingRun,
    is_out_of_memory,
    predict_layer_array,
    train_steps,
    training_error_message,
)

SHAPE = (7, 8, 9)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny training steps run far slower with several intra-op threads on a
    # busy machine, because the threads spin waiting for each other.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _inputs():
    rng = np.random.default_rng(0)
    data_layer_array = rng.random((4,) + SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[:3] = 1
    labels[5:] = 255
    snapshot = AnnotationSnapshot(
        label_arrays=[labels],
        layer_names=["paint"],
        complete=[True],
        cluster_names=["first"],
        cluster_colors=["#ff0000"],
    )
    return data_layer_array, snapshot


def _model():
    return gacc.GACC(2, set_size=4, batch_size=4, random_state=0, device="cpu")


def test_train_steps_yields_and_marks_done():
    data_layer_array, snapshot = _inputs()
    model = _model()
    run = TrainingRun(num_steps=3)
    logs = list(
        train_steps(model, data_layer_array, snapshot, None, run, num_batches=3, epochs=1,
                    warm_start=False)
    )
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    assert run.steps_done == 3
    assert run.done_event.is_set()
    assert run.seconds_left() == pytest.approx(0.0)

    proba_kxyz = predict_layer_array(model, data_layer_array, None)
    assert proba_kxyz.shape == (2,) + SHAPE
    assert proba_kxyz.dtype == np.float32


def test_closing_train_steps_stops_engine():
    data_layer_array, snapshot = _inputs()
    model = _model()
    run = TrainingRun(num_steps=1000)
    steps = train_steps(model, data_layer_array, snapshot, None, run, num_batches=100,
                        epochs=10, warm_start=False)
    next(steps)
    next(steps)
    steps.close()
    assert run.done_event.is_set()
    assert model.n_steps_ == 2
    # The engine's loop ended, so its networks are back in evaluation mode.
    assert not model.networks_.training


def test_train_steps_wraps_runtime_errors(monkeypatch):
    data_layer_array, snapshot = _inputs()
    model = _model()

    def failing_step(self, batch):
        raise gacc.NonFiniteLossError("The supervised loss is nan at step 1.")

    monkeypatch.setattr(gacc.GACC, "_run_step", failing_step)
    run = TrainingRun(num_steps=2)
    steps = train_steps(model, data_layer_array, snapshot, None, run, num_batches=2, epochs=1,
                        warm_start=False)
    with pytest.raises(TrainingFailedError) as raised:
        next(steps)
    # superqt's generator workers drop RuntimeErrors, so the wrapper must not be one.
    assert not isinstance(raised.value, RuntimeError)
    assert isinstance(raised.value.error, gacc.NonFiniteLossError)
    assert run.done_event.is_set()
    assert "last finite step" in training_error_message(raised.value)


def test_invalid_annotations_reach_the_message():
    data_layer_array, snapshot = _inputs()
    snapshot.label_arrays[0][0, 0, 0] = 7
    run = TrainingRun(num_steps=1)
    steps = train_steps(_model(), data_layer_array, snapshot, None, run, num_batches=1,
                        epochs=1, warm_start=False)
    with pytest.raises(TrainingFailedError) as raised:
        next(steps)
    message = training_error_message(raised.value)
    assert message.startswith("Cannot train:")
    assert "contains label 7" in message


def test_out_of_memory_message():
    error = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(error)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    message = training_error_message(error, device="cuda:0")
    assert "Out of memory on cuda:0" in message
    assert "batch size" in message


def test_seconds_left_ignores_pauses():
    run = TrainingRun(num_steps=10)
    assert run.seconds_left() is None
    run.start_time -= 4.0
    run.steps_done = 2
    run.paused_seconds = 2.0
    assert run.seconds_left() == pytest.approx(8.0, abs=0.5)
