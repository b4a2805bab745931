"""Tests of saving and loading GACC model files."""

import os

import numpy as np
import pytest
import torch

import gacc
from engine_fixtures import (
    SPATIAL_SHAPE,
    TINY_PARAMS,
    make_volume,
    network_weights,
    same_weights,
    torch_single_thread,  # noqa: F401
)
from gacc import checkpoint

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def volume():
    return make_volume()


@pytest.fixture
def fitted(volume):
    data, clusters = volume
    model = gacc.GACC(**TINY_PARAMS, class_weight="balanced", min_max_scale_range=(-1.0, 2.0))
    return model.fit(data, clusters, num_batches=6, epochs=1)


@pytest.fixture
def saved(fitted, tmp_path):
    path = tmp_path / "model.gacc.pt"
    fitted.save(path)
    return path


def _comparable(params, *, device=True):
    """Return params with the scale range as a list, as the file stores it."""
    params = dict(params)
    params["min_max_scale_range"] = list(params["min_max_scale_range"])
    if not device:
        del params["device"]
    return params


def test_round_trip(fitted, saved, volume):
    data, _ = volume
    loaded = gacc.GACC.load(saved, device="cpu")
    assert np.array_equal(loaded.predict(data), fitted.predict(data))
    assert _comparable(loaded.get_params()) == _comparable(fitted.get_params())
    assert loaded.history_ == fitted.history_
    assert loaded.n_steps_ == fitted.n_steps_ == 6
    assert loaded.n_features_in_ == fitted.n_features_in_
    assert loaded.n_known_clusters_ == fitted.n_known_clusters_
    assert loaded.spatial_shape_ == fitted.spatial_shape_
    assert loaded.device_ == torch.device("cpu")
    assert same_weights(network_weights(loaded.networks_), network_weights(fitted.networks_))
    np.testing.assert_array_equal(loaded.scaling_.data_min_, fitted.scaling_.data_min_)
    np.testing.assert_array_equal(loaded.scaling_.data_max_, fitted.scaling_.data_max_)
    assert loaded.scaling_.feature_range == (-1.0, 2.0)


def test_load_auto_device(fitted, saved):
    loaded = gacc.GACC.load(saved)
    assert loaded.device == "auto"
    assert str(loaded.device_) == gacc.available_devices()[0]
    assert _comparable(loaded.get_params(), device=False) == _comparable(
        fitted.get_params(), device=False
    )


def test_save_returns_path(fitted, tmp_path):
    path = tmp_path / "out.pt"
    assert fitted.save(path) == path
    assert path.is_file()


def test_no_temporary_files(fitted, saved, tmp_path):
    fitted.save(saved)  # overwrite an existing file
    assert sorted(os.listdir(tmp_path)) == ["model.gacc.pt"]


def test_failed_save_keeps_old_file(fitted, saved, tmp_path, monkeypatch):
    before = saved.read_bytes()

    def broken_save(payload, stream):
        stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(saved)
    assert saved.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.gacc.pt"]


