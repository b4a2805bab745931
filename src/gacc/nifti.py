"""Load, check and save NIfTI images for GACC.

Every loader takes a "Niimg-like" input, like nilearn: a path to a ``.nii`` or
``.nii.gz`` file (NIfTI-1 or NIfTI-2) or a nibabel image. Checks that need only
the header (file type, shape, data type, file size) run before any voxel data
is read, so a wrong 4D file fails in milliseconds however large it is.

Axis order is the engine's: data ``(X, Y, Z, T)``, clusters ``(X, Y, Z, P)``,
masks ``(X, Y, Z)``. Output images are built from a reference image so that the
affine and the header fields (units, TR, qform and sform codes) carry over.
"""

import csv
import gzip
import logging
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy

from gacc._atomic import atomic_path
from gacc.checkpoint import write_error
from gacc.exceptions import InvalidInputError

__all__ = [
    "load_clusters",
    "load_data",
    "load_data_img",
    "load_mask",
    "read_label_table",
    "save_img",
    "to_img",
]

logger = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_GZIP_MAGIC = b"\x1f\x8b"
# DEFLATE cannot compress better than about 1032:1, so a .nii.gz file whose
# header declares more bytes than this ratio allows must be damaged.
_MAX_GZIP_RATIO = 1100
# Errors that nibabel, gzip, zlib and numpy raise on damaged or foreign files.
_READ_ERRORS = (
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    nib.spatialimages.ImageDataError,
    OSError,
    EOFError,
    ValueError,
    zlib.error,
)
# Values in [0, 100] are read as percentages, the way FSL stores its
# probabilistic atlases.
_PERCENT_MAX = 100.0
# Affines that differ by less than this many millimetres describe one grid.
_AFFINE_ATOL = 1e-4
# The non-finite and range scan reads this many bytes of data at a time, so
# checking a large 4D array needs little extra memory.
_SCAN_CHUNK_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------
# Opening images and checking headers
# ---------------------------------------------------------------------------


def _image_name(img):
    """Return a short description of ``img`` for error messages."""
    if isinstance(img, (str, os.PathLike)):
        return repr(str(img))
    filename = img.get_filename() if hasattr(img, "get_filename") else None
    if filename:
        return repr(str(filename))
    return f"the in-memory {type(img).__name__}"


def _has_nifti_suffix(path):
    name = path.name.lower()
    return any(name.endswith(suffix) for suffix in _NIFTI_SUFFIXES)


def _open_image(img, *, mmap=True):
    """Return a nibabel NIfTI image for a path or image, reading only the header.

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    InvalidInputError
        If the file is not a readable NIfTI-1 or NIfTI-2 image.
    TypeError
        If ``img`` is neither a path nor a nibabel image.
    """
    if isinstance(img, nib.Nifti1Pair):
        # Nifti1Image, Nifti2Image and the .hdr/.img pair classes.
        return img
    if isinstance(img, nib.spatialimages.SpatialImage):
        raise InvalidInputError(
            f"{_image_name(img)} is a {type(img).__name__}, not a NIfTI image. "
            "Convert it first, for example with "
            "nibabel.Nifti1Image(img.get_fdata(), img.affine)."
        )
    if not isinstance(img, (str, os.PathLike)):
        raise TypeError(
            "Expected a path to a .nii or .nii.gz file or a nibabel NIfTI image, "
            f"got {type(img).__name__}."
        )

    path = Path(img).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"NIfTI file {str(path)!r} does not exist.")
    if path.is_dir():
        raise InvalidInputError(
            f"{str(path)!r} is a folder, not a .nii or .nii.gz file."
        )
    if not _has_nifti_suffix(path):
        raise InvalidInputError(
            f"{str(path)!r} is not a NIfTI file: the name should end in .nii or "
            ".nii.gz. Convert other formats with nibabel or nilearn first."
        )
    _check_compression(path)

    try:
        image = nib.load(path, mmap=mmap)
    except _READ_ERRORS as error:
        raise InvalidInputError(
            f"Cannot read {str(path)!r}: the file is damaged or is not a NIfTI "
            f"image ({type(error).__name__}: {error})."
        ) from error
    if not isinstance(image, nib.Nifti1Pair):
        raise InvalidInputError(
            f"{str(path)!r} contains a {type(image).__name__}, not a NIfTI-1 or "
            "NIfTI-2 image."
        )
    _check_header(image, path)
    return image


