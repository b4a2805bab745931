"""The kinds of NIfTI input GACC meets, through load_data and fit and through the command line.

The loader's own checks are tested in test_nifti.py. These tests follow each
kind of file through a tiny fit (and a prediction) to the written outputs.
"""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

import gacc
from engine_fixtures import TINY_PARAMS, make_volume, torch_single_thread  # noqa: F401
from gacc.cli import main

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SPATIAL_SHAPE = (9, 10, 8)
N_FEATURES = 6
RAS_AFFINE = np.diag([2.0, 2.5, 3.0, 1.0])
RAS_AFFINE[:3, 3] = [-9.0, -12.0, -10.0]
# Left-posterior-superior axes, rotated about two axes: neither RAS nor
# aligned with any scanner axis.
_A, _B = np.deg2rad(12.0), np.deg2rad(-7.0)
_ROTATION = np.array([
    [np.cos(_A), -np.sin(_A), 0.0],
    [np.sin(_A), np.cos(_A), 0.0],
    [0.0, 0.0, 1.0],
]) @ np.array([
    [1.0, 0.0, 0.0],
    [0.0, np.cos(_B), -np.sin(_B)],
    [0.0, np.sin(_B), np.cos(_B)],
])
OBLIQUE_AFFINE = np.eye(4)
OBLIQUE_AFFINE[:3, :3] = _ROTATION @ np.diag([-2.0, -2.5, 3.0])
OBLIQUE_AFFINE[:3, 3] = [31.5, 42.25, -17.0]

TINY_OPTIONS = [
    "--num-clusters", "4", "--epochs", "1", "--num-batches", "2", "--batch-size", "4",
    "--hidden-size", "8", "--column-hidden-size", "8", "--num-heads", "2", "--num-layers", "1",
    "--prediction-repeats", "1", "--device", "cpu", "-q",
]


@pytest.fixture(scope="module")
def volume():
    return make_volume(SPATIAL_SHAPE, n_features=N_FEATURES)


def _save(path, array, affine=RAS_AFFINE, image_class=nib.Nifti1Image, dtype=None,
          slope=None, inter=None):
    header = None
    if dtype is not None and np.dtype(dtype).byteorder == ">":
        # nibabel writes the byte order of the header, for header and data alike.
        header = image_class.header_class(endianness=">")
    image = image_class(array, affine, header=header)
    if dtype is not None:
        image.header.set_data_dtype(dtype)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    nib.save(image, path)
    return path


def _fit_history(data_xyzt, clusters):
    model = gacc.GACC(**TINY_PARAMS).fit(data_xyzt, clusters, num_batches=3, epochs=1)
    return model.history_


def _cli_fit_predict(folder, data_path, clusters_path, *extra):
    """Run gacc fit then gacc predict; return the prediction image."""
    model_path = folder / "model.pt"
    proba_path = folder / "proba.nii.gz"
    assert main(["fit", str(data_path), str(clusters_path), "-o", str(model_path),
                 *TINY_OPTIONS, *extra]) == 0
    assert main(["predict", str(model_path), str(data_path), "-o", str(proba_path),
                 "--device", "cpu", "-q"]) == 0
    return nib.load(proba_path)


def _one_error_line(capsys, command):
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"gacc {command}: error: ")
    return lines[0]


