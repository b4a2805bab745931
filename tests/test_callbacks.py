"""Tests of observing and stopping training: callbacks, stop events and fit_iter."""

import threading

import numpy as np
import pytest

import gacc
from engine_fixtures import TINY_PARAMS, make_volume, torch_single_thread  # noqa: F401
from gacc.callbacks import Callback, LambdaCallback, ProgressBar

pytestmark = pytest.mark.usefixtures("torch_single_thread")

LOSS_NAMES = {"supervised", "adversarial", "xc", "cx", "generator", "discriminator",
              "xc_predictor", "cx_predictor"}


class Recorder(Callback):
    """Record every hook call, in order."""

    def __init__(self):
        self.calls = []
        self.logs = []

    def on_train_begin(self, model):
        self.calls.append("begin")

    def on_step_end(self, model, step_logs):
        self.calls.append("step")
        self.logs.append(step_logs)

    def on_train_end(self, model):
        self.calls.append("end")


@pytest.fixture(scope="module")
def volume():
    return make_volume()


def _model():
    return gacc.GACC(**TINY_PARAMS)


def test_every_step_reported(volume):
    data, clusters = volume
    recorder = Recorder()
    model = _model().fit(data, clusters, num_batches=3, epochs=2, callbacks=[recorder])
    assert recorder.calls == ["begin"] + ["step"] * 6 + ["end"]
    assert [logs["step"] for logs in recorder.logs] == [1, 2, 3, 4, 5, 6]
    assert [logs["epoch"] for logs in recorder.logs] == [1, 1, 1, 2, 2, 2]
    assert all(logs["num_steps"] == 6 for logs in recorder.logs)
    for index, logs in enumerate(recorder.logs):
        assert set(logs) == {"step", "epoch", "num_steps", "losses"}
        assert set(logs["losses"]) == LOSS_NAMES
        for name, value in logs["losses"].items():
            assert isinstance(value, float), name
            assert value == model.history_[name][index], name


def test_steps_count_across_warm_starts(volume):
    data, clusters = volume
    recorder = Recorder()
    model = _model().fit(data, clusters, num_batches=2, epochs=1)
    model.fit(data, clusters, num_batches=3, epochs=1, callbacks=[recorder], warm_start=True)
    assert [logs["step"] for logs in recorder.logs] == [3, 4, 5]
    assert all(logs["num_steps"] == 3 for logs in recorder.logs)


def test_switched_off_terms_not_reported(volume):
    data, clusters = volume
    recorder = Recorder()
    model = gacc.GACC(**TINY_PARAMS, adversarial_weight=0.0, cx_weight=0.0)
    model.fit(data, clusters, num_batches=2, epochs=1, callbacks=[recorder])
    expected = {"supervised", "xc", "generator", "xc_predictor"}
    assert all(set(logs["losses"]) == expected for logs in recorder.logs)


def test_stop_training_in_callback(volume):
    data, clusters = volume
    recorder = Recorder()

    def stop_at_three(model, step_logs):
        if step_logs["step"] == 3:
            model.stop_training = True

    model = _model().fit(
        data, clusters, num_batches=5, epochs=2,
        callbacks=[LambdaCallback(on_step_end=stop_at_three), recorder],
    )
    assert model.n_steps_ == 3
    assert recorder.calls == ["begin", "step", "step", "step", "end"]
    assert all(len(values) == 3 for values in model.history_.values())
    assert np.all(np.isfinite(model.predict(data)))


def test_stop_training_reset_next_fit(volume):
    data, clusters = volume
    model = _model()
    model.fit(data, clusters, num_batches=4, epochs=1, callbacks=[
        LambdaCallback(on_step_end=lambda m, logs: setattr(m, "stop_training", True))
    ])
    assert model.n_steps_ == 1
    model.fit(data, clusters, num_batches=4, epochs=1, warm_start=True)
    assert model.n_steps_ == 5


