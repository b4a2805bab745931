"""Tests for loading, checking and saving NIfTI images."""

import gzip
import logging
import os
import struct

import nibabel as nib
import numpy as np
import pytest

from gacc import nifti
from gacc.exceptions import InvalidInputError

SHAPE = (7, 8, 9, 5)
AFFINE = np.array(
    [
        [2.0, 0.0, 0.0, -7.0],
        [0.0, 2.5, 0.0, -10.0],
        [0.0, 0.0, 3.0, -12.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
# Left-posterior-superior axes with a rotation about z: neither RAS nor
# aligned with the scanner axes.
_ANGLE = np.deg2rad(20.0)
OBLIQUE_AFFINE = np.array(
    [
        [-2.0 * np.cos(_ANGLE), -2.5 * np.sin(_ANGLE), 0.0, 30.0],
        [-2.0 * np.sin(_ANGLE), 2.5 * np.cos(_ANGLE), 0.0, -40.0],
        [0.0, 0.0, 3.0, 5.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _random_data(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _write(tmp_path, name, data, affine=AFFINE, image_class=nib.Nifti1Image, dtype=None):
    image = image_class(data, affine)
    if dtype is not None:
        image.header.set_data_dtype(dtype)
    path = tmp_path / name
    nib.save(image, path)
    return path


@pytest.fixture
def data_path(tmp_path):
    return _write(tmp_path, "data.nii.gz", _random_data())


# ---------------------------------------------------------------------------
# Round trips, data types and scaling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image], ids=["nifti1", "nifti2"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_keeps_affine_and_header(tmp_path, image_class, suffix):
    data = _random_data()
    source = image_class(data, OBLIQUE_AFFINE)
    source.header.set_xyzt_units("mm", "sec")
    source.header["pixdim"][4] = 2.5
    source.header["descrip"] = b"gacc test"
    source_path = tmp_path / f"source{suffix}"
    nib.save(source, source_path)

    loaded, reference = nifti.load_data(source_path)
    out_path = nifti.save_img(loaded * 2, reference, tmp_path / f"out{suffix}")
    result = nib.load(out_path)

    assert isinstance(result, image_class)
    np.testing.assert_array_equal(result.affine, nib.load(source_path).affine)
    np.testing.assert_allclose(result.get_fdata(), data * 2, rtol=1e-6)
    assert result.header.get_xyzt_units() == ("mm", "sec")
    assert result.header["pixdim"][4] == pytest.approx(2.5)
    assert result.header["descrip"].item() == b"gacc test"
    assert result.header.get_sform(coded=True)[1] == source.header.get_sform(coded=True)[1]
    assert result.header.get_qform(coded=True)[1] == source.header.get_qform(coded=True)[1]


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("byte_order", ["<", ">"], ids=["little", "big"])
def test_load_data_dtypes_and_byte_order(tmp_path, dtype, byte_order):
    values = np.random.default_rng(1).integers(0, 200, size=SHAPE).astype(dtype)
    header = nib.Nifti1Header(endianness=byte_order)
    image = nib.Nifti1Image(values, AFFINE, header=header)
    image.header.set_data_dtype(dtype)
    path = tmp_path / "typed.nii"
    nib.save(image, path)
    assert nib.load(path).header.endianness == byte_order

    data_xyzt, _ = nifti.load_data(path)

    assert data_xyzt.dtype == np.float32
    assert data_xyzt.dtype.isnative
    np.testing.assert_array_equal(data_xyzt, values.astype(np.float32))


def test_load_data_applies_scl_slope_and_inter(tmp_path):
    raw = np.random.default_rng(2).integers(-100, 100, size=SHAPE).astype(np.int16)
    image = nib.Nifti1Image(raw, AFFINE)
    image.header.set_data_dtype(np.int16)
    path = tmp_path / "scaled.nii"
    nib.save(image, path)
    # Write the scaling fields directly, so the stored integers stay as they are.
    header = nib.load(path).header.copy()
    header.set_slope_inter(0.5, 10.0)
    with open(path, "r+b") as file:
        header.write_to(file)

    data_xyzt, _ = nifti.load_data(path)

    np.testing.assert_allclose(data_xyzt, raw * 0.5 + 10.0)


def test_load_data_float64_output(data_path):
    data_xyzt, _ = nifti.load_data(data_path, dtype=np.float64)
    assert data_xyzt.dtype == np.float64


def test_load_data_memory_maps_native_float32(tmp_path):
    path = _write(tmp_path, "native.nii", _random_data(), dtype=np.float32)

    mapped, _ = nifti.load_data(path, mmap=True)
    in_memory, _ = nifti.load_data(path, mmap=False)

    assert isinstance(mapped.base, np.memmap)
    assert not isinstance(in_memory.base, np.memmap)
    np.testing.assert_array_equal(mapped, in_memory)


def test_load_data_accepts_image_object():
    data = _random_data()
    data_xyzt, image = nifti.load_data(nib.Nifti1Image(data, AFFINE))
    np.testing.assert_array_equal(data_xyzt, data)
    np.testing.assert_array_equal(image.affine, AFFINE)


@pytest.mark.parametrize("affine", [AFFINE, OBLIQUE_AFFINE], ids=["ras", "oblique-lps"])
def test_save_keeps_affine_unchanged(tmp_path, affine):
    reference = nib.Nifti1Image(_random_data(), affine)
    path = nifti.save_img(np.ones(SHAPE[:3], dtype=bool), reference, tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(nib.load(path).affine, affine, atol=1e-6)


@pytest.mark.parametrize(
    "values, expected_dtype",
    [
        (np.ones(SHAPE[:3], dtype=bool), np.uint8),
        (np.full(SHAPE[:3], 7, dtype=np.int64), np.uint8),
        (np.full(SHAPE[:3], -3, dtype=np.int64), np.int16),
        (np.full(SHAPE[:3], 70000, dtype=np.int64), np.int32),
        (np.full(SHAPE[:3], 0.25, dtype=np.float64), np.float32),
    ],
    ids=["bool", "small-labels", "negative-labels", "large-labels", "float64"],
)
def test_save_picks_output_dtype(tmp_path, values, expected_dtype):
    reference = nib.Nifti1Image(_random_data(), AFFINE)
    path = nifti.save_img(values, reference, tmp_path / "out.nii")
    result = nib.load(path)
    assert result.get_data_dtype() == expected_dtype
    np.testing.assert_array_equal(result.get_fdata(), values.astype(np.float64))


def test_save_resets_reference_scaling(tmp_path):
    reference = nib.Nifti1Image(_random_data(), AFFINE)
    reference.header.set_slope_inter(2.0, 5.0)
    values = np.linspace(0, 1, np.prod(SHAPE)).reshape(SHAPE).astype(np.float32)
    path = nifti.save_img(values, reference, tmp_path / "proba.nii")
    np.testing.assert_allclose(nib.load(path).get_fdata(), values, rtol=1e-6)


def test_save_3d_from_4d_reference_sets_dim(tmp_path):
    reference = nib.Nifti1Image(_random_data(), AFFINE)
    path = nifti.save_img(np.zeros(SHAPE[:3], np.float32), reference, tmp_path / "map.nii")
    result = nib.load(path)
    assert result.shape == SHAPE[:3]
    assert result.header["dim"][0] == 3


def test_save_rejects_wrong_spatial_shape(tmp_path):
    reference = nib.Nifti1Image(_random_data(), AFFINE)
    with pytest.raises(InvalidInputError, match=r"\(7, 9, 8\)"):
        nifti.save_img(np.zeros((7, 9, 8)), reference, tmp_path / "out.nii")


def test_save_rejects_other_suffix(tmp_path):
    reference = nib.Nifti1Image(_random_data(), AFFINE)
    with pytest.raises(InvalidInputError, match=r"\.nii or \.nii\.gz"):
        nifti.save_img(np.zeros(SHAPE[:3]), reference, tmp_path / "out.img")


def test_to_img_returns_unsaved_image():
    reference = nib.Nifti2Image(_random_data(), OBLIQUE_AFFINE)
    image = nifti.to_img(np.zeros(SHAPE[:3] + (3,), np.float32), reference)
    assert isinstance(image, nib.Nifti2Image)
    assert image.shape == SHAPE[:3] + (3,)
    assert image.get_filename() is None
    np.testing.assert_array_equal(image.affine, OBLIQUE_AFFINE)


# ---------------------------------------------------------------------------
# Atomic writing
# ---------------------------------------------------------------------------


def test_save_leaves_no_temporary_files(tmp_path):
    reference = nib.Nifti1Image(_random_data(), AFFINE)
    nifti.save_img(np.zeros(SHAPE[:3]), reference, tmp_path / "a.nii.gz")
    nifti.save_img(np.ones(SHAPE[:3]), reference, tmp_path / "a.nii.gz")
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz"]
    np.testing.assert_array_equal(nib.load(tmp_path / "a.nii.gz").get_fdata(), 1.0)


def test_save_into_missing_folder_raises(tmp_path):
    reference = nib.Nifti1Image(_random_data(), AFFINE)
    target = tmp_path / "missing" / "out.nii"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nifti.save_img(np.zeros(SHAPE[:3]), reference, target)
    assert not (tmp_path / "missing").exists()


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    reference = nib.Nifti1Image(_random_data(), AFFINE)
    target = tmp_path / "out.nii"
    nifti.save_img(np.full(SHAPE[:3], 3.0), reference, target)

    def write_half_then_fail(image, path):
        with open(path, "wb") as file:
            file.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(nifti.nib, "save", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        nifti.save_img(np.zeros(SHAPE[:3]), reference, target)

    assert sorted(os.listdir(tmp_path)) == ["out.nii"]
    np.testing.assert_array_equal(nib.load(target).get_fdata(), 3.0)


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


def test_3d_data_raises_with_hint(tmp_path):
    path = _write(tmp_path, "volume.nii", _random_data(SHAPE[:3]))
    with pytest.raises(InvalidInputError, match=r"4D \(X, Y, Z, T\)"):
        nifti.load_data(path)


def test_3d_data_allowed_as_one_volume(tmp_path):
    path = _write(tmp_path, "volume.nii", _random_data(SHAPE[:3]))
    data_xyzt, image = nifti.load_data(path, allow_3d=True)
    assert data_xyzt.shape == SHAPE[:3] + (1,)
    assert image.shape == SHAPE[:3] + (1,)


@pytest.mark.parametrize(
    "shape_5d", [(7, 8, 9, 1, 5), (7, 8, 9, 5, 1)], ids=["singleton-4th", "singleton-5th"]
)
def test_5d_singleton_axis_squeezed(tmp_path, shape_5d):
    data = _random_data(shape_5d)
    path = _write(tmp_path, "five.nii.gz", data)

    image = nifti.load_data_img(path)
    data_xyzt, _ = nifti.load_data(path)

    assert image.shape == SHAPE
    np.testing.assert_array_equal(data_xyzt, data.reshape(SHAPE))


def test_5d_without_singleton_raises(tmp_path):
    path = _write(tmp_path, "five.nii", _random_data((7, 8, 9, 2, 5)))
    with pytest.raises(InvalidInputError, match=r"\(7, 8, 9, 2, 5\)"):
        nifti.load_data_img(path)


def test_2d_image_raises(tmp_path):
    path = _write(tmp_path, "plane.nii", _random_data((7, 8)))
    with pytest.raises(InvalidInputError, match="three spatial axes"):
        nifti.load_data(path)


def test_load_data_img_reads_no_voxels(tmp_path):
    path = _write(tmp_path, "data.nii", _random_data(), dtype=np.float32)
    image = nifti.load_data_img(path)
    assert image.shape == SHAPE
    assert not image.in_memory


# ---------------------------------------------------------------------------
# Damaged and foreign files
# ---------------------------------------------------------------------------


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.nii"):
        nifti.load_data(tmp_path / "nothing.nii")


def test_text_file_named_nii_raises(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("subject 1, run 2\n" * 40)
    with pytest.raises(InvalidInputError, match="notes.nii"):
        nifti.load_data(path)


def test_truncated_nii_gz_raises(tmp_path):
    path = _write(tmp_path, "data.nii.gz", _random_data((17, 18, 19, 5)))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(InvalidInputError, match="truncated or damaged"):
        nifti.load_data(path)


def test_truncated_nii_raises_before_reading(tmp_path):
    path = _write(tmp_path, "data.nii", _random_data(), dtype=np.float32)
    content = path.read_bytes()
    path.write_bytes(content[:-100])
    with pytest.raises(InvalidInputError, match="has only"):
        nifti.load_data_img(path)


def _patch_header(path, offset, fmt, *values):
    content = bytearray(path.read_bytes())
    struct.pack_into(fmt, content, offset, *values)
    path.write_bytes(bytes(content))


def test_negative_dimension_raises(tmp_path):
    path = _write(tmp_path, "data.nii", _random_data(), dtype=np.float32)
    # NIfTI-1 dim field: eight int16 values at byte 40.
    _patch_header(path, 40, "<8h", 4, 7, -8, 9, 5, 1, 1, 1)
    with pytest.raises(InvalidInputError, match="negative shape"):
        nifti.load_data(path)


def test_nan_affine_raises(tmp_path):
    path = _write(tmp_path, "data.nii", _random_data(), dtype=np.float32)
    # NIfTI-1 srow_x, srow_y, srow_z: twelve float32 values at byte 280.
    _patch_header(path, 280, "<12f", *([np.nan] * 12))
    with pytest.raises(InvalidInputError, match="affine"):
        nifti.load_data(path)


def test_plain_file_named_nii_gz_raises(tmp_path):
    plain = _write(tmp_path, "data.nii", _random_data())
    renamed = tmp_path / "data.nii.gz"
    plain.rename(renamed)
    with pytest.raises(InvalidInputError, match="not gzip-compressed"):
        nifti.load_data(renamed)


def test_gzip_file_named_nii_raises_with_rename_hint(tmp_path):
    compressed = _write(tmp_path, "data.nii.gz", _random_data())
    renamed = tmp_path / "data.nii"
    compressed.rename(renamed)
    with pytest.raises(InvalidInputError, match="Rename it to end in .nii.gz"):
        nifti.load_data(renamed)


def test_damaged_gzip_stream_raises(tmp_path):
    path = tmp_path / "data.nii.gz"
    raw = gzip.compress(nib.Nifti1Image(_random_data(), AFFINE).to_bytes())
    damaged = bytearray(raw)
    middle = len(damaged) // 2
    damaged[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(damaged))
    with pytest.raises(InvalidInputError, match="data.nii.gz"):
        nifti.load_data(path)


def test_other_suffix_raises(tmp_path):
    path = tmp_path / "data.mgz"
    nib.save(nib.MGHImage(_random_data(), AFFINE), path)
    with pytest.raises(InvalidInputError, match=r"\.nii or \.nii\.gz"):
        nifti.load_data(path)


def test_non_nifti_image_object_raises():
    with pytest.raises(InvalidInputError, match="MGHImage"):
        nifti.load_data(nib.MGHImage(_random_data(), AFFINE))


def test_complex_data_raises():
    image = nib.Nifti1Image(_random_data().astype(np.complex64), AFFINE)
    with pytest.raises(InvalidInputError, match="complex64"):
        nifti.load_data(image)


def test_folder_raises(tmp_path):
    folder = tmp_path / "run.nii"
    folder.mkdir()
    with pytest.raises(InvalidInputError, match="is a folder"):
        nifti.load_data(folder)


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


def test_nan_and_inf_raise_with_count():
    data = _random_data()
    data[0, 0, 0, :3] = np.nan
    data[6, 7, 8, 4] = np.inf
    with pytest.raises(InvalidInputError, match=r"4 NaN or infinite.*nan_policy='zero'"):
        nifti.load_data(nib.Nifti1Image(data, AFFINE), nan_policy="raise")


def test_nan_kept_by_default(caplog):
    data = _random_data()
    data[0, 0, 0, :3] = np.nan
    data[6, 7, 8, 4] = -np.inf
    with caplog.at_level(logging.INFO, logger="gacc.nifti"):
        data_xyzt, _ = nifti.load_data(nib.Nifti1Image(data, AFFINE))
    assert np.isnan(data_xyzt[0, 0, 0, :3]).all()
    assert data_xyzt[6, 7, 8, 4] == -np.inf
    assert np.count_nonzero(~np.isfinite(data_xyzt)) == 4
    assert "4 NaN or infinite values" in caplog.text


def test_all_nan_raises():
    data = np.full(SHAPE, np.nan, dtype=np.float32)
    with pytest.raises(InvalidInputError, match="only NaN or infinite"):
        nifti.load_data(nib.Nifti1Image(data, AFFINE))


def test_nan_policy_zero_replaces_and_warns(caplog):
    data = _random_data()
    data[1, 2, 3, :] = np.nan
    data[2, 2, 2, 0] = -np.inf
    image = nib.Nifti1Image(data, AFFINE)

    with caplog.at_level(logging.WARNING, logger="gacc.nifti"):
        data_xyzt, _ = nifti.load_data(image, nan_policy="zero")

    assert np.isfinite(data_xyzt).all()
    np.testing.assert_array_equal(data_xyzt[1, 2, 3], 0.0)
    assert data_xyzt[2, 2, 2, 0] == 0.0
    assert "6 NaN or infinite" in caplog.text
    # The caller's image keeps its NaN.
    assert np.isnan(np.asanyarray(image.dataobj)[1, 2, 3]).all()


def test_invalid_nan_policy_raises(data_path):
    with pytest.raises(ValueError, match="nan_policy"):
        nifti.load_data(data_path, nan_policy="omit")


@pytest.mark.parametrize("value, phrase", [(0.0, "all zero"), (4.0, "constant")])
def test_constant_data_raises(value, phrase):
    image = nib.Nifti1Image(np.full(SHAPE, value, dtype=np.float32), AFFINE)
    with pytest.raises(InvalidInputError, match=phrase):
        nifti.load_data(image)


# ---------------------------------------------------------------------------
# Clusters
# ---------------------------------------------------------------------------


def _label_image(affine=AFFINE):
    labels = np.zeros(SHAPE[:3], dtype=np.int16)
    labels[:2] = 3
    labels[3:5, :4] = 1
    labels[5:, 5:] = 12
    return labels, nib.Nifti1Image(labels, affine)


def test_label_atlas_orders_by_value_with_default_names():
    labels, image = _label_image()
    cluster_xyzp, names = nifti.load_clusters(image)

    assert cluster_xyzp.shape == SHAPE[:3] + (3,)
    assert cluster_xyzp.dtype == np.float32
    assert names == ["label_1", "label_3", "label_12"]
    np.testing.assert_array_equal(cluster_xyzp[..., 0], labels == 1)
    np.testing.assert_array_equal(cluster_xyzp[..., 2], labels == 12)


@pytest.mark.parametrize("delimiter, suffix", [(",", ".csv"), ("\t", ".tsv")])
def test_label_atlas_with_label_table(tmp_path, delimiter, suffix):
    _, image = _label_image()
    table = tmp_path / f"labels{suffix}"
    rows = ["index", "name"], ["0", "Background"], ["1", "Left Thalamus"], ["3", "Cuneus"]
    table.write_text("\n".join(delimiter.join(row) for row in rows) + "\n")

    _, names = nifti.load_clusters(image, labels=table)

    assert names == ["Left Thalamus", "Cuneus", "label_12"]


def test_label_table_without_header(tmp_path):
    _, image = _label_image()
    table = tmp_path / "labels.csv"
    table.write_text("1,thalamus\n3,cuneus\n12,insula\n")
    _, names = nifti.load_clusters(image, labels=table)
    assert names == ["thalamus", "cuneus", "insula"]


def test_label_table_with_unknown_columns_raises(tmp_path):
    _, image = _label_image()
    table = tmp_path / "labels.csv"
    table.write_text("code,description\n1,thalamus\n")
    with pytest.raises(InvalidInputError, match="columns"):
        nifti.load_clusters(image, labels=table)


def test_label_dict_names():
    _, image = _label_image()
    _, names = nifti.load_clusters(image, labels={12: "insula"})
    assert names == ["label_1", "label_3", "insula"]


def test_probabilistic_atlas_thresholding():
    proba = np.zeros(SHAPE[:3] + (2,), dtype=np.float32)
    proba[:3, ..., 0] = 0.7
    proba[3:, ..., 0] = 0.4
    proba[..., 1] = 0.5
    image = nib.Nifti1Image(proba, AFFINE)

    binary, names = nifti.load_clusters(image, threshold=0.5)
    kept, _ = nifti.load_clusters(image, threshold=None)

    assert names == ["volume_0", "volume_1"]
    np.testing.assert_array_equal(binary[..., 0], proba[..., 0] >= 0.5)
    np.testing.assert_array_equal(binary[..., 1], 1.0)
    np.testing.assert_array_equal(kept, proba)


def test_probabilistic_percentages_scaled():
    percent = np.zeros(SHAPE[:3] + (2,), dtype=np.uint8)
    percent[:4, ..., 0] = 80
    percent[2:, ..., 1] = 30
    image = nib.Nifti1Image(percent, AFFINE)
    image.header.set_data_dtype(np.uint8)

    kept, _ = nifti.load_clusters(image, threshold=None)
    binary, _ = nifti.load_clusters(image, threshold=0.5)

    assert kept.max() == pytest.approx(0.8)
    np.testing.assert_allclose(kept, percent / 100.0, rtol=1e-6)
    assert binary[..., 1].sum() == 0


def test_percentages_leave_caller_image_unchanged():
    percent = np.zeros(SHAPE[:3] + (2,), dtype=np.float32)
    percent[:4] = 60.0
    image = nib.Nifti1Image(percent, AFFINE)
    nifti.load_clusters(image, threshold=None)
    assert np.asanyarray(image.dataobj).max() == 60.0


def test_probabilistic_names_from_sequence():
    proba = np.zeros(SHAPE[:3] + (2,), dtype=np.float32)
    proba[:3, ..., :] = 1.0
    _, names = nifti.load_clusters(nib.Nifti1Image(proba, AFFINE), labels=["V1", "MT"])
    assert names == ["V1", "MT"]


def test_probabilistic_names_of_wrong_length_raise():
    proba = np.ones(SHAPE[:3] + (2,), dtype=np.float32)
    with pytest.raises(InvalidInputError, match="3 names"):
        nifti.load_clusters(nib.Nifti1Image(proba, AFFINE), labels=["a", "b", "c"])


def test_cluster_values_out_of_range_raise():
    stat = _random_data(SHAPE[:3] + (2,)) * 5
    with pytest.raises(InvalidInputError, match="probabilities in \\[0, 1\\]"):
        nifti.load_clusters(nib.Nifti1Image(stat, AFFINE))


def test_cluster_nan_kept_as_unknown():
    proba = np.zeros(SHAPE[:3] + (2,), dtype=np.float32)
    proba[:2, ..., 0] = 1.0
    proba[5:, ..., 0] = np.nan
    proba[..., 1] = 0.9
    cluster_xyzp, _ = nifti.load_clusters(nib.Nifti1Image(proba, AFFINE))
    assert np.isnan(cluster_xyzp[5:, ..., 0]).all()
    assert np.isfinite(cluster_xyzp[:5]).all()


def test_empty_cluster_warns(caplog):
    proba = np.zeros(SHAPE[:3] + (3,), dtype=np.float32)
    proba[:3, ..., 0] = 1.0
    proba[..., 1] = 0.2
    proba[4:, ..., 2] = 1.0
    with caplog.at_level(logging.WARNING, logger="gacc.nifti"):
        cluster_xyzp, names = nifti.load_clusters(
            nib.Nifti1Image(proba, AFFINE), labels=["a", "faint", "c"]
        )
    assert cluster_xyzp.shape[3] == 3
    assert "'faint'" in caplog.text
    assert "'a'" not in caplog.text


def test_all_clusters_empty_raises():
    proba = np.full(SHAPE[:3] + (2,), 0.1, dtype=np.float32)
    with pytest.raises(InvalidInputError, match="Every cluster"):
        nifti.load_clusters(nib.Nifti1Image(proba, AFFINE))


def test_label_atlas_background_only_raises():
    image = nib.Nifti1Image(np.zeros(SHAPE[:3], np.int16), AFFINE)
    with pytest.raises(InvalidInputError, match="only background"):
        nifti.load_clusters(image)


def test_3d_non_integer_map_read_as_one_cluster():
    proba = np.zeros(SHAPE[:3], dtype=np.float32)
    proba[:3] = 0.75
    proba[3:] = 0.25
    cluster_xyzp, names = nifti.load_clusters(nib.Nifti1Image(proba, AFFINE))
    assert cluster_xyzp.shape == SHAPE[:3] + (1,)
    assert names == ["volume_0"]
    np.testing.assert_array_equal(cluster_xyzp[..., 0], proba >= 0.5)


@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.2])
def test_invalid_threshold_raises(threshold):
    _, image = _label_image()
    with pytest.raises(ValueError, match="threshold"):
        nifti.load_clusters(image, threshold=threshold)


# ---------------------------------------------------------------------------
# Grids and resampling
# ---------------------------------------------------------------------------


def test_cluster_grid_mismatch_raises(tmp_path, data_path):
    _, image = _label_image(affine=OBLIQUE_AFFINE)
    with pytest.raises(InvalidInputError, match="resample=True") as error:
        nifti.load_clusters(image, reference=data_path)
    assert "affine" in str(error.value)


def test_cluster_shape_mismatch_raises(data_path):
    labels = np.ones((7, 8, 10), dtype=np.int16)
    with pytest.raises(InvalidInputError, match=r"(?s)\(7, 8, 10\).*\(7, 8, 9\)"):
        nifti.load_clusters(nib.Nifti1Image(labels, AFFINE), reference=data_path)


def test_cluster_same_grid_passes(data_path):
    labels, image = _label_image()
    cluster_xyzp, _ = nifti.load_clusters(image, reference=data_path)
    np.testing.assert_array_equal(cluster_xyzp[..., 1], labels == 3)


def test_label_atlas_resampled_with_nearest(data_path):
    # The same labels on a grid of twice the resolution, covering the same
    # field of view as the data grid.
    fine_affine = AFFINE.copy()
    fine_affine[:3, :3] /= 2
    fine_affine[:3, 3] -= np.diag(AFFINE)[:3] / 4
    labels, _ = _label_image()
    fine_labels = labels.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine_image = nib.Nifti1Image(fine_labels, fine_affine)

    cluster_xyzp, names = nifti.load_clusters(fine_image, reference=data_path, resample=True)

    assert names == ["label_1", "label_3", "label_12"]
    assert cluster_xyzp.shape == SHAPE[:3] + (3,)
    assert set(np.unique(cluster_xyzp)) <= {0.0, 1.0}
    agreement = np.mean(cluster_xyzp[..., 1] == (labels == 3))
    assert agreement > 0.95


def test_probabilistic_atlas_resampled_and_clipped(data_path):
    coarse_affine = AFFINE.copy()
    coarse_affine[:3, :3] *= 2
    proba = np.zeros((4, 4, 5, 2), dtype=np.float32)
    proba[:2, ..., 0] = 1.0
    proba[..., 1] = 0.6
    proba[3, 3, 4, 1] = np.nan
    image = nib.Nifti1Image(proba, coarse_affine)

    cluster_xyzp, _ = nifti.load_clusters(
        image, threshold=None, reference=data_path, resample=True
    )

    assert cluster_xyzp.shape == SHAPE[:3] + (2,)
    finite = cluster_xyzp[np.isfinite(cluster_xyzp)]
    assert finite.min() >= 0.0
    assert finite.max() <= 1.0
    assert np.isnan(cluster_xyzp[..., 1]).any()
    assert not np.isnan(cluster_xyzp[..., 0]).any()


def test_mask_loads_as_bool():
    values = np.zeros(SHAPE[:3], dtype=np.uint8)
    values[2:5, 3:6, 1:8] = 1
    mask = nifti.load_mask(nib.Nifti1Image(values, AFFINE))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, values == 1)


def test_mask_grid_mismatch_raises(data_path):
    values = np.ones(SHAPE[:3], dtype=np.uint8)
    with pytest.raises(InvalidInputError, match="resample=True"):
        nifti.load_mask(nib.Nifti1Image(values, OBLIQUE_AFFINE), reference=data_path)


def test_mask_resampled_onto_reference(data_path):
    values = np.ones((4, 4, 5), dtype=np.uint8)
    coarse_affine = AFFINE.copy()
    coarse_affine[:3, :3] *= 2
    mask = nifti.load_mask(nib.Nifti1Image(values, coarse_affine), data_path, resample=True)
    assert mask.shape == SHAPE[:3]
    assert mask[:6, :6, :8].all()


def test_empty_mask_raises():
    with pytest.raises(InvalidInputError, match="empty"):
        nifti.load_mask(nib.Nifti1Image(np.zeros(SHAPE[:3], np.uint8), AFFINE))


def test_4d_mask_with_several_volumes_raises():
    with pytest.raises(InvalidInputError, match="3D"):
        nifti.load_mask(nib.Nifti1Image(np.ones(SHAPE, np.uint8), AFFINE))
