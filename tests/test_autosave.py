"""Tests of ModelCheckpoint: periodic saves, saves when training ends, and exact resumes."""

import logging
import os

import numpy as np
import pytest

import gacc
from engine_fixtures import (
    TINY_PARAMS,
    make_volume,
    network_weights,
    same_weights,
    torch_single_thread,  # noqa: F401
)
from gacc.callbacks import LambdaCallback, ModelCheckpoint

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def volume():
    return make_volume()


def _model(**params):
    return gacc.GACC(**{**TINY_PARAMS, **params})


def _fit(volume, steps, callbacks=None, model=None, warm_start=False):
    data, clusters = volume
    model = model if model is not None else _model()
    return model.fit(data, clusters, num_batches=steps, epochs=1, callbacks=callbacks,
                     warm_start=warm_start)


def _saved_steps(path):
    return gacc.GACC.load(path, device="cpu").n_steps_


def _interrupt_at_call(monkeypatch, call, error):
    """Make the ``call``-th training step raise ``error`` before changing anything."""
    original = gacc.training.TrainingStep.__call__
    calls = []

    def step(self, batch, step_number, generator):
        calls.append(step_number)
        if len(calls) == call:
            raise error
        return original(self, batch, step_number, generator)

    monkeypatch.setattr(gacc.training.TrainingStep, "__call__", step)


# ----------------------------------------------------------------------
# When files are written


def test_saves_every_n_steps(volume, tmp_path):
    saved = []
    original_save = gacc.GACC.save

    def recording_save(model, path):
        saved.append((model.n_steps_, path.name))
        return original_save(model, path)

    checkpoint = ModelCheckpoint(tmp_path / "model_{step:03d}.pt", every_n_steps=2,
                                 keep_last=False)
    model = _model()
    model.save = recording_save.__get__(model)
    _fit(volume, 5, [checkpoint], model=model)

    assert saved == [(2, "model_002.pt"), (4, "model_004.pt"), (5, "model_005.pt")]
    assert sorted(os.listdir(tmp_path)) == ["model_002.pt", "model_004.pt", "model_005.pt"]
    assert _saved_steps(tmp_path / "model_004.pt") == 4
    assert checkpoint.last_path_ == tmp_path / "model_005.pt"
    assert checkpoint.last_step_ == 5


def test_keep_last_deletes_older(volume, tmp_path):
    checkpoint = ModelCheckpoint(tmp_path / "model_{step}.pt", every_n_steps=2)
    _fit(volume, 5, [checkpoint])
    assert os.listdir(tmp_path) == ["model_5.pt"]


def test_plain_path_replaced(volume, tmp_path):
    path = tmp_path / "checkpoint.pt"
    _fit(volume, 5, [ModelCheckpoint(path, every_n_steps=2)])
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert _saved_steps(path) == 5


def test_no_second_save_at_end(volume, tmp_path, monkeypatch):
    checkpoint = ModelCheckpoint(tmp_path / "model.pt", every_n_steps=3)
    model = _model()
    saves = []
    original_save = model.save
    model.save = lambda path: saves.append(path) or original_save(path)
    _fit(volume, 6, [checkpoint], model=model)
    assert len(saves) == 2


def test_every_n_steps_counts_all_fits(volume, tmp_path):
    path = tmp_path / "model_{step}.pt"
    model = _fit(volume, 3)
    _fit(volume, 3, [ModelCheckpoint(path, every_n_steps=4, keep_last=False)], model=model,
         warm_start=True)
    assert sorted(os.listdir(tmp_path)) == ["model_4.pt", "model_6.pt"]


def test_only_at_end_with_none(volume, tmp_path):
    _fit(volume, 4, [ModelCheckpoint(tmp_path / "model_{step}.pt", every_n_steps=None)])
    assert os.listdir(tmp_path) == ["model_4.pt"]


# ----------------------------------------------------------------------
# Saves after a stop, an error or an interruption


def test_saved_after_stop(volume, tmp_path):
    def stop_at_three(model, step_logs):
        if step_logs["step"] == 3:
            model.stop_training = True

    path = tmp_path / "model.pt"
    _fit(volume, 10, [LambdaCallback(on_step_end=stop_at_three), ModelCheckpoint(path)])
    assert _saved_steps(path) == 3


def test_saved_after_closing_fit_iter(volume, tmp_path):
    data, clusters = volume
    path = tmp_path / "model.pt"
    steps = _model().fit_iter(data, clusters, num_batches=10, epochs=1,
                              callbacks=[ModelCheckpoint(path)])
    next(steps)
    next(steps)
    steps.close()
    assert _saved_steps(path) == 2


