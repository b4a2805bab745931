"""Hide part of the known clusters from training, for held-out evaluation.

Each function takes complete reference clusters ``cluster_xyzp`` of shape
(X, Y, Z, P) (1 inside, 0 outside, NaN unknown) and returns a
:class:`sklearn.utils.Bunch` with:

- ``cluster_xyzp``: the partial clusters to train on, NaN where hidden;
- ``known_mask``: bool array of the partial clusters' shape, True where an
  entry is given to training;
- ``held_out_mask``: bool array of the input's shape, True where an entry is
  hidden from training but known in the reference. Score predictions on
  these entries only (``gacc.metrics.evaluate_clusters(..., mask=held_out_mask)``).

Entries outside ``mask`` and entries that are already NaN are neither known
nor held out; they are NaN in the partial clusters. Splits that draw at
random are deterministic for a given ``random_state``.
"""

import logging
import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.utils import Bunch, check_random_state

from gacc.exceptions import InvalidInputError

__all__ = ["hide_clusters", "hide_region", "hide_slices", "hide_voxels"]

logger = logging.getLogger(__name__)

# Entries at or above this value count as inside a cluster, which also covers
# probabilistic maps scaled to [0, 1].
MEMBERSHIP_THRESHOLD = 0.5

# Random restarts of the greedy cover that picks slices shared by all clusters.
_SHARED_SLICE_RESTARTS = 32


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _validate_clusters(cluster_xyzp):
    cluster_xyzp = np.asarray(cluster_xyzp)
    if cluster_xyzp.ndim != 4:
        raise InvalidInputError(
            f"cluster_xyzp has shape {cluster_xyzp.shape} but must be 4D (X, Y, Z, P); "
            "add a trailing axis for a single cluster, for example array[..., np.newaxis]."
        )
    if cluster_xyzp.shape[-1] == 0:
        raise InvalidInputError("cluster_xyzp has no clusters (P = 0); pass at least one.")
    if cluster_xyzp.dtype == bool or np.issubdtype(cluster_xyzp.dtype, np.integer):
        return cluster_xyzp.astype(np.float32)
    if not np.issubdtype(cluster_xyzp.dtype, np.floating):
        raise InvalidInputError(
            f"cluster_xyzp has dtype {cluster_xyzp.dtype} but must be numeric."
        )
    return cluster_xyzp


