"""Tests of the GACC loss terms against values computed independently with numpy."""

import numpy as np
import pytest
import torch

from gacc.losses import (
    adversarial_generator_loss,
    cluster_to_entity_loss,
    discriminator_loss,
    entity_to_cluster_loss,
    masked_mean,
    supervised_loss,
)


def _bce_with_logits(logits, targets, positive_weight=1.0):
    """Binary cross-entropy from logits, written out in float64 numpy."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    log_p = -np.logaddexp(0.0, -logits)  # log sigmoid(x)
    log_not_p = -np.logaddexp(0.0, logits)  # log (1 - sigmoid(x))
    return -(positive_weight * targets * log_p + (1.0 - targets) * log_not_p)


def _random(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _mask(shape, seed, probability=0.5):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < probability).float()


def test_masked_mean_value():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)


def test_masked_mean_empty_mask():
    values = torch.tensor([1.0, 2.0])
    result = masked_mean(values, torch.zeros(2))
    assert result.item() == 0.0
    assert torch.isfinite(result)


def test_supervised_loss_matches_numpy():
    logits = _random((3, 5, 2), 0, scale=3.0)
    targets = _mask((3, 5, 2), 1)
    known = _mask((3, 5, 2), 2, probability=0.6)
    expected = _bce_with_logits(logits.numpy(), targets.numpy())
    expected = (expected * known.numpy()).sum() / known.numpy().sum()
    assert supervised_loss(logits, targets, known).item() == pytest.approx(expected, rel=1e-5)


def test_supervised_loss_ignores_unknown():
    logits = _random((3, 5, 2), 0)
    targets = _mask((3, 5, 2), 1)
    known = _mask((3, 5, 2), 2)
    flipped = torch.where(known > 0, targets, 1.0 - targets)
    assert supervised_loss(logits, targets, known).item() == pytest.approx(
        supervised_loss(logits, flipped, known).item()
    )


def test_supervised_loss_positive_weight():
    logits = _random((4, 6, 2), 3)
    targets = _mask((4, 6, 2), 4)
    known = torch.ones_like(targets)
    weight = torch.tensor([5.0, 1.0])
    expected = _bce_with_logits(logits.numpy(), targets.numpy(), weight.numpy()).mean()
    result = supervised_loss(logits, targets, known, weight).item()
    assert result == pytest.approx(expected, rel=1e-5)
    assert result > supervised_loss(logits, targets, known).item()


def test_discriminator_loss_matches_numpy():
    real = _random((3, 2), 5)
    fake = _random((3, 4), 6)
    expected = (
        _bce_with_logits(real.numpy(), np.ones((3, 2))).mean()
        + _bce_with_logits(fake.numpy(), np.zeros((3, 4))).mean()
    )
    assert discriminator_loss(real, fake).item() == pytest.approx(expected, rel=1e-5)


def test_discriminator_loss_falls_when_correct():
    confident = discriminator_loss(torch.full((2, 3), 8.0), torch.full((2, 5), -8.0))
    fooled = discriminator_loss(torch.full((2, 3), -8.0), torch.full((2, 5), 8.0))
    assert confident.item() < 1e-3
    assert fooled.item() > 10.0


def test_adversarial_loss_matches_numpy():
    fake = _random((3, 4), 7, scale=2.0)
    expected = _bce_with_logits(fake.numpy(), np.ones((3, 4))).mean()
    assert adversarial_generator_loss(fake).item() == pytest.approx(expected, rel=1e-5)


def test_adversarial_loss_falls_as_fakes_pass():
    losses = [adversarial_generator_loss(torch.full((2, 3), value)).item()
              for value in (-5.0, 0.0, 5.0)]
    assert losses[0] > losses[1] > losses[2] > 0.0


def test_entity_to_cluster_loss_hidden_only():
    logits = _random((2, 3, 7), 8)
    columns = torch.rand(2, 3, 7, generator=torch.Generator().manual_seed(9))
    hidden = _mask((2, 3, 7), 10)
    expected = _bce_with_logits(logits.numpy(), columns.numpy())
    expected = (expected * hidden.numpy()).sum() / hidden.numpy().sum()
    assert entity_to_cluster_loss(logits, columns, hidden).item() == pytest.approx(
        expected, rel=1e-5
    )

    # Changing the prediction on visible entries changes nothing.
    changed = torch.where(hidden > 0, logits, logits + 10.0)
    assert entity_to_cluster_loss(changed, columns, hidden).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_cluster_to_entity_loss_hidden_only():
    reconstruction = _random((2, 3, 5, 4), 11)  # (B, C, N, T)
    data = _random((2, 5, 4), 12)  # (B, N, T)
    hidden = _mask((2, 5, 4), 13)
    squared = (reconstruction.numpy() - data.numpy()[:, None]) ** 2
    weights = np.broadcast_to(hidden.numpy()[:, None], squared.shape)
    expected = (squared * weights).sum() / weights.sum()
    assert cluster_to_entity_loss(reconstruction, data, hidden).item() == pytest.approx(
        expected, rel=1e-5
    )

    # The predictor is scored on the entries it cannot see, not the visible ones.
    changed = torch.where(hidden[:, None] > 0, reconstruction, reconstruction + 100.0)
    assert cluster_to_entity_loss(changed, data, hidden).item() == pytest.approx(
        expected, rel=1e-5
    )


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6], ids=["normal", "large", "huge"])
def test_losses_finite_and_nonnegative(scale):
    logits = _random((2, 6, 3), 14, scale=scale)
    targets = _mask((2, 6, 3), 15)
    known = _mask((2, 6, 3), 16)
    columns = torch.sigmoid(_random((2, 3, 6), 17, scale=scale))
    reconstruction = _random((2, 3, 6, 4), 18, scale=scale)
    data = _random((2, 6, 4), 19)
    hidden = _mask((2, 6, 4), 20)
    losses = {
        "supervised": supervised_loss(logits, targets, known),
        "discriminator": discriminator_loss(logits[..., 0], logits[..., 1]),
        "adversarial": adversarial_generator_loss(logits[..., 2]),
        "xc": entity_to_cluster_loss(logits.transpose(1, 2), columns, targets.transpose(1, 2)),
        "cx": cluster_to_entity_loss(reconstruction, data, hidden),
    }
    for name, loss in losses.items():
        assert torch.isfinite(loss), name
        assert loss.item() >= 0.0, name


def test_entity_to_cluster_loss_bounded_by_entropy():
    # With soft targets the cross-entropy is at least the targets' entropy,
    # reached when the prediction equals the target.
    columns = torch.tensor([[[0.2, 0.5, 0.9]]])
    hidden = torch.ones_like(columns)
    exact = entity_to_cluster_loss(torch.logit(columns), columns, hidden).item()
    p = columns.numpy().astype(np.float64)
    entropy = float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))))
    assert exact == pytest.approx(entropy, rel=1e-5)
    assert entity_to_cluster_loss(torch.zeros_like(columns), columns, hidden).item() > exact
