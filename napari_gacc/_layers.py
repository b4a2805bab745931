"""Conversions between engine arrays and napari layer arrays (no Qt, no viewer).

Axis order
----------
The engine takes ``data_xyzt`` of shape (X, Y, Z, T), ``cluster_xyzp`` of
shape (X, Y, Z, P) and returns memberships of shape (X, Y, Z, K). Layers put
the non-spatial axis first, (T, X, Y, Z), (P, X, Y, Z), (K, X, Y, Z), so that
napari shows it as a slider. Both use the same spatial voxel order (the
RAS+ order the reader produces).

Annotation convention
---------------------
An annotation layer is a 3D Labels layer on the data grid. In it,

* 0 (unpainted) means *unknown*;
* a value k in 1..P means *inside cluster k* (cluster index k - 1);
* the maximum value of the layer's integer data type (255 for the uint8
  layers the plugin creates, 65535 for uint16 layers made for 255 or more
  clusters) means *inside none of the clusters*; the cluster table shows it
  as "background".

A voxel painted in any annotation layer is *fully annotated* by default: it
is inside the clusters painted there in any layer and outside every other
cluster of the table. Overlap is expressed with several layers: a voxel
painted 2 in one layer and 5 in another is inside clusters 2 and 5. With
``complete=False`` a painted cluster only says "inside" and only the
background value says "outside".
"""

import colorsys

import numpy as np
import pandas as pd

from gacc.exceptions import InvalidInputError

BACKGROUND_NAME = "background"
# Grey at 35 % alpha, so the anatomy stays visible under painted background.
BACKGROUND_COLOR = "#80808059"


def engine_to_layer(array):
    """Move the last axis first: (X, Y, Z, N) to (N, X, Y, Z)."""
    return np.moveaxis(np.asarray(array), -1, 0)


def layer_to_engine(array):
    """Move the first axis last: (N, X, Y, Z) to (X, Y, Z, N)."""
    return np.moveaxis(np.asarray(array), 0, -1)


def annotation_dtype(n_clusters):
    """Return the smallest unsigned integer type that leaves one value for background."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_clusters < np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise InvalidInputError(f"n_clusters={n_clusters} is too large for an annotation layer.")


def background_label(dtype):
    """Return the reserved "inside none of the clusters" value for a layer data type."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise InvalidInputError(
            f"Annotation layers need integer data, got dtype {dtype}. "
            "Create the layer with the setup widget or convert it to uint8."
        )
    return int(np.iinfo(dtype).max)


def annotations_to_cluster_xyzp(label_arrays, n_clusters, *, complete=True, names=None):
    """Combine annotation layer arrays into the engine's partial ground truth.

    Parameters
    ----------
    label_arrays : sequence of ndarray of shape (X, Y, Z)
        Integer arrays of the annotation layers, following the convention
        of this module; each array's background value comes from its dtype.
    n_clusters : int
        P, the number of clusters in the cluster table.
    complete : bool or sequence of bool, default=True
        Whether a voxel painted in a layer is outside every cluster not
        painted at it in any layer; one value for all layers or one per layer.
    names : sequence of str or None, default=None
        Layer names, used in error messages.

    Returns
    -------
    cluster_xyzp : ndarray of shape (X, Y, Z, P), dtype float32
        1 inside, 0 outside, NaN unknown.

    Raises
    ------
    InvalidInputError
        If the arrays differ in shape, or hold a value above P that is not
        the background value.
    """
    label_arrays = [np.asarray(array) for array in label_arrays]
    if not label_arrays:
        raise InvalidInputError("No annotation layer given; add or import one first.")
    names = list(names) if names is not None else [f"#{i}" for i in range(len(label_arrays))]
    if isinstance(complete, (bool, np.bool_)):
        complete = [bool(complete)] * len(label_arrays)
    shape = label_arrays[0].shape
    if len(shape) != 3:
        raise InvalidInputError(
            f"Annotation layer {names[0]!r} has shape {shape}; annotations are 3D volumes."
        )
    n_voxels = int(np.prod(shape))
    inside = np.zeros((n_voxels, n_clusters), dtype=bool)
    # Voxels whose every cluster entry is known: outside unless painted inside.
    fully_known = np.zeros(n_voxels, dtype=bool)

    for array, name, layer_complete in zip(label_arrays, names, complete):
        if array.shape != shape:
            raise InvalidInputError(
                f"Annotation layer {name!r} has shape {array.shape} but {names[0]!r} has "
                f"shape {shape}; all annotation layers must lie on the data grid."
            )
        values = array.reshape(-1)
        reserved = background_label(array.dtype)
        is_background = values == reserved
        is_cluster = (values > 0) & ~is_background
        too_large = is_cluster & (values > n_clusters)
        if np.any(too_large):
            bad_value = int(values[too_large].max())
            raise InvalidInputError(
                f"Annotation layer {name!r} contains label {bad_value} but the cluster table "
                f"has {n_clusters} clusters (labels 1..{n_clusters}, {reserved} for "
                "background). Add clusters to the table or erase that label."
            )
        voxel_index = np.flatnonzero(is_cluster)
        inside[voxel_index, values[voxel_index].astype(np.int64) - 1] = True
        fully_known |= (is_cluster | is_background) if layer_complete else is_background

    cluster_vp = np.full((n_voxels, n_clusters), np.nan, dtype=np.float32)
    cluster_vp[fully_known] = 0.0
    cluster_vp[inside] = 1.0
    return cluster_vp.reshape(shape + (n_clusters,))