def _check_header(image, path):
    """Raise if the header's dimensions or affine are invalid or exceed the file."""
    try:
        shape = tuple(int(n) for n in image.header.get_data_shape())
        affine = np.asarray(image.affine, dtype=np.float64)
    except _READ_ERRORS + (TypeError, ArithmeticError) as error:
        raise InvalidInputError(
            f"Cannot read the header of {str(path)!r}: the file is damaged "
            f"({type(error).__name__}: {error})."
        ) from error
    if any(n < 0 for n in shape):
        raise InvalidInputError(
            f"{str(path)!r} is damaged: its header declares the negative shape {shape}."
        )
    if not np.isfinite(affine).all():
        raise InvalidInputError(
            f"{str(path)!r} is damaged: the affine in its header (qform or sform) "
            "contains NaN or infinite values. Fix the header, for example with "
            "nibabel's set_qform and set_sform."
        )
    _check_file_size(image, path)


def _check_compression(path):
    """Raise if the gzip state of ``path`` contradicts its suffix."""
    try:
        with open(path, "rb") as file:
            magic = file.read(2)
    except OSError as error:
        raise InvalidInputError(f"Cannot open {str(path)!r}: {error}.") from error
    is_gzip_name = path.name.lower().endswith(".gz")
    if magic == _GZIP_MAGIC and not is_gzip_name:
        raise InvalidInputError(
            f"{str(path)!r} is gzip-compressed but its name ends in .nii. "
            "Rename it to end in .nii.gz."
        )
    if magic != _GZIP_MAGIC and is_gzip_name:
        raise InvalidInputError(
            f"{str(path)!r} is named .nii.gz but is not gzip-compressed: the file "
            "is damaged or is not a NIfTI image. If it is an uncompressed NIfTI "
            "file, rename it to end in .nii."
        )


def _check_file_size(image, path):
    """Raise if the file is too small for the data its header declares."""
    header = image.header
    try:
        shape = header.get_data_shape()
        itemsize = np.dtype(header.get_data_dtype()).itemsize
        # The proxy's offset accounts for header extensions and for files
        # whose vox_offset field is 0.
        offset = int(getattr(image.dataobj, "offset", header.get_data_offset()))
    except _READ_ERRORS + (TypeError,) as error:
        raise InvalidInputError(
            f"Cannot read the header of {str(path)!r}: the file is damaged "
            f"({type(error).__name__}: {error})."
        ) from error
    n_bytes = int(np.prod(shape, dtype=np.float64)) * itemsize
    file_size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        if n_bytes > _MAX_GZIP_RATIO * max(file_size, 1) + 2**20:
            raise InvalidInputError(
                f"{str(path)!r} is truncated or damaged: its header declares "
                f"shape {tuple(shape)} ({n_bytes} bytes), more than a "
                f"{file_size}-byte gzip file can hold."
            )
    elif offset + n_bytes > file_size:
        raise InvalidInputError(
            f"{str(path)!r} is truncated or damaged: its header declares shape "
            f"{tuple(shape)} of {header.get_data_dtype()} ({n_bytes} bytes from "
            f"offset {offset}), but the file has only {file_size} bytes."
        )


def _check_data_dtype(image, name):
    dtype = np.dtype(image.get_data_dtype())
    if dtype.kind not in "buif":
        raise InvalidInputError(
            f"{name} stores {dtype} voxels (NIfTI datatype "
            f"{int(image.header['datatype'])}), but GACC needs real-valued "
            "integer or floating-point voxels."
        )


def _reshape_image(image, shape):
    """Return ``image`` with a new shape, without reading its data."""
    header = image.header.copy()
    dataobj = image.dataobj.reshape(shape)
    return image.__class__(dataobj, image.affine, header=header)


