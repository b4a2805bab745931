"""Scores for predicted cluster memberships against reference clusters.

Every function takes a reference and a prediction as 4D arrays of shape
(X, Y, Z, C) (the engine's ``cluster_xyzp`` layout) or as 2D arrays of shape
(n_voxels, C), and an optional ``mask`` that selects the entries to score:

- a voxel mask of shape (X, Y, Z) (or (n_voxels,)) scores the same voxels for
  every cluster, for example a brain mask;
- an entry mask of the reference's full shape scores each (voxel, cluster)
  entry on its own, for example the entries hidden from training.

Reference entries that are NaN (unknown) are never scored. Memberships are
binarised as ``value >= threshold`` for the overlap scores (Dice, IoU,
overlapping NMI, Omega index); ROC AUC ranks the raw probabilities.
"""

import logging

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import roc_auc_score

from gacc.exceptions import InvalidInputError

__all__ = [
    "dice_score",
    "evaluate_clusters",
    "iou_score",
    "match_clusters",
    "omega_index",
    "overlapping_nmi",
    "roc_auc",
]

logger = logging.getLogger(__name__)

# Pairs of membership patterns handled per block by ``omega_index``; bounds the
# temporary (block, n_patterns) matrices to about 32 MB of float64.
_OMEGA_BLOCK_ELEMENTS = 4_000_000


# ---------------------------------------------------------------------------
# Input validation (public functions call these once; kernels trust them)
# ---------------------------------------------------------------------------


def _as_voxel_matrix(array, name):
    """Return ``array`` as a float64 matrix of shape (n_voxels, C) and its leading shape."""
    array = np.asarray(array)
    if array.ndim not in (2, 4):
        raise InvalidInputError(
            f"{name} has shape {array.shape} but must be 4D (X, Y, Z, C) or "
            "2D (n_voxels, C). Add a trailing cluster axis for a single cluster, "
            "for example array[..., np.newaxis]."
        )
    if array.dtype == bool:
        array = array.astype(np.float64)
    elif not np.issubdtype(array.dtype, np.number):
        raise InvalidInputError(
            f"{name} has dtype {array.dtype} but must be numeric or boolean."
        )
    leading_shape = array.shape[:-1]
    matrix = np.asarray(array, dtype=np.float64).reshape(-1, array.shape[-1])
    return matrix, leading_shape


