"""Baseline methods that a user could pick instead of GACC, built on scikit-learn.

Every baseline takes the same inputs as ``gacc.GACC.fit``: ``data_xyzt`` of
shape (X, Y, Z, T), partial clusters ``cluster_xyzp`` of shape
(X, Y, Z, P) with NaN for unknown entries, a voxel ``mask`` and a
``random_state``. It returns membership probabilities of shape (X, Y, Z, C)
as float32, 0 outside the mask.

Semi-supervised baselines (C = P, one output per given cluster):

- ``knn``: k-nearest-neighbour classifier on voxel features plus scaled
  voxel coordinates.
- ``random_forest``: random-forest voxel classifier on features, Gaussian-
  smoothed features and coordinates, as in ilastik's pixel classification.
- ``label_spreading``: ``sklearn.semi_supervised.LabelSpreading`` with a
  k-nearest-neighbour graph, one binary problem per cluster.

Discovery baselines (C = ``n_clusters``, unsupervised, given clusters unused):

- ``kmeans``: k-means on the same features, hard memberships.
- ``gaussian_mixture``: a Gaussian mixture with diagonal covariances, soft
  memberships as posterior probabilities. They sum to 1 over components, so
  at a 0.5 threshold a voxel is in at most one cluster.

Clusters whose known entries are the same voxels share one fitted model
(scikit-learn's k-NN and random forests take several outputs at once), so
splits that hide whole voxels cost one fit, and per-cluster splits one fit
per cluster. Training sets larger than ``max_train_voxels`` are subsampled
uniformly at random to keep each baseline fast on a 2-core CPU.
"""

import logging

import numpy as np
from scipy import ndimage
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KNeighborsClassifier
from sklearn.semi_supervised import LabelSpreading
from sklearn.utils import check_random_state

from gacc.exceptions import InvalidInputError

__all__ = [
    "DISCOVERY_BASELINES",
    "SEMI_SUPERVISED_BASELINES",
    "gaussian_mixture_baseline",
    "kmeans_baseline",
    "knn_baseline",
    "label_spreading_baseline",
    "random_forest_baseline",
    "voxel_features",
]

logger = logging.getLogger(__name__)

# Known entries at or above this value are members, as in gacc.metrics.
MEMBERSHIP_THRESHOLD = 0.5


# ---------------------------------------------------------------------------
# Inputs and features
# ---------------------------------------------------------------------------


def _validate_inputs(data_xyzt, cluster_xyzp, mask):
    """Return float data, float clusters (or None) and a bool voxel mask."""
    data_xyzt = np.asarray(data_xyzt, dtype=np.float64)
    if data_xyzt.ndim != 4:
        raise InvalidInputError(
            f"data_xyzt has shape {data_xyzt.shape} but must be 4D (X, Y, Z, T)."
        )
    spatial_shape = data_xyzt.shape[:3]
    if cluster_xyzp is not None:
        cluster_xyzp = np.asarray(cluster_xyzp, dtype=np.float64)
        if cluster_xyzp.ndim != 4 or cluster_xyzp.shape[:3] != spatial_shape:
            raise InvalidInputError(
                f"cluster_xyzp has shape {cluster_xyzp.shape} but data_xyzt has spatial "
                f"shape {spatial_shape}; pass clusters of shape {spatial_shape} + (P,)."
            )
    if mask is None:
        mask = np.ones(spatial_shape, dtype=bool)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != spatial_shape:
            raise InvalidInputError(
                f"mask has shape {mask.shape} but data_xyzt has spatial shape {spatial_shape}."
            )
    if not mask.any():
        raise InvalidInputError("mask selects no voxel; pass a mask with at least one True.")
    if not np.all(np.isfinite(data_xyzt[mask])):
        raise InvalidInputError("data_xyzt has NaN or infinite values inside the mask.")
    return data_xyzt, cluster_xyzp, mask


def _standardise(matrix):
    """Z-score each column; constant columns become 0."""
    std = matrix.std(axis=0)
    std[std == 0] = 1.0
    return (matrix - matrix.mean(axis=0)) / std


def _unit_block(matrix):
    """Scale a block of columns so that its variances sum to 1."""
    total_variance = matrix.var(axis=0).sum()
    return matrix / np.sqrt(total_variance) if total_variance > 0 else matrix


