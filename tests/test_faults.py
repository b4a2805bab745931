"""Faults in the engine: non-finite values, memory use, out-of-memory errors and failed saves."""

import errno
import logging
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import gacc
from engine_fixtures import (
    SPATIAL_SHAPE,
    TINY_PARAMS,
    make_volume,
    torch_single_thread,  # noqa: F401
)
from gacc import preprocessing

pytestmark = pytest.mark.usefixtures("torch_single_thread")

K = TINY_PARAMS["num_clusters"]


@pytest.fixture(scope="module")
def volume():
    return make_volume()


def _model(**params):
    return gacc.GACC(**{**TINY_PARAMS, **params})


def _fit(data, clusters, steps=4, params=None, **fit_kwargs):
    return _model(**(params or {})).fit(data, clusters, num_batches=steps, epochs=1,
                                        **fit_kwargs)


def _brain_mask():
    mask = np.zeros(SPATIAL_SHAPE, dtype=bool)
    mask[1:8, 2:9, 1:7] = True
    return mask


# ----------------------------------------------------------------------
# NaN and infinite values in the data


def test_nan_outside_mask_never_read(volume):
    data, clusters = volume
    mask = _brain_mask()
    with_nan = data.copy()
    with_nan[~mask] = np.nan
    with_inf = data.copy()
    with_inf[~mask] = -np.inf

    reference = _fit(data, clusters, mask=mask)
    from_nan = _fit(with_nan, clusters, mask=mask)
    from_inf = _fit(with_inf, clusters, mask=mask)

    assert from_nan.history_ == reference.history_
    assert from_inf.history_ == reference.history_
    proba = from_nan.predict(with_nan, mask=mask)
    assert np.array_equal(proba, reference.predict(data, mask=mask))
    assert np.isfinite(proba).all()
    assert np.all(proba[~mask] == 0.0)


def test_nan_voxels_left_out_by_default(volume, caplog):
    data, clusters = volume
    data = data.copy()
    bad = np.zeros(SPATIAL_SHAPE, dtype=bool)
    bad[0] = True  # a whole slab of NaN background: 80 voxels
    bad[5, 5, 5] = True  # one voxel with a single NaN time point
    data[0] = np.nan
    data[5, 5, 5, 3] = np.nan

    with caplog.at_level(logging.WARNING, logger="gacc.preprocessing"):
        model = _fit(data, clusters)
    assert "81 voxels contain NaN or infinite values" in caplog.text
    assert all(np.isfinite(values).all() for values in model.history_.values())

    proba = model.predict(data)
    assert np.isfinite(proba).all()
    assert np.all(proba[bad] == 0.0)
    assert np.all(proba[~bad] > 0.0)


def test_foreground_without_mask_drops_nan_voxels():
    data = np.ones((3, 4, 5, 2), dtype=np.float32)
    data[0, 0, 0, 1] = np.nan
    data[2, 3, 4, 0] = np.inf
    data[1, 1, 1] = 0.0
    indices = preprocessing.foreground_indices(data)
    dropped = np.ravel_multi_index(([0, 2, 1], [0, 3, 1], [0, 4, 1]), (3, 4, 5))
    assert len(indices) == 60 - 3
    assert not np.isin(dropped, indices).any()


def test_nan_inside_mask_raises(volume):
    data, clusters = volume
    data = data.copy()
    data[2, 3, 4, :2] = np.nan
    data[3, 3, 3, 0] = np.inf
    with pytest.raises(gacc.InvalidInputError,
                       match=r"3 NaN or infinite values in 2 voxels inside the mask; "
                             r"leave those voxels out of the mask") as raised:
        _model().fit(data, clusters, mask=_brain_mask(), num_batches=1, epochs=1)
    assert "np.nan_to_num" in str(raised.value)


