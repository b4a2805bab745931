"""Tests for the baseline methods of the quality benchmark (benchmarks/baselines.py)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from gacc.exceptions import InvalidInputError
from gacc.metrics import evaluate_clusters
from gacc.splits import hide_clusters, hide_slices, hide_voxels

BASELINES_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py"
_spec = importlib.util.spec_from_file_location("quality_baselines", BASELINES_PATH)
baselines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(baselines)

SHAPE = (14, 15, 13)
N_FEATURES = 9


@pytest.fixture(scope="module")
def easy_case():
    """Four overlapping balls whose voxels carry cluster-specific feature means."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), axis=-1)
    centres = np.array([[4, 4, 4], [9, 10, 8], [5, 10, 7], [9, 5, 9]])
    distances = np.linalg.norm(grid[..., np.newaxis, :] - centres, axis=-1)  # (X, Y, Z, 4)
    clusters = (distances < 4.0).astype(np.float32)
    loadings = rng.normal(size=(4, N_FEATURES)) * 2.0
    data = clusters @ loadings + 0.5 * rng.normal(size=SHAPE + (N_FEATURES,))
    mask = np.ones(SHAPE, dtype=bool)
    mask[0] = False
    return data.astype(np.float32), clusters, mask


@pytest.mark.parametrize("name", list(baselines.SEMI_SUPERVISED_BASELINES))
def test_semi_supervised_beat_chance(easy_case, name):
    data, clusters, mask = easy_case
    split = hide_slices(clusters, n_known_slices=3, mask=mask, random_state=0)
    proba = baselines.SEMI_SUPERVISED_BASELINES[name](
        data, split.cluster_xyzp, mask=mask, random_state=0
    )
    assert proba.shape == clusters.shape
    assert proba.dtype == np.float32
    assert proba.min() >= 0.0
    assert proba.max() <= 1.0
    assert np.all(proba[~mask] == 0)
    scores = evaluate_clusters(clusters, proba, mask=split.held_out_mask)
    # Chance gives an AUC of 0.5 and a Dice near the cluster's volume share.
    assert scores["mean_auc"] > 0.9
    assert scores["mean_dice"] > 0.6


@pytest.mark.parametrize("name", list(baselines.SEMI_SUPERVISED_BASELINES))
def test_semi_supervised_deterministic(easy_case, name):
    data, clusters, mask = easy_case
    split = hide_voxels(clusters, known_fraction=0.1, mask=mask, random_state=1)
    method = baselines.SEMI_SUPERVISED_BASELINES[name]
    first = method(data, split.cluster_xyzp, mask=mask, random_state=3)
    second = method(data, split.cluster_xyzp, mask=mask, random_state=3)
    np.testing.assert_array_equal(first, second)


def test_constant_known_cluster_predicted_constant(easy_case):
    data, clusters, mask = easy_case
    partial = np.where(np.arange(SHAPE[2]) < 4, clusters.transpose(3, 0, 1, 2), np.nan)
    partial = partial.transpose(1, 2, 3, 0)
    # Cluster 1 lies at z >= 4, so its known slices contain no member.
    assert np.nanmax(partial[..., 1]) == 0
    proba = baselines.knn_baseline(data, partial, mask=mask, random_state=0)
    assert np.all(proba[..., 1] == 0)
    assert proba[..., 0].max() > 0.5


@pytest.mark.parametrize("name", list(baselines.DISCOVERY_BASELINES))
def test_discovery_beats_chance(easy_case, name):
    data, clusters, mask = easy_case
    split = hide_clusters(clusters, n_hidden=2, mask=mask, random_state=0)
    proba = baselines.DISCOVERY_BASELINES[name](
        data, split.cluster_xyzp, n_clusters=5, mask=mask, random_state=0
    )
    assert proba.shape == SHAPE + (5,)
    np.testing.assert_allclose(proba[mask].sum(axis=-1), 1.0, rtol=1e-5)
    scores = evaluate_clusters(split.reference, proba, mask=mask, match=True)
    assert np.all(scores["matched"] >= 0)
    # k-means gives hard memberships, so its AUC is that of a single threshold.
    assert scores["mean_auc"] > 0.7
    assert scores["mean_dice"] > 0.3


def test_voxel_features_weights_blocks(easy_case):
    data, _, mask = easy_case
    features = baselines.voxel_features(data, mask, coordinate_weight=2.0)
    assert features.shape == (mask.sum(), N_FEATURES + 3)
    assert features[:, :N_FEATURES].var(axis=0).sum() == pytest.approx(1.0)
    assert features[:, N_FEATURES:].var(axis=0).sum() == pytest.approx(4.0)
    reduced = baselines.voxel_features(data, mask, n_components=4, smoothing_sigmas=(1.0,),
                                       coordinate_weight=0.0, random_state=0)
    assert reduced.shape == (mask.sum(), 4)


def test_baselines_reject_mismatched_clusters(easy_case):
    data, clusters, _ = easy_case
    with pytest.raises(InvalidInputError, match="spatial shape"):
        baselines.knn_baseline(data, clusters[:-1])
