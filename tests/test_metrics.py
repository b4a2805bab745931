"""Tests for gacc.metrics against values computed independently."""

import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from gacc.exceptions import InvalidInputError
from gacc.metrics import (
    dice_score,
    evaluate_clusters,
    iou_score,
    match_clusters,
    omega_index,
    overlapping_nmi,
    roc_auc,
)

SHAPE = (7, 8, 9)


def random_cover(shape, n_clusters, density, seed):
    rng = np.random.default_rng(seed)
    return (rng.random(shape + (n_clusters,)) < density).astype(np.float64)


def h(p):
    return 0.0 if p <= 0 else -p * math.log2(p)


def onmi_by_loops(cover_x, cover_y):
    """McDaid's NMI_max written with scalar loops, as a second implementation."""
    n = cover_x.shape[0]

    def column_entropy(column):
        p = column.sum() / n
        return h(p) + h(1 - p)

    def conditional(first, second):
        total = 0.0
        for k in range(first.shape[1]):
            best = column_entropy(first[:, k])
            for l in range(second.shape[1]):
                a, b = first[:, k].astype(bool), second[:, l].astype(bool)
                p11 = np.sum(a & b) / n
                p10 = np.sum(a & ~b) / n
                p01 = np.sum(~a & b) / n
                p00 = np.sum(~a & ~b) / n
                if h(p11) + h(p00) > h(p10) + h(p01):
                    joint = h(p11) + h(p10) + h(p01) + h(p00)
                    best = min(best, joint - column_entropy(second[:, l]))
            total += best
        return total

    entropy_x = sum(column_entropy(cover_x[:, k]) for k in range(cover_x.shape[1]))
    entropy_y = sum(column_entropy(cover_y[:, k]) for k in range(cover_y.shape[1]))
    information = 0.5 * (
        entropy_x - conditional(cover_x, cover_y) + entropy_y - conditional(cover_y, cover_x)
    )
    return information / max(entropy_x, entropy_y)


# ---------------------------------------------------------------------------
# Dice and IoU
# ---------------------------------------------------------------------------

OVERLAP_CASES = [
    # reference, prediction, expected Dice, expected IoU (one cluster, 6 voxels)
    ([1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], 1.0, 1.0),
    ([1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], 0.0, 0.0),
    ([1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], 2 * 2 / 6, 2 / 4),
    ([1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], 2 * 1 / 5, 1 / 4),
    ([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], np.nan, np.nan),
    ([0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], 0.0, 0.0),
    ([1, 1, 0, 0, 0, 0], [0.9, 0.5, 0.49, 0.1, 0, 0], 1.0, 1.0),
]


@pytest.mark.parametrize(
    "reference, prediction, expected_dice, expected_iou",
    OVERLAP_CASES,
    ids=["perfect", "disjoint", "partial", "superset", "both-empty", "reference-empty",
         "threshold-inclusive"],
)
def test_overlap_hand_cases(reference, prediction, expected_dice, expected_iou):
    reference = np.array(reference, dtype=float)[:, np.newaxis]
    prediction = np.array(prediction, dtype=float)[:, np.newaxis]
    np.testing.assert_allclose(dice_score(reference, prediction), [expected_dice])
    np.testing.assert_allclose(iou_score(reference, prediction), [expected_iou])


def test_dice_per_cluster_4d():
    reference = random_cover(SHAPE, 3, 0.3, seed=0)
    prediction = random_cover(SHAPE, 3, 0.4, seed=1)
    dice = dice_score(reference, prediction)
    assert dice.shape == (3,)
    for k in range(3):
        a = reference[..., k].astype(bool)
        b = prediction[..., k].astype(bool)
        assert dice[k] == pytest.approx(2 * np.sum(a & b) / (a.sum() + b.sum()))


def test_dice_iou_relation():
    reference = random_cover(SHAPE, 4, 0.3, seed=2)
    prediction = random_cover(SHAPE, 4, 0.2, seed=3)
    dice = dice_score(reference, prediction)
    iou = iou_score(reference, prediction)
    np.testing.assert_allclose(iou, dice / (2 - dice))


def test_dice_accepts_voxel_matrix():
    reference = random_cover(SHAPE, 3, 0.3, seed=4)
    prediction = random_cover(SHAPE, 3, 0.3, seed=5)
    flat = dice_score(reference.reshape(-1, 3), prediction.reshape(-1, 3))
    np.testing.assert_allclose(flat, dice_score(reference, prediction))


