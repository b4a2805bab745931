"""Input validation and the one preprocessing path that fit and predict share.

The engine works on the foreground voxels only: a 4D volume (X, Y, Z, T)
becomes a matrix (n_voxels, T) of the voxels inside the mask, in C order of
their (i, j, k) indices, and each voxel's token is its min-max scaled values
followed by a sinusoidal encoding of its position.
"""

import logging
import math

import numpy as np
import torch

from .exceptions import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = [
    "MinMaxScaling",
    "check_cluster_xyzp",
    "check_data_xyzt",
    "check_mask",
    "foreground_indices",
    "iter_voxels",
    "positional_encoding",
]

# The whole-volume scans read about this many bytes of data at a time, so
# their temporary masks stay small next to a large 4D array.
_SCAN_CHUNK_BYTES = 64 * 2**20
# Tokens are built a chunk of voxels at a time, each chunk holding about
# this many bytes of float64 values (scaling computes in float64), so no
# float64 copy of the whole foreground is ever made.
_VOXEL_CHUNK_BYTES = 16 * 2**20


def _as_array(value, name):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if hasattr(value, "get_fdata") and hasattr(value, "affine"):
        raise InvalidInputError(
            f"{name} is a nibabel image; pass its array with img.get_fdata(), "
            "or load it with gacc.nifti first."
        )
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"{name} could not be converted to a numpy array: {error}") from error


