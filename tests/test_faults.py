"""Faults in the engine: non-finite values, memory use, out-of-memory errors and failed saves."""

import logging
import tracemalloc

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