def _validate_threshold(threshold):
    if not (np.isscalar(threshold) and np.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise InvalidInputError(
            f"threshold={threshold!r} is invalid: use a number in (0, 1], such as 0.5."
        )
    return float(threshold)


def _validate_prediction(pred, reference_shape, name, *, same_columns):
    """Check that ``pred`` is finite and lines up with the reference voxels."""
    matrix, leading_shape = pred
    if leading_shape != reference_shape[0]:
        raise InvalidInputError(
            f"{name} has voxel shape {leading_shape} but the reference has "
            f"{reference_shape[0]}; both must cover the same voxels in the same order."
        )
    if same_columns and matrix.shape[1] != reference_shape[1]:
        raise InvalidInputError(
            f"{name} has {matrix.shape[1]} clusters but the reference has "
            f"{reference_shape[1]}; pass matching columns, or use match_clusters "
            "or evaluate_clusters(..., match=True) for discovered clusters."
        )
    n_bad = int(np.count_nonzero(~np.isfinite(matrix)))
    if n_bad:
        raise InvalidInputError(
            f"{name} contains {n_bad} NaN or infinite values; predictions must be "
            "finite. A model whose training diverged cannot be scored."
        )
    return matrix


def _as_bool_mask(mask, name):
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if not np.issubdtype(mask.dtype, np.number):
        raise InvalidInputError(f"{name} has dtype {mask.dtype} but must be boolean.")
    values = np.unique(mask)
    if not np.all(np.isin(values, (0, 1))):
        raise InvalidInputError(
            f"{name} must be boolean or contain only 0 and 1, but it contains "
            f"{values[:5].tolist()}."
        )
    return mask.astype(bool)


def _entry_mask(mask, leading_shape, n_columns):
    """Return the scored entries as a bool matrix of shape (n_voxels, n_columns).

    ``mask`` is None (score everything), a voxel mask shaped like the leading
    axes, or an entry mask shaped like the whole reference.
    """
    n_voxels = int(np.prod(leading_shape))
    if mask is None:
        return np.ones((n_voxels, n_columns), dtype=bool)
    mask = _as_bool_mask(mask, "mask")
    if mask.shape == tuple(leading_shape):
        return np.repeat(mask.reshape(n_voxels, 1), n_columns, axis=1)
    if mask.shape == tuple(leading_shape) + (n_columns,):
        return mask.reshape(n_voxels, n_columns)
    raise InvalidInputError(
        f"mask has shape {mask.shape} but must be a voxel mask of shape "
        f"{tuple(leading_shape)} or an entry mask of shape "
        f"{tuple(leading_shape) + (n_columns,)}."
    )


def _voxel_mask(mask, leading_shape):
    """Return the scored voxels as a bool vector; an entry mask keeps voxels scored in every column."""
    n_voxels = int(np.prod(leading_shape))
    if mask is None:
        return np.ones(n_voxels, dtype=bool)
    mask = _as_bool_mask(mask, "mask")
    if mask.shape == tuple(leading_shape):
        return mask.reshape(n_voxels)
    if mask.ndim == len(leading_shape) + 1 and mask.shape[:-1] == tuple(leading_shape):
        return mask.reshape(n_voxels, -1).all(axis=1)
    raise InvalidInputError(
        f"mask has shape {mask.shape} but must be a voxel mask of shape "
        f"{tuple(leading_shape)} or an entry mask of shape {tuple(leading_shape)} + (C,)."
    )


def _prepare_pair(y_true, y_pred, mask, threshold, *, pred_name="y_pred"):
    """Validate a reference and a same-shaped prediction; return matrices and scored entries."""
    threshold = _validate_threshold(threshold)
    true_matrix, leading_shape = _as_voxel_matrix(y_true, "y_true")
    pred_matrix = _validate_prediction(
        _as_voxel_matrix(y_pred, pred_name),
        (leading_shape, true_matrix.shape[1]),
        pred_name,
        same_columns=True,
    )
    scored = _entry_mask(mask, leading_shape, true_matrix.shape[1])
    scored &= ~np.isnan(true_matrix)
    return true_matrix, pred_matrix, scored, threshold


def _nanmean(values):
    """Mean of the finite values, NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _nanmedian(values):
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")


# ---------------------------------------------------------------------------
# Overlap per cluster
# ---------------------------------------------------------------------------


def _overlap_counts(true_matrix, pred_matrix, scored, threshold):
    """Return per-column intersection, reference size and prediction size on scored entries."""
    true_in = (true_matrix >= threshold) & scored
    pred_in = (pred_matrix >= threshold) & scored
    intersection = np.count_nonzero(true_in & pred_in, axis=0)
    return intersection, np.count_nonzero(true_in, axis=0), np.count_nonzero(pred_in, axis=0)


def dice_score(y_true, y_pred, *, mask=None, threshold=0.5):
    """Compute the Dice coefficient of each cluster.

    Dice is ``2 |A & B| / (|A| + |B|)`` where A and B are the scored voxels
    inside the reference and the predicted cluster.

    Parameters
    ----------
    y_true : ndarray of shape (X, Y, Z, C) or (n_voxels, C)
        Reference memberships: 1 inside, 0 outside, NaN unknown (never
        scored). Probabilistic maps are binarised at ``threshold``.
    y_pred : ndarray of the same shape as ``y_true``
        Predicted memberships or probabilities; must be finite.
    mask : ndarray of bool of shape (X, Y, Z) or of ``y_true``'s shape, default=None
        Voxels (for every cluster) or single entries to score, for example the
        held-out entries. None scores every known entry.
    threshold : float, default=0.5
        Values at or above it count as members.

    Returns
    -------
    dice : ndarray of shape (C,)
        Dice per cluster in [0, 1]. A cluster that is empty in both the
        reference and the prediction on its scored entries gets NaN, because
        there is nothing to overlap. Average with ``np.nanmean``.

    Raises
    ------
    InvalidInputError
        If shapes disagree, the prediction is not finite, or the threshold is
        not in (0, 1].
    """
    true_matrix, pred_matrix, scored, threshold = _prepare_pair(y_true, y_pred, mask, threshold)
    intersection, true_size, pred_size = _overlap_counts(true_matrix, pred_matrix, scored, threshold)
    total = true_size + pred_size
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2.0 * intersection / total, np.nan)
    return dice.astype(np.float64)


def iou_score(y_true, y_pred, *, mask=None, threshold=0.5):
    """Compute the intersection over union (Jaccard index) of each cluster.

    IoU is ``|A & B| / |A | B|`` on the scored entries; it relates to Dice by
    ``IoU = Dice / (2 - Dice)``.

    Parameters
    ----------
    y_true : ndarray of shape (X, Y, Z, C) or (n_voxels, C)
        Reference memberships: 1 inside, 0 outside, NaN unknown (never scored).
    y_pred : ndarray of the same shape as ``y_true``
        Predicted memberships or probabilities; must be finite.
    mask : ndarray of bool of shape (X, Y, Z) or of ``y_true``'s shape, default=None
        Voxels or entries to score. None scores every known entry.
    threshold : float, default=0.5
        Values at or above it count as members.

    Returns
    -------
    iou : ndarray of shape (C,)
        IoU per cluster in [0, 1]; NaN where the reference and the prediction
        are both empty on the scored entries.

    Raises
    ------
    InvalidInputError
        If shapes disagree, the prediction is not finite, or the threshold is
        not in (0, 1].
    """
    true_matrix, pred_matrix, scored, threshold = _prepare_pair(y_true, y_pred, mask, threshold)
    intersection, true_size, pred_size = _overlap_counts(true_matrix, pred_matrix, scored, threshold)
    union = true_size + pred_size - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
    return iou.astype(np.float64)


def roc_auc(y_true, y_proba, *, mask=None, threshold=0.5):
    """Compute the area under the ROC curve of each cluster's probabilities.

    Parameters
    ----------
    y_true : ndarray of shape (X, Y, Z, C) or (n_voxels, C)
        Reference memberships: entries at or above ``threshold`` are positive,
        NaN entries are never scored.
    y_proba : ndarray of the same shape as ``y_true``
        Predicted membership probabilities (any finite scores rank the same).
    mask : ndarray of bool of shape (X, Y, Z) or of ``y_true``'s shape, default=None
        Voxels or entries to score. None scores every known entry.
    threshold : float, default=0.5
        Binarises the reference only.

    Returns
    -------
    auc : ndarray of shape (C,)
        ROC AUC per cluster (``sklearn.metrics.roc_auc_score``); NaN where the
        scored entries of the reference hold only one class, because the ROC
        curve is undefined there.
    """
    true_matrix, proba_matrix, scored, threshold = _prepare_pair(
        y_true, y_proba, mask, threshold, pred_name="y_proba"
    )
    n_columns = true_matrix.shape[1]
    auc = np.full(n_columns, np.nan)
    for column in range(n_columns):
        rows = scored[:, column]
        labels = true_matrix[rows, column] >= threshold
        n_positive = int(np.count_nonzero(labels))
        if n_positive == 0 or n_positive == labels.size:
            continue
        auc[column] = roc_auc_score(labels, proba_matrix[rows, column])
    return auc


# ---------------------------------------------------------------------------
# Matching discovered clusters
# ---------------------------------------------------------------------------


def _dice_matrix(true_matrix, pred_matrix, scored, threshold):
    """Dice of every (reference column, predicted column) pair, on each reference column's entries.

    Returns an array of shape (R, Q) with NaN where both are empty.
    """
    true_in = ((true_matrix >= threshold) & scored).astype(np.float64)  # (n, R)
    pred_in = (pred_matrix >= threshold).astype(np.float64)  # (n, Q)
    intersection = true_in.T @ pred_in  # (R, Q)
    pred_size = scored.T.astype(np.float64) @ pred_in  # (R, Q) predicted members among each R's entries
    total = true_in.sum(axis=0)[:, np.newaxis] + pred_size
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * intersection / total, np.nan)


def match_clusters(reference, predicted, *, mask=None, threshold=0.5):
    """Pair reference clusters with predicted clusters one to one, maximising Dice.

    Use it for clusters the model discovered, whose column order is arbitrary.
    The pairing is the Hungarian assignment
    (``scipy.optimize.linear_sum_assignment``) on the Dice matrix, so the sum
    of the Dice of the pairs is maximal. Pairs whose Dice is NaN (both empty)
    count as 0 for the assignment.

    Parameters
    ----------
    reference : ndarray of shape (X, Y, Z, R) or (n_voxels, R)
        Reference clusters: 1 inside, 0 outside, NaN unknown (never scored).
    predicted : ndarray of shape (X, Y, Z, Q) or (n_voxels, Q)
        Predicted memberships or probabilities; Q may differ from R.
    mask : ndarray of bool of shape (X, Y, Z) or of ``reference``'s shape, default=None
        Voxels to score, or entries per reference cluster (each reference
        cluster is compared with every predicted cluster on its own entries).
    threshold : float, default=0.5
        Values at or above it count as members.

    Returns
    -------
    reference_indices : ndarray of int of shape (min(R, Q),)
        Matched reference columns, in increasing order.
    predicted_indices : ndarray of int of shape (min(R, Q),)
        The predicted column paired with each entry of ``reference_indices``.
    dice : ndarray of shape (R, Q)
        Dice of every pair, NaN where both clusters are empty.
    """
    threshold = _validate_threshold(threshold)
    true_matrix, leading_shape = _as_voxel_matrix(reference, "reference")
    pred_matrix = _validate_prediction(
        _as_voxel_matrix(predicted, "predicted"),
        (leading_shape, true_matrix.shape[1]),
        "predicted",
        same_columns=False,
    )
    scored = _entry_mask(mask, leading_shape, true_matrix.shape[1]) & ~np.isnan(true_matrix)
    dice = _dice_matrix(true_matrix, pred_matrix, scored, threshold)
    reference_indices, predicted_indices = linear_sum_assignment(
        np.nan_to_num(dice, nan=0.0), maximize=True
    )
    return reference_indices.astype(np.intp), predicted_indices.astype(np.intp), dice


# ---------------------------------------------------------------------------
# Scores for whole overlapping covers
# ---------------------------------------------------------------------------


def _prepare_covers(reference, predicted, mask, threshold):
    """Return binary covers (n_scored, R) and (n_scored, Q) on the scored voxels.

    Voxels where any reference entry is NaN are dropped, because a cover needs
    every membership of a voxel.
    """
    threshold = _validate_threshold(threshold)
    true_matrix, leading_shape = _as_voxel_matrix(reference, "reference")
    pred_matrix = _validate_prediction(
        _as_voxel_matrix(predicted, "predicted"),
        (leading_shape, true_matrix.shape[1]),
        "predicted",
        same_columns=False,
    )
    voxels = _voxel_mask(mask, leading_shape) & ~np.isnan(true_matrix).any(axis=1)
    return true_matrix[voxels] >= threshold, pred_matrix[voxels] >= threshold


def _plogp(p):
    """Return ``-p log2 p`` elementwise, with the limit 0 at p = 0."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros_like(p)
    positive = p > 0
    out[positive] = -p[positive] * np.log2(p[positive])
    return out


def _onmi_max(cover_x, cover_y):
    """McDaid's NMI_max of two binary covers of shape (n, Kx) and (n, Ky); assumes validated input."""
    n = cover_x.shape[0]
    x = cover_x.astype(np.float64)
    y = cover_y.astype(np.float64)
    size_x = x.sum(axis=0)  # (Kx,)
    size_y = y.sum(axis=0)  # (Ky,)

    # Contingency counts of every column pair, each of shape (Kx, Ky):
    # both = in X_k and Y_l, only_x, only_y, neither.
    both = x.T @ y
    only_x = size_x[:, np.newaxis] - both
    only_y = size_y[np.newaxis, :] - both
    neither = n - both - only_x - only_y

    entropy_x = _plogp(size_x / n) + _plogp(1.0 - size_x / n)  # H(X_k), bits
    entropy_y = _plogp(size_y / n) + _plogp(1.0 - size_y / n)  # H(Y_l), bits
    h_both, h_only_x = _plogp(both / n), _plogp(only_x / n)
    h_only_y, h_neither = _plogp(only_y / n), _plogp(neither / n)
    joint = h_both + h_only_x + h_only_y + h_neither  # H(X_k, Y_l)

    # Lancichinetti, Fortunato & Kertesz's constraint: Y_l may explain X_k only
    # when agreements carry more information than disagreements, otherwise the
    # complement of a cluster would count as a perfect match.
    admissible = h_both + h_neither > h_only_x + h_only_y

    x_given_y = np.where(admissible, joint - entropy_y[np.newaxis, :], np.inf)
    y_given_x = np.where(admissible, joint - entropy_x[:, np.newaxis], np.inf)
    # Without an admissible partner, the conditional entropy is the column's own entropy.
    cond_x = np.minimum(x_given_y.min(axis=1, initial=np.inf), entropy_x)  # H(X_k | Y)
    cond_y = np.minimum(y_given_x.min(axis=0, initial=np.inf), entropy_y)  # H(Y_l | X)

    total_x, total_y = entropy_x.sum(), entropy_y.sum()
    normaliser = max(total_x, total_y)
    if normaliser <= 0:
        return float("nan")
    mutual_information = 0.5 * ((total_x - cond_x.sum()) + (total_y - cond_y.sum()))
    return float(np.clip(mutual_information / normaliser, 0.0, 1.0))


def overlapping_nmi(reference, predicted, *, mask=None, threshold=0.5):
    """Compute the overlapping normalised mutual information of two covers.

    This is the ``NMI_max`` variant of McDaid, Greene & Hurley, "Normalized
    mutual information to evaluate overlapping community finding algorithms"
    (2011, arXiv:1110.2515). Each cluster is a binary variable over the scored
    voxels. For each reference cluster X_k, ``H(X_k | Y)`` is the smallest
    conditional entropy ``H(X_k | Y_l)`` over the predicted clusters Y_l that
    pass the Lancichinetti-Fortunato-Kertesz constraint
    ``h(P11) + h(P00) > h(P10) + h(P01)``, or ``H(X_k)`` when none does. Then
    ``I = (H(X) - H(X|Y) + H(Y) - H(Y|X)) / 2`` with ``H(X) = sum_k H(X_k)``,
    and the score is ``I / max(H(X), H(Y))``. It is symmetric, 1 for identical
    covers (up to column order) and close to 0 for independent covers. The
    column counts may differ, so no matching is needed.

    Parameters
    ----------
    reference : ndarray of shape (X, Y, Z, R) or (n_voxels, R)
        Reference cover: 1 inside, 0 outside. Voxels with any NaN entry are
        left out.
    predicted : ndarray of shape (X, Y, Z, Q) or (n_voxels, Q)
        Predicted memberships or probabilities, binarised at ``threshold``.
    mask : ndarray of bool of shape (X, Y, Z), default=None
        Voxels to score. An entry mask of ``reference``'s shape is reduced to
        the voxels scored in every reference column.
    threshold : float, default=0.5
        Values at or above it count as members.

    Returns
    -------
    onmi : float
        Score in [0, 1]; NaN when no voxel is scored or both covers carry no
        information (every cluster empty or full on the scored voxels).
    """
    cover_x, cover_y = _prepare_covers(reference, predicted, mask, threshold)
    if cover_x.shape[0] == 0:
        return float("nan")
    return _onmi_max(cover_x, cover_y)


def _pair_overlap_histogram(patterns, weights, n_columns_first):
    """Count voxel pairs by shared clusters in two covers, from unique joint patterns.

    ``patterns`` of shape (G, R + Q) contains each distinct joint membership
    row once, and ``weights`` of shape (G,) counts the voxels with that row. Returns the
    number of ordered pairs with equal overlap counts in both covers and the
    histograms of overlap counts of each cover (indexed by count).
    """
    first = patterns[:, :n_columns_first].astype(np.float64)
    second = patterns[:, n_columns_first:].astype(np.float64)
    n_patterns = patterns.shape[0]
    n_bins = max(first.shape[1], second.shape[1]) + 1
    hist_first = np.zeros(n_bins)
    hist_second = np.zeros(n_bins)
    agreements = 0.0

    block = max(1, _OMEGA_BLOCK_ELEMENTS // max(n_patterns, 1))
    for start in range(0, n_patterns, block):
        stop = min(start + block, n_patterns)
        shared_first = np.rint(first[start:stop] @ first.T).astype(np.intp)  # (b, G)
        shared_second = np.rint(second[start:stop] @ second.T).astype(np.intp)  # (b, G)
        pair_weights = weights[start:stop, np.newaxis] * weights[np.newaxis, :]
        # A pattern paired with itself gives n * (n - 1) ordered pairs of distinct voxels.
        rows = np.arange(stop - start)
        pair_weights[rows, rows + start] = weights[start:stop] * (weights[start:stop] - 1.0)
        agreements += pair_weights[shared_first == shared_second].sum()
        hist_first += np.bincount(shared_first.ravel(), pair_weights.ravel(), minlength=n_bins)
        hist_second += np.bincount(shared_second.ravel(), pair_weights.ravel(), minlength=n_bins)
    return agreements, hist_first, hist_second


def omega_index(reference, predicted, *, mask=None, threshold=0.5):
    """Compute the Omega index of two overlapping covers.

    The Omega index (Collins & Dent, 1988) is the adjusted-for-chance share
    of voxel pairs that belong together to the same number of clusters in
    both covers: ``(observed - expected) / (1 - expected)``, where the
    expected agreement assumes the two covers are independent. It is 1 for
    identical covers, near 0 for independent ones, and equals the adjusted
    Rand index when neither cover overlaps.

    Voxels with identical memberships in both covers are grouped, so the cost
    grows with the square of the number of distinct joint membership patterns,
    not of voxels.

    Parameters
    ----------
    reference : ndarray of shape (X, Y, Z, R) or (n_voxels, R)
        Reference cover. Voxels with any NaN entry are left out.
    predicted : ndarray of shape (X, Y, Z, Q) or (n_voxels, Q)
        Predicted memberships or probabilities, binarised at ``threshold``.
    mask : ndarray of bool of shape (X, Y, Z), default=None
        Voxels to score; an entry mask is reduced to the voxels scored in
        every reference column.
    threshold : float, default=0.5
        Values at or above it count as members.

    Returns
    -------
    omega : float
        Score at most 1 (negative when agreement is below chance); NaN when
        fewer than two voxels are scored or the expected agreement is 1.
    """
    cover_x, cover_y = _prepare_covers(reference, predicted, mask, threshold)
    n_voxels = cover_x.shape[0]
    if n_voxels < 2:
        return float("nan")
    joint = np.concatenate([cover_x, cover_y], axis=1)
    patterns, counts = np.unique(joint, axis=0, return_counts=True)
    agreements, hist_x, hist_y = _pair_overlap_histogram(
        patterns, counts.astype(np.float64), cover_x.shape[1]
    )
    n_pairs = n_voxels * (n_voxels - 1.0)  # ordered pairs of distinct voxels
    observed = agreements / n_pairs
    expected = float(np.sum(hist_x * hist_y)) / n_pairs**2
    if expected >= 1.0:
        return float("nan")
    return float((observed - expected) / (1.0 - expected))


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------


def evaluate_clusters(reference, proba, *, mask=None, threshold=0.5, match=False):
    """Score predicted clusters against reference clusters with every metric.

    Parameters
    ----------
    reference : ndarray of shape (X, Y, Z, R) or (n_voxels, R)
        Reference clusters: 1 inside, 0 outside, NaN unknown (never scored).
    proba : ndarray of shape (X, Y, Z, K) or (n_voxels, K)
        Predicted membership probabilities. Without ``match``, K must be at
        least R and the first R columns are compared with the reference
        (GACC puts the clusters that follow the given ones first).
    mask : ndarray of bool of shape (X, Y, Z) or of ``reference``'s shape, default=None
        Voxels or entries to score, for example the entries hidden from
        training. The cover scores (overlapping NMI, Omega) use the voxels
        scored in every reference column.
    threshold : float, default=0.5
        Values at or above it count as members.
    match : bool, default=False
        Pair reference and predicted clusters one to one by Dice
        (:func:`match_clusters`) before scoring, for discovered clusters.

    Returns
    -------
    scores : dict
        With these keys:

        - ``dice``, ``iou``, ``auc``: ndarray of shape (R,), NaN where
          undefined or unmatched.
        - ``matched``: ndarray of int of shape (R,), the predicted column
          compared with each reference column, or -1 if none.
        - ``mean_dice``, ``median_dice``, ``mean_iou``, ``mean_auc``: floats
          over the defined values.
        - ``onmi``, ``omega``: floats for the compared columns as covers.
        - ``n_scored_entries``, ``n_scored_voxels``: ints.
    """
    threshold = _validate_threshold(threshold)
    true_matrix, leading_shape = _as_voxel_matrix(reference, "reference")
    proba_matrix = _validate_prediction(
        _as_voxel_matrix(proba, "proba"),
        (leading_shape, true_matrix.shape[1]),
        "proba",
        same_columns=False,
    )
    n_reference = true_matrix.shape[1]
    n_predicted = proba_matrix.shape[1]

    if match:
        reference_indices, predicted_indices, _ = match_clusters(
            true_matrix, proba_matrix, mask=_flatten_mask(mask, leading_shape), threshold=threshold
        )
        matched = np.full(n_reference, -1, dtype=np.intp)
        matched[reference_indices] = predicted_indices
    else:
        if n_predicted < n_reference:
            raise InvalidInputError(
                f"proba has {n_predicted} clusters but the reference has {n_reference}; "
                "without match=True the first R predicted clusters are compared with "
                "the R reference clusters."
            )
        matched = np.arange(n_reference, dtype=np.intp)

    has_match = matched >= 0
    # Unmatched reference columns are compared with an all-zero prediction and
    # their scores replaced by NaN below.
    aligned = np.zeros_like(true_matrix)
    aligned[:, has_match] = proba_matrix[:, matched[has_match]]
    flat_mask = _flatten_mask(mask, leading_shape)

    dice = dice_score(true_matrix, aligned, mask=flat_mask, threshold=threshold)
    iou = iou_score(true_matrix, aligned, mask=flat_mask, threshold=threshold)
    auc = roc_auc(true_matrix, aligned, mask=flat_mask, threshold=threshold)
    for scores in (dice, iou, auc):
        scores[~has_match] = np.nan

    compared = aligned[:, has_match]
    onmi = overlapping_nmi(true_matrix, compared, mask=flat_mask, threshold=threshold)
    omega = omega_index(true_matrix, compared, mask=flat_mask, threshold=threshold)

    scored = _entry_mask(flat_mask, (true_matrix.shape[0],), n_reference) & ~np.isnan(true_matrix)
    cover_voxels = _voxel_mask(flat_mask, (true_matrix.shape[0],)) & ~np.isnan(true_matrix).any(axis=1)
    return {
        "dice": dice,
        "iou": iou,
        "auc": auc,
        "matched": matched,
        "mean_dice": _nanmean(dice),
        "median_dice": _nanmedian(dice),
        "mean_iou": _nanmean(iou),
        "mean_auc": _nanmean(auc),
        "onmi": onmi,
        "omega": omega,
        "n_scored_entries": int(np.count_nonzero(scored)),
        "n_scored_voxels": int(np.count_nonzero(cover_voxels)),
    }


def _flatten_mask(mask, leading_shape):
    """Reshape a voxel or entry mask to match voxel matrices of ``leading_shape`` voxels."""
    if mask is None:
        return None
    mask = _as_bool_mask(mask, "mask")
    n_voxels = int(np.prod(leading_shape))
    if mask.shape == tuple(leading_shape):
        return mask.reshape(n_voxels)
    if mask.ndim == len(leading_shape) + 1 and mask.shape[:-1] == tuple(leading_shape):
        return mask.reshape(n_voxels, mask.shape[-1])
    raise InvalidInputError(
        f"mask has shape {mask.shape} but must be a voxel mask of shape "
        f"{tuple(leading_shape)} or an entry mask of shape {tuple(leading_shape)} + (C,)."
    )