def _slabs(data):
    """Yield slices of the first axis, each covering about ``_SCAN_CHUNK_BYTES`` of ``data``."""
    slab_bytes = max(data[:1].nbytes, 1)
    step = max(1, _SCAN_CHUNK_BYTES // slab_bytes)
    for start in range(0, data.shape[0], step):
        yield slice(start, start + step)


def _count_float32_overflow(original, converted):
    """Count the values that are finite in ``original`` but not in its float32 copy."""
    count = 0
    for rows in _slabs(original):
        count += int(np.count_nonzero(np.isfinite(original[rows]) & ~np.isfinite(converted[rows])))
    return count


def _finite_range(data):
    """Return the minimum and maximum finite value of ``data``, or (nan, nan) if none."""
    minimum, maximum = np.inf, -np.inf
    for rows in _slabs(data):
        slab = data[rows]
        finite = np.isfinite(slab)
        if finite.all():
            values = slab
        else:
            values = slab[finite]
            if values.size == 0:
                continue
        minimum = min(minimum, float(values.min()))
        maximum = max(maximum, float(values.max()))
    if minimum > maximum:
        return math.nan, math.nan
    return minimum, maximum


def check_data_xyzt(data_xyzt):
    """Validate a 4D data array and return it as float32.

    A float32 array, memory-mapped or not, is returned as it is, without a
    copy. NaN and infinite values are allowed here: they are checked on the
    foreground voxels only, by :func:`foreground_indices`, because fMRI
    volumes often hold NaN outside the brain.

    Raises
    ------
    InvalidInputError
        If the array is not 4D, is empty, is not real-valued, contains finite
        values beyond the float32 range, contains no finite value, or its
        finite values are all equal.
    """
    data = _as_array(data_xyzt, "data_xyzt")
    if data.ndim != 4:
        raise InvalidInputError(
            f"data_xyzt must be 4D with shape (X, Y, Z, T); got {data.ndim}D with shape "
            f"{data.shape}. For a 3D volume with one value per voxel, add a last axis: "
            "data[..., np.newaxis]."
        )
    if min(data.shape) == 0:
        raise InvalidInputError(f"data_xyzt is empty: shape {data.shape}.")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise InvalidInputError(f"data_xyzt must be numeric; got dtype {data.dtype}.")
    if np.issubdtype(data.dtype, np.complexfloating):
        raise InvalidInputError(
            f"data_xyzt has complex dtype {data.dtype}; pass real values, for example "
            "np.abs(data_xyzt) for magnitudes."
        )
    original = data
    with np.errstate(over="ignore"):
        data = data.astype(np.float32, copy=False)
    # Only floating-point types wider than float32 can hold values that
    # overflow it; every integer type fits.
    if original.dtype.kind == "f" and original.dtype.itemsize > 4:
        n_overflow = _count_float32_overflow(original, data)
        if n_overflow:
            raise InvalidInputError(
                f"data_xyzt contains {n_overflow} values beyond the float32 range "
                "(about 3.4e38); rescale the data first."
            )
    minimum, maximum = _finite_range(data)
    if math.isnan(minimum):
        raise InvalidInputError(
            "data_xyzt contains only NaN or infinite values; check that the right data were given."
        )
    if minimum == maximum:
        raise InvalidInputError(
            f"data_xyzt is constant (every value is {minimum}); GACC needs data "
            "that vary between voxels."
        )
    return data


def check_mask(mask, spatial_shape, name="mask"):
    """Validate a 3D foreground mask and return it as bool (X, Y, Z)."""
    mask = _as_array(mask, name)
    if mask.shape != tuple(spatial_shape):
        raise InvalidInputError(
            f"{name} has shape {mask.shape} but data_xyzt has spatial shape "
            f"{tuple(spatial_shape)}; pass a 3D mask on the same grid."
        )
    if mask.dtype != bool:
        values = np.unique(mask)
        if not np.all(np.isin(values, (0, 1))):
            raise InvalidInputError(
                f"{name} must be boolean or hold only 0 and 1; found values "
                f"{values[:5].tolist()}. Threshold it first, for example mask > 0.5."
            )
        mask = mask.astype(bool)
    if not mask.any():
        raise InvalidInputError(f"{name} selects no voxel; it must contain at least one True.")
    return mask


def _scan_voxels(data_xyzt):
    """Return two (X, Y, Z) arrays: the count of non-finite values and "any value is non-zero"."""
    spatial_shape = data_xyzt.shape[:3]
    n_nonfinite = np.zeros(spatial_shape, dtype=np.int32)
    nonzero = np.zeros(spatial_shape, dtype=bool)
    for rows in _slabs(data_xyzt):
        slab = data_xyzt[rows]
        n_nonfinite[rows] = np.count_nonzero(~np.isfinite(slab), axis=-1)
        # NaN compares unequal to 0, so non-finite voxels count as non-zero here.
        nonzero[rows] = np.any(slab != 0, axis=-1)
    return n_nonfinite, nonzero


def foreground_indices(data_xyzt, mask=None):
    """Return the flat indices (C order) of the voxels GACC uses.

    With an explicit ``mask``, its voxels are used, and their values must all
    be finite; values outside the mask are never read. Without a mask, every
    voxel whose values are all finite and not all zero is used. This drops
    the zero background of skull-stripped or atlas images and the NaN
    background of many fMRI volumes. A warning then gives the number of
    voxels left out because they contain NaN or infinite values.

    Raises
    ------
    InvalidInputError
        If the mask is invalid, a voxel inside an explicit mask contains a NaN
        or infinite value, or no voxel remains.
    """
    spatial_shape = data_xyzt.shape[:3]
    if mask is not None:
        mask = check_mask(mask, spatial_shape)
    n_nonfinite, nonzero = _scan_voxels(data_xyzt)
    finite = n_nonfinite == 0

    if mask is not None:
        bad = mask & ~finite
        if bad.any():
            raise InvalidInputError(
                f"data_xyzt contains {int(n_nonfinite[bad].sum())} NaN or infinite values in "
                f"{int(bad.sum())} voxels inside the mask; leave those voxels out of the mask "
                "(for example mask & np.isfinite(data_xyzt).all(axis=-1)) or replace the "
                "values (for example with np.nan_to_num(data_xyzt))."
            )
        return np.flatnonzero(mask.reshape(-1))

    n_dropped = int(np.count_nonzero(~finite))
    mask = nonzero & finite
    if not mask.any():
        if n_dropped:
            raise InvalidInputError(
                f"Every voxel of data_xyzt is zero or contains NaN or infinite values "
                f"({n_dropped} voxels contain some), so there is nothing to cluster."
            )
        raise InvalidInputError("data_xyzt is zero everywhere; there is nothing to cluster.")
    if n_dropped:
        logger.warning(
            "%d voxels contain NaN or infinite values; they are left out of the foreground "
            "(pass a mask to choose the voxels yourself).", n_dropped,
        )
    return np.flatnonzero(mask.reshape(-1))


def iter_voxels(data_xyzt, flat_indices, chunk_size=None):
    """Yield (indices, voxels_t) chunks of the voxels at ``flat_indices``.

    ``voxels_t`` has shape (len(indices), T) and the dtype of ``data_xyzt``.
    The values are gathered by (i, j, k) index, so neither a Fortran-ordered
    array (as NIfTI files are stored) nor a memory map is copied whole. By
    default a chunk contains as many voxels as fit in 16 MiB of float64 values.
    """
    spatial_shape = data_xyzt.shape[:3]
    if chunk_size is None:
        chunk_size = max(1, _VOXEL_CHUNK_BYTES // (8 * data_xyzt.shape[3]))
    for start in range(0, len(flat_indices), chunk_size):
        indices = flat_indices[start:start + chunk_size]
        yield indices, data_xyzt[np.unravel_index(indices, spatial_shape)]


def check_cluster_xyzp(cluster_xyzp, spatial_shape, num_clusters, known_mask=None):
    """Validate ground-truth clusters and return (values, known) as (X, Y, Z, P) arrays.

    ``values`` is float32 in [0, 1] with unknown entries set to 0, and
    ``known`` is bool, False where ``cluster_xyzp`` is NaN or ``known_mask``
    is False.
    """
    clusters = _as_array(cluster_xyzp, "cluster_xyzp")
    if clusters.ndim == 3:
        raise InvalidInputError(
            f"cluster_xyzp must be 4D with shape (X, Y, Z, P); got 3D shape {clusters.shape}. "
            "For a label image, build one column per label, for example with "
            "gacc.nifti.load_clusters, or add a last axis for a single cluster."
        )
    if clusters.ndim != 4:
        raise InvalidInputError(
            f"cluster_xyzp must be 4D with shape (X, Y, Z, P); got {clusters.ndim}D with "
            f"shape {clusters.shape}."
        )
    if clusters.shape[:3] != tuple(spatial_shape):
        raise InvalidInputError(
            f"cluster_xyzp has spatial shape {clusters.shape[:3]} but data_xyzt has "
            f"{tuple(spatial_shape)}; resample the clusters onto the data grid "
            "(gacc.nifti.load_clusters(..., reference=data_img, resample=True))."
        )
    n_known_clusters = clusters.shape[3]
    if n_known_clusters == 0:
        raise InvalidInputError("cluster_xyzp has P=0 clusters; give at least one cluster.")
    if n_known_clusters > num_clusters:
        raise InvalidInputError(
            f"cluster_xyzp has P={n_known_clusters} clusters, more than "
            f"num_clusters={num_clusters}; set num_clusters >= {n_known_clusters}."
        )
    clusters = clusters.astype(np.float32, copy=False)
    known = np.isfinite(clusters)
    if np.isinf(clusters).any():
        raise InvalidInputError(
            "cluster_xyzp contains infinite values; use 1 inside, 0 outside and NaN for unknown."
        )
    if known_mask is not None:
        known_mask = _as_array(known_mask, "known_mask")
        if known_mask.shape != clusters.shape:
            raise InvalidInputError(
                f"known_mask has shape {known_mask.shape} but cluster_xyzp has "
                f"{clusters.shape}; they must match."
            )
        known &= known_mask.astype(bool)
    values = np.where(known, clusters, np.float32(0.0)).astype(np.float32, copy=False)
    if values.min() < 0 or values.max() > 1:
        raise InvalidInputError(
            f"cluster_xyzp values must lie in [0, 1] (1 inside, 0 outside, NaN unknown); "
            f"found values from {values.min()} to {values.max()}. Scale probabilistic maps "
            "to [0, 1] first."
        )
    if not known.any():
        raise InvalidInputError(
            "cluster_xyzp has no known entry (all NaN or masked out by known_mask); "
            "GACC needs at least some known inside or outside voxels."
        )
    return values, known


class MinMaxScaling:
    """Per-feature min-max scaling learned on the foreground voxels.

    Parameters
    ----------
    feature_range : tuple of float or None
        Target range. None leaves the data unscaled.
    """

    def __init__(self, feature_range=(0.0, 1.0)):
        if feature_range is not None:
            try:
                low, high = (float(v) for v in feature_range)
            except (TypeError, ValueError) as error:
                raise InvalidInputError(
                    f"min_max_scale_range={feature_range!r} must be two numbers [low, high], "
                    "or None to turn scaling off."
                ) from error
            if not high > low:
                raise InvalidInputError(
                    f"min_max_scale_range={list(feature_range)} must be [low, high] with "
                    "high > low, or None to turn scaling off."
                )
            feature_range = (low, high)
        self.feature_range = feature_range
        self.data_min_ = None
        self.data_max_ = None

    def fit(self, voxels_t):
        """Learn the per-feature minimum and maximum of (n_voxels, T) values."""
        return self.fit_chunks([voxels_t])

    def fit_chunks(self, chunks):
        """Learn the per-feature minimum and maximum over (n_voxels, T) chunks of voxels.

        Equivalent to :meth:`fit` on the chunks stacked, without stacking them.
        """
        data_min = data_max = None
        for voxels_t in chunks:
            chunk_min = voxels_t.min(axis=0).astype(np.float32)
            chunk_max = voxels_t.max(axis=0).astype(np.float32)
            if data_min is None:
                data_min, data_max = chunk_min, chunk_max
            else:
                data_min = np.minimum(data_min, chunk_min)
                data_max = np.maximum(data_max, chunk_max)
        if data_min is None:
            raise InvalidInputError("MinMaxScaling needs at least one voxel to fit.")
        self.data_min_, self.data_max_ = data_min, data_max
        n_constant = int(np.sum(self.data_max_ == self.data_min_))
        if n_constant:
            logger.warning(
                "%d of %d features are constant over the foreground; they carry no "
                "information and are scaled to the bottom of the range.",
                n_constant, len(self.data_min_),
            )
        return self

    def transform(self, voxels_t):
        """Scale (n_voxels, T) values; values outside the fitted range extrapolate."""
        if self.feature_range is None:
            return voxels_t.astype(np.float32, copy=False)
        low, high = self.feature_range
        # float64, because differences of float32 values near the float32
        # limits overflow.
        data_min = self.data_min_.astype(np.float64)
        span = self.data_max_.astype(np.float64) - data_min
        span = np.where(span > 0, span, 1.0)
        scaled = (voxels_t - data_min) / span
        return (scaled * (high - low) + low).astype(np.float32)

    def state_dict(self):
        """Return the learned statistics as plain lists, for saving."""
        return {
            "feature_range": None if self.feature_range is None else list(self.feature_range),
            "data_min": None if self.data_min_ is None else self.data_min_.tolist(),
            "data_max": None if self.data_max_ is None else self.data_max_.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state):
        """Rebuild a fitted scaling from :meth:`state_dict` output."""
        scaling = cls(state["feature_range"])
        if state["data_min"] is not None:
            scaling.data_min_ = np.asarray(state["data_min"], dtype=np.float32)
            scaling.data_max_ = np.asarray(state["data_max"], dtype=np.float32)
        return scaling


def positional_encoding(flat_indices, spatial_shape, num_frequencies=6):
    """Encode voxel positions with sines and cosines of their relative coordinates.

    Parameters
    ----------
    flat_indices : ndarray of shape (n_voxels,)
        C-order indices into a volume of ``spatial_shape``.
    spatial_shape : tuple of int
        (X, Y, Z) of the volume the model was fitted on.
    num_frequencies : int, default=6
        Frequencies per axis; the coarsest has half a period across the
        volume and each next one doubles.

    Returns
    -------
    ndarray of shape (n_voxels, 6 * num_frequencies), float32
    """
    ijk = np.stack(np.unravel_index(flat_indices, spatial_shape), axis=1).astype(np.float64)
    # Relative coordinates in (0, 1), voxel centres, so the encoding is the same
    # whatever the voxel size.
    relative = (ijk + 0.5) / np.asarray(spatial_shape, dtype=np.float64)  # (n_voxels, 3)
    frequencies = math.pi * 2.0 ** np.arange(num_frequencies)  # (n_frequencies,)
    angles = relative[:, :, None] * frequencies  # (n_voxels, 3, n_frequencies)
    encoding = np.concatenate((np.sin(angles), np.cos(angles)), axis=-1)
    return encoding.reshape(len(flat_indices), -1).astype(np.float32)