def _masked_smoothing(data_xyzt, mask, sigma):
    """Gaussian-smooth each feature map inside the mask only (normalised convolution).

    Dividing by the smoothed mask keeps voxels near the mask's edge from being
    pulled towards the zeros outside it.
    """
    weights = ndimage.gaussian_filter(mask.astype(np.float64), sigma, mode="constant")
    weights[weights == 0] = 1.0
    smoothed = np.empty_like(data_xyzt)
    for t in range(data_xyzt.shape[-1]):
        numerator = ndimage.gaussian_filter(data_xyzt[..., t] * mask, sigma, mode="constant")
        smoothed[..., t] = numerator / weights
    return smoothed


def voxel_features(
    data_xyzt,
    mask,
    *,
    coordinate_weight=1.0,
    n_components=None,
    smoothing_sigmas=(),
    random_state=None,
):
    """Build one feature row per mask voxel: data features plus voxel coordinates.

    The data values are standardised per feature (over the mask's voxels),
    optionally extended with Gaussian-smoothed copies and reduced by PCA,
    and scaled so that their variances sum to 1. The voxel indices are
    standardised per axis and scaled so that their variances sum to
    ``coordinate_weight ** 2``. Euclidean distances then weigh the data and
    the position by ``1 : coordinate_weight``, whatever T is.

    Parameters
    ----------
    data_xyzt : ndarray of shape (X, Y, Z, T)
        Voxel features, for example time series or stacked maps.
    mask : ndarray of bool of shape (X, Y, Z)
        Voxels to describe, in C order.
    coordinate_weight : float, default=1.0
        Weight of the position against the data; 0 drops the coordinates.
    n_components : int, default=None
        Number of PCA components kept from the data block; None keeps all.
    smoothing_sigmas : sequence of float, default=()
        Gaussian widths in voxels; each adds a smoothed copy of every feature.
    random_state : int, RandomState instance or None, default=None
        Seed for the randomised PCA solver.

    Returns
    -------
    features : ndarray of shape (n_mask_voxels, n_features)
        Rows in the order of ``np.flatnonzero(mask)``.
    """
    blocks = [data_xyzt[mask]]
    for sigma in smoothing_sigmas:
        blocks.append(_masked_smoothing(data_xyzt, mask, sigma)[mask])
    values = _standardise(np.concatenate(blocks, axis=1))
    if n_components is not None and n_components < values.shape[1]:
        values = PCA(n_components=n_components, random_state=random_state).fit_transform(values)
    features = [_unit_block(values)]
    if coordinate_weight > 0:
        coordinates = _standardise(np.argwhere(mask).astype(np.float64))
        features.append(coordinate_weight * _unit_block(coordinates))
    return np.concatenate(features, axis=1)


def _known_groups(cluster_xyzp, mask):
    """Group clusters whose known entries are the same voxels.

    Returns a list of (cluster indices, known voxel rows) pairs, with rows
    indexing the mask's voxels in C order.
    """
    known = ~np.isnan(cluster_xyzp[mask])  # (n_mask_voxels, P)
    patterns, inverse = np.unique(known.T, axis=0, return_inverse=True)
    inverse = np.ravel(inverse)
    return [
        (np.flatnonzero(inverse == g), np.flatnonzero(patterns[g]))
        for g in range(patterns.shape[0])
    ]


def _subsample(rows, max_rows, rng):
    if rows.size <= max_rows:
        return rows
    return np.sort(rng.choice(rows, size=max_rows, replace=False))


def _positive_probability(estimator_proba, classes):
    """Probability of class 1 from one output's ``predict_proba`` columns."""
    classes = np.asarray(classes)
    if np.any(classes == 1):
        return estimator_proba[:, np.flatnonzero(classes == 1)[0]]
    return np.zeros(estimator_proba.shape[0])


def _to_volume(values, mask):
    """Place per-voxel rows (n_mask_voxels, C) into a float32 (X, Y, Z, C) volume."""
    volume = np.zeros(mask.shape + (values.shape[1],), dtype=np.float32)
    volume[mask] = values
    return volume