def _to_4d_shape(shape, name, *, allow_3d, what):
    """Return the 4D shape that ``shape`` maps to, or raise.

    Non-spatial axes of length 1 are dropped, so (X, Y, Z, 1, T), as written
    by some pipelines, becomes (X, Y, Z, T). A 3D image becomes (X, Y, Z, 1)
    only when ``allow_3d`` is true.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) < 3:
        raise InvalidInputError(
            f"{name} has shape {shape}, but {what} needs three spatial axes (X, Y, Z)."
        )
    if min(shape) <= 0:
        raise InvalidInputError(f"{name} has shape {shape} and contains no voxels.")
    if len(shape) == 3:
        if allow_3d:
            return shape + (1,)
        raise InvalidInputError(
            f"{name} is a 3D image of shape {shape}, but {what} must be a 4D "
            "(X, Y, Z, T) image with one volume per time point or feature map. "
            "Stack your 3D maps with nilearn.image.concat_imgs, or pass "
            "allow_3d=True to treat a single volume as T=1."
        )
    extra = [n for n in shape[3:] if n != 1]
    if len(extra) > 1:
        raise InvalidInputError(
            f"{name} has shape {shape} with {len(extra)} non-singleton axes after "
            f"the three spatial ones, but {what} must be a 4D (X, Y, Z, T) image. "
            "Reshape or split it so that only one axis follows X, Y and Z."
        )
    return shape[:3] + ((extra[0],) if extra else (1,))


def load_data_img(img, *, allow_3d=False):
    """Open and check a 4D data image without reading its voxels.

    Parameters
    ----------
    img : str, Path or nibabel image
        A ``.nii`` or ``.nii.gz`` file (NIfTI-1 or NIfTI-2) or a NIfTI image.
    allow_3d : bool, default=False
        If True, a 3D image is read as one volume, shape (X, Y, Z, 1).
        If False, a 3D image raises an error.

    Returns
    -------
    img : nibabel.Nifti1Image or nibabel.Nifti2Image
        The image with a 4D shape (X, Y, Z, T). 5D images whose extra axes
        have length 1, such as (X, Y, Z, 1, T), are reshaped to 4D lazily.

    Raises
    ------
    FileNotFoundError
        If the path does not exist.
    InvalidInputError
        If the file is damaged, is not NIfTI, has an unusable data type or
        cannot be read as 4D.
    """
    name = _image_name(img)
    image = _open_image(img)
    _check_data_dtype(image, name)
    shape = image.shape
    shape_4d = _to_4d_shape(shape, name, allow_3d=allow_3d, what="the data")
    if shape_4d != tuple(shape):
        logger.info("Reading %s of shape %s as %s.", name, tuple(shape), shape_4d)
        image = _reshape_image(image, shape_4d)
    return image


# ---------------------------------------------------------------------------
# Reading voxel data
# ---------------------------------------------------------------------------


def _gzip_path(dataobj):
    """Return the path of a .gz file that ``dataobj`` reads from, or None."""
    file_like = getattr(dataobj, "file_like", None)
    if isinstance(file_like, (str, os.PathLike)) and str(file_like).lower().endswith(".gz"):
        return file_like
    return None


def _read_gzip_checked(proxy, path, dtype):
    """Read a nibabel array proxy of a .gz file, then check the gzip trailer.

    nibabel stops reading at the end of the voxel data, before the gzip
    trailer, so the CRC-32 that detects a damaged stream is never checked.
    Reading the few remaining bytes through the same stream checks it.
    """
    with gzip.open(path, "rb") as stream:
        spec = (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
        checked = ArrayProxy(stream, spec, order=proxy.order)
        array = np.asarray(checked, dtype=dtype)
        stream.read()
    return array


def _read_array(image, name, dtype):
    """Read the scaled voxel array of ``image`` as ``dtype``.

    nibabel applies scl_slope and scl_inter and converts the byte order. An
    uncompressed file that needs neither scaling nor conversion comes back
    as a view of the memory map, so no second copy is made. A ``.nii.gz``
    stream is checked against its CRC-32, so a damaged file raises an error
    instead of returning wrong values.
    """
    try:
        path = _gzip_path(image.dataobj)
        if path is not None:
            return _read_gzip_checked(image.dataobj, path, dtype)
        return np.asarray(image.dataobj, dtype=dtype)
    except _READ_ERRORS as error:
        raise InvalidInputError(
            f"Cannot read the voxel data of {name}: the file is truncated or "
            f"damaged ({type(error).__name__}: {error})."
        ) from error


def _scan_values(array):
    """Return the count of non-finite values and the finite min and max.

    Scans chunks along the last axis so that the temporary masks stay small.
    The min and max are NaN when no value is finite.
    """
    n_nonfinite = 0
    minimum, maximum = np.inf, -np.inf
    if array.ndim == 0 or array.size == 0:
        return 0, np.nan, np.nan
    volume_bytes = max(array[..., 0].nbytes, 1)
    step = max(1, _SCAN_CHUNK_BYTES // volume_bytes)
    for start in range(0, array.shape[-1], step):
        chunk = array[..., start : start + step]
        finite = np.isfinite(chunk)
        n_finite = int(np.count_nonzero(finite))
        n_nonfinite += chunk.size - n_finite
        if n_finite == chunk.size:
            minimum = min(minimum, float(chunk.min()))
            maximum = max(maximum, float(chunk.max()))
        elif n_finite:
            values = chunk[finite]
            minimum = min(minimum, float(values.min()))
            maximum = max(maximum, float(values.max()))
    if minimum > maximum:
        return n_nonfinite, np.nan, np.nan
    return n_nonfinite, minimum, maximum


def load_data(img, *, mmap=True, dtype=np.float32, nan_policy="keep", allow_3d=False):
    """Load a 4D data image as an array of shape (X, Y, Z, T).

    Parameters
    ----------
    img : str, Path or nibabel image
        A 4D ``.nii`` or ``.nii.gz`` image (see :func:`load_data_img`).
    mmap : bool, default=True
        Memory-map uncompressed ``.nii`` files. A file stored as native
        ``dtype`` without scaling is then used in place, not copied.
    dtype : numpy dtype, default=np.float32
        Floating-point type of the returned array.
    nan_policy : {"keep", "raise", "zero"}, default="keep"
        What to do with NaN and infinite values. "keep" returns them as they
        are and logs their count. :class:`gacc.GACC` then leaves the voxels
        that contain any of them out of its default foreground, and raises
        an error if an explicit mask contains such a voxel, so NaN outside
        the brain is harmless. "raise" raises an error, and "zero" replaces
        them with 0 and logs a warning with their count.
    allow_3d : bool, default=False
        Read a 3D image as one volume, shape (X, Y, Z, 1).

    Returns
    -------
    data_xyzt : ndarray of shape (X, Y, Z, T)
        Voxel values with the header's scl_slope and scl_inter applied.
    img : nibabel.Nifti1Image or nibabel.Nifti2Image
        The 4D image, to use as reference when saving outputs.

    Raises
    ------
    FileNotFoundError
        If the path does not exist.
    InvalidInputError
        If the file is damaged or not 4D, contains NaN or infinite values
        with ``nan_policy="raise"``, contains no finite value, or its finite
        values are all equal.
    """
    if nan_policy not in ("keep", "raise", "zero"):
        raise ValueError(
            f"nan_policy={nan_policy!r} is invalid. Use 'keep', 'raise' or 'zero'."
        )
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype={dtype} is invalid. Use a floating-point type.")

    name = _image_name(img)
    if isinstance(img, (str, os.PathLike)):
        img = _open_image(img, mmap=mmap)
    image = load_data_img(img, allow_3d=allow_3d)
    data_xyzt = _read_array(image, name, dtype)

    n_nonfinite, minimum, maximum = _scan_values(data_xyzt)
    if n_nonfinite == data_xyzt.size:
        raise InvalidInputError(
            f"{name} contains only NaN or infinite values, so check that the right file "
            "was given."
        )
    if n_nonfinite and nan_policy == "keep":
        logger.info(
            "%s contains %d NaN or infinite values out of %d. Keeping them: GACC leaves "
            "the voxels that hold them out of the default foreground.",
            name,
            n_nonfinite,
            data_xyzt.size,
        )
    elif n_nonfinite:
        if nan_policy == "raise":
            raise InvalidInputError(
                f"{name} contains {n_nonfinite} NaN or infinite values out of "
                f"{data_xyzt.size}. Replace them, for example with "
                "nilearn.image.clean_img or numpy.nan_to_num, or pass "
                "nan_policy='keep' to leave their voxels out of the foreground, or "
                "nan_policy='zero' to set them to 0."
            )
        logger.warning(
            "%s contains %d NaN or infinite values out of %d. Setting them to 0.",
            name,
            n_nonfinite,
            data_xyzt.size,
        )
        # A new array, because the loaded one may share memory with the
        # caller's image.
        data_xyzt = np.nan_to_num(data_xyzt, copy=True, nan=0.0, posinf=0.0, neginf=0.0)
        minimum = min(minimum, 0.0) if np.isfinite(minimum) else 0.0
        maximum = max(maximum, 0.0) if np.isfinite(maximum) else 0.0
    if minimum == maximum:
        what = "all zero" if minimum == 0 else f"constant (every value is {minimum:g})"
        raise InvalidInputError(
            f"{name} is {what}. GACC cannot cluster data without variation, so "
            "check that the right file was given."
        )
    return data_xyzt, image


# ---------------------------------------------------------------------------
# Grids and resampling
# ---------------------------------------------------------------------------


def _spatial_grid(image):
    return tuple(int(n) for n in image.shape[:3]), np.asarray(image.affine, dtype=np.float64)


def _same_grid(image, reference):
    shape, affine = _spatial_grid(image)
    reference_shape, reference_affine = _spatial_grid(reference)
    return shape == reference_shape and np.allclose(
        affine, reference_affine, rtol=0, atol=_AFFINE_ATOL
    )


def _check_grid(image, name, reference, reference_name, what):
    """Raise if ``image`` is not on the voxel grid of ``reference``."""
    if _same_grid(image, reference):
        return
    shape, affine = _spatial_grid(image)
    reference_shape, reference_affine = _spatial_grid(reference)
    def one_line(matrix):
        rows = (" ".join(f"{value:.4g}" for value in row) for row in np.asarray(matrix))
        return "[" + "; ".join(rows) + "]"

    raise InvalidInputError(
        f"The {what} ({name}) is not on the grid of the data ({reference_name}): "
        f"shape {shape} with affine {one_line(affine)}, but the data have spatial shape "
        f"{reference_shape} with affine {one_line(reference_affine)}. Pass resample=True "
        "(--resample on the command line) to resample it onto the data grid, or resample "
        "it yourself with nilearn.image.resample_to_img."
    )


def _resample(image, reference, interpolation):
    """Resample ``image`` onto the spatial grid of ``reference`` with nilearn."""
    from nilearn.image import resample_img

    shape, affine = _spatial_grid(reference)
    logger.info(
        "Resampling %s onto the grid %s (%s interpolation).",
        _image_name(image),
        shape,
        interpolation,
    )
    return resample_img(
        image,
        target_affine=affine,
        target_shape=shape,
        interpolation=interpolation,
        clip=True,
        force_resample=True,
        copy_header=True,
    )


def _open_reference(reference):
    name = _image_name(reference)
    image = _open_image(reference)
    if len(image.shape) < 3:
        raise InvalidInputError(
            f"The reference {name} has shape {tuple(image.shape)}, but a 3D or "
            "4D image."
        )
    return image, name


def _match_grid(image, name, reference, *, resample, interpolation, what):
    """Check ``image`` against ``reference`` and resample it if asked."""
    if reference is None:
        return image
    reference_image, reference_name = _open_reference(reference)
    if _same_grid(image, reference_image):
        return image
    if not resample:
        _check_grid(image, name, reference_image, reference_name, what)
    return _resample(image, reference_image, interpolation)


# ---------------------------------------------------------------------------
# Clusters and masks
# ---------------------------------------------------------------------------


def read_label_table(path):
    """Read a CSV or TSV label table into a dict {value: name}.

    With a header row, the value column is the first one named ``index``,
    ``label``, ``value`` or ``id`` and the name column the first named
    ``name``, ``label_name`` or ``region``. Without a header, the first
    column contains values and the second names.

    Parameters
    ----------
    path : str or Path
        The table file; ``.tsv`` files and files whose first line contains a
        tab are read as tab-separated, others as comma-separated.

    Returns
    -------
    table : dict of int to str

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    InvalidInputError
        If the file is empty or a value is not a number.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Label table {str(path)!r} does not exist.")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if not lines:
        raise InvalidInputError(f"Label table {str(path)!r} is empty.")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in lines[0] else ","
    rows = [row for row in csv.reader(lines, delimiter=delimiter) if row]
    if not rows:
        raise InvalidInputError(f"Label table {str(path)!r} is empty.")

    first = [cell.strip().lower() for cell in rows[0]]
    has_header = not _is_number(first[0])
    value_column, name_column = 0, 1
    if has_header:
        value_column = _find_column(first, ("index", "label", "value", "id"), path)
        name_column = _find_column(first, ("name", "label_name", "region"), path)
        rows = rows[1:]

    table = {}
    for line_number, row in enumerate(rows, start=2 if has_header else 1):
        if len(row) <= max(value_column, name_column):
            raise InvalidInputError(
                f"Label table {str(path)!r}, line {line_number}: expected a value "
                f"and a name, got {row}."
            )
        value = row[value_column].strip()
        if not _is_number(value):
            raise InvalidInputError(
                f"Label table {str(path)!r}, line {line_number}: label value "
                f"{value!r} is not a number."
            )
        table[int(float(value))] = row[name_column].strip()
    return table


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _find_column(header, candidates, path):
    for candidate in candidates:
        if candidate in header:
            return header.index(candidate)
    raise InvalidInputError(
        f"Label table {str(path)!r} has columns {header}, but expected one of "
        f"{list(candidates)}."
    )