@pytest.mark.parametrize(
    "error",
    [KeyboardInterrupt(), gacc.NonFiniteLossError("The generator loss became nan")],
    ids=["keyboard-interrupt", "non-finite-loss"],
)
def test_saved_after_failure(volume, tmp_path, monkeypatch, error):
    path = tmp_path / "model.pt"
    _interrupt_at_call(monkeypatch, 4, error)
    model = _model()
    with pytest.raises(type(error)):
        _fit(volume, 10, [ModelCheckpoint(path, every_n_steps=100)], model=model)
    loaded = gacc.GACC.load(path, device="cpu")
    assert loaded.n_steps_ == 3
    assert same_weights(network_weights(loaded.networks_), network_weights(model.networks_))


def test_nothing_saved_before_first_step(volume, tmp_path, monkeypatch):
    _interrupt_at_call(monkeypatch, 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _fit(volume, 5, [ModelCheckpoint(tmp_path / "model.pt")])
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------
# Resuming


def test_resume_equals_uninterrupted(volume, tmp_path, monkeypatch):
    data, _ = volume
    whole = _fit(volume, 8)

    path = tmp_path / "model.pt"
    _interrupt_at_call(monkeypatch, 6, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _fit(volume, 8, [ModelCheckpoint(path, every_n_steps=2)])
    monkeypatch.undo()

    resumed = gacc.GACC.load(path, device="cpu")
    assert resumed.n_steps_ == 5
    _fit(volume, 8 - resumed.n_steps_, model=resumed, warm_start=True)
    assert resumed.n_steps_ == 8
    assert resumed.history_ == whole.history_
    assert same_weights(network_weights(resumed.networks_), network_weights(whole.networks_))
    assert np.array_equal(resumed.predict(data), whole.predict(data))


def test_resume_from_periodic_checkpoint(volume, tmp_path):
    # As after a crash that leaves no time for a final save.
    data, _ = volume
    whole = _fit(volume, 7)
    path = tmp_path / "model_{step}.pt"
    _fit(volume, 7, [ModelCheckpoint(path, every_n_steps=3, keep_last=False)])
    resumed = gacc.GACC.load(tmp_path / "model_3.pt", device="cpu")
    _fit(volume, 4, model=resumed, warm_start=True)
    assert resumed.history_ == whole.history_
    assert np.array_equal(resumed.predict(data), whole.predict(data))


# ----------------------------------------------------------------------
# Failed saves and invalid settings


def _failing_saves(model, fail_calls):
    """Make the ``fail_calls``-th calls (1-based) of ``model.save`` raise a full-disk error."""
    original_save = model.save
    calls = []

    def save(path):
        calls.append(path)
        if len(calls) in fail_calls:
            raise OSError(28, f"Cannot write {str(path)!r}: No space left on device")
        return original_save(path)

    model.save = save
    return calls


def test_periodic_save_failure_logged(volume, tmp_path, caplog):
    path = tmp_path / "model.pt"
    model = _model()
    calls = _failing_saves(model, {1})
    with caplog.at_level(logging.ERROR, logger="gacc.callbacks"):
        _fit(volume, 5, [ModelCheckpoint(path, every_n_steps=2)], model=model)
    assert len(calls) == 3
    assert model.n_steps_ == 5
    assert "Checkpoint of step 2 not saved, training goes on" in caplog.text
    assert _saved_steps(path) == 5


def test_final_save_failure_raises(volume, tmp_path):
    model = _model()
    _failing_saves(model, {1})
    with pytest.raises(OSError, match="No space left on device"):
        _fit(volume, 3, [ModelCheckpoint(tmp_path / "model.pt")], model=model)
    assert model.n_steps_ == 3


def test_final_save_failure_keeps_training_error(volume, tmp_path, monkeypatch, caplog):
    model = _model()
    _failing_saves(model, {1})
    _interrupt_at_call(monkeypatch, 3, gacc.NonFiniteLossError("The generator loss became nan"))
    with caplog.at_level(logging.ERROR, logger="gacc.callbacks"):
        with pytest.raises(gacc.NonFiniteLossError):
            _fit(volume, 5, [ModelCheckpoint(tmp_path / "model.pt")], model=model)
    assert "Checkpoint of step 2 not saved" in caplog.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"every_n_steps": 0}, "every_n_steps=0", id="zero"),
        pytest.param({"every_n_steps": 2.5}, "every_n_steps=2.5", id="float"),
        pytest.param({"every_n_steps": True}, "every_n_steps=True", id="bool"),
        pytest.param({"path": "model_{epoch}.pt"}, r"\{step\}", id="unknown-field"),
        pytest.param({"path": "model_{step:q}.pt"}, "not a valid template", id="bad-format"),
    ],
)
def test_invalid_settings(tmp_path, kwargs, message):
    kwargs = {"path": tmp_path / "model.pt", **kwargs}
    with pytest.raises(ValueError, match=message):
        ModelCheckpoint(**kwargs)