def overlap_counts(binary_xyzk):
    """Count the voxels shared by each pair of clusters.

    Parameters
    ----------
    binary_xyzk : ndarray of shape (X, Y, Z, K), bool

    Returns
    -------
    counts : ndarray of shape (K, K), int64
        ``counts[i, j]`` voxels lie in both clusters i and j. The diagonal
        contains the cluster sizes.
    """
    binary_vk = np.asarray(binary_xyzk, dtype=bool).reshape(-1, binary_xyzk.shape[-1])
    # float64 sums of 0/1 are exact up to 2**53 voxels.
    as_float = binary_vk.astype(np.float64)
    return np.rint(as_float.T @ as_float).astype(np.int64)


def group_non_overlapping(overlap):
    """Split clusters into groups whose members never share a voxel.

    Greedy graph colouring of the overlap graph, largest degree first
    (Welsh-Powell order), so each group can be drawn in one Labels layer.

    Parameters
    ----------
    overlap : ndarray of shape (K, K)
        Nonzero off-diagonal entries mark clusters that overlap.

    Returns
    -------
    groups : list of list of int
        0-based cluster indices, each group sorted; every cluster appears
        in exactly one group.
    """
    overlap = np.asarray(overlap)
    n_clusters = overlap.shape[0]
    adjacent = overlap != 0
    np.fill_diagonal(adjacent, False)
    degree = adjacent.sum(axis=1)
    order = sorted(range(n_clusters), key=lambda k: (-degree[k], k))
    colour = np.full(n_clusters, -1)
    for k in order:
        used = set(colour[adjacent[k]].tolist())
        next_colour = 0
        while next_colour in used:
            next_colour += 1
        colour[k] = next_colour
    n_groups = int(colour.max()) + 1 if n_clusters else 0
    return [sorted(np.flatnonzero(colour == c).tolist()) for c in range(n_groups)]


def binary_to_label_arrays(binary_xyzk, groups, *, dtype=None, background=None, label_offset=0):
    """Draw binary clusters into one label array per group.

    Parameters
    ----------
    binary_xyzk : ndarray of shape (X, Y, Z, K), bool
    groups : list of list of int
        Groups of non-overlapping clusters, from :func:`group_non_overlapping`.
    dtype : numpy dtype or None, default=None
        Label data type; None picks :func:`annotation_dtype` for
        K + ``label_offset`` labels.
    background : ndarray of shape (X, Y, Z), bool, or None, default=None
        Voxels to mark with the background value in the first array.
    label_offset : int, default=0
        Added to every cluster label, to append clusters after those of an
        existing cluster table.

    Returns
    -------
    label_arrays : list of ndarray of shape (X, Y, Z)
        Cluster k (0-based) is drawn with value k + 1 + ``label_offset``.
    """
    binary_xyzk = np.asarray(binary_xyzk, dtype=bool)
    if dtype is None:
        dtype = annotation_dtype(binary_xyzk.shape[-1] + label_offset)
    dtype = np.dtype(dtype)
    label_arrays = []
    for group in groups:
        labels = np.zeros(binary_xyzk.shape[:3], dtype=dtype)
        for k in group:
            labels[binary_xyzk[..., k]] = k + 1 + label_offset
        label_arrays.append(labels)
    if background is not None:
        if not label_arrays:
            label_arrays.append(np.zeros(binary_xyzk.shape[:3], dtype=dtype))
        label_arrays[0][np.asarray(background, dtype=bool)] = background_label(dtype)
    return label_arrays