def _label_dict(labels, n_volumes=None):
    """Return ``labels`` (dict, sequence of names or table path) as a dict."""
    if labels is None:
        return {}
    if isinstance(labels, (str, os.PathLike)):
        return read_label_table(labels)
    if isinstance(labels, dict):
        return {int(key): str(value) for key, value in labels.items()}
    names = [str(name) for name in labels]
    if n_volumes is not None and len(names) != n_volumes:
        raise InvalidInputError(
            f"labels lists {len(names)} names but the cluster image has "
            f"{n_volumes} volumes."
        )
    return dict(enumerate(names))


def _read_labels_3d(image, name):
    """Return the integer label array of a 3D label atlas."""
    values = _read_array(image, name, np.float64)
    n_nonfinite = int(np.count_nonzero(~np.isfinite(values)))
    if n_nonfinite:
        raise InvalidInputError(
            f"The label image {name} contains {n_nonfinite} NaN or infinite values, but "
            "a label atlas must hold integer labels (0 for background)."
        )
    rounded = np.rint(values)
    if not np.allclose(values, rounded, rtol=0, atol=1e-3):
        return None
    return rounded.astype(np.int64)


def _clusters_from_labels(label_xyz, labels, name):
    values = np.unique(label_xyz)
    values = values[values != 0]
    if values.size == 0:
        raise InvalidInputError(
            f"The label image {name} contains only background (0), so it defines no "
            "cluster."
        )
    table = _label_dict(labels)
    names = [table.get(int(value), f"label_{int(value)}") for value in values]
    cluster_xyzp = np.empty(label_xyz.shape + (values.size,), dtype=np.float32)
    for index, value in enumerate(values):
        cluster_xyzp[..., index] = label_xyz == value
    logger.info("Read %d labels from %s.", values.size, name)
    return cluster_xyzp, names


