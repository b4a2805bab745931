"""Prediction layers: thresholding, overlap-free grouping, statistics (no Qt).

A prediction is shown as

* one Image layer of shape (K, X, Y, Z) with the membership probabilities,
  the cluster axis first so that napari shows it as a slider; and
* binary Labels layers, each holding several clusters that never overlap
  (value = cluster index + 1), found by greedy colouring of the overlap graph.

The probability layer's ``metadata["gacc"]`` stores the fitted model, the
cluster names and colours, the threshold, the foreground mask and the name
of the data layer, so the results widget can redo every step from the layers.
Thresholding again updates the Labels layers in place and removes layers a
smaller grouping no longer needs.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap

from gacc.metrics import dice_score

from . import _metadata as md
from ._annotations import derived_metadata, spatial_placement
from ._layers import (
    binary_to_label_arrays,
    cluster_xyzp_to_annotations,
    default_cluster_colors,
    group_non_overlapping,
    overlap_counts,
)
from ._nifti_layers import copy_nifti_metadata

DISCOVERED_PREFIX = "discovered"


def cluster_names_and_colors(known_names, known_colors, n_clusters):
    """Name and colour all K clusters: the P given ones, then the discovered ones."""
    names = list(known_names)[:n_clusters]
    colors = list(known_colors)[:n_clusters]
    defaults = default_cluster_colors(n_clusters)
    for k in range(len(names), n_clusters):
        names.append(f"{DISCOVERED_PREFIX} {k + 1}")
        colors.append(defaults[k])
    return names, colors


@dataclass
class ThresholdedPrediction:
    """Binary clusters at one threshold, grouped for display, with statistics.

    Attributes
    ----------
    threshold : float
    groups : list of list of int
        0-based cluster indices drawn in each Labels layer.
    label_arrays : list of ndarray of shape (X, Y, Z)
        One per group; cluster k has value k + 1.
    statistics : pandas.DataFrame
        One row per cluster, see :func:`cluster_statistics`.
    """

    threshold: float
    groups: list
    label_arrays: list
    statistics: pd.DataFrame


def cluster_statistics(binary_xyzk, voxel_volume_mm3, names, *, proba_xyzk=None,
                       cluster_xyzp=None, threshold=0.5):
    """Compute size, overlap and agreement with the annotations of every cluster.

    Parameters
    ----------
    binary_xyzk : ndarray of shape (X, Y, Z, K), bool
    voxel_volume_mm3 : float
    names : sequence of str
        K cluster names.
    proba_xyzk : ndarray of shape (X, Y, Z, K) or None, default=None
        Probabilities, needed for Dice.
    cluster_xyzp : ndarray of shape (X, Y, Z, P) or None, default=None
        Annotations (1 inside, 0 outside, NaN unknown) of the first P clusters.
    threshold : float, default=0.5

    Returns
    -------
    statistics : pandas.DataFrame
        Columns ``cluster`` (0-based), ``name``, ``voxels``, ``volume_mm3``,
        ``overlapping_clusters`` (how many other clusters share a voxel),
        ``overlap_voxels`` (voxels also in another cluster), ``overlaps_with``
        (1-based labels of those clusters) and ``dice`` (agreement with the
        annotations on their known voxels, NaN for discovered clusters and
        clusters without annotated voxels).
    """
    n_clusters = binary_xyzk.shape[-1]
    counts = overlap_counts(binary_xyzk)
    sizes = np.diag(counts).copy()
    shared = counts.copy()
    np.fill_diagonal(shared, 0)
    membership_count = binary_xyzk.reshape(-1, n_clusters).sum(axis=1)
    overlap_voxels = [
        int(np.count_nonzero(binary_xyzk.reshape(-1, n_clusters)[:, k] & (membership_count > 1)))
        for k in range(n_clusters)
    ]
    dice = np.full(n_clusters, np.nan)
    if cluster_xyzp is not None and proba_xyzk is not None and cluster_xyzp.shape[-1]:
        n_known = min(cluster_xyzp.shape[-1], n_clusters)
        dice[:n_known] = dice_score(
            cluster_xyzp[..., :n_known], proba_xyzk[..., :n_known], threshold=threshold
        )
    return pd.DataFrame(
        {
            "cluster": np.arange(n_clusters),
            "name": list(names),
            "voxels": sizes.astype(np.int64),
            "volume_mm3": sizes * float(voxel_volume_mm3),
            "overlapping_clusters": (shared > 0).sum(axis=1),
            "overlap_voxels": overlap_voxels,
            "overlaps_with": [
                ", ".join(str(j + 1) for j in np.flatnonzero(shared[k])) for k in range(n_clusters)
            ],
            "dice": dice,
        }
    )


def threshold_prediction(proba_kxyz, threshold, names, voxel_volume_mm3, *, cluster_xyzp=None):
    """Threshold probabilities, group overlapping clusters and compute statistics.

    Safe to run in a worker thread: it reads arrays only.

    Parameters
    ----------
    proba_kxyz : ndarray of shape (K, X, Y, Z)
    threshold : float
        Probabilities ``>= threshold`` count as inside.
    names : sequence of str
    voxel_volume_mm3 : float
    cluster_xyzp : ndarray of shape (X, Y, Z, P) or None, default=None
        Current annotations, for the Dice column.

    Returns
    -------
    result : ThresholdedPrediction
    """
    proba_xyzk = np.moveaxis(np.asarray(proba_kxyz), 0, -1)
    binary_xyzk = proba_xyzk >= threshold
    groups = group_non_overlapping(overlap_counts(binary_xyzk)) or [[]]
    label_arrays = binary_to_label_arrays(binary_xyzk, groups)
    statistics = cluster_statistics(
        binary_xyzk,
        voxel_volume_mm3,
        names,
        proba_xyzk=proba_xyzk,
        cluster_xyzp=cluster_xyzp,
        threshold=threshold,
    )
    return ThresholdedPrediction(threshold, groups, label_arrays, statistics)


def probability_layer_name(data_layer_name):
    """Return the name of the probability layer of a data layer."""
    return f"{data_layer_name} cluster probabilities"


def find_probability_layer(layers, data_layer_name):
    """Return the probability layer made for ``data_layer_name``, or None."""
    for layer in layers:
        info = layer.metadata.get(md.GACC_KEY, {})
        if (
            isinstance(layer, Image)
            and info.get("role") == md.ROLE_PROBABILITIES
            and info.get("data_layer") == data_layer_name
        ):
            return layer
    return None


def prediction_label_layers(layers, probability_layer):
    """Return the Labels layers drawn from ``probability_layer``, in group order."""
    source = md.gacc_info(probability_layer).get("data_layer")
    found = [
        layer
        for layer in layers
        if isinstance(layer, Labels)
        and md.layer_role(layer) == md.ROLE_PREDICTION
        and layer.metadata[md.GACC_KEY].get("data_layer") == source
    ]
    return sorted(found, key=lambda layer: layer.metadata[md.GACC_KEY].get("group", 0))


def show_probabilities(viewer, data_layer, proba_kxyz, *, model, names, colors, mask):
    """Add or update the probability layer of ``data_layer``.

    Returns
    -------
    layer : napari.layers.Image
        The probability layer, reused when one exists for this data layer.
    """
    info = {
        "data_layer": data_layer.name,
        "model": model,
        "names": list(names),
        "colors": list(colors),
        "mask": mask,
    }
    layer = find_probability_layer(viewer.layers, data_layer.name)
    if layer is not None and layer.data.shape == proba_kxyz.shape:
        layer.data = proba_kxyz
        md.gacc_info(layer).update(info)
        return layer
    if layer is not None:
        viewer.layers.remove(layer)
    metadata = derived_metadata(data_layer, md.ROLE_PROBABILITIES, threshold=0.5, **info)
    placement = spatial_placement(data_layer)
    layer = viewer.add_image(
        proba_kxyz,
        name=probability_layer_name(data_layer.name),
        scale=(1.0,) + placement["scale"],
        translate=(0.0,) + placement["translate"],
        axis_labels=("cluster",) + placement["axis_labels"],
        colormap="inferno",
        contrast_limits=(0.0, 1.0),
        blending="additive",
        visible=False,
        metadata=metadata,
    )
    return layer


def show_thresholded(viewer, probability_layer, result):
    """Draw ``result`` into the prediction Labels layers, reusing them in place.

    Layers beyond the number of groups are removed; missing ones are added
    on the grid of the probability layer.

    Returns
    -------
    layers : list of napari.layers.Labels
    """
    info = md.gacc_info(probability_layer)
    info["threshold"] = float(result.threshold)
    names, colors = info["names"], info["colors"]
    existing = prediction_label_layers(viewer.layers, probability_layer)
    for layer in existing[len(result.label_arrays):]:
        viewer.layers.remove(layer)

    color_dict = {None: "#ffffff", 0: "transparent"}
    color_dict.update({k + 1: color for k, color in enumerate(colors)})
    colormap = DirectLabelColormap(color_dict=color_dict)
    layers = []
    for group_index, (group, labels) in enumerate(zip(result.groups, result.label_arrays)):
        features = _group_features(result.statistics, group)
        group_info = {
            "group": group_index,
            "clusters": list(group),
            "data_layer": info["data_layer"],
        }
        if group_index < len(existing):
            layer = existing[group_index]
            layer.data = labels
            layer.features = features
            layer.colormap = colormap
            md.gacc_info(layer).update(group_info)
        else:
            metadata = {
                md.NIFTI_KEY: copy_nifti_metadata(probability_layer.metadata[md.NIFTI_KEY]),
                md.GACC_KEY: {"role": md.ROLE_PREDICTION, **group_info},
            }
            layer = viewer.add_labels(
                labels,
                name=f"{info['data_layer']} clusters {group_index + 1}",
                scale=tuple(probability_layer.scale[-3:]),
                translate=tuple(probability_layer.translate[-3:]),
                axis_labels=tuple(probability_layer.axis_labels[-3:]),
                features=features,
                colormap=colormap,
                opacity=0.6,
                metadata=metadata,
            )
        layers.append(layer)
    return layers


def _group_features(statistics, group):
    """Return the statistics rows of one group, indexed by label value for napari."""
    rows = statistics[statistics["cluster"].isin(group)].copy()
    rows.insert(0, "index", rows["cluster"] + 1)
    return rows.reset_index(drop=True)


def prediction_as_annotations(proba_kxyz, threshold, mask, clusters, *, cluster_xyzp=None):
    """Build annotation arrays from a prediction, keeping every annotated entry.

    Parameters
    ----------
    proba_kxyz : ndarray of shape (K, X, Y, Z)
    threshold : float
    mask : ndarray of shape (X, Y, Z), bool, or None
        Voxels to annotate; None annotates voxels with any nonzero probability.
    clusters : sequence of int
        0-based clusters to copy, in their new label order: the first P must
        be 0..P-1 (the annotated clusters), discovered ones may follow.
    cluster_xyzp : ndarray of shape (X, Y, Z, P) or None, default=None
        Current annotations. Their known entries override the prediction,
        so corrections already painted are never lost.

    Returns
    -------
    label_arrays : list of ndarray of shape (X, Y, Z)
        Fully annotated arrays: inside the clusters above the threshold,
        background in masked voxels inside none of them, unpainted outside
        the mask.
    """
    proba_xyzk = np.moveaxis(np.asarray(proba_kxyz), 0, -1)
    if mask is None:
        mask = proba_xyzk.max(axis=-1) > 0
    merged = (proba_xyzk[..., list(clusters)] >= threshold).astype(np.float32)
    if cluster_xyzp is not None:
        n_known = min(cluster_xyzp.shape[-1], merged.shape[-1])
        known = np.isfinite(cluster_xyzp[..., :n_known])
        merged[..., :n_known][known] = cluster_xyzp[..., :n_known][known]
    merged[~np.asarray(mask, dtype=bool)] = np.nan
    label_arrays, _groups = cluster_xyzp_to_annotations(merged)
    return label_arrays
