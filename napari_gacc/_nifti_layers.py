"""Conversion between NIfTI images and napari layer data.

Layer arrays put the non-spatial axis (time, feature, cluster) first so that
napari shows it as a slider, and their spatial axes are in RAS+ voxel order
(see :mod:`napari_gacc._orientation`). ``layer.metadata["nifti"]`` keeps what
is needed to write the layer back exactly:

``"affine"``
    ndarray of shape (4, 4), the file's voxel-to-world affine.
``"header"``
    The file's ``nibabel.Nifti1Header`` (a copy).
``"orientation"``
    ndarray of shape (3, 2), the reorientation applied for display.
``"file_shape"``
    Shape of the array in the file, so a 5D file with a singleton 4th axis
    is written back as 5D.
``"scaling"``
    ``(slope, intercept)`` of an integer file with voxel scaling, else None.
``"derived"``
    False for the array read from the file; True for layers computed on its
    grid (annotations, predictions), which are written with their own data
    type and the affine of the file they were derived from.
"""

import copy
import logging
import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from gacc.exceptions import InvalidInputError
from gacc.nifti import to_img

from . import _metadata as md
from ._orientation import (
    display_geometry,
    spatial_shape_in_display_order,
    to_display_order,
    to_file_order,
)

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")

# BIDS file-name suffixes that mark label images and probabilistic atlases.
_LABEL_SUFFIX = re.compile(r"_(dseg|mask)$")
_PROBABILITY_SUFFIX = re.compile(r"_probseg$")

_AXIS_LABELS = {
    md.ROLE_DATA: ("volume", "x", "y", "z"),
    md.ROLE_PROBABILITIES: ("cluster", "x", "y", "z"),
}