def _fit_predict_groups(features, cluster_xyzp, mask, make_estimator, max_train_voxels, rng):
    """Fit one multi-output classifier per group of clusters with the same known voxels.

    Clusters whose known entries hold one class only get that class as a
    constant prediction, since no classifier can be trained on them.
    """
    labels = cluster_xyzp[mask]  # (n_mask_voxels, P), NaN where unknown
    proba = np.zeros(labels.shape)
    for clusters, rows in _known_groups(cluster_xyzp, mask):
        if rows.size == 0:
            logger.warning("Clusters %s have no known entry; predicting 0.", clusters.tolist())
            continue
        rows = _subsample(rows, max_train_voxels, rng)
        targets = (labels[np.ix_(rows, clusters)] >= MEMBERSHIP_THRESHOLD).astype(np.intp)
        varied = targets.min(axis=0) != targets.max(axis=0)
        proba[:, clusters[~varied]] = targets[0, ~varied]
        if not varied.any():
            continue
        estimator = make_estimator()
        fit_targets = targets[:, varied]
        if fit_targets.shape[1] == 1:
            # A 1D target avoids scikit-learn's column-vector warning.
            fit_targets = fit_targets[:, 0]
        estimator.fit(features[rows], fit_targets)
        outputs = estimator.predict_proba(features)
        if not isinstance(outputs, list):  # one output gives an array, several a list
            outputs = [outputs]
        classes = estimator.classes_ if isinstance(estimator.classes_, list) else [estimator.classes_]
        for column, output, output_classes in zip(clusters[varied], outputs, classes):
            proba[:, column] = _positive_probability(output, output_classes)
    return proba


# ---------------------------------------------------------------------------
# Semi-supervised baselines
# ---------------------------------------------------------------------------


def knn_baseline(
    data_xyzt,
    cluster_xyzp,
    *,
    mask=None,
    random_state=None,
    n_neighbors=15,
    coordinate_weight=1.0,
    n_components=10,
    max_train_voxels=20_000,
):
    """Predict memberships with a k-nearest-neighbour classifier per known-voxel group.

    Parameters
    ----------
    data_xyzt : ndarray of shape (X, Y, Z, T)
        Voxel features.
    cluster_xyzp : ndarray of shape (X, Y, Z, P)
        Partial clusters: 1 inside, 0 outside, NaN unknown.
    mask : ndarray of bool of shape (X, Y, Z), default=None
        Voxels to train on and predict; None uses every voxel.
    random_state : int, RandomState instance or None, default=None
        Seed for subsampling and PCA.
    n_neighbors : int, default=15
        Neighbours, weighted by inverse distance.
    coordinate_weight : float, default=1.0
        Weight of the voxel position against the data (see :func:`voxel_features`).
    n_components : int, default=10
        PCA components of the data kept. With 13 dimensions in all, scikit-learn
        searches neighbours with a k-d tree, which is much faster than the
        brute-force search it uses above 15 dimensions.
    max_train_voxels : int, default=20000
        Largest training set per fit; larger ones are subsampled.

    Returns
    -------
    proba : ndarray of shape (X, Y, Z, P)
        Fraction (distance-weighted) of neighbours inside each cluster.
    """
    data_xyzt, cluster_xyzp, mask = _validate_inputs(data_xyzt, cluster_xyzp, mask)
    rng = check_random_state(random_state)
    features = voxel_features(
        data_xyzt, mask, coordinate_weight=coordinate_weight,
        n_components=n_components, random_state=rng,
    )

    def make_estimator():
        return KNeighborsClassifier(n_neighbors=n_neighbors, weights="distance")

    proba = _fit_predict_groups(features, cluster_xyzp, mask, make_estimator, max_train_voxels, rng)
    return _to_volume(proba, mask)


def random_forest_baseline(
    data_xyzt,
    cluster_xyzp,
    *,
    mask=None,
    random_state=None,
    n_estimators=50,
    smoothing_sigmas=(1.0, 2.0),
    max_train_voxels=10_000,
    n_jobs=None,
):
    """Predict memberships with a random-forest voxel classifier.

    As in ilastik's pixel classification workflow, a random forest classifies
    each voxel from its values and filtered copies of them. Here the filters
    are Gaussian smoothing only (ilastik also offers edge and texture
    filters). The voxel coordinates are added so that the forest can use
    position like the other baselines.

    Parameters
    ----------
    data_xyzt : ndarray of shape (X, Y, Z, T)
        Voxel features.
    cluster_xyzp : ndarray of shape (X, Y, Z, P)
        Partial clusters: 1 inside, 0 outside, NaN unknown.
    mask : ndarray of bool of shape (X, Y, Z), default=None
        Voxels to train on and predict; None uses every voxel.
    random_state : int, RandomState instance or None, default=None
        Seed for subsampling and the forest.
    n_estimators : int, default=50
        Number of trees.
    smoothing_sigmas : sequence of float, default=(1.0, 2.0)
        Gaussian widths in voxels of the smoothed feature copies; () uses
        the raw features only.
    max_train_voxels : int, default=10000
        Largest training set per fit; larger ones are subsampled.
    n_jobs : int, default=None
        Parallel jobs of the forest (scikit-learn's convention).

    Returns
    -------
    proba : ndarray of shape (X, Y, Z, P)
        Share of trees voting for membership, per cluster.
    """
    data_xyzt, cluster_xyzp, mask = _validate_inputs(data_xyzt, cluster_xyzp, mask)
    rng = check_random_state(random_state)
    features = voxel_features(data_xyzt, mask, smoothing_sigmas=smoothing_sigmas)
    seed = rng.randint(np.iinfo(np.int32).max)

    def make_estimator():
        return RandomForestClassifier(
            n_estimators=n_estimators, min_samples_leaf=2, n_jobs=n_jobs, random_state=seed
        )

    proba = _fit_predict_groups(features, cluster_xyzp, mask, make_estimator, max_train_voxels, rng)
    return _to_volume(proba, mask)