def test_only_nan_and_zero_voxels_raise():
    data = np.zeros((3, 4, 5, 2), dtype=np.float32)
    data[0] = np.nan
    data[1, 1, 1, 0] = 1.0
    data[1, 1, 1, 1] = np.nan
    with pytest.raises(gacc.InvalidInputError, match=r"zero or contains NaN.*\(21 voxels"):
        preprocessing.foreground_indices(data)


def test_nan_file_fits_through_loader(volume, tmp_path):
    nib = pytest.importorskip("nibabel")
    data, clusters = volume
    data = data.copy()
    data[:2] = np.nan
    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)

    loaded, _ = gacc.nifti.load_data(path)
    assert np.isnan(loaded[:2]).all()
    model = _fit(loaded, clusters)
    proba = model.predict(loaded)
    assert np.all(proba[:2] == 0.0)
    assert np.all(proba[2:] > 0.0)


# ----------------------------------------------------------------------
# Memory use with large volumes


def test_float32_memmap_not_copied(tmp_path):
    shape = (6, 7, 5, 4)
    memmap = np.lib.format.open_memmap(tmp_path / "data.npy", mode="w+", dtype=np.float32,
                                       shape=shape, fortran_order=True)
    memmap[:] = np.random.default_rng(0).random(shape)
    checked = preprocessing.check_data_xyzt(memmap)
    assert checked.dtype == np.float32
    assert np.shares_memory(checked, memmap)