def test_dice_voxel_mask():
    reference = random_cover(SHAPE, 2, 0.3, seed=6)
    prediction = random_cover(SHAPE, 2, 0.3, seed=7)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[:3] = True
    expected = dice_score(reference[:3], prediction[:3])
    np.testing.assert_allclose(dice_score(reference, prediction, mask=mask), expected)


def test_dice_entry_mask_scores_each_column_separately():
    reference = random_cover(SHAPE, 2, 0.3, seed=8)
    prediction = random_cover(SHAPE, 2, 0.3, seed=9)
    mask = np.zeros(SHAPE + (2,), dtype=bool)
    mask[:3, ..., 0] = True
    mask[:, :4, :, 1] = True
    dice = dice_score(reference, prediction, mask=mask)
    assert dice[0] == pytest.approx(dice_score(reference[:3, ..., :1], prediction[:3, ..., :1])[0])
    assert dice[1] == pytest.approx(
        dice_score(reference[:, :4, :, 1:], prediction[:, :4, :, 1:])[0]
    )


def test_dice_skips_unknown_reference():
    reference = np.array([[1.0], [1.0], [np.nan], [0.0]])
    prediction = np.array([[1.0], [0.0], [1.0], [0.0]])
    # The NaN voxel is not scored: one hit, one miss, so Dice = 2 / 3.
    assert dice_score(reference, prediction)[0] == pytest.approx(2 / 3)


def test_dice_threshold():
    reference = np.array([[1.0], [1.0], [0.0]])
    prediction = np.array([[0.8], [0.6], [0.3]])
    assert dice_score(reference, prediction, threshold=0.7)[0] == pytest.approx(2 / 3)
    assert dice_score(reference, prediction, threshold=0.2)[0] == pytest.approx(4 / 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"y_pred": np.zeros(SHAPE + (3,))}, "clusters"),
        ({"y_pred": np.zeros((7, 8, 8, 2))}, "voxel shape"),
        ({"y_pred": np.full(SHAPE + (2,), np.nan)}, "NaN"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"mask": np.ones((7, 8), dtype=bool)}, "mask has shape"),
        ({"mask": np.full(SHAPE, 2)}, "only 0 and 1"),
    ],
    ids=["column-count", "voxel-shape", "nan-prediction", "zero-threshold",
         "large-threshold", "mask-shape", "mask-values"],
)
def test_dice_rejects_invalid_input(kwargs, message):
    arguments = {"y_true": np.zeros(SHAPE + (2,)), "y_pred": np.zeros(SHAPE + (2,))}
    arguments.update(kwargs)
    y_true = arguments.pop("y_true")
    y_pred = arguments.pop("y_pred")
    with pytest.raises(InvalidInputError, match=message):
        dice_score(y_true, y_pred, **arguments)


def test_dice_rejects_3d_reference():
    with pytest.raises(InvalidInputError, match="4D"):
        dice_score(np.zeros(SHAPE), np.zeros(SHAPE))


# ---------------------------------------------------------------------------
# ROC AUC
# ---------------------------------------------------------------------------


def test_roc_auc_matches_sklearn():
    rng = np.random.default_rng(10)
    reference = random_cover(SHAPE, 3, 0.3, seed=11)
    proba = np.clip(reference * 0.3 + rng.random(reference.shape) * 0.7, 0, 1)
    auc = roc_auc(reference, proba)
    for k in range(3):
        expected = roc_auc_score(reference[..., k].ravel(), proba[..., k].ravel())
        assert auc[k] == pytest.approx(expected)


def test_roc_auc_single_class_is_nan():
    reference = np.zeros(SHAPE + (2,))
    reference[:2, ..., 1] = 1.0
    proba = np.random.default_rng(12).random(SHAPE + (2,))
    auc = roc_auc(reference, proba)
    assert np.isnan(auc[0])
    assert np.isfinite(auc[1])


def test_roc_auc_entry_mask():
    reference = random_cover(SHAPE, 1, 0.5, seed=13)
    proba = reference.copy()
    mask = np.ones(SHAPE + (1,), dtype=bool)
    # Inverting the prediction on the unscored half must not change the score.
    proba[:3] = 1 - proba[:3]
    mask[:3] = False
    assert roc_auc(reference, proba, mask=mask)[0] == pytest.approx(1.0)
    assert roc_auc(reference, proba)[0] < 1.0


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------


