"""Drawing sets of voxels, the same way for training and for prediction.

A set is N distinct foreground voxels drawn uniformly at random ("global"
sets) or from one small cube of the volume ("local" sets). Training draws B
such sets per step. Prediction splits the foreground into sets of the same
kind, so every voxel lands in exactly one set per repeat. Each repeat uses a
new random split, so a voxel is seen in as many random contexts as there are
repeats, each drawn like a training set. Its memberships are the mean over
the repeats.
"""

import numpy as np
import torch

__all__ = ["draw_local_training_sets", "draw_training_sets", "local_partition", "prediction_sets"]


def draw_training_sets(n_voxels, n_sets, set_size, generator, *, annotated=None,
                       annotated_fraction=0.0):
    """Draw sets of distinct voxel positions for one training step.

    Parameters
    ----------
    n_voxels : int
        Number of foreground voxels to draw from.
    n_sets : int
        B, sets per batch.
    set_size : int
        N, voxels per set; at most ``n_voxels``.
    generator : torch.Generator
        Source of randomness (on the CPU), for repeatable runs.
    annotated : LongTensor of shape (n_annotated,), optional
        Positions of the voxels with at least one known label.
    annotated_fraction : float, default=0.0
        Probability that a set member is drawn from ``annotated`` instead of
        from the whole foreground.

    Returns
    -------
    LongTensor of shape (B, N)
        Positions into the foreground voxel list.
    """
    # argsort of uniform noise gives B independent random permutations; the
    # first N of each are N distinct voxels. For large volumes draw with
    # replacement first and repair the rare duplicates, which is far cheaper.
    if n_voxels <= 4 * set_size:
        noise = torch.rand(n_sets, n_voxels, generator=generator)
        return noise.argsort(dim=1)[:, :set_size]

    def draw(count):
        sets = torch.randint(n_voxels, (count, set_size), generator=generator)
        if annotated is not None and annotated_fraction > 0 and len(annotated):
            from_annotated = torch.rand(count, set_size, generator=generator) < annotated_fraction
            picks = torch.randint(len(annotated), (count, set_size), generator=generator)
            sets = torch.where(from_annotated, annotated[picks], sets)
        return sets

    sets = draw(n_sets)
    for _ in range(100):
        sorted_sets, _ = sets.sort(dim=1)
        duplicated = (sorted_sets[:, 1:] == sorted_sets[:, :-1]).any(dim=1)
        if not duplicated.any():
            break
        sets[duplicated] = draw(int(duplicated.sum()))
    return sets


def draw_local_training_sets(ijk, n_sets, set_size, window, generator):
    """Draw training sets from local cubes, exactly as :func:`prediction_sets` does.

    A fresh random partition into local sets is made (seeded from
    ``generator``) and ``n_sets`` of its sets are picked at random, so every
    training set is distributed like a prediction set.

    Returns
    -------
    LongTensor of shape (B, N)
    """
    seed = int(torch.randint(2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    sets, _ = local_partition(ijk, set_size, window, rng)
    chosen = rng.choice(len(sets), size=n_sets, replace=len(sets) < n_sets)
    return torch.from_numpy(sets[chosen])


def prediction_sets(n_voxels, set_size, repeats, seed, *, ijk=None, window=None):
    """Yield, for each repeat, sets that cover every foreground voxel once.

    With ``window``, sets are drawn from local cubes by :func:`local_partition`
    (``ijk`` gives the voxels' indices); without it, from the whole foreground.

    The last set of a repeat is filled up with other randomly chosen voxels
    when ``n_voxels`` is not a multiple of ``set_size``; a per-set weight
    marks those fill-in voxels so their outputs are not counted twice.

    Parameters
    ----------
    n_voxels, set_size : int
    repeats : int
        Number of random partitions of the foreground.
    seed : int
        Seed of the permutations, so a prediction repeats exactly.

    Yields
    ------
    sets : ndarray of shape (n_sets, N), int64
    counted : ndarray of shape (n_sets, N), bool
        False for fill-in voxels.
    """
    rng = np.random.default_rng(seed)
    if window is not None:
        for _ in range(repeats):
            yield local_partition(ijk, set_size, window, rng)
        return
    n_sets = -(-n_voxels // set_size)
    n_fill = n_sets * set_size - n_voxels
    for _ in range(repeats):
        order = rng.permutation(n_voxels)
        counted = np.ones(n_sets * set_size, dtype=bool)
        if n_fill:
            # Fill-in voxels come from outside the last set's own members so a
            # set never contains one voxel twice.
            last_members = order[(n_sets - 1) * set_size:]
            candidates = np.setdiff1d(np.arange(n_voxels), last_members, assume_unique=True)
            if len(candidates) >= n_fill:
                fill = rng.choice(candidates, size=n_fill, replace=False)
            else:
                fill = rng.choice(n_voxels, size=n_fill, replace=True)
            order = np.concatenate((order, fill))
            counted[n_voxels:] = False
        yield order.reshape(n_sets, set_size), counted.reshape(n_sets, set_size)


def local_partition(ijk, set_size, window, rng):
    """Split voxels into sets of ``set_size`` drawn from local cubic windows.

    The volume is cut into cubes of ``window`` voxels per side at a random
    offset; the voxels of each cube are shuffled and split into sets. The
    last set of a cube is filled up with other randomly chosen voxels of the
    same cube (repeated when the cube holds fewer than ``set_size`` voxels).

    Parameters
    ----------
    ijk : ndarray of shape (n_voxels, 3), int
        Voxel indices of the foreground voxels.
    set_size : int
    window : int
        Side of the cubes, in voxels.
    rng : numpy.random.Generator

    Returns
    -------
    sets : ndarray of shape (n_sets, N), int64
        Positions into the foreground list; every voxel is counted once.
    counted : ndarray of shape (n_sets, N), bool
        False for fill-in voxels.
    """
    n_voxels = len(ijk)
    offset = rng.integers(window, size=3)
    tiles = (ijk + offset) // window  # (n_voxels, 3)
    tile_id = np.ravel_multi_index(tiles.T, tiles.max(axis=0) + 1)
    order = np.lexsort((rng.random(n_voxels), tile_id))
    sorted_tiles = tile_id[order]
    starts = np.flatnonzero(np.r_[True, sorted_tiles[1:] != sorted_tiles[:-1]])
    counts = np.diff(np.r_[starts, n_voxels])
    rank = np.arange(n_voxels) - np.repeat(starts, counts)
    sets_per_tile = -(-counts // set_size)
    first_set = np.r_[0, np.cumsum(sets_per_tile)[:-1]]
    set_index = np.repeat(first_set, counts) + rank // set_size

    sets = np.full((int(sets_per_tile.sum()), set_size), -1, dtype=np.int64)
    sets[set_index, rank % set_size] = order
    counted = sets >= 0
    empty_rows, empty_columns = np.nonzero(~counted)
    if len(empty_rows):
        tile_of_set = np.repeat(np.arange(len(counts)), sets_per_tile)[empty_rows]
        pick = starts[tile_of_set] + (rng.random(len(empty_rows)) * counts[tile_of_set]).astype(
            np.int64
        )
        sets[empty_rows, empty_columns] = order[pick]
    return sets, counted