def _peak_bytes(function, *args, **kwargs):
    """Return the peak of memory that numpy and Python allocate while ``function`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        function(*args, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_checks_scan_in_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    data = np.asfortranarray(rng.random((40, 30, 20, 48), dtype=np.float32))
    monkeypatch.setattr(preprocessing, "_SCAN_CHUNK_BYTES", data.nbytes // 20)

    def check(data):
        preprocessing.foreground_indices(preprocessing.check_data_xyzt(data))

    # A whole-array boolean mask alone would take a quarter of the data's size.
    assert _peak_bytes(check, data) < 0.15 * data.nbytes


def test_predict_makes_no_copy_of_data(monkeypatch):
    # Fortran order, as NIfTI stores voxels: a C-order reshape would copy it whole.
    n_features = 64
    data, clusters = make_volume((30, 28, 26), n_features=n_features, n_clusters=2)
    data = np.asfortranarray(data)
    model = _fit(data, clusters, steps=1, params={"prediction_repeats": 1})
    monkeypatch.setattr(preprocessing, "_VOXEL_CHUNK_BYTES", 1024 * 8 * n_features)

    n_voxels = int(np.prod(data.shape[:3]))
    tokens_bytes = 4 * n_voxels * (n_features + 6 * model.num_frequencies)
    output_bytes = 4 * n_voxels * K
    peak = _peak_bytes(model.predict, data)
    assert peak < tokens_bytes + output_bytes + 0.5 * data.nbytes


# ----------------------------------------------------------------------
# Non-finite predictions


@pytest.fixture
def fitted(volume):
    data, clusters = volume
    return _fit(data, clusters, steps=3)


def test_predict_nan_weights_raise(fitted, volume):
    data, _ = volume
    with torch.no_grad():
        next(fitted.networks_.generator.parameters())[0] = np.nan
    with pytest.raises(gacc.NonFiniteLossError,
                       match=r"memberships of \d+ voxels are NaN or infinite because the "
                             r"generator's weights contain NaN"):
        fitted.predict(data)


def test_predict_network_overflow_raises(fitted, volume, monkeypatch):
    data, _ = volume
    generator = fitted.networks_.generator
    forward = generator.forward

    def overflowing_forward(tokens):
        logits = forward(tokens)
        logits[0, 0, 0] = np.nan
        return logits

    monkeypatch.setattr(generator, "forward", overflowing_forward)
    with pytest.raises(gacc.NonFiniteLossError, match="network overflowed on these data"):
        fitted.predict(data)


def test_predict_far_outside_fitted_range(volume):
    data, clusters = volume
    model = _fit(data * np.float32(1e-30), clusters, steps=1)
    with pytest.raises(gacc.InvalidInputError,
                       match=r"overflows float32 in 720 voxels: .* Give data on the fitted scale"):
        model.predict(data * np.float32(1e10))


# ----------------------------------------------------------------------
# Running out of memory


def _cuda_out_of_memory():
    return torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB"
    )


def _failing_steps(monkeypatch, should_fail):
    """Patch the training step to raise when ``should_fail(batch_size)``; return the sizes seen."""
    original = gacc.training.TrainingStep.__call__
    sizes = []

    def step(self, batch, step_number, generator):
        size = batch.tokens.shape[0]
        sizes.append(size)
        error = should_fail(size, len(sizes))
        if error is not None:
            raise error
        return original(self, batch, step_number, generator)

    monkeypatch.setattr(gacc.training.TrainingStep, "__call__", step)
    return sizes


def test_training_oom_halves_batch(volume, monkeypatch, caplog):
    data, clusters = volume
    sizes = _failing_steps(
        monkeypatch, lambda size, call: _cuda_out_of_memory() if call == 2 else None
    )
    with caplog.at_level(logging.WARNING, logger="gacc.estimator"):
        model = _fit(data, clusters, steps=4)
    assert sizes == [8, 8, 4, 4, 4]
    assert model.n_steps_ == 4
    assert all(len(values) == 4 for values in model.history_.values())
    assert "retrying the step with 4 sets per batch" in caplog.text
    assert "batch_size=4" in caplog.text


def test_training_oom_resets_next_fit(volume, monkeypatch):
    data, clusters = volume
    sizes = _failing_steps(
        monkeypatch, lambda size, call: _cuda_out_of_memory() if call == 1 else None
    )
    model = _fit(data, clusters, steps=2)
    model.fit(data, clusters, num_batches=1, epochs=1, warm_start=True)
    assert sizes == [8, 4, 4, 8]


def test_mps_oom_message_halves_batch(volume, monkeypatch):
    data, clusters = volume
    mps_error = RuntimeError(
        "MPS backend out of memory (MPS allocated: 9.00 GB, other allocations: 1.00 MB, "
        "max allowed: 9.07 GB). Tried to allocate 256.00 MB on private pool."
    )
    sizes = _failing_steps(monkeypatch, lambda size, call: mps_error if size > 2 else None)
    model = _fit(data, clusters, steps=2)
    assert sizes == [8, 4, 2, 2]
    assert model.n_steps_ == 2


def test_training_oom_at_one_set_raises(volume, monkeypatch):
    data, clusters = volume
    sizes = _failing_steps(monkeypatch, lambda size, call: _cuda_out_of_memory())
    model = _model()
    with pytest.raises(MemoryError, match=r"batch_size=8 was halved down to 1\): CUDA out of "
                                          r"memory\. Lower set_size") as raised:
        model.fit(data, clusters, num_batches=3, epochs=1)
    assert sizes == [8, 4, 2, 1]
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)
    assert model.n_steps_ == 0


def test_other_runtime_error_not_retried(volume, monkeypatch):
    data, clusters = volume
    sizes = _failing_steps(monkeypatch, lambda size, call: RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _model().fit(data, clusters, num_batches=2, epochs=1)
    assert sizes == [8]


@pytest.mark.parametrize(
    "interruption, raised",
    [(_cuda_out_of_memory(), MemoryError), (KeyboardInterrupt(), KeyboardInterrupt)],
    ids=["out-of-memory", "keyboard-interrupt"],
)
def test_failed_update_restores_step_start(fitted, volume, monkeypatch, interruption, raised):
    # The discriminator and both predictors are updated before the generator,
    # so failing at the generator's update leaves three networks changed.
    data, clusters = volume
    before = {name: value.clone() for name, value in fitted.networks_.state_dict().items()}
    original = gacc.training.TrainingStep._update

    def update(self, name, loss, step):
        if name == "generator":
            raise interruption
        return original(self, name, loss, step)

    monkeypatch.setattr(gacc.training.TrainingStep, "_update", update)
    with pytest.raises(raised):
        fitted.fit(data, clusters, num_batches=1, epochs=1, warm_start=True)
    after = fitted.networks_.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert fitted.n_steps_ == 3


def test_release_cached_memory_empties_cuda_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    gacc.training.release_cached_memory(torch.device("cuda", 0))
    gacc.training.release_cached_memory(torch.device("cpu"))
    assert calls == ["cuda"]


def _failing_forward(monkeypatch, model, should_fail):
    """Patch the generator's forward pass to raise when ``should_fail(n_sets)``."""
    generator = model.networks_.generator
    forward = generator.forward
    sizes = []

    def patched(tokens):
        sizes.append(tokens.shape[0])
        error = should_fail(tokens.shape[0])
        if error is not None:
            raise error
        return forward(tokens)

    monkeypatch.setattr(generator, "forward", patched)
    return sizes