def test_match_recovers_permutation():
    reference = random_cover(SHAPE, 5, 0.25, seed=14)
    permutation = np.array([3, 0, 4, 1, 2])
    predicted = reference[..., permutation]
    reference_indices, predicted_indices, dice = match_clusters(reference, predicted)
    np.testing.assert_array_equal(reference_indices, np.arange(5))
    # predicted[..., j] is reference[..., permutation[j]].
    np.testing.assert_array_equal(permutation[predicted_indices], np.arange(5))
    assert dice.shape == (5, 5)
    np.testing.assert_allclose(dice[reference_indices, predicted_indices], 1.0)


def test_match_more_predicted_than_reference():
    reference = random_cover(SHAPE, 2, 0.3, seed=15)
    noise = random_cover(SHAPE, 3, 0.3, seed=16)
    predicted = np.concatenate([noise[..., :1], reference[..., 1:], noise[..., 1:],
                                reference[..., :1]], axis=-1)
    reference_indices, predicted_indices, dice = match_clusters(reference, predicted)
    assert dice.shape == (2, 5)
    np.testing.assert_array_equal(reference_indices, [0, 1])
    np.testing.assert_array_equal(predicted_indices, [4, 1])


def test_match_fewer_predicted_than_reference():
    reference = random_cover(SHAPE, 4, 0.3, seed=17)
    predicted = reference[..., [2]]
    reference_indices, predicted_indices, _ = match_clusters(reference, predicted)
    np.testing.assert_array_equal(reference_indices, [2])
    np.testing.assert_array_equal(predicted_indices, [0])


def test_match_dice_matrix_values():
    reference = random_cover(SHAPE, 2, 0.3, seed=18)
    predicted = random_cover(SHAPE, 3, 0.3, seed=19)
    _, _, dice = match_clusters(reference, predicted)
    for r in range(2):
        for q in range(3):
            expected = dice_score(reference[..., [r]], predicted[..., [q]])[0]
            assert dice[r, q] == pytest.approx(expected)


# ---------------------------------------------------------------------------
# Overlapping NMI and Omega index
# ---------------------------------------------------------------------------


def test_onmi_identical_covers():
    cover = random_cover(SHAPE, 4, 0.3, seed=20)
    assert overlapping_nmi(cover, cover) == pytest.approx(1.0)
    assert overlapping_nmi(cover, cover[..., ::-1]) == pytest.approx(1.0)


def test_onmi_independent_covers_near_zero():
    first = random_cover((20, 20, 20), 5, 0.2, seed=21)
    second = random_cover((20, 20, 20), 6, 0.3, seed=22)
    assert overlapping_nmi(first, second) < 0.02


def test_onmi_symmetric():
    first = random_cover(SHAPE, 3, 0.3, seed=23)
    second = np.clip(first[..., [1, 0]] + random_cover(SHAPE, 2, 0.1, seed=24), 0, 1)
    assert overlapping_nmi(first, second) == pytest.approx(overlapping_nmi(second, first))


def test_onmi_hand_computed_case():
    # Four items: X = {0, 1}, Y = {0, 1, 2}. With one column each, NMI_max is
    # the mutual information divided by the larger entropy:
    # H(X) = 1 bit, H(Y) = h(3/4) + h(1/4), H(X, Y) = h(1/4) + h(1/4) + h(1/2) = 1.5 bits.
    cover_x = np.array([[1], [1], [0], [0]], dtype=float)
    cover_y = np.array([[1], [1], [1], [0]], dtype=float)
    entropy_y = -0.75 * math.log2(0.75) - 0.25 * math.log2(0.25)
    expected = (1.0 + entropy_y - 1.5) / 1.0
    assert expected == pytest.approx(0.311278, abs=1e-6)
    assert overlapping_nmi(cover_x, cover_y) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [25, 26, 27])
def test_onmi_matches_loop_implementation(seed):
    first = random_cover((6, 5, 4), 3, 0.3, seed=seed)
    second = np.clip(first[..., [0, 2]] + random_cover((6, 5, 4), 2, 0.2, seed=seed + 100), 0, 1)
    second = np.concatenate([second, random_cover((6, 5, 4), 1, 0.5, seed=seed + 200)], axis=-1)
    expected = onmi_by_loops(first.reshape(-1, 3), second.reshape(-1, 3))
    assert overlapping_nmi(first, second) == pytest.approx(expected)


def test_onmi_complement_is_not_a_match():
    # A cluster's complement is fully informative in the plain mutual
    # information, but the admissibility constraint rejects it.
    cover = random_cover(SHAPE, 1, 0.3, seed=28)
    assert overlapping_nmi(cover, 1 - cover) == pytest.approx(0.0)


