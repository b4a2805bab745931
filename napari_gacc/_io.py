"""NIfTI reader and writers contributed to napari (``.nii`` and ``.nii.gz``)."""

import logging
from pathlib import Path

import nibabel as nib

from gacc._atomic import atomic_path

from . import _metadata as md
from ._nifti_layers import (
    img_to_layer_data,
    is_nifti_path,
    layer_data_to_img,
    layer_nifti_metadata,
    strip_nifti_suffix,
)

logger = logging.getLogger(__name__)


def napari_get_reader(path):
    """Return :func:`read_nifti` if every path in ``path`` is a NIfTI file, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if paths and all(is_nifti_path(p) for p in paths):
        return read_nifti
    return None


def read_nifti(path):
    """Read one or several NIfTI files as napari layer data.

    A 4D file opens as an Image layer with the volume axis first (the
    slider); a ``*_probseg`` file opens as a probability layer with the
    cluster axis first; a ``*_dseg`` or ``*_mask`` file, or an integer file
    with the NIfTI label intent, opens as a Labels layer; any other 3D file
    opens as an Image layer. The original affine and header are kept in
    ``layer.metadata["nifti"]``.

    Parameters
    ----------
    path : str or Path or list of them

    Returns
    -------
    layer_data : list of tuple
        One ``(data, kwargs, layer_type)`` per file.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layer_data = []
    for one_path in paths:
        img = nib.load(str(one_path))
        name = strip_nifti_suffix(one_path)
        data, kwargs, layer_type = img_to_layer_data(img, name=name)
        kwargs["metadata"][md.NIFTI_KEY]["source"] = str(one_path)
        layer_data.append((data, kwargs, layer_type))
        logger.info("Read %s with shape %s as a %s layer.", one_path, img.shape, layer_type)
    return layer_data


def _write_layer(path, data, meta, *, is_labels):
    path = Path(path)
    if not is_nifti_path(path):
        path = path.with_name(path.name + ".nii.gz")
    nifti = layer_nifti_metadata(
        meta.get("metadata"), meta.get("scale"), meta.get("translate"), data.shape
    )
    img = layer_data_to_img(data, nifti, is_labels=is_labels)
    with atomic_path(path) as tmp_path:
        nib.save(img, str(tmp_path))
    logger.info("Wrote %s with shape %s.", path, img.shape)
    return [str(path)]


def write_image(path, data, meta):
    """Write an Image layer (data or cluster probabilities) as NIfTI.

    The file gets the affine, header and voxel order of the NIfTI file the
    layer came from or was derived from; a layer from elsewhere gets a
    diagonal affine built from its scale and translate.

    Returns
    -------
    paths : list of str
        The path written (``.nii.gz`` is appended when the name has no
        NIfTI extension).
    """
    return _write_layer(path, data, meta, is_labels=False)


def write_labels(path, data, meta):
    """Write a Labels layer (annotations, predicted clusters, masks) as NIfTI.

    See :func:`write_image`; derived label images also get the NIfTI intent
    code ``NIFTI_INTENT_LABEL``.
    """
    return _write_layer(path, data, meta, is_labels=True)