# ----------------------------------------------------------------------
# File formats and affines, through the command line


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image],
                         ids=["nifti1", "nifti2"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_formats_keep_class_and_affine(tmp_path, volume, image_class, suffix):
    data, clusters = volume
    data_path = _save(tmp_path / f"bold{suffix}", data, OBLIQUE_AFFINE, image_class)
    clusters_path = _save(tmp_path / f"clusters{suffix}", clusters, OBLIQUE_AFFINE, image_class)
    proba = _cli_fit_predict(tmp_path, data_path, clusters_path)
    source = nib.load(data_path)
    assert type(proba) is image_class
    assert proba.shape == SPATIAL_SHAPE + (4,)
    np.testing.assert_array_equal(proba.affine, source.affine)
    np.testing.assert_array_equal(proba.header.get_sform(), source.header.get_sform())
    np.testing.assert_array_equal(proba.header.get_qform(), source.header.get_qform())


def test_five_d_singleton_data(tmp_path, volume):
    data, clusters = volume
    data_5d = data[:, :, :, np.newaxis, :]  # (X, Y, Z, 1, T), as some pipelines write
    data_path = _save(tmp_path / "bold.nii.gz", data_5d)
    clusters_path = _save(tmp_path / "clusters.nii.gz", clusters)
    proba = _cli_fit_predict(tmp_path, data_path, clusters_path)
    assert proba.shape == SPATIAL_SHAPE + (4,)
    loaded, _ = gacc.nifti.load_data(data_path)
    assert np.array_equal(loaded, data)


# ----------------------------------------------------------------------
# Stored data types and scaling, through load_data and fit


def _integers(data, low, high):
    return np.clip(np.round((data - data.min()) * 20.0) + low, low, high)


DTYPE_CASES = [
    ("int16", lambda d: _integers(d, -300, 32767), np.int16, None),
    ("uint8", lambda d: _integers(d, 0, 255), np.uint8, None),
    ("float64", lambda d: d.astype(np.float64) * 1e3, np.float64, None),
    ("float32-big-endian", lambda d: d, np.dtype(">f4"), None),
    ("int16-big-endian", lambda d: _integers(d, -300, 32767), np.dtype(">i2"), None),
    ("int16-scl-slope", lambda d: _integers(d, -300, 32767), np.int16, (0.5, 3.0)),
]


@pytest.mark.parametrize(
    "make_values, dtype, scaling",
    [pytest.param(make, dtype, scaling, id=name) for name, make, dtype, scaling in DTYPE_CASES],
)
def test_stored_dtypes_fit_like_float32(tmp_path, volume, make_values, dtype, scaling):
    data, clusters = volume
    stored = make_values(data)
    slope, inter = scaling if scaling is not None else (None, None)
    path = _save(tmp_path / "bold.nii", stored.astype(dtype), dtype=dtype, slope=slope,
                 inter=inter)
    expected = stored.astype(np.float64)
    if scaling is not None:
        expected = expected * slope + inter

    loaded, image = gacc.nifti.load_data(path)
    assert loaded.dtype == np.float32
    assert np.array_equal(loaded, expected.astype(np.float32))
    assert image.get_data_dtype() == np.dtype(dtype)
    if np.dtype(dtype).byteorder == ">":
        assert image.header.endianness == ">"
    assert _fit_history(loaded, clusters) == _fit_history(expected.astype(np.float32), clusters)


def test_float32_file_memory_mapped(tmp_path, volume):
    data, _ = volume
    path = _save(tmp_path / "bold.nii", data)
    loaded, _ = gacc.nifti.load_data(path)
    assert isinstance(loaded.base, np.memmap) or isinstance(loaded, np.memmap)
    assert np.shares_memory(gacc.preprocessing.check_data_xyzt(loaded), loaded)


# ----------------------------------------------------------------------
# Grids


def test_probabilistic_clusters_other_grid(tmp_path, volume, capsys):
    # Percent maps (as FSL stores them) with unknown NaN entries, on a grid
    # shifted by one voxel: an error without --resample, resampled with it.
    data, clusters = volume
    data_path = _save(tmp_path / "bold.nii.gz", data)
    percent = clusters * 100.0
    percent[:2, :, :, 0] = np.nan
    shifted = RAS_AFFINE.copy()
    shifted[:3, 3] += RAS_AFFINE[:3, :3] @ [1.0, 0.0, 0.0]
    clusters_path = _save(tmp_path / "clusters.nii.gz", percent.astype(np.float32), shifted)
    argv = ["fit", str(data_path), str(clusters_path), "-o", str(tmp_path / "model.pt"),
            *TINY_OPTIONS]

    assert main(argv) == 1
    assert "not on the grid of the data" in _one_error_line(capsys, "fit")
    assert main([*argv, "--resample"]) == 0
    assert gacc.GACC.load(tmp_path / "model.pt", device="cpu").n_known_clusters_ == 3


def test_mask_other_grid(tmp_path, volume, capsys):
    data, clusters = volume
    data_path = _save(tmp_path / "bold.nii.gz", data)
    clusters_path = _save(tmp_path / "clusters.nii.gz", clusters)
    fine_affine = RAS_AFFINE.copy()
    fine_affine[:3, :3] /= 2
    fine_affine[:3, 3] -= np.diag(RAS_AFFINE)[:3] / 4
    mask_path = _save(tmp_path / "mask.nii.gz", np.ones((18, 20, 16), np.uint8), fine_affine)
    argv = ["fit", str(data_path), str(clusters_path), "-o", str(tmp_path / "model.pt"),
            "--mask", str(mask_path), *TINY_OPTIONS]
    assert main(argv) == 1
    assert "The mask" in _one_error_line(capsys, "fit")
    assert main([*argv, "--resample"]) == 0


# ----------------------------------------------------------------------
# Values


def test_nan_background_through_cli(tmp_path, volume):
    data, clusters = volume
    data = data.copy()
    data[:2] = np.nan
    data_path = _save(tmp_path / "bold.nii.gz", data)
    clusters_path = _save(tmp_path / "clusters.nii.gz", clusters)
    proba = _cli_fit_predict(tmp_path, data_path, clusters_path).get_fdata()
    assert np.isfinite(proba).all()
    assert np.all(proba[:2] == 0.0)
    assert np.all(proba[2:] > 0.0)


def test_constant_time_point_fits(tmp_path, volume, caplog):
    # One constant feature map is no reason to stop: it carries no information.
    data, clusters = volume
    data = data.copy()
    data[..., 2] = 1.5
    data_path = _save(tmp_path / "bold.nii", data)
    loaded, _ = gacc.nifti.load_data(data_path)
    model = gacc.GACC(**TINY_PARAMS).fit(loaded, clusters, num_batches=2, epochs=1)
    assert model.n_steps_ == 2
    assert "1 of 6 features are constant" in caplog.text


@pytest.mark.parametrize("value, message", [(0.0, "is all zero"), (7.0, "is constant")],
                         ids=["all-zero", "constant"])
def test_constant_volume_rejected(tmp_path, volume, capsys, value, message):
    _, clusters = volume
    data_path = _save(tmp_path / "bold.nii.gz", np.full(SPATIAL_SHAPE + (3,), value,
                                                        np.float32))
    clusters_path = _save(tmp_path / "clusters.nii.gz", clusters)
    assert main(["fit", str(data_path), str(clusters_path), "-o", str(tmp_path / "m.pt"),
                 *TINY_OPTIONS]) == 1
    assert message in _one_error_line(capsys, "fit")


# ----------------------------------------------------------------------
# Damaged files


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])


def _zero_middle(path):
    # The gzip stream stays decodable, so only its CRC-32 shows the damage.
    raw = bytearray(gzip.decompress(path.read_bytes()))
    compressed = bytearray(gzip.compress(bytes(raw), mtime=0))
    middle = len(compressed) // 2
    compressed[middle:middle + 32] = bytes(32)
    path.write_bytes(bytes(compressed))


@pytest.mark.parametrize("damage", [_truncate, _zero_middle], ids=["truncated", "zeroed-bytes"])
def test_damaged_gzip_data(tmp_path, volume, capsys, damage):
    data, clusters = volume
    data_path = _save(tmp_path / "bold.nii.gz", np.random.default_rng(0).random(
        (24, 25, 26, 8), dtype=np.float32))
    damage(data_path)
    clusters_path = _save(tmp_path / "clusters.nii.gz", clusters)
    assert main(["fit", str(data_path), str(clusters_path), "-o", str(tmp_path / "m.pt"),
                 *TINY_OPTIONS]) == 1
    line = _one_error_line(capsys, "fit")
    assert "bold.nii.gz" in line
    assert "damaged" in line
    assert not os.path.exists(tmp_path / "m.pt")