def cluster_xyzp_to_annotations(cluster_xyzp, *, threshold=0.5, label_offset=0):
    """Convert engine ground truth to annotation layer arrays.

    The inverse of :func:`annotations_to_cluster_xyzp` with ``complete=True``
    for voxels that are either fully known or fully unknown.

    Parameters
    ----------
    cluster_xyzp : ndarray of shape (X, Y, Z, P)
        1 inside, 0 outside, NaN unknown; probabilities are thresholded.
    threshold : float, default=0.5
        Values ``>= threshold`` count as inside.
    label_offset : int, default=0
        Cluster p gets label p + 1 + ``label_offset``.

    Returns
    -------
    label_arrays : list of ndarray of shape (X, Y, Z)
        Annotation arrays whose clusters never overlap within one array.
    groups : list of list of int
        0-based cluster indices drawn in each array.
    """
    # NOTE: a voxel known for only some clusters cannot be expressed in the
    # fully annotated convention. Its "inside" entries are kept, and later
    # read back as outside every other cluster; its "outside" entries are
    # dropped unless the voxel is outside all clusters.
    cluster_xyzp = np.asarray(cluster_xyzp, dtype=np.float32)
    known = np.isfinite(cluster_xyzp)
    binary = known & (np.nan_to_num(cluster_xyzp, nan=0.0) >= threshold)
    background = known.all(axis=-1) & ~binary.any(axis=-1)
    groups = group_non_overlapping(overlap_counts(binary))
    if not groups:
        groups = [[]]
    label_arrays = binary_to_label_arrays(
        binary, groups, background=background, label_offset=label_offset
    )
    return label_arrays, groups


def default_cluster_colors(n_clusters):
    """Return ``n_clusters`` distinct, reproducible colours as hex strings.

    Hues follow the golden-ratio sequence so that neighbouring indices get
    very different hues; brightness alternates to separate close hues.
    """
    colors = []
    for k in range(n_clusters):
        hue = (0.11 + 0.618033988749895 * k) % 1.0
        value = 0.95 if k % 2 == 0 else 0.75
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.8, value)
        colors.append(f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}")
    return colors


def cluster_table(names, colors=None, *, dtype=np.uint8):
    """Build the cluster table stored in ``layer.features`` of annotation layers.

    Parameters
    ----------
    names : sequence of str
        Cluster names, in label order (cluster k has label k + 1).
    colors : sequence of str or None, default=None
        Hex colours; None uses :func:`default_cluster_colors`.
    dtype : numpy dtype, default=np.uint8
        Layer data type, which fixes the background value.

    Returns
    -------
    table : pandas.DataFrame
        Columns ``index`` (label value, as napari's Labels layer expects),
        ``cluster`` (0-based cluster index, -1 for background), ``name`` and
        ``color``; row 0 is unpainted, the last row is background.
    """
    names = list(names)
    colors = list(colors) if colors is not None else default_cluster_colors(len(names))
    if len(colors) != len(names):
        raise InvalidInputError(
            f"Got {len(names)} cluster names but {len(colors)} colours; give one colour each."
        )
    reserved = background_label(dtype)
    return pd.DataFrame(
        {
            "index": [0] + list(range(1, len(names) + 1)) + [reserved],
            "cluster": [-1] + list(range(len(names))) + [-1],
            "name": ["unknown"] + names + [BACKGROUND_NAME],
            "color": ["#00000000"] + colors + [BACKGROUND_COLOR],
        }
    )


def table_clusters(table):
    """Return the (name, colour) pairs of the clusters in a cluster table, in label order."""
    rows = table[table["cluster"] >= 0].sort_values("cluster")
    return list(zip(rows["name"].astype(str), rows["color"].astype(str)))


def table_color_dict(table):
    """Map label values to colours for napari's ``DirectLabelColormap``."""
    color_dict = {None: "#ffffff", 0: "transparent"}
    for value, color in zip(table["index"], table["color"]):
        if int(value) != 0:
            color_dict[int(value)] = color
    return color_dict