def label_spreading_baseline(
    data_xyzt,
    cluster_xyzp,
    *,
    mask=None,
    random_state=None,
    n_neighbors=10,
    alpha=0.2,
    coordinate_weight=1.0,
    n_components=10,
    max_labelled_voxels=3000,
    n_unlabelled_voxels=3000,
):
    """Predict memberships by label spreading over a k-nearest-neighbour graph.

    Each cluster is one binary problem (one-vs-rest, because clusters
    overlap). The graph is built on the cluster's known voxels (subsampled to
    ``max_labelled_voxels``) plus ``n_unlabelled_voxels`` voxels drawn from
    the rest of the mask, the same draw for every cluster. Every mask voxel
    then gets the spread label distribution of its nearest graph nodes
    (``LabelSpreading.predict_proba``).

    Parameters
    ----------
    data_xyzt : ndarray of shape (X, Y, Z, T)
        Voxel features.
    cluster_xyzp : ndarray of shape (X, Y, Z, P)
        Partial clusters: 1 inside, 0 outside, NaN unknown.
    mask : ndarray of bool of shape (X, Y, Z), default=None
        Voxels to train on and predict; None uses every voxel.
    random_state : int, RandomState instance or None, default=None
        Seed for subsampling and PCA.
    n_neighbors : int, default=10
        Neighbours in the graph.
    alpha : float, default=0.2
        Share of a node's label taken from its neighbours at each iteration.
    coordinate_weight : float, default=1.0
        Weight of the voxel position against the data.
    n_components : int, default=10
        PCA components of the data kept.
    max_labelled_voxels : int, default=3000
        Largest number of labelled graph nodes per cluster.
    n_unlabelled_voxels : int, default=3000
        Unlabelled graph nodes drawn from the voxels outside the known set.

    Returns
    -------
    proba : ndarray of shape (X, Y, Z, P)
        Spread probability of membership, per cluster.
    """
    data_xyzt, cluster_xyzp, mask = _validate_inputs(data_xyzt, cluster_xyzp, mask)
    rng = check_random_state(random_state)
    features = voxel_features(
        data_xyzt, mask, coordinate_weight=coordinate_weight,
        n_components=n_components, random_state=rng,
    )
    labels = cluster_xyzp[mask]  # (n_mask_voxels, P), NaN where unknown
    n_voxels, n_clusters = labels.shape
    proba = np.zeros(labels.shape)
    draw_order = rng.permutation(n_voxels)

    for p in range(n_clusters):
        known = ~np.isnan(labels[:, p])
        targets = labels[known, p] >= MEMBERSHIP_THRESHOLD
        if targets.size == 0 or targets.all() or not targets.any():
            proba[:, p] = float(targets.all()) if targets.size else 0.0
            continue
        labelled = _subsample(np.flatnonzero(known), max_labelled_voxels, rng)
        unlabelled = draw_order[~known[draw_order]][:n_unlabelled_voxels]
        rows = np.concatenate([labelled, unlabelled])
        y = np.full(rows.size, -1, dtype=np.intp)
        y[: labelled.size] = labels[labelled, p] >= MEMBERSHIP_THRESHOLD
        model = LabelSpreading(kernel="knn", n_neighbors=n_neighbors, alpha=alpha, max_iter=100)
        model.fit(features[rows], y)
        with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 rows are handled below
            spread = _positive_probability(model.predict_proba(features), model.classes_)
        # Voxels whose graph neighbours received no label at all come out
        # as 0 / 0; they get the share of members among the known entries.
        proba[:, p] = np.where(np.isfinite(spread), spread, targets.mean())
    return _to_volume(np.clip(proba, 0.0, 1.0), mask)


