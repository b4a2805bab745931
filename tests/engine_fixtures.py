"""Small volumes, tiny network settings and helpers shared by the engine tests.

The test modules import from here instead of from ``conftest.py``. Shapes
are uneven, (9, 10, 8) voxels with 12 features, so that a swapped axis
fails a test.
"""

import numpy as np
import pytest
import torch

SPATIAL_SHAPE = (9, 10, 8)
N_FEATURES = 12
N_KNOWN_CLUSTERS = 3

# Networks small enough that one training step takes a few milliseconds on
# one CPU core; every estimator test starts from these.
TINY_PARAMS = {
    "num_clusters": 4,
    "hidden_size": 16,
    "column_hidden_size": 8,
    "num_heads": 2,
    "num_layers": 1,
    "batch_size": 8,
    "prediction_repeats": 2,
    "device": "cpu",
    "random_state": 0,
}


def make_volume(shape=SPATIAL_SHAPE, n_features=N_FEATURES, n_clusters=N_KNOWN_CLUSTERS,
                *, seed=0, noise=0.5, inside_probability=0.25):
    """Build a semi-synthetic volume whose clusters are visible only in the data.

    Each voxel belongs to each cluster independently with
    ``inside_probability``, so clusters overlap and are scattered in space:
    position alone cannot predict them. A voxel's data are the sum of the
    time courses of its clusters, plus Gaussian noise and an offset of 3 that
    keeps every voxel non-zero (inside the default foreground).

    Returns
    -------
    data_xyzt : ndarray of shape (X, Y, Z, T), float32
    cluster_xyzp : ndarray of shape (X, Y, Z, P), float32 of 0 and 1
    """
    rng = np.random.default_rng(seed)
    clusters = (rng.random(tuple(shape) + (n_clusters,)) < inside_probability)
    clusters = clusters.astype(np.float32)
    courses = rng.standard_normal((n_clusters, n_features)).astype(np.float32)
    data = clusters @ courses + noise * rng.standard_normal(tuple(shape) + (n_features,))
    return (data + 3.0).astype(np.float32), clusters


def hide_labels(cluster_xyzp, fraction=0.5, seed=1):
    """Return (clusters with NaN on hidden voxels, bool (X, Y, Z) of hidden voxels)."""
    rng = np.random.default_rng(seed)
    hidden = rng.random(cluster_xyzp.shape[:3]) < fraction
    partial = cluster_xyzp.copy()
    partial[hidden] = np.nan
    return partial, hidden


def dice(predicted, truth):
    """Dice coefficient of two boolean arrays, computed with numpy alone."""
    predicted = np.asarray(predicted, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    total = predicted.sum() + truth.sum()
    if total == 0:
        return 1.0
    return 2.0 * np.logical_and(predicted, truth).sum() / total


def network_weights(module):
    """Copy every parameter and buffer of a module to a dict of CPU tensors."""
    return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


def same_weights(first, second):
    """Whether two weight dicts from :func:`network_weights` are exactly equal."""
    return first.keys() == second.keys() and all(
        torch.equal(first[name], second[name]) for name in first
    )


@pytest.fixture
def torch_single_thread():
    """Run torch on one thread during the test.

    The tiny networks run several times faster on one thread than on two
    busy cores.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