def test_stop_event_from_thread(volume):
    # A worker thread sets the stop event once step 2 has ended; the
    # callback waits for it, so training stops after exactly 2 steps.
    data, clusters = volume
    stop_event = threading.Event()
    reached_two = threading.Event()

    def stopper():
        if reached_two.wait(timeout=30):
            stop_event.set()

    def on_step_end(model, step_logs):
        if step_logs["step"] == 2:
            reached_two.set()
            assert stop_event.wait(timeout=30)

    thread = threading.Thread(target=stopper)
    thread.start()
    try:
        model = _model().fit(data, clusters, num_batches=10, epochs=1, stop_event=stop_event,
                             callbacks=[LambdaCallback(on_step_end=on_step_end)])
    finally:
        reached_two.set()
        thread.join(timeout=30)
    assert model.n_steps_ == 2
    assert np.all(np.isfinite(model.predict(data)))


def test_stop_event_set_before_fit(volume):
    data, clusters = volume
    stop_event = threading.Event()
    stop_event.set()
    recorder = Recorder()
    model = _model().fit(data, clusters, num_batches=5, epochs=1, stop_event=stop_event,
                         callbacks=[recorder])
    assert model.n_steps_ == 0
    assert recorder.calls == ["begin", "end"]
    assert model.predict(data).shape[-1] == TINY_PARAMS["num_clusters"]


def test_fit_iter_yields_steps(volume):
    data, clusters = volume
    model = _model()
    logs = list(model.fit_iter(data, clusters, num_batches=2, epochs=2))
    assert [item["step"] for item in logs] == [1, 2, 3, 4]
    assert model.n_steps_ == 4
    reference = _model().fit(data, clusters, num_batches=2, epochs=2)
    assert model.history_ == reference.history_


def test_fit_iter_closed_early(volume):
    data, clusters = volume
    recorder = Recorder()
    model = _model()
    steps = model.fit_iter(data, clusters, num_batches=10, epochs=3, callbacks=[recorder])
    for item in steps:
        if item["step"] == 4:
            break
    steps.close()
    assert model.n_steps_ == 4
    assert recorder.calls == ["begin"] + ["step"] * 4 + ["end"]
    assert all(len(values) == 4 for values in model.history_.values())
    assert not model.networks_.training
    proba = model.predict(data)
    assert np.all(np.isfinite(proba))

    # The stopped model continues where it stopped.
    model.fit(data, clusters, num_batches=2, epochs=1, warm_start=True)
    assert model.n_steps_ == 6


def test_fit_iter_checks_input_at_once(volume):
    data, _ = volume
    with pytest.raises(gacc.InvalidInputError, match="cluster_xyzp is missing"):
        _model().fit_iter(data, None)


def test_callback_error_ends_training(volume):
    data, clusters = volume
    recorder = Recorder()

    def fail(model, step_logs):
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        _model().fit(data, clusters, num_batches=3, epochs=1,
                     callbacks=[recorder, LambdaCallback(on_step_end=fail)])
    assert recorder.calls == ["begin", "step", "end"]


def test_train_end_after_nonfinite(volume):
    data, clusters = volume
    recorder = Recorder()
    model = gacc.GACC(**{**TINY_PARAMS, "learning_rate": 1e6})
    with pytest.raises(gacc.NonFiniteLossError):
        model.fit(data, clusters, num_batches=5, epochs=1, callbacks=[recorder])
    assert recorder.calls[0] == "begin"
    assert recorder.calls[-1] == "end"


def test_lambda_callback_hooks(volume):
    data, clusters = volume
    calls = []
    callback = LambdaCallback(
        on_train_begin=lambda model: calls.append("begin"),
        on_step_end=lambda model, logs: calls.append(logs["step"]),
        on_train_end=lambda model: calls.append("end"),
    )
    _model().fit(data, clusters, num_batches=2, epochs=1, callbacks=[callback])
    assert calls == ["begin", 1, 2, "end"]


def test_progress_bar(volume, capsys):
    data, clusters = volume
    bar = ProgressBar(disable=False, ascii=True, mininterval=0)
    _model().fit(data, clusters, num_batches=3, epochs=1, callbacks=[bar])
    output = capsys.readouterr().err
    assert "GACC fit" in output
    assert "3/3" in output
    assert bar._bar is None