def _validate_mask(mask, spatial_shape):
    """Return the voxel mask as bool of shape ``spatial_shape``; None selects every voxel."""
    if mask is None:
        return np.ones(spatial_shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != tuple(spatial_shape):
        raise InvalidInputError(
            f"mask has shape {mask.shape} but cluster_xyzp has spatial shape "
            f"{tuple(spatial_shape)}; pass a mask of the same voxels."
        )
    if mask.dtype != bool:
        if not np.all(np.isin(np.unique(mask), (0, 1))):
            raise InvalidInputError("mask must be boolean or contain only 0 and 1.")
        mask = mask.astype(bool)
    if not mask.any():
        raise InvalidInputError("mask selects no voxel; pass a mask with at least one True.")
    return mask


def _validate_axis(axis):
    if not isinstance(axis, Integral) or not 0 <= axis <= 2:
        raise InvalidInputError(f"axis={axis!r} is invalid: use 0, 1 or 2 (a spatial axis).")
    return int(axis)


def _validate_fraction(value, name):
    if not isinstance(value, Real) or not 0.0 < value < 1.0:
        raise InvalidInputError(f"{name}={value!r} is invalid: use a number in (0, 1).")
    return float(value)


def _split_result(cluster_xyzp, known, mask):
    """Build the Bunch returned by every split from the known entries.

    ``known`` of the shape of ``cluster_xyzp`` marks the entries given to
    training; it is restricted here to known reference entries inside ``mask``.
    """
    available = mask[..., np.newaxis] & ~np.isnan(cluster_xyzp)
    known = known & available
    partial = np.where(known, cluster_xyzp, np.nan).astype(cluster_xyzp.dtype, copy=False)
    return Bunch(
        cluster_xyzp=partial,
        known_mask=known,
        held_out_mask=available & ~known,
    )


def _positive_voxels(cluster_xyzp, mask):
    """Bool array (X, Y, Z, P): voxels inside each cluster and inside the mask."""
    with np.errstate(invalid="ignore"):
        return (cluster_xyzp >= MEMBERSHIP_THRESHOLD) & mask[..., np.newaxis]


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


def hide_slices(
    cluster_xyzp,
    *,
    axis=2,
    n_known_slices=3,
    mask=None,
    per_cluster=True,
    random_state=None,
):
    """Keep each cluster's labels on a few slices only, as a user paints them.

    Parameters
    ----------
    cluster_xyzp : ndarray of shape (X, Y, Z, P)
        Reference clusters: 1 inside, 0 outside, NaN unknown.
    axis : {0, 1, 2}, default=2
        Spatial axis across which slices are cut (2 gives axial slices of a
        RAS-oriented image).
    n_known_slices : int, default=3
        Number of known slices per cluster.
    mask : ndarray of bool of shape (X, Y, Z), default=None
        Voxels that can be known or scored; only slices that cross the mask
        are drawn. None uses every voxel.
    per_cluster : bool, default=True
        True draws each cluster's slices on their own, among the slices that
        contain part of the cluster, like painting each cluster where it is
        visible. False draws one set of slices for all clusters, chosen
        greedily so that as many clusters as possible have a part on a known
        slice, then at random.
    random_state : int, RandomState instance or None, default=None
        Seed for the draw.

    Returns
    -------
    split : Bunch
        ``cluster_xyzp``, ``known_mask`` and ``held_out_mask`` (see the
        module docstring) and ``known_slices``, a list with the sorted slice
        indices known for each cluster.

    Warns
    -----
    UserWarning
        When a cluster has fewer slices with members than ``n_known_slices``
        (it is known on those slices plus slices without members), or none at
        all (its known slices then contain only non-members).

    Notes
    -----
    Every slice is fully known for the cluster it is drawn for: members and
    non-members alike, as in a painted annotation where the unpainted part
    of a finished slice means "outside".
    """
    cluster_xyzp = _validate_clusters(cluster_xyzp)
    spatial_shape = cluster_xyzp.shape[:3]
    mask = _validate_mask(mask, spatial_shape)
    axis = _validate_axis(axis)
    n_slices = spatial_shape[axis]
    if not isinstance(n_known_slices, Integral) or not 1 <= n_known_slices <= n_slices:
        raise InvalidInputError(
            f"n_known_slices={n_known_slices!r} is invalid: use an integer from 1 to "
            f"{n_slices} (the number of slices along axis {axis})."
        )
    rng = check_random_state(random_state)
    n_clusters = cluster_xyzp.shape[-1]

    other_axes = tuple(a for a in range(3) if a != axis)
    slices_in_mask = np.flatnonzero(mask.any(axis=other_axes))
    # (n_slices, P): whether each slice contains members of each cluster.
    has_members = _positive_voxels(cluster_xyzp, mask).any(axis=other_axes)
    n_to_draw = min(int(n_known_slices), slices_in_mask.size)

    if per_cluster:
        known_slices = [
            _draw_cluster_slices(has_members[:, p], slices_in_mask, n_to_draw, rng, p)
            for p in range(n_clusters)
        ]
    else:
        shared = _draw_shared_slices(has_members, slices_in_mask, n_to_draw, rng)
        known_slices = [shared.copy() for _ in range(n_clusters)]
        uncovered = np.flatnonzero(has_members.any(axis=0) & ~has_members[shared].any(axis=0))
        if uncovered.size:
            warnings.warn(
                f"{uncovered.size} clusters (indices {uncovered[:10].tolist()}) have no "
                f"member on the {n_to_draw} shared known slices; raise n_known_slices or "
                "use per_cluster=True.",
                UserWarning,
                stacklevel=2,
            )

    known = np.zeros(cluster_xyzp.shape, dtype=bool)
    index = [slice(None)] * 4
    for p, slices in enumerate(known_slices):
        index[axis] = slices
        index[3] = p
        known[tuple(index)] = True

    split = _split_result(cluster_xyzp, known, mask)
    split.known_slices = known_slices
    return split


def _draw_cluster_slices(has_members, slices_in_mask, n_to_draw, rng, cluster_index):
    """Draw one cluster's slices, preferring slices with members; return them sorted."""
    with_members = np.flatnonzero(has_members)
    if with_members.size >= n_to_draw:
        return np.sort(rng.choice(with_members, size=n_to_draw, replace=False))
    if with_members.size == 0:
        warnings.warn(
            f"Cluster {cluster_index} has no member inside the mask, so its known "
            "slices contain only non-members.",
            UserWarning,
            stacklevel=3,
        )
    else:
        warnings.warn(
            f"Cluster {cluster_index} has members on {with_members.size} slices only; "
            f"all of them are known, plus {n_to_draw - with_members.size} slices "
            "without members.",
            UserWarning,
            stacklevel=3,
        )
    rest = np.setdiff1d(slices_in_mask, with_members)
    extra = rng.choice(rest, size=n_to_draw - with_members.size, replace=False)
    return np.sort(np.concatenate([with_members, extra]))


def _draw_shared_slices(has_members, slices_in_mask, n_to_draw, rng):
    """Draw slices shared by all clusters, covering as many clusters as possible first.

    Greedy set cover is not optimal, so it is repeated with random tie-breaks
    and the draw that covers the most clusters is kept.
    """
    coverable = np.count_nonzero(has_members.any(axis=0))
    best_draw, best_covered = None, -1
    for _ in range(_SHARED_SLICE_RESTARTS):
        draw, n_covered = _greedy_slice_cover(has_members, slices_in_mask, n_to_draw, rng)
        if n_covered > best_covered:
            best_draw, best_covered = draw, n_covered
        if best_covered == coverable:
            break
    return best_draw


def _greedy_slice_cover(has_members, slices_in_mask, n_to_draw, rng):
    """Return one greedy draw of sorted slices and the number of clusters it covers."""
    chosen = []
    covered = np.zeros(has_members.shape[1], dtype=bool)
    candidates = list(slices_in_mask)
    while len(chosen) < n_to_draw:
        gains = np.array([np.count_nonzero(has_members[s] & ~covered) for s in candidates])
        if gains.max() > 0:
            # Random choice among the slices that cover the most new clusters.
            pick = candidates[rng.choice(np.flatnonzero(gains == gains.max()))]
        else:
            pick = candidates[rng.randint(len(candidates))]
        chosen.append(pick)
        covered |= has_members[pick]
        candidates.remove(pick)
    return np.sort(np.array(chosen, dtype=np.intp)), int(np.count_nonzero(covered))


def hide_voxels(cluster_xyzp, *, known_fraction=0.05, mask=None, random_state=None):
    """Keep the labels of scattered voxels only, as from clicks or sparse samples.

    A drawn voxel is known for every cluster.

    Parameters
    ----------
    cluster_xyzp : ndarray of shape (X, Y, Z, P)
        Reference clusters: 1 inside, 0 outside, NaN unknown.
    known_fraction : float, default=0.05
        Share of the mask's voxels drawn uniformly without replacement (at
        least one voxel).
    mask : ndarray of bool of shape (X, Y, Z), default=None
        Voxels that can be known or scored. None uses every voxel.
    random_state : int, RandomState instance or None, default=None
        Seed for the draw.

    Returns
    -------
    split : Bunch
        ``cluster_xyzp``, ``known_mask`` and ``held_out_mask`` (see the
        module docstring) and ``known_voxels``, a bool array of shape
        (X, Y, Z).

    Notes
    -----
    A cluster with members but none among the drawn voxels gets one of its
    members, drawn at random, added to the known voxels, so that every
    cluster has at least one known member. The known share can therefore
    exceed ``known_fraction`` by at most P voxels.
    """
    cluster_xyzp = _validate_clusters(cluster_xyzp)
    mask = _validate_mask(mask, cluster_xyzp.shape[:3])
    known_fraction = _validate_fraction(known_fraction, "known_fraction")
    rng = check_random_state(random_state)

    mask_indices = np.flatnonzero(mask)
    n_known = max(1, int(round(known_fraction * mask_indices.size)))
    drawn = rng.choice(mask_indices, size=n_known, replace=False)
    known_voxels = np.zeros(mask.size, dtype=bool)
    known_voxels[drawn] = True

    members = _positive_voxels(cluster_xyzp, mask).reshape(mask.size, -1)
    n_added = 0
    for p in range(members.shape[1]):
        if members[:, p].any() and not (members[:, p] & known_voxels).any():
            known_voxels[rng.choice(np.flatnonzero(members[:, p]))] = True
            n_added += 1
    if n_added:
        logger.info("Added one known member voxel for each of %d clusters without one.", n_added)

    known_voxels = known_voxels.reshape(mask.shape)
    known = np.repeat(known_voxels[..., np.newaxis], cluster_xyzp.shape[-1], axis=-1)
    split = _split_result(cluster_xyzp, known, mask)
    split.known_voxels = known_voxels & mask
    return split


def hide_region(cluster_xyzp, *, axis=0, known_fraction=0.5, known_side="low", mask=None):
    """Keep the labels on one side of a cut across the volume, hide the other side.

    The cut is a plane across ``axis``, placed so that about
    ``known_fraction`` of the mask's voxels lie on the known side. Along
    axis 0 of a RAS-oriented brain image with ``known_fraction=0.5`` this
    hides one hemisphere. The split is deterministic, so it takes no seed.

    Parameters
    ----------
    cluster_xyzp : ndarray of shape (X, Y, Z, P)
        Reference clusters: 1 inside, 0 outside, NaN unknown.
    axis : {0, 1, 2}, default=0
        Axis across which the volume is cut.
    known_fraction : float, default=0.5
        Target share of the mask's voxels with known labels. The cut falls
        between whole slices, so the actual share differs by at most one
        slice; it is returned as ``known_share``.
    known_side : {"low", "high"}, default="low"
        Whether the slices with low or high indices are known.
    mask : ndarray of bool of shape (X, Y, Z), default=None
        Voxels that can be known or scored. None uses every voxel.

    Returns
    -------
    split : Bunch
        ``cluster_xyzp``, ``known_mask`` and ``held_out_mask`` (see the
        module docstring), ``cut_index`` (the first slice of the high side)
        and ``known_share`` (the share of mask voxels that are known).

    Notes
    -----
    A cluster that lies wholly on the hidden side has only non-members among
    its known entries. Such clusters are the hardest case of this split.
    """
    cluster_xyzp = _validate_clusters(cluster_xyzp)
    mask = _validate_mask(mask, cluster_xyzp.shape[:3])
    axis = _validate_axis(axis)
    known_fraction = _validate_fraction(known_fraction, "known_fraction")
    if known_side not in ("low", "high"):
        raise InvalidInputError(f"known_side={known_side!r} is invalid: use 'low' or 'high'.")

    other_axes = tuple(a for a in range(3) if a != axis)
    voxels_per_slice = mask.sum(axis=other_axes)
    low_share = np.cumsum(voxels_per_slice) / voxels_per_slice.sum()  # share at or below each slice
    target_low = known_fraction if known_side == "low" else 1.0 - known_fraction
    # The cut goes after the slice whose cumulative share is nearest the target.
    cut_index = int(np.argmin(np.abs(low_share - target_low))) + 1

    coordinate = np.arange(mask.shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
    known_voxels = coordinate < cut_index if known_side == "low" else coordinate >= cut_index
    known_voxels = np.broadcast_to(known_voxels, mask.shape)
    known = np.repeat(known_voxels[..., np.newaxis], cluster_xyzp.shape[-1], axis=-1)

    split = _split_result(cluster_xyzp, known, mask)
    split.cut_index = cut_index
    split.known_share = float(np.count_nonzero(known_voxels & mask) / np.count_nonzero(mask))
    return split


def hide_clusters(cluster_xyzp, *, n_hidden=1, hidden=None, mask=None, random_state=None):
    """Remove whole clusters, to test whether a model discovers them.

    The remaining clusters are given fully (inside ``mask``). Train a model
    with ``K = P - n_hidden + n_free`` clusters and compare its free clusters
    with ``reference`` using one-to-one matching
    (``gacc.metrics.evaluate_clusters(..., match=True)``).

    Parameters
    ----------
    cluster_xyzp : ndarray of shape (X, Y, Z, P)
        Reference clusters: 1 inside, 0 outside, NaN unknown.
    n_hidden : int, default=1
        Number of clusters to remove, drawn among the clusters that have
        members inside the mask. Ignored when ``hidden`` is given.
    hidden : sequence of int, default=None
        Indices of the clusters to remove, in place of a random draw.
    mask : ndarray of bool of shape (X, Y, Z), default=None
        Voxels that can be known or scored. None uses every voxel.
    random_state : int, RandomState instance or None, default=None
        Seed for the draw.

    Returns
    -------
    split : Bunch
        With these keys:

        - ``cluster_xyzp``: the given clusters in their original order, of
          shape (X, Y, Z, P - n_hidden), and ``known_mask`` of that shape.
        - ``held_out_mask`` of shape (X, Y, Z, P): True on the hidden
          clusters' known entries inside the mask.
        - ``given_clusters``, ``hidden_clusters``: sorted indices into the
          input's clusters.
        - ``reference`` of shape (X, Y, Z, n_hidden): the hidden clusters.
    """
    cluster_xyzp = _validate_clusters(cluster_xyzp)
    mask = _validate_mask(mask, cluster_xyzp.shape[:3])
    n_clusters = cluster_xyzp.shape[-1]

    if hidden is not None:
        hidden_clusters = np.unique(np.asarray(hidden, dtype=np.intp))
        if hidden_clusters.size == 0 or hidden_clusters.min() < 0 or hidden_clusters.max() >= n_clusters:
            raise InvalidInputError(
                f"hidden={list(hidden)!r} is invalid: give one or more cluster indices "
                f"from 0 to {n_clusters - 1}."
            )
    else:
        candidates = np.flatnonzero(_positive_voxels(cluster_xyzp, mask).any(axis=(0, 1, 2)))
        if not isinstance(n_hidden, Integral) or not 1 <= n_hidden <= candidates.size:
            raise InvalidInputError(
                f"n_hidden={n_hidden!r} is invalid: use an integer from 1 to "
                f"{candidates.size}, the number of clusters with members inside the mask."
            )
        rng = check_random_state(random_state)
        hidden_clusters = np.sort(rng.choice(candidates, size=int(n_hidden), replace=False))
    given_clusters = np.setdiff1d(np.arange(n_clusters), hidden_clusters)

    given_xyzp = cluster_xyzp[..., given_clusters]
    split = _split_result(given_xyzp, np.ones(given_xyzp.shape, dtype=bool), mask)
    held_out = np.zeros(cluster_xyzp.shape, dtype=bool)
    held_out[..., hidden_clusters] = mask[..., np.newaxis] & ~np.isnan(
        cluster_xyzp[..., hidden_clusters]
    )
    split.held_out_mask = held_out
    split.given_clusters = given_clusters
    split.hidden_clusters = hidden_clusters
    split.reference = cluster_xyzp[..., hidden_clusters].copy()
    return split