def test_predict_oom_halves_chunk(volume, monkeypatch, caplog):
    data, clusters = volume
    model = _fit(data, clusters, steps=2, params={"prediction_batch_size": 64})
    expected = model.predict(data)
    sizes = _failing_forward(
        monkeypatch, model, lambda n_sets: _cuda_out_of_memory() if n_sets > 16 else None
    )
    with caplog.at_level(logging.WARNING, logger="gacc.estimator"):
        proba = model.predict(data)
    np.testing.assert_allclose(proba, expected, rtol=0, atol=1e-6)
    assert sizes[:3] == [64, 32, 16]
    assert max(sizes[3:]) == 16
    assert "retrying with 32 sets per forward pass" in caplog.text
    assert "retrying with 16 sets per forward pass" in caplog.text
    assert model.prediction_batch_size == 64


def test_predict_oom_at_one_set_raises(fitted, volume, monkeypatch):
    data, _ = volume
    fitted.prediction_batch_size = 4
    sizes = _failing_forward(monkeypatch, fitted, lambda n_sets: _cuda_out_of_memory())
    with pytest.raises(MemoryError, match=r"prediction_batch_size=4 was halved down to 1"):
        fitted.predict(data)
    assert sizes == [4, 2, 1]


# ----------------------------------------------------------------------
# Failed saves: full disks and folders without write permission


def _no_space():
    return OSError(errno.ENOSPC, "No space left on device")


def test_model_save_disk_full(fitted, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    fitted.save(path)
    before = path.read_bytes()

    def full_disk_fsync(descriptor):
        raise _no_space()

    # The temporary file already contains the whole model when the sync fails.
    monkeypatch.setattr(gacc.checkpoint.os, "fsync", full_disk_fsync)
    with pytest.raises(OSError, match=r"Cannot write '.*model\.pt': No space left on device\. "
                                      r"Free disk space") as raised:
        fitted.save(path)
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pt"]


def test_model_save_unwritable_folder(fitted, tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".model.pt.x"))

    monkeypatch.setattr(gacc._atomic.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError, match=r"Cannot write '.*model\.pt': Permission denied\. "
                                              r"Choose a folder you can write to"):
        fitted.save(tmp_path / "model.pt")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["proba.nii", "proba.nii.gz"])
