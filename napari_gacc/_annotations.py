"""Annotation, data and mask layers: creation, lookup and conversion (no Qt).

The cluster table (names and colours) lives in ``layer.features`` of every
annotation layer, with one row per label value, and drives each layer's
``DirectLabelColormap``. :func:`apply_cluster_table` keeps all annotation
layers of the viewer in step. See :mod:`napari_gacc._layers` for what the
label values mean.
"""

from dataclasses import dataclass

import numpy as np
from napari.layers import Image, Labels, Layer
from napari.utils.colormaps import DirectLabelColormap

from gacc.exceptions import InvalidInputError
from gacc.nifti import load_clusters

from . import _metadata as md
from ._layers import (
    annotation_dtype,
    annotations_to_cluster_xyzp,
    background_label,
    cluster_table,
    cluster_xyzp_to_annotations,
    layer_to_engine,
    table_clusters,
    table_color_dict,
)
from ._nifti_layers import derived_nifti_metadata, layer_nifti_metadata, reference_img
from ._orientation import to_display_order

ANNOTATION_OPACITY = 0.7


def spatial_placement(layer):
    """Return the scale, translate and axis labels of the last three axes."""
    return {
        "scale": tuple(layer.scale[-3:]),
        "translate": tuple(layer.translate[-3:]),
        "axis_labels": tuple(layer.axis_labels[-3:]),
    }


def derived_metadata(source_layer, role, **info):
    """Return ``metadata`` for a layer computed on the grid of ``source_layer``."""
    nifti = layer_nifti_metadata(
        source_layer.metadata, source_layer.scale, source_layer.translate, source_layer.data.shape
    )
    return {md.NIFTI_KEY: derived_nifti_metadata(nifti), md.GACC_KEY: {"role": role, **info}}


def annotation_layer_data(labels, table, *, name, placement, metadata):
    """Return a Labels layer data tuple for an annotation layer.

    Parameters
    ----------
    labels : ndarray of shape (X, Y, Z), unsigned integer
    table : pandas.DataFrame
        Cluster table from :func:`napari_gacc._layers.cluster_table`.
    name : str
    placement : dict
        Output of :func:`spatial_placement` for the data layer.
    metadata : dict
        Output of :func:`derived_metadata` with role annotation.

    Returns
    -------
    layer_data : tuple of (ndarray, dict, "labels")
    """
    metadata[md.GACC_KEY].setdefault("use", True)
    kwargs = {
        "name": name,
        "features": table,
        "colormap": DirectLabelColormap(color_dict=table_color_dict(table)),
        "opacity": ANNOTATION_OPACITY,
        "metadata": metadata,
        **placement,
    }
    return labels, kwargs, "labels"


def new_annotation_layer(data_layer, table, *, name, labels=None):
    """Create an annotation Labels layer on the spatial grid of a 4D data layer.

    Parameters
    ----------
    data_layer : napari.layers.Image
        Data layer of shape (T, X, Y, Z).
    table : pandas.DataFrame
        Cluster table; its background row fixes the data type.
    name : str
    labels : ndarray of shape (X, Y, Z) or None, default=None
        Initial labels; None starts unpainted.

    Returns
    -------
    layer : napari.layers.Labels
    """
    spatial_shape = tuple(data_layer.data.shape[-3:])
    dtype = annotation_dtype(int((table["cluster"] >= 0).sum()))
    if labels is None:
        labels = np.zeros(spatial_shape, dtype=dtype)
    elif labels.shape != spatial_shape:
        raise InvalidInputError(
            f"labels have shape {labels.shape} but the data layer {data_layer.name!r} has "
            f"spatial shape {spatial_shape}."
        )
    metadata = derived_metadata(data_layer, md.ROLE_ANNOTATION)
    return Layer.create(
        *annotation_layer_data(
            labels, table, name=name, placement=spatial_placement(data_layer), metadata=metadata
        )
    )


def is_data_layer(layer):
    """Return True if ``layer`` can be clustered: an Image layer with four dimensions."""
    return isinstance(layer, Image) and layer.data.ndim == 4 and not layer.rgb


def is_annotation_layer(layer):
    """Return True if ``layer`` is a Labels layer tagged as annotation."""
    return isinstance(layer, Labels) and md.layer_role(layer) == md.ROLE_ANNOTATION


def annotation_layers(layers, spatial_shape=None, *, used_only=False):
    """Return the annotation layers, optionally on one grid and marked for use."""
    found = []
    for layer in layers:
        if not is_annotation_layer(layer):
            continue
        if spatial_shape is not None and tuple(layer.data.shape) != tuple(spatial_shape):
            continue
        if used_only and not md.gacc_info(layer).get("use", True):
            continue
        found.append(layer)
    return found


def current_cluster_table(layers):
    """Return the cluster table of the first annotation layer, or None."""
    for layer in annotation_layers(layers):
        features = layer.features
        if {"index", "cluster", "name", "color"} <= set(features.columns):
            return features.copy()
    return None


def _widen_labels(layer, dtype):
    """Convert ``layer.data`` to a wider integer type, moving the background value."""
    old_background = background_label(layer.data.dtype)
    widened = np.asarray(layer.data).astype(dtype)
    widened[np.asarray(layer.data) == old_background] = background_label(dtype)
    layer.data = widened