def _scale_probabilities(cluster_xyzp, name):
    """Return the maps with percentages scaled to [0, 1], or raise for other ranges."""
    _, minimum, maximum = _scan_values(cluster_xyzp)
    if not np.isfinite(minimum):
        return cluster_xyzp
    if minimum >= 0 and maximum <= 1:
        return cluster_xyzp
    if minimum >= 0 and maximum <= _PERCENT_MAX:
        logger.info("%s contains values up to %g. Reading them as percentages.", name, maximum)
        # Not in place, because the array may be the caller's image data.
        return cluster_xyzp / np.float32(_PERCENT_MAX)
    raise InvalidInputError(
        f"The cluster image {name} contains values from {minimum:g} to {maximum:g}, but "
        "cluster maps must be probabilities in [0, 1] or percentages in [0, 100]. "
        "Threshold or rescale statistical maps before using them as clusters."
    )


def _warn_empty_clusters(cluster_xyzp, names, name):
    empty = []
    for index, cluster_name in enumerate(names):
        column = cluster_xyzp[..., index]
        if not np.any(column > 0) and not np.any(np.isnan(column)):
            empty.append(cluster_name)
    if len(empty) == len(names):
        raise InvalidInputError(
            f"Every cluster in {name} is empty (no voxel above 0 after "
            "thresholding). Lower the threshold or check the file."
        )
    for cluster_name in empty:
        logger.warning("Cluster %r in %s contains no voxel.", cluster_name, name)