def test_nifti_save_disk_full(tmp_path, monkeypatch, name):
    nib = pytest.importorskip("nibabel")
    reference = nib.Nifti1Image(np.zeros(SPATIAL_SHAPE + (2,), np.float32), np.eye(4))
    path = tmp_path / name
    gacc.nifti.save_img(np.ones(SPATIAL_SHAPE + (3,), np.float32), reference, path)
    before = path.read_bytes()
    original_save = nib.save

    def partial_save(image, filename):
        original_save(image, filename)
        with open(filename, "r+b") as stream:
            stream.truncate(100)
        raise _no_space()

    monkeypatch.setattr(gacc.nifti.nib, "save", partial_save)
    with pytest.raises(OSError, match=rf"Cannot write '.*{name}': No space left on device"):
        gacc.nifti.save_img(np.zeros(SPATIAL_SHAPE + (3,), np.float32), reference, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [name]


# Run in a child process, because the file size limit applies to the whole
# process: the kernel itself then fails the writes, with EFBIG.
_SIZE_LIMITED_SAVES = """
import os, resource, signal, sys
import numpy as np, nibabel as nib
sys.path.insert(0, {tests!r})
import gacc
from engine_fixtures import TINY_PARAMS, make_volume

data, clusters = make_volume()
model = gacc.GACC(**TINY_PARAMS).fit(data, clusters, num_batches=1, epochs=1)
reference = nib.Nifti1Image(data, np.eye(4))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
for save in (lambda: model.save("model.pt"),
             lambda: gacc.nifti.save_img(data, reference, "data.nii")):
    try:
        save()
    except OSError as error:
        print(type(error).__name__, error.errno, error)
print(sorted(os.listdir(".")))
"""


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                    reason="RLIMIT_FSIZE with SIGXFSZ ignored is a Linux behaviour")
def test_kernel_write_failure_leaves_nothing(tmp_path):
    script = _SIZE_LIMITED_SAVES.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"OSError {errno.EFBIG} ")
    assert "Cannot write 'model.pt': File too large. Free disk space" in lines[0]
    assert lines[1].startswith(f"OSError {errno.EFBIG} ")
    assert "Cannot write 'data.nii'" in lines[1]
    assert lines[2] == "[]"


# ----------------------------------------------------------------------
# Damaged model files


def _edit_model_file(path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def _drop_param_group_entry(payload):
    payload["optimizers"]["generator"]["param_groups"][0]["params"].pop()


def _wrong_moment_shape(payload):
    state = payload["optimizers"]["discriminator"]["state"]
    first = next(iter(state))
    state[first]["exp_avg"] = torch.zeros(3)


def _missing_optimizer(payload):
    del payload["optimizers"]["cx_predictor"]


def _optimizers_not_dict(payload):
    payload["optimizers"] = [1, 2]


def _nan_weight(payload):
    name = next(iter(payload["networks"]))
    payload["networks"][name][0] = np.nan


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(_drop_param_group_entry, "damaged optimizer state for the generator",
                     id="param-group-size"),
        pytest.param(_wrong_moment_shape,
                     r"optimizer state for the discriminator .*'exp_avg' has shape \(3,\)",
                     id="moment-shape"),
        pytest.param(_missing_optimizer, "optimizer states for .*'xc_predictor'\\]",
                     id="missing-optimizer"),
        pytest.param(_optimizers_not_dict, "optimizer states for list", id="not-a-dict"),
        pytest.param(_nan_weight, "NaN or infinite weights in 1 tensors", id="nan-weight"),
    ],
)
def test_damaged_model_state_at_load(fitted, tmp_path, change, message):
    path = tmp_path / "model.pt"
    fitted.save(path)
    _edit_model_file(path, change)
    with pytest.raises(gacc.ModelFileError, match=message) as raised:
        gacc.GACC.load(path, device="cpu")
    assert str(path) in str(raised.value)


def test_loaded_optimizer_state_not_shared(fitted, volume, tmp_path):
    # Validation loads copies, so warm starts still begin from the saved state.
    data, clusters = volume
    path = tmp_path / "model.pt"
    fitted.save(path)
    loaded = gacc.GACC.load(path, device="cpu")
    loaded.fit(data, clusters, num_batches=2, epochs=1, warm_start=True)
    fitted.fit(data, clusters, num_batches=2, epochs=1, warm_start=True)
    assert loaded.history_ == fitted.history_