# ---------------------------------------------------------------------------
# Discovery baselines
# ---------------------------------------------------------------------------


def kmeans_baseline(
    data_xyzt,
    cluster_xyzp=None,
    *,
    n_clusters,
    mask=None,
    random_state=None,
    coordinate_weight=1.0,
    n_components=10,
):
    """Partition the mask's voxels with k-means on features plus coordinates.

    Parameters
    ----------
    data_xyzt : ndarray of shape (X, Y, Z, T)
        Voxel features.
    cluster_xyzp : ndarray of shape (X, Y, Z, P), default=None
        Accepted for a common signature and checked, but unused: k-means
        takes no labels.
    n_clusters : int
        Number of clusters.
    mask : ndarray of bool of shape (X, Y, Z), default=None
        Voxels to cluster; None uses every voxel.
    random_state : int, RandomState instance or None, default=None
        Seed for PCA and the k-means initialisation.
    coordinate_weight : float, default=1.0
        Weight of the voxel position against the data.
    n_components : int, default=10
        PCA components of the data kept.

    Returns
    -------
    memberships : ndarray of shape (X, Y, Z, n_clusters)
        One-hot memberships (1 for the voxel's cluster, 0 elsewhere).
    """
    data_xyzt, _, mask = _validate_inputs(data_xyzt, cluster_xyzp, mask)
    rng = check_random_state(random_state)
    features = voxel_features(
        data_xyzt, mask, coordinate_weight=coordinate_weight,
        n_components=n_components, random_state=rng,
    )
    model = KMeans(n_clusters=n_clusters, n_init=3, random_state=rng)
    labels = model.fit_predict(features)
    return _to_volume(np.eye(n_clusters)[labels], mask)


def gaussian_mixture_baseline(
    data_xyzt,
    cluster_xyzp=None,
    *,
    n_clusters,
    mask=None,
    random_state=None,
    coordinate_weight=1.0,
    n_components=10,
    max_train_voxels=20_000,
):
    """Cluster the mask's voxels softly with a diagonal Gaussian mixture.

    Parameters
    ----------
    data_xyzt : ndarray of shape (X, Y, Z, T)
        Voxel features.
    cluster_xyzp : ndarray of shape (X, Y, Z, P), default=None
        Accepted for a common signature and checked, but unused.
    n_clusters : int
        Number of mixture components.
    mask : ndarray of bool of shape (X, Y, Z), default=None
        Voxels to cluster; None uses every voxel.
    random_state : int, RandomState instance or None, default=None
        Seed for PCA, subsampling and the initialisation.
    coordinate_weight : float, default=1.0
        Weight of the voxel position against the data.
    n_components : int, default=10
        PCA components of the data kept.
    max_train_voxels : int, default=20000
        The mixture is fitted on at most this many voxels drawn at random,
        then evaluated on every voxel.

    Returns
    -------
    proba : ndarray of shape (X, Y, Z, n_clusters)
        Posterior probability of each component.
    """
    data_xyzt, _, mask = _validate_inputs(data_xyzt, cluster_xyzp, mask)
    rng = check_random_state(random_state)
    features = voxel_features(
        data_xyzt, mask, coordinate_weight=coordinate_weight,
        n_components=n_components, random_state=rng,
    )
    rows = _subsample(np.arange(features.shape[0]), max_train_voxels, rng)
    model = GaussianMixture(
        n_components=n_clusters, covariance_type="diag", reg_covar=1e-4,
        n_init=1, random_state=rng,
    )
    model.fit(features[rows])
    return _to_volume(model.predict_proba(features), mask)


SEMI_SUPERVISED_BASELINES = {
    "knn": knn_baseline,
    "random_forest": random_forest_baseline,
    "label_spreading": label_spreading_baseline,
}
"""Baselines trained on the partial clusters, by name; each returns P columns."""

DISCOVERY_BASELINES = {
    "kmeans": kmeans_baseline,
    "gaussian_mixture": gaussian_mixture_baseline,
}
"""Unsupervised baselines by name; each takes ``n_clusters`` and returns that many columns."""