def load_clusters(img, *, threshold=0.5, labels=None, reference=None, resample=False):
    """Load known clusters as an array of shape (X, Y, Z, P).

    Two layouts are read:

    - a 4D probabilistic atlas, one map per cluster, with values in [0, 1]
      or percentages in [0, 100] (as FSL stores them). NaN marks unknown
      entries and is kept.
    - a 3D label atlas, one cluster per distinct non-zero integer label,
      ordered by label value. A 3D image with non-integer values is read as
      a single probabilistic map.

    Parameters
    ----------
    img : str, Path or nibabel image
        The cluster image.
    threshold : float or None, default=0.5
        For probabilistic maps: values >= ``threshold`` become 1 and the
        others 0. None keeps the probabilities. Label atlases are binary
        already and ignore it.
    labels : dict, sequence of str, str or Path, optional
        Cluster names: a dict {label value: name} (for a 4D atlas the keys
        are volume indices starting at 0), a sequence of P names, or the path
        to a CSV or TSV label table with ``index`` and ``name`` columns.
        Clusters without a name get ``"label_<value>"`` (3D) or
        ``"volume_<index>"`` (4D).
    reference : str, Path or nibabel image, optional
        The data image whose voxel grid the clusters must share.
    resample : bool, default=False
        If the grids differ, resample onto the reference grid with nilearn
        (nearest interpolation for label atlases, continuous for
        probabilistic maps) instead of raising an error.

    Returns
    -------
    cluster_xyzp : ndarray of shape (X, Y, Z, P), dtype float32
        1 inside, 0 outside and NaN unknown, or probabilities in [0, 1]
        with ``threshold=None``.
    names : list of str
        One name per cluster.

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    InvalidInputError
        If the image is damaged, has an unusable shape or value range, is on
        another grid without ``resample=True``, or every cluster is empty.
    """
    if threshold is not None and not 0 < threshold <= 1:
        raise ValueError(
            f"threshold={threshold} is invalid. Use a value in (0, 1] or None."
        )
    name = _image_name(img)
    image = _open_image(img)
    _check_data_dtype(image, name)
    shape = tuple(image.shape)

    if len(shape) == 3:
        resampled = _match_grid(
            image, name, reference, resample=resample, interpolation="nearest",
            what="cluster image",
        )
        label_xyz = _read_labels_3d(resampled, name)
        if label_xyz is not None:
            cluster_xyzp, names = _clusters_from_labels(label_xyz, labels, name)
            _warn_empty_clusters(cluster_xyzp, names, name)
            return cluster_xyzp, names
        logger.info("%s is 3D with non-integer values, so reading it as one map.", name)

    shape_4d = _to_4d_shape(shape, name, allow_3d=True, what="the cluster image")
    if shape_4d != shape:
        image = _reshape_image(image, shape_4d)
    cluster_xyzp = _read_probabilistic(image, name, reference, resample)
    n_clusters = cluster_xyzp.shape[3]

    table = _label_dict(labels, n_volumes=n_clusters if _is_sequence(labels) else None)
    names = [table.get(index, f"volume_{index}") for index in range(n_clusters)]
    if threshold is not None:
        unknown = np.isnan(cluster_xyzp)
        cluster_xyzp = (cluster_xyzp >= threshold).astype(np.float32)
        cluster_xyzp[unknown] = np.nan
    _warn_empty_clusters(cluster_xyzp, names, name)
    return cluster_xyzp, names


