"""NIfTI reader, writer and reorientation of the napari plugin (no viewer needed)."""

import nibabel as nib
import numpy as np
import pytest

from napari_gacc import _metadata as md
from napari_gacc._io import napari_get_reader, read_nifti, write_image, write_labels
from napari_gacc._nifti_layers import derived_nifti_metadata
from napari_gacc._orientation import display_geometry, to_display_order, to_file_order

SHAPE = (7, 8, 9)
N_VOLUMES = 5

# Voxel axis 0 runs anterior, axis 1 runs left (flipped x), axis 2 runs superior.
PERMUTED_AFFINE = np.array(
    [
        [0.0, -2.0, 0.0, 10.0],
        [3.0, 0.0, 0.0, -20.0],
        [0.0, 0.0, 2.5, 5.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
LPS_AFFINE = np.diag([-1.5, -2.0, 3.0, 1.0])


def _assert_same_header(expected, actual):
    for key in expected.keys():
        first, second = expected[key], actual[key]
        if first.dtype.kind == "f":
            equal = np.array_equal(first, second, equal_nan=True)
        else:
            equal = np.array_equal(first, second)
        assert equal, f"header field {key}: {first} != {second}"


def _save_4d(path, affine, *, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    data = (rng.random(SHAPE + (N_VOLUMES,)) * 100).astype(dtype)
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=4)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.0
    img.header["descrip"] = b"napari-gacc round trip"
    nib.save(img, str(path))
    return data


@pytest.mark.parametrize(
    "affine",
    [np.diag([2.0, 3.0, 2.5, 1.0]), PERMUTED_AFFINE, LPS_AFFINE],
    ids=["ras", "permuted", "lps"],
)
def test_orientation_round_trip(affine):
    array = np.arange(np.prod(SHAPE) * 2).reshape(SHAPE + (2,))
    geometry = display_geometry(affine, SHAPE)
    restored = to_file_order(to_display_order(array, geometry.orientation), geometry.orientation)
    np.testing.assert_array_equal(restored, array)


def test_display_geometry_of_permuted_affine():
    geometry = display_geometry(PERMUTED_AFFINE, SHAPE)
    # Display axis x is file axis 1 flipped, y is file axis 0, z is file axis 2.
    assert geometry.scale == (2.0, 3.0, 2.5)
    assert geometry.translate == (10.0 - 2.0 * (SHAPE[1] - 1), -20.0, 5.0)
    assert not geometry.is_oblique


def test_display_geometry_flags_oblique_affine():
    angle = np.deg2rad(10)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation * 2.0
    geometry = display_geometry(affine, SHAPE)
    assert geometry.is_oblique
    np.testing.assert_allclose(geometry.scale, (2.0, 2.0, 2.0))


def test_get_reader_accepts_nifti_only(tmp_path):
    assert napari_get_reader(str(tmp_path / "a.nii.gz")) is read_nifti
    assert napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.NII.GZ")]) is read_nifti
    assert napari_get_reader(str(tmp_path / "a.tif")) is None
    assert napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.png")]) is None


def test_read_4d_puts_volumes_first(tmp_path):
    path = tmp_path / "bold.nii.gz"
    data = _save_4d(path, PERMUTED_AFFINE)
    [(layer_data, kwargs, layer_type)] = read_nifti(str(path))

    assert layer_type == "image"
    assert layer_data.shape == (N_VOLUMES, 8, 7, 9)
    assert kwargs["scale"] == (1.0, 2.0, 3.0, 2.5)
    # Volume 3 at file voxel (i, j, k) sits at display voxel (7 - j, i, k).
    assert layer_data[3, 8 - 1 - 2, 4, 6] == data[4, 2, 6, 3]
    assert kwargs["metadata"][md.GACC_KEY]["role"] == md.ROLE_DATA
    np.testing.assert_array_equal(kwargs["metadata"][md.NIFTI_KEY]["affine"], PERMUTED_AFFINE)


@pytest.mark.parametrize("affine", [PERMUTED_AFFINE, LPS_AFFINE], ids=["permuted", "lps"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_write_restores_affine_header_and_data(tmp_path, affine, suffix):
    source = tmp_path / f"bold{suffix}"
    data = _save_4d(source, affine)
    [(layer_data, kwargs, _)] = read_nifti(str(source))

    target = tmp_path / f"copy{suffix}"
    assert write_image(str(target), layer_data, kwargs) == [str(target)]

    original, written = nib.load(str(source)), nib.load(str(target))
    np.testing.assert_array_equal(written.affine, original.affine)
    _assert_same_header(original.header, written.header)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), data)


def test_write_keeps_integer_scaling(tmp_path):
    raw = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    img = nib.Nifti1Image(raw, LPS_AFFINE)
    img.header.set_slope_inter(0.5, 3.0)
    source = tmp_path / "scaled.nii"
    nib.save(img, str(source))

    [(layer_data, kwargs, _)] = read_nifti(str(source))
    assert layer_data.dtype == np.float32
    target = tmp_path / "scaled_copy.nii"
    write_image(str(target), layer_data, kwargs)

    written = nib.load(str(target))
    _assert_same_header(nib.load(str(source)).header, written.header)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj.get_unscaled()), raw)
    assert written.dataobj.slope == 0.5
    assert written.dataobj.inter == 3.0


def test_oblique_file_warns_and_keeps_affine(tmp_path):
    angle = np.deg2rad(15)
    affine = np.eye(4)
    affine[:3, :3] = [
        [np.cos(angle), 0, np.sin(angle)],
        [0, 2, 0],
        [-np.sin(angle), 0, np.cos(angle)],
    ]
    source = tmp_path / "oblique.nii.gz"
    _save_4d(source, affine)
    with pytest.warns(UserWarning, match="oblique"):
        [(layer_data, kwargs, _)] = read_nifti(str(source))
    target = tmp_path / "oblique_copy.nii.gz"
    write_image(str(target), layer_data, kwargs)
    np.testing.assert_allclose(nib.load(str(target)).affine, nib.load(str(source)).affine)


def test_derived_labels_written_on_original_grid(tmp_path):
    source = tmp_path / "bold.nii.gz"
    _save_4d(source, PERMUTED_AFFINE)
    [(layer_data, kwargs, _)] = read_nifti(str(source))
    labels = np.zeros(layer_data.shape[1:], dtype=np.uint8)
    labels[1, 2, 3] = 4
    meta = {"metadata": {md.NIFTI_KEY: derived_nifti_metadata(kwargs["metadata"][md.NIFTI_KEY])}}

    target = tmp_path / "clusters_dseg.nii.gz"
    write_labels(str(target), labels, meta)

    written = nib.load(str(target))
    assert written.shape == SHAPE
    assert written.get_data_dtype() == np.uint8
    assert written.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(written.affine, PERMUTED_AFFINE)
    # Display voxel (1, 2, 3) is file voxel (2, 8 - 1 - 1, 3).
    assert np.asanyarray(written.dataobj)[2, 6, 3] == 4
    [(read_back, read_kwargs, read_type)] = read_nifti(str(target))
    assert read_type == "labels"
    np.testing.assert_array_equal(read_back, labels)


def test_probabilities_written_with_cluster_axis_last(tmp_path):
    source = tmp_path / "bold.nii.gz"
    _save_4d(source, LPS_AFFINE)
    [(layer_data, kwargs, _)] = read_nifti(str(source))
    rng = np.random.default_rng(1)
    proba_kxyz = rng.random((3,) + layer_data.shape[1:]).astype(np.float32)
    meta = {"metadata": {md.NIFTI_KEY: derived_nifti_metadata(kwargs["metadata"][md.NIFTI_KEY])}}

    target = tmp_path / "clusters_probseg.nii.gz"
    write_image(str(target), proba_kxyz, meta)

    written = nib.load(str(target))
    assert written.shape == SHAPE + (3,)
    assert written.header.get_zooms()[3] == 1.0
    [(read_back, read_kwargs, _)] = read_nifti(str(target))
    assert read_kwargs["metadata"][md.GACC_KEY]["role"] == md.ROLE_PROBABILITIES
    np.testing.assert_allclose(read_back, proba_kxyz)


def test_write_without_nifti_metadata_uses_scale(tmp_path):
    labels = np.zeros((4, 5, 6), dtype=np.uint8)
    labels[3, 4, 5] = 2
    target = tmp_path / "plain"
    [written_path] = write_labels(
        str(target),
        labels,
        {"metadata": {}, "scale": (2.0, 2.0, 3.0), "translate": (1.0, 0.0, -1.0)},
    )
    written = nib.load(written_path)
    assert written_path.endswith(".nii.gz")
    np.testing.assert_array_equal(written.affine[:3, 3], (1.0, 0.0, -1.0))
    np.testing.assert_array_equal(np.diag(written.affine)[:3], (2.0, 2.0, 3.0))
    assert np.asanyarray(written.dataobj)[3, 4, 5] == 2


def test_read_rejects_5d_file(tmp_path):
    path = tmp_path / "odd.nii"
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5, 2, 2), np.float32), np.eye(4)), str(path))
    with pytest.raises(ValueError, match="3D volumes and 4D stacks"):
        read_nifti(str(path))