def apply_cluster_table(layers, names, colors):
    """Store a cluster table in every annotation layer and recolour them.

    Layers whose data type cannot hold the new number of clusters plus the
    background value are widened (uint8 to uint16), which moves their
    background value from 255 to 65535.

    Returns
    -------
    table : pandas.DataFrame
        The table for uint8 layers (see :func:`napari_gacc._layers.cluster_table`).
    """
    needed = annotation_dtype(len(names))
    for layer in annotation_layers(layers):
        if np.iinfo(layer.data.dtype).max < np.iinfo(needed).max:
            _widen_labels(layer, needed)
        table = cluster_table(names, colors, dtype=layer.data.dtype)
        layer.features = table
        layer.colormap = DirectLabelColormap(color_dict=table_color_dict(table))
    return cluster_table(names, colors, dtype=needed)


@dataclass
class AnnotationSnapshot:
    """Copies of the annotation layers, safe to read in a worker thread.

    Attributes
    ----------
    label_arrays : list of ndarray of shape (X, Y, Z)
    layer_names : list of str
    complete : list of bool
        Per layer, whether a painted voxel is fully annotated.
    cluster_names, cluster_colors : list of str
        The cluster table, in label order.
    """

    label_arrays: list
    layer_names: list
    complete: list
    cluster_names: list
    cluster_colors: list

    def to_cluster_xyzp(self):
        """Return ``cluster_xyzp`` of shape (X, Y, Z, P): 1 inside, 0 outside, NaN unknown."""
        return annotations_to_cluster_xyzp(
            self.label_arrays,
            len(self.cluster_names),
            complete=self.complete,
            names=self.layer_names,
        )


def snapshot_annotations(layers, spatial_shape):
    """Copy the annotation layers on one grid that are marked for training.

    Each layer's ``metadata["gacc"]["complete"]`` (default True) tells
    whether a voxel painted in it is fully annotated (see
    :mod:`napari_gacc._layers`).

    Raises
    ------
    InvalidInputError
        If no such layer exists or the cluster table is empty.
    """
    used = annotation_layers(layers, spatial_shape, used_only=True)
    table = current_cluster_table(layers)
    if not used or table is None:
        raise InvalidInputError(
            "No annotation layer on the data grid is marked for training. Add or "
            "import annotations in the GACC setup widget first."
        )
    clusters = table_clusters(table)
    if not clusters:
        raise InvalidInputError("The cluster table is empty; add at least one cluster.")
    return AnnotationSnapshot(
        label_arrays=[np.array(layer.data) for layer in used],
        layer_names=[layer.name for layer in used],
        complete=[bool(md.gacc_info(layer).get("complete", True)) for layer in used],
        cluster_names=[name for name, _color in clusters],
        cluster_colors=[color for _name, color in clusters],
    )


def collect_ground_truth(layers, spatial_shape):
    """Build ``cluster_xyzp`` and the cluster names from the used annotation layers.

    Returns
    -------
    cluster_xyzp : ndarray of shape (X, Y, Z, P), float32
        1 inside, 0 outside, NaN unknown; P is the length of the cluster table.
    names : list of str
        Cluster names in label order.
    """
    snapshot = snapshot_annotations(layers, spatial_shape)
    return snapshot.to_cluster_xyzp(), snapshot.cluster_names


def known_voxel_counts(cluster_xyzp):
    """Count known voxels per cluster.

    Returns
    -------
    inside, outside : ndarray of shape (P,), int64
        Voxels known to be inside and outside each cluster.
    """
    inside = np.count_nonzero(cluster_xyzp == 1.0, axis=(0, 1, 2))
    outside = np.count_nonzero(cluster_xyzp == 0.0, axis=(0, 1, 2))
    return inside.astype(np.int64), outside.astype(np.int64)


def data_xyzt_of(data_layer):
    """Return the data layer as a float32 engine array of shape (X, Y, Z, T)."""
    return np.ascontiguousarray(layer_to_engine(np.asarray(data_layer.data)), dtype=np.float32)


def mask_xyz_of(mask_layer, spatial_shape):
    """Return a mask layer (Labels or 3D Image) as a bool array: nonzero is inside."""
    mask = np.asarray(mask_layer.data)
    if mask.shape != tuple(spatial_shape):
        raise InvalidInputError(
            f"Mask layer {mask_layer.name!r} has shape {mask.shape} but the data grid "
            f"is {tuple(spatial_shape)}; pick a mask on the data grid."
        )
    mask = np.nan_to_num(mask, nan=0.0) != 0
    if not mask.any():
        raise InvalidInputError(f"Mask layer {mask_layer.name!r} is empty; paint or load a mask.")
    return mask


def load_atlas_annotations(path, nifti, *, threshold=0.5, resample=False, label_offset=0):
    """Read an atlas file as annotation arrays on the grid of a data layer.

    Runs :func:`gacc.nifti.load_clusters` with the data's grid as reference,
    so it can run in a worker thread (it touches no layer).

    Parameters
    ----------
    path : str or Path
        A 4D probabilistic atlas or a 3D label atlas (``.nii`` or ``.nii.gz``).
    nifti : dict
        ``metadata["nifti"]`` of the data layer.
    threshold : float, default=0.5
        Probabilities ``>= threshold`` count as inside a cluster.
    resample : bool, default=False
        Whether an atlas on another grid is resampled onto the data grid.
    label_offset : int, default=0
        Number of clusters already in the table; the atlas clusters follow them.

    Returns
    -------
    label_arrays : list of ndarray of shape (X', Y', Z')
        In the layer's RAS+ voxel order; overlapping clusters in separate arrays.
    names : list of str
        One name per atlas cluster.
    """
    cluster_xyzp, names = load_clusters(
        path, threshold=threshold, reference=reference_img(nifti), resample=resample
    )
    cluster_xyzp = to_display_order(cluster_xyzp, nifti["orientation"])
    label_arrays, _groups = cluster_xyzp_to_annotations(
        cluster_xyzp, threshold=threshold, label_offset=label_offset
    )
    return label_arrays, list(names)