def _is_sequence(labels):
    return labels is not None and not isinstance(labels, (str, os.PathLike, dict))


def _read_probabilistic(image, name, reference, resample):
    """Read 4D cluster maps in [0, 1] (NaN for unknown), resampled if asked."""
    reference_image = None
    if reference is not None:
        # Compare grids from the headers before reading any voxel.
        reference_image, reference_name = _open_reference(reference)
        if _same_grid(image, reference_image):
            reference_image = None
        elif not resample:
            _check_grid(image, name, reference_image, reference_name, "cluster image")

    cluster_xyzp = _read_array(image, name, np.float32)
    if np.isinf(cluster_xyzp).any():
        raise InvalidInputError(
            f"The cluster image {name} contains infinite values. Use values in "
            "[0, 1], or NaN for unknown entries."
        )
    cluster_xyzp = _scale_probabilities(cluster_xyzp, name)
    if reference_image is None:
        return cluster_xyzp

    # Resample the known values and the unknown (NaN) marks separately,
    # because spline interpolation would spread NaN over whole neighbourhoods.
    unknown = np.isnan(cluster_xyzp)
    known = np.where(unknown, 0.0, cluster_xyzp).astype(np.float32)
    known_img = image.__class__(known, image.affine, header=image.header.copy())
    resampled = np.asarray(
        _resample(known_img, reference_image, "continuous").dataobj, dtype=np.float32
    )
    resampled = np.clip(resampled, 0.0, 1.0)
    if unknown.any():
        unknown_img = image.__class__(
            unknown.astype(np.uint8), image.affine, header=image.header.copy()
        )
        unknown_img.set_data_dtype(np.uint8)
        unknown_resampled = _resample(unknown_img, reference_image, "nearest")
        resampled[np.asarray(unknown_resampled.dataobj) > 0] = np.nan
    return resampled


def load_mask(img, reference=None, *, resample=False):
    """Load a brain or foreground mask as a boolean array of shape (X, Y, Z).

    Parameters
    ----------
    img : str, Path or nibabel image
        A 3D image (or 4D with one volume). Non-zero finite voxels are
        inside the mask.
    reference : str, Path or nibabel image, optional
        The data image whose voxel grid the mask must share.
    resample : bool, default=False
        If the grids differ, resample onto the reference grid (nearest
        interpolation) instead of raising an error.

    Returns
    -------
    mask : ndarray of shape (X, Y, Z), dtype bool

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    InvalidInputError
        If the image is damaged, not 3D, on another grid without
        ``resample=True``, or empty.
    """
    name = _image_name(img)
    image = _open_image(img)
    _check_data_dtype(image, name)
    shape = tuple(image.shape)
    spatial_shape = _to_4d_shape(shape, name, allow_3d=True, what="the mask")
    if spatial_shape[3] != 1:
        raise InvalidInputError(
            f"The mask {name} has shape {shape}, but a mask must be a 3D (X, Y, Z) image."
        )
    if len(shape) != 3:
        image = _reshape_image(image, spatial_shape[:3])
    image = _match_grid(
        image, name, reference, resample=resample, interpolation="nearest", what="mask"
    )
    values = _read_array(image, name, np.float32)
    finite = np.isfinite(values)
    n_nonfinite = int(values.size - np.count_nonzero(finite))
    if n_nonfinite:
        logger.warning(
            "The mask %s contains %d NaN or infinite voxels. Treating them as outside.",
            name,
            n_nonfinite,
        )
    mask = finite & (values != 0)
    if not mask.any():
        raise InvalidInputError(f"The mask {name} is empty: it has no non-zero voxel.")
    return mask


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _output_dtype(array):
    """Return the dtype to store ``array`` in: compact for labels, float32 otherwise."""
    if array.dtype == bool:
        return np.dtype(np.uint8)
    if array.dtype.kind in "iu":
        if array.size == 0:
            return np.dtype(np.uint8)
        minimum, maximum = int(array.min()), int(array.max())
        for candidate in (np.uint8, np.int16, np.int32):
            info = np.iinfo(candidate)
            if info.min <= minimum and maximum <= info.max:
                return np.dtype(candidate)
        return np.dtype(np.int64)
    if array.dtype.kind == "f":
        return np.dtype(np.float32)
    raise InvalidInputError(
        f"Cannot store an array of dtype {array.dtype} in NIfTI. Use real numbers."
    )


