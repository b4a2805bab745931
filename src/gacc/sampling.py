"""Drawing sets of voxels, the same way for training and for prediction.

A set is N distinct foreground voxels drawn uniformly at random. Training
draws B such sets per step. Prediction splits a random permutation of the
foreground into sets of N, so every voxel lands in exactly one set per
repeat, and repeats with other permutations: each voxel is then seen in as
many different random contexts as there are repeats, each context drawn
like a training set, and its memberships are the mean over repeats.
"""

import numpy as np
import torch

__all__ = ["draw_training_sets", "prediction_sets"]


def draw_training_sets(n_voxels, n_sets, set_size, generator):
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
    sets = torch.randint(n_voxels, (n_sets, set_size), generator=generator)
    for _ in range(100):
        sorted_sets, _ = sets.sort(dim=1)
        duplicated = (sorted_sets[:, 1:] == sorted_sets[:, :-1]).any(dim=1)
        if not duplicated.any():
            break
        redraw = torch.randint(
            n_voxels, (int(duplicated.sum()), set_size), generator=generator
        )
        sets[duplicated] = redraw
    return sets


def prediction_sets(n_voxels, set_size, repeats, seed):
    """Yield, for each repeat, sets that cover every foreground voxel once.

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
    n_sets = -(-n_voxels // set_size)
    n_fill = n_sets * set_size - n_voxels
    for _ in range(repeats):
        order = rng.permutation(n_voxels)
        counted = np.ones(n_sets * set_size, dtype=bool)
        if n_fill:
            # Fill-in voxels come from outside the last set's own members so a
            # set never holds one voxel twice.
            last_members = order[(n_sets - 1) * set_size:]
            candidates = np.setdiff1d(np.arange(n_voxels), last_members, assume_unique=True)
            if len(candidates) >= n_fill:
                fill = rng.choice(candidates, size=n_fill, replace=False)
            else:
                fill = rng.choice(n_voxels, size=n_fill, replace=True)
            order = np.concatenate((order, fill))
            counted[n_voxels:] = False
        yield order.reshape(n_sets, set_size), counted.reshape(n_sets, set_size)
