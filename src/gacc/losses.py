"""Loss terms of GACC. Every term is bounded below by 0.

Each network minimises only its own objective: the discriminator its
classification loss, each cooperative predictor its prediction error, and
the generator the weighted sum of the supervised, adversarial and
cooperative terms, computed with the other networks frozen.
"""

import torch
from torch.nn import functional as F

__all__ = [
    "adversarial_generator_loss",
    "cluster_to_entity_loss",
    "discriminator_loss",
    "entity_to_cluster_loss",
    "masked_mean",
    "supervised_loss",
]


def masked_mean(values, mask):
    """Mean of ``values`` over the entries where ``mask`` is 1; 0 when none is."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def supervised_loss(logits, targets, known, positive_weight=None):
    """Binary cross-entropy on the known ground-truth entries.

    Parameters
    ----------
    logits : Tensor of shape (B, N, P)
        Generator logits of the first P clusters.
    targets : Tensor of shape (B, N, P)
        Ground truth in [0, 1] (unknown entries hold any value).
    known : Tensor of shape (B, N, P)
        1 where the ground truth is known.
    positive_weight : Tensor of shape (P,), optional
        Weight of the inside-cluster term per cluster, to balance small
        clusters against the many outside voxels.
    """
    losses = F.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=positive_weight, reduction="none"
    )
    return masked_mean(losses, known)


def discriminator_loss(real_logits, fake_logits):
    """Cross-entropy of telling real columns (label 1) from generated ones (label 0)."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def adversarial_generator_loss(fake_logits):
    """Non-saturating generator loss: -log D(fake), that is softplus(-logit)."""
    return F.softplus(-fake_logits).mean()


def entity_to_cluster_loss(logits, columns, hidden):
    """Cross-entropy of the predicted column against the true one, on hidden entries.

    ``columns`` are soft memberships in [0, 1]; the loss is at least the
    entropy of the column, so it is bounded below.
    """
    losses = F.binary_cross_entropy_with_logits(logits, columns, reduction="none")
    return masked_mean(losses, hidden)


def cluster_to_entity_loss(reconstruction, data, hidden):
    """Mean squared error of reconstructed features on the hidden entries only.

    reconstruction (B, C, N, T); data and hidden (B, N, T), broadcast over
    the C columns.
    """
    squared = (reconstruction - data.unsqueeze(1)) ** 2
    return masked_mean(squared, hidden.unsqueeze(1).expand_as(squared))