def test_onmi_mask_and_trivial_covers():
    cover = random_cover(SHAPE, 2, 0.3, seed=29)
    mask = np.zeros(SHAPE, dtype=bool)
    assert np.isnan(overlapping_nmi(cover, cover, mask=mask))
    assert np.isnan(overlapping_nmi(np.zeros(SHAPE + (2,)), np.zeros(SHAPE + (1,))))


def test_omega_identical_and_random():
    first = random_cover((10, 10, 10), 4, 0.3, seed=30)
    second = random_cover((10, 10, 10), 4, 0.3, seed=31)
    assert omega_index(first, first) == pytest.approx(1.0)
    assert abs(omega_index(first, second)) < 0.05


def test_omega_equals_ari_for_partitions():
    rng = np.random.default_rng(32)
    labels_a = rng.integers(0, 3, 300)
    labels_b = rng.integers(0, 4, 300)
    labels_b[:200] = labels_a[:200]
    expected = adjusted_rand_score(labels_a, labels_b)
    assert omega_index(np.eye(3)[labels_a], np.eye(4)[labels_b]) == pytest.approx(expected)


def test_omega_counts_shared_memberships():
    # Items 0 and 1 share two clusters in the reference but only one in the
    # prediction, so that pair disagrees even though both covers group them.
    reference = np.array([[1, 1], [1, 1], [0, 0], [0, 1]], dtype=float)
    predicted = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=float)
    # Pairs (01, 02, 03, 12, 13, 23): reference counts 2,0,1,0,1,0; prediction
    # counts 1,0,0,0,1,0. Agreement 4/6; expected sum_j N_j N'_j / 36 with
    # reference histogram {0: 3, 1: 2, 2: 1} and prediction {0: 4, 1: 2}.
    observed = 4 / 6
    expected = (3 * 4 + 2 * 2) / 36
    assert omega_index(reference, predicted) == pytest.approx(
        (observed - expected) / (1 - expected)
    )


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------


def test_evaluate_without_matching_uses_first_columns():
    reference = random_cover(SHAPE, 3, 0.3, seed=33)
    extra = random_cover(SHAPE, 2, 0.3, seed=34)
    proba = np.concatenate([reference * 0.9, extra], axis=-1)
    scores = evaluate_clusters(reference, proba)
    np.testing.assert_allclose(scores["dice"], 1.0)
    np.testing.assert_allclose(scores["auc"], 1.0)
    np.testing.assert_array_equal(scores["matched"], [0, 1, 2])
    assert scores["mean_dice"] == pytest.approx(1.0)
    assert scores["onmi"] == pytest.approx(1.0)
    assert scores["omega"] == pytest.approx(1.0)
    assert scores["n_scored_voxels"] == int(np.prod(SHAPE))


def test_evaluate_with_matching():
    reference = random_cover(SHAPE, 3, 0.3, seed=35)
    proba = np.concatenate([random_cover(SHAPE, 1, 0.3, seed=36), reference[..., [2, 0, 1]]],
                           axis=-1)
    scores = evaluate_clusters(reference, proba, match=True)
    np.testing.assert_array_equal(scores["matched"], [2, 3, 1])
    np.testing.assert_allclose(scores["dice"], 1.0)


def test_evaluate_unmatched_reference_is_nan():
    reference = random_cover(SHAPE, 3, 0.3, seed=37)
    scores = evaluate_clusters(reference, reference[..., [1]], match=True)
    np.testing.assert_array_equal(scores["matched"], [-1, 0, -1])
    assert np.isnan(scores["dice"][0])
    assert scores["dice"][1] == pytest.approx(1.0)
    assert scores["mean_dice"] == pytest.approx(1.0)


def test_evaluate_entry_mask():
    reference = random_cover(SHAPE, 2, 0.3, seed=38)
    proba = reference.copy()
    proba[:4] = 1 - proba[:4]
    held_out = np.zeros(SHAPE + (2,), dtype=bool)
    held_out[4:] = True
    scores = evaluate_clusters(reference, proba, mask=held_out)
    np.testing.assert_allclose(scores["dice"], 1.0)
    assert scores["n_scored_entries"] == 2 * 3 * 8 * 9
    assert scores["n_scored_voxels"] == 3 * 8 * 9


def test_evaluate_rejects_too_few_columns():
    reference = random_cover(SHAPE, 3, 0.3, seed=39)
    with pytest.raises(InvalidInputError, match="match=True"):
        evaluate_clusters(reference, reference[..., :2])