def to_img(array, reference_img):
    """Build a NIfTI image of ``array`` on the grid of ``reference_img``.

    The affine and a copy of the reference header are kept (units, TR, qform
    and sform codes, description). The data type, dimensions, scaling and
    display range are set for the new data. Booleans are stored as uint8,
    integers in the smallest of uint8, int16, int32 and int64 that fits them,
    and floating-point values as float32.

    Parameters
    ----------
    array : ndarray of shape (X, Y, Z) or (X, Y, Z, K)
        Values on the spatial grid of the reference.
    reference_img : str, Path or nibabel image
        The image whose grid and header the output takes.

    Returns
    -------
    img : nibabel.Nifti1Image or nibabel.Nifti2Image
        The same class as the reference.
    """
    reference = _open_image(reference_img)
    array = np.asanyarray(array)
    if array.ndim not in (3, 4):
        raise InvalidInputError(
            f"array has shape {array.shape}, but expected (X, Y, Z) or (X, Y, Z, K)."
        )
    reference_shape = tuple(reference.shape[:3])
    if array.shape[:3] != reference_shape:
        raise InvalidInputError(
            f"array has spatial shape {array.shape[:3]} but the reference image "
            f"{_image_name(reference_img)} has spatial shape {reference_shape}."
        )
    dtype = _output_dtype(array)
    data = np.asarray(array, dtype=dtype)

    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_data_shape(data.shape)
    # Scaling belongs to the reference's stored values, not to the new data.
    header.set_slope_inter(np.nan, np.nan)
    finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
    header["cal_min"] = float(finite.min()) if finite.size else 0.0
    header["cal_max"] = float(finite.max()) if finite.size else 0.0

    image_class = reference.__class__
    if not isinstance(reference, (nib.Nifti1Image, nib.Nifti2Image)):
        image_class = nib.Nifti1Image
    # nibabel keeps the header's qform and sform (and their codes) when they
    # already give this affine, and rewrites them only when they do not.
    return image_class(data, reference.affine, header=header)


def save_img(array, reference_img, path):
    """Write ``array`` as a NIfTI file on the grid of ``reference_img``.

    The file is written to a temporary name in the same folder and renamed at
    the end, so an interrupted write never leaves a partial file at ``path``.
    See :func:`to_img` for how the image is built.

    Parameters
    ----------
    array : ndarray of shape (X, Y, Z) or (X, Y, Z, K)
        Values on the spatial grid of the reference.
    reference_img : str, Path or nibabel image
        The image whose grid and header the output takes.
    path : str or Path
        Output file; the name must end in ``.nii`` or ``.nii.gz``.

    Returns
    -------
    path : Path
        The written file.

    Raises
    ------
    FileNotFoundError
        If the output folder does not exist.
    InvalidInputError
        If the name does not end in .nii or .nii.gz, or the array does not
        fit the reference grid.
    OSError
        If writing fails, for example on a full disk or in a folder without
        write permission. The message names ``path`` and the fix, and
        ``path`` is left as it was.
    """
    path = Path(path).expanduser()
    if not _has_nifti_suffix(path):
        raise InvalidInputError(
            f"Output path {str(path)!r} must end in .nii or .nii.gz."
        )
    image = to_img(array, reference_img)
    try:
        with atomic_path(path) as tmp_path:
            nib.save(image, tmp_path)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise write_error(path, error) from error
    logger.info("Wrote %s, shape %s.", path, image.shape)
    return path