def test_save_missing_folder(fitted, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fitted.save(tmp_path / "missing" / "model.pt")


def test_save_before_fit(tmp_path):
    with pytest.raises(gacc.NotFittedError):
        gacc.GACC(**TINY_PARAMS).save(tmp_path / "model.pt")


def test_warm_start_after_load(fitted, saved, volume):
    # A loaded model continues exactly as the model that was saved would.
    data, clusters = volume
    loaded = gacc.GACC.load(saved, device="cpu")
    loaded.fit(data, clusters, num_batches=4, epochs=1, warm_start=True)
    fitted.fit(data, clusters, num_batches=4, epochs=1, warm_start=True)
    assert loaded.n_steps_ == 10
    assert loaded.history_ == fitted.history_
    assert np.array_equal(loaded.predict(data), fitted.predict(data))


def test_optimizer_state_restored(fitted, saved, volume):
    data, clusters = volume
    loaded = gacc.GACC.load(saved, device="cpu")
    loaded.fit(data, clusters, num_batches=1, epochs=1, warm_start=True)
    for name, optimizer in loaded._trainer.optimizers.items():
        steps = {float(state["step"]) for state in optimizer.state_dict()["state"].values()}
        assert steps == {7.0}, name


def test_loaded_model_other_shape(saved, volume):
    data, _ = volume
    loaded = gacc.GACC.load(saved, device="cpu")
    with pytest.raises(gacc.InvalidInputError, match=r"\(9, 10, 8, 11\) but the model"):
        loaded.predict(data[..., :11])
    with pytest.raises(gacc.InvalidInputError, match=r"\(9, 10, 6, 12\) but the model"):
        loaded.predict(data[:, :, :6])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        gacc.GACC.load(tmp_path / "missing.pt")


def test_folder_is_not_model(tmp_path):
    with pytest.raises(FileNotFoundError):
        gacc.GACC.load(tmp_path)


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _text(path):
    path.write_text("num_clusters = 50\n")


def _empty(path):
    path.write_bytes(b"")


def _state_dict_only(path):
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)


def _edited(change):
    def write(path):
        payload = torch.load(path, weights_only=True)
        change(payload)
        torch.save(payload, path)
    return write


def _set(key, value):
    def change(payload):
        payload[key] = value
    return change


def _delete(key):
    def change(payload):
        del payload[key]
    return change


def _wrong_hidden_size(payload):
    payload["params"]["hidden_size"] = 32


def _unknown_param(payload):
    payload["params"]["bogus"] = 1


def _bad_random_state(payload):
    payload["random_states"]["sampling"] = torch.zeros(3, dtype=torch.uint8)


DAMAGED_FILES = [
    ("truncated", _truncated, "not a readable GACC model file"),
    ("random-bytes", _random_bytes, "not a readable GACC model file"),
    ("text", _text, "not a readable GACC model file"),
    ("empty", _empty, "not a readable GACC model file"),
    ("other-torch-file", _state_dict_only, "PyTorch file but not a GACC model"),
    ("format-version", _edited(_set("format_version", 99)),
     "format version 99 .* reads format version 1"),
    ("no-format", _edited(_delete("format")), "not a GACC model"),
    ("no-params", _edited(_delete("params")), "do not match"),
    ("no-fit", _edited(_delete("fit")), "do not match"),
    ("no-random-states", _edited(_delete("random_states")), "do not match"),
    ("no-networks", _edited(_delete("networks")), "do not match"),
    ("wrong-hidden-size", _edited(_wrong_hidden_size), "size mismatch"),
    ("unknown-param", _edited(_unknown_param), "bogus"),
    ("bad-random-state", _edited(_bad_random_state), "do not match"),
]


@pytest.mark.parametrize(
    "damage, message",
    [pytest.param(damage, message, id=name) for name, damage, message in DAMAGED_FILES],
)
def test_damaged_file(saved, damage, message):
    damage(saved)
    with pytest.raises(gacc.ModelFileError, match=message) as raised:
        gacc.GACC.load(saved, device="cpu")
    assert str(saved) in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_unavailable_device_not_damage(saved):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available, so device='cuda' loads")
    with pytest.raises(ValueError, match="CUDA is not available") as raised:
        gacc.GACC.load(saved, device="cuda")
    assert not isinstance(raised.value, gacc.ModelFileError)


def test_file_holds_only_plain_types(saved):
    # The file loads with weights_only=True, so loading never runs code.
    payload = torch.load(saved, weights_only=True)
    assert payload["format"] == "gacc-model"
    assert payload["format_version"] == checkpoint.FORMAT_VERSION
    assert payload["gacc_version"] == gacc.__version__
    assert payload["fit"]["spatial_shape"] == list(SPATIAL_SHAPE)


def test_other_gacc_version_warns(saved, caplog):
    _edited(_set("gacc_version", "0.0.1"))(saved)
    loaded = gacc.GACC.load(saved, device="cpu")
    assert loaded.n_steps_ == 6
    assert "written by gacc 0.0.1" in caplog.text
