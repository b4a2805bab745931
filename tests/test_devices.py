"""Tests of device selection, and one tiny fit on CUDA where a GPU exists."""

import numpy as np
import pytest
import torch

import gacc
from engine_fixtures import TINY_PARAMS, make_volume


def test_available_devices_end_with_cpu():
    devices = gacc.available_devices()
    assert devices[-1] == "cpu"
    assert devices.count("cpu") == 1
    cuda = [device for device in devices if device.startswith("cuda")]
    assert len(cuda) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_auto_picks_first_available():
    device = gacc.resolve_device("auto")
    assert isinstance(device, torch.device)
    expected = torch.device(gacc.available_devices()[0])
    assert device.type == expected.type
    assert gacc.resolve_device(None) == device


@pytest.mark.parametrize("request_", ["cpu", torch.device("cpu")], ids=["string", "device"])
def test_cpu_resolves(request_):
    assert gacc.resolve_device(request_) == torch.device("cpu")


@pytest.mark.parametrize("request_", ["gpu", "tpu", "cuda:x", "", 3.5], ids=str)
def test_invalid_device(request_):
    with pytest.raises(ValueError, match=r"'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") as raised:
        gacc.resolve_device(request_)
    assert repr(request_) in str(raised.value)


def test_unsupported_device_type():
    with pytest.raises(ValueError, match="device='meta' is not supported"):
        gacc.resolve_device("meta")


def test_cuda_missing():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available on this machine")
    for request_ in ("cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(ValueError, match="CUDA is not available") as raised:
            gacc.resolve_device(request_)
        assert "'cpu'" in str(raised.value)


def test_cuda_index_out_of_range():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to check the device index")
    request_ = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match="CUDA device"):
        gacc.resolve_device(request_)


def test_mps_missing():
    if gacc.devices._mps_available():
        pytest.skip("Apple MPS is available on this machine")
    with pytest.raises(ValueError, match="Apple MPS is not available"):
        gacc.resolve_device("mps")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda(tmp_path):
    data, clusters = make_volume()
    params = {**TINY_PARAMS, "device": "cuda"}
    model = gacc.GACC(**params).fit(data, clusters, num_batches=5, epochs=1)
    assert model.device_.type == "cuda"
    assert next(model.networks_.parameters()).is_cuda
    for name, values in model.history_.items():
        assert np.all(np.isfinite(values)), name
    proba = model.predict(data)
    assert proba.dtype == np.float32
    assert proba.shape == data.shape[:3] + (params["num_clusters"],)
    assert np.all((proba >= 0) & (proba <= 1))

    # Same seed on the same device repeats; a CUDA model loads on the CPU.
    again = gacc.GACC(**params).fit(data, clusters, num_batches=5, epochs=1)
    np.testing.assert_allclose(again.predict(data), proba, atol=1e-5)
    path = tmp_path / "model.pt"
    model.save(path)
    on_cpu = gacc.GACC.load(path, device="cpu")
    np.testing.assert_allclose(on_cpu.predict(data), proba, atol=1e-4)
    on_cpu.fit(data, clusters, num_batches=2, epochs=1, warm_start=True)
    assert on_cpu.n_steps_ == 7