def is_nifti_path(path):
    """Return True if ``path`` names a NIfTI-1 or NIfTI-2 file by its extension."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(path):
    """Return the file name of ``path`` without ``.nii`` or ``.nii.gz``."""
    name = Path(path).name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def guess_role(img, name):
    """Choose how to show an image: data, probabilities, labels or anatomy.

    Rules, in order: a BIDS ``_dseg`` or ``_mask`` suffix, or the NIfTI
    intent code ``NIFTI_INTENT_LABEL`` on an integer image, makes a labels
    layer; a ``_probseg`` suffix on a 4D image makes a probability layer with
    the cluster axis first; any other 4D image is data, and any other 3D
    image is anatomy.
    """
    ndim = len(_squeezed_shape(img.shape))
    intent = img.header.get_intent()[0] if hasattr(img.header, "get_intent") else ""
    is_integer = np.issubdtype(img.get_data_dtype(), np.integer)
    if ndim == 3 and (_LABEL_SUFFIX.search(name) or (intent == "label" and is_integer)):
        return md.ROLE_MASK if name.endswith("_mask") else md.ROLE_LABELS
    if ndim == 4 and _PROBABILITY_SUFFIX.search(name):
        return md.ROLE_PROBABILITIES
    return md.ROLE_DATA if ndim == 4 else md.ROLE_ANATOMY


def _squeezed_shape(shape):
    # A 5D file of shape (X, Y, Z, 1, N) stores N volumes (vector intent).
    if len(shape) == 5 and shape[3] == 1:
        return shape[:3] + shape[4:]
    return tuple(shape)


def _read_array(img):
    """Read the voxel values of ``img``, keeping integer labels as integers."""
    dataobj = img.dataobj
    slope = getattr(dataobj, "slope", 1.0)
    inter = getattr(dataobj, "inter", 0.0)
    is_scaled = not (slope == 1.0 and inter == 0.0)
    file_dtype = img.get_data_dtype()
    if np.issubdtype(file_dtype, np.integer) and not is_scaled:
        array = np.asanyarray(dataobj)
    elif file_dtype == np.float64:
        array = img.get_fdata()
    else:
        array = img.get_fdata(dtype=np.float32)
    return array.reshape(_squeezed_shape(array.shape)), (
        (float(slope), float(inter)) if is_scaled else None
    )


def img_to_layer_data(img, *, name, role=None):
    """Convert a NIfTI image to a napari layer data tuple.

    Parameters
    ----------
    img : nibabel.Nifti1Image or nibabel.Nifti2Image
        A 3D image, a 4D image, or a 5D image with a singleton 4th axis.
    name : str
        Layer name.
    role : str or None, default=None
        One of the ``ROLE_*`` constants of :mod:`napari_gacc._metadata`;
        None picks one with :func:`guess_role`.

    Returns
    -------
    layer_data : tuple of (ndarray, dict, str)
        Array of shape (N, X', Y', Z') for 4D images or (X', Y', Z'), with
        X', Y', Z' in RAS+ order; layer keyword arguments; layer type.
    """
    shape = _squeezed_shape(img.shape)
    if len(shape) not in (3, 4):
        raise InvalidInputError(
            f"NIfTI image {name!r} has shape {tuple(img.shape)}; napari-gacc reads 3D "
            "volumes and 4D stacks of volumes only. Split or squeeze the file first."
        )
    role = role or guess_role(img, name)
    geometry = display_geometry(img.affine, shape[:3])
    if geometry.is_oblique:
        message = (
            f"{name!r} has an oblique affine (rotation of {geometry.obliquity:.3f} voxel "
            "per voxel after reorientation); napari shows it on the closest axis-aligned "
            "grid. Saving the layer restores the original affine."
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)

    array, scaling = _read_array(img)
    array = to_display_order(array, geometry.orientation)
    if array.ndim == 4:
        array = np.moveaxis(array, -1, 0)
    nifti = {
        "affine": np.array(img.affine, dtype=float),
        "header": img.header.copy(),
        "orientation": geometry.orientation,
        "file_shape": tuple(img.shape),
        "scaling": scaling,
        "derived": False,
    }
    kwargs = _layer_kwargs(name, role, geometry, array.ndim)
    kwargs["metadata"] = {md.NIFTI_KEY: nifti, md.GACC_KEY: {"role": role}}
    layer_type = "labels" if role in md.LABEL_ROLES else "image"
    if layer_type == "labels" and not np.issubdtype(array.dtype, np.integer):
        array = np.rint(array).astype(np.int32)
    if role == md.ROLE_PROBABILITIES:
        array = array.astype(np.float32, copy=False)
    return array, kwargs, layer_type


def _layer_kwargs(name, role, geometry, ndim):
    # Layer units are left unset: napari warns whenever layers with and
    # without units are shown together, and NIfTI grids are in mm anyway.
    kwargs = {"name": name}
    if ndim == 4:
        kwargs["scale"] = (1.0,) + geometry.scale
        kwargs["translate"] = (0.0,) + geometry.translate
        kwargs["axis_labels"] = _AXIS_LABELS.get(role, ("volume", "x", "y", "z"))
    else:
        kwargs["scale"] = geometry.scale
        kwargs["translate"] = geometry.translate
        kwargs["axis_labels"] = ("x", "y", "z")
    if role == md.ROLE_PROBABILITIES:
        kwargs.update(colormap="inferno", contrast_limits=(0.0, 1.0), blending="additive")
    elif role in (md.ROLE_DATA, md.ROLE_ANATOMY):
        kwargs["colormap"] = "gray"
    return kwargs


def derived_nifti_metadata(nifti):
    """Return NIfTI metadata for a layer computed on the grid of another layer.

    The affine, orientation and header are those of ``nifti``; writing such a
    layer sets the header's data type from the layer's array and clears the
    voxel scaling (see :func:`layer_data_to_img`).
    """
    derived = copy_nifti_metadata(nifti)
    derived["scaling"] = None
    derived["derived"] = True
    return derived


def nifti_metadata_from_placement(scale, translate, spatial_shape):
    """Build NIfTI metadata for a layer that did not come from a NIfTI file.

    The affine is diagonal: the last three entries of ``scale`` and
    ``translate`` become voxel sizes and the origin, in layer axis order.
    """
    affine = np.eye(4)
    affine[:3, :3] = np.diag(np.asarray(scale, dtype=float)[-3:])
    affine[:3, 3] = np.asarray(translate, dtype=float)[-3:]
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    return {
        "affine": affine,
        "header": header,
        "orientation": nib.orientations.axcodes2ornt(("R", "A", "S")),
        "file_shape": tuple(int(n) for n in spatial_shape),
        "scaling": None,
        "derived": True,
    }


def layer_nifti_metadata(metadata, scale, translate, data_shape):
    """Return the NIfTI metadata of a layer, or build it from the layer's placement.

    Parameters
    ----------
    metadata : dict or None
        ``layer.metadata``.
    scale, translate : sequence of float or None
        ``layer.scale`` and ``layer.translate``; None counts as 1 and 0.
    data_shape : tuple of int
        Shape of the layer array; its last three entries are the grid shape.
    """
    nifti = (metadata or {}).get(md.NIFTI_KEY)
    if nifti is not None:
        return nifti
    ndim = len(data_shape)
    scale = np.ones(ndim) if scale is None else scale
    translate = np.zeros(ndim) if translate is None else translate
    return nifti_metadata_from_placement(scale, translate, tuple(data_shape)[-3:])


def reference_img(nifti):
    """Return a data-free NIfTI image with the grid and header of ``nifti`` metadata.

    The voxel array is a zero-stride view, so the image costs no memory; it
    serves as the ``reference`` of :mod:`gacc.nifti` functions.
    """
    header = nifti["header"].copy()
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    empty = np.broadcast_to(np.uint8(0), tuple(nifti["file_shape"][:3]))
    return image_class(empty, nifti["affine"], header)


def layer_data_to_img(data, nifti, *, is_labels=False):
    """Convert a layer array back to a NIfTI image in the file's voxel order.

    Parameters
    ----------
    data : ndarray of shape (N, X', Y', Z') or (X', Y', Z')
        Layer array in RAS+ voxel order, non-spatial axis first.
    nifti : dict
        ``layer.metadata["nifti"]`` (see the module docstring).
    is_labels : bool, default=False
        Whether the array contains labels; derived label images get the NIfTI
        intent code ``NIFTI_INTENT_LABEL`` so that readers show them as labels.

    Returns
    -------
    img : nibabel.Nifti1Image or nibabel.Nifti2Image
        Image with the original affine and a copy of the original header.
    """
    array = np.asarray(data)
    if array.ndim not in (3, 4):
        raise InvalidInputError(
            f"Layer data has shape {array.shape}; only 3D volumes and 4D stacks "
            "(volume or cluster axis first) can be saved as NIfTI."
        )
    if array.ndim == 4:
        array = np.moveaxis(array, 0, -1)
    expected = spatial_shape_in_display_order(nifti["file_shape"][:3], nifti["orientation"])
    if array.shape[:3] != expected:
        raise InvalidInputError(
            f"Layer data has spatial shape {array.shape[:3]} but its NIfTI metadata "
            f"describes a grid of shape {expected}, so the layer no longer matches the "
            "file it came from. Remove metadata['nifti'] to save it on its own grid."
        )
    array = to_file_order(array, nifti["orientation"])
    if not nifti.get("derived"):
        header = nifti["header"].copy()
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        file_shape = tuple(nifti["file_shape"])
        if array.size == int(np.prod(file_shape)):
            array = array.reshape(file_shape)
        return _img_like_file(image_class, array, nifti, header)

    img = to_img(array, reference_img(nifti))
    if array.ndim == 4:
        # The fourth axis of a derived image is a cluster axis, not time.
        zooms = img.header.get_zooms()[:3] + (1.0,)
        img.header.set_zooms(zooms)
        img.header.set_xyzt_units(xyz=img.header.get_xyzt_units()[0], t="unknown")
    if is_labels:
        img.header.set_intent("label")
    else:
        img.header.set_intent("none")
    return img


def _img_like_file(image_class, array, nifti, header):
    """Rebuild the image read from a file, with its header and voxel scaling."""
    scaling = nifti.get("scaling")
    file_dtype = header.get_data_dtype()
    if scaling is not None and np.issubdtype(file_dtype, np.integer):
        slope, inter = scaling
        info = np.iinfo(file_dtype)
        raw = np.clip(np.rint((array - inter) / slope), info.min, info.max).astype(file_dtype)
        img = image_class(raw, nifti["affine"], header)
        # Setting the scaling after construction makes nibabel write the raw
        # values with the file's own slope and intercept.
        img.header.set_slope_inter(slope, inter)
        return img
    return image_class(array.astype(file_dtype, copy=False), nifti["affine"], header)


def copy_nifti_metadata(nifti):
    """Deep-copy NIfTI metadata so that two layers never share a header object."""
    copied = copy.copy(nifti)
    copied["header"] = nifti["header"].copy()
    copied["affine"] = np.array(nifti["affine"], dtype=float)
    copied["orientation"] = np.array(nifti["orientation"])
    return copied
