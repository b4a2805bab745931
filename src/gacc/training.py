"""One GACC training step: discriminator, cooperative predictors, then generator.

Shapes: B sets, N voxels per set, T data features, E positional features,
F = T + E token features, K generated clusters, P known clusters.
"""

import gc
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .exceptions import NonFiniteLossError
from .losses import (
    adversarial_generator_loss,
    cluster_to_entity_loss,
    discriminator_loss,
    entity_to_cluster_loss,
    supervised_loss,
)
from .networks import ClusterToEntityPredictor, Discriminator, EntityToClusterPredictor, Generator

logger = logging.getLogger(__name__)

__all__ = [
    "Batch",
    "GACCNetworks",
    "LossWeights",
    "TrainingStep",
    "is_out_of_memory",
    "release_cached_memory",
]

# Gradients are clipped to this global norm per network, which keeps a rare
# large batch from throwing the weights far off.
MAX_GRADIENT_NORM = 1.0

# Starts of the messages of allocation failures that PyTorch raises as a
# plain RuntimeError rather than torch.OutOfMemoryError: the Apple MPS
# allocator and the CPU allocator.
_OUT_OF_MEMORY_MESSAGES = (
    "MPS backend out of memory",
    "DefaultCPUAllocator: can't allocate memory",
)


def is_out_of_memory(error):
    """Return whether ``error`` is an allocation failure on a CUDA or MPS device or the CPU."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(
        message in str(error) for message in _OUT_OF_MEMORY_MESSAGES
    )


def release_cached_memory(device):
    """Free unreferenced tensors and hand the allocator's cached blocks back to ``device``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


@dataclass(frozen=True)
class LossWeights:
    """Weights of the generator's loss terms; 0 turns a term and its network off."""

    supervised: float = 1.0
    adversarial: float = 0.1
    xc: float = 0.1
    cx: float = 0.1


@dataclass
class Batch:
    """Tensors of one training batch, all on the training device."""

    tokens: torch.Tensor  # (B, N, F): scaled data then positional encoding
    data: torch.Tensor  # (B, N, T): scaled data alone
    position: torch.Tensor  # (B, N, E)
    targets: torch.Tensor  # (B, N, P): ground truth, 0 where unknown
    known: torch.Tensor  # (B, N, P): 1 where the ground truth is known


class GACCNetworks(nn.Module):
    """The generator, the discriminator and the two cooperative predictors."""

    def __init__(self, num_data_features, num_position_features, num_clusters, *,
                 hidden_size=64, num_heads=4, num_layers=2, column_hidden_size=32):
        super().__init__()
        num_features = num_data_features + num_position_features
        self.generator = Generator(num_features, num_clusters, hidden_size, num_heads, num_layers)
        column_options = {"hidden_size": column_hidden_size, "num_heads": num_heads,
                          "num_layers": 1}
        self.discriminator = Discriminator(num_features, **column_options)
        self.xc_predictor = EntityToClusterPredictor(num_features, **column_options)
        # Tokens of C c->x: data with hidden entries zeroed, the hiding mask, the position.
        self.cx_predictor = ClusterToEntityPredictor(
            2 * num_data_features + num_position_features, num_data_features, **column_options
        )


def _compiled(module, compile_modules):
    if not compile_modules:
        return module
    try:
        return torch.compile(module, dynamic=False)
    except Exception as error:  # noqa: BLE001 - any failure means: run eagerly
        logger.warning("torch.compile is unavailable (%s); running eagerly.", error)
        return module


def _clone(value):
    """Copy every tensor in a nested structure of dicts and lists."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(item) for item in value)
    return value


def _check_finite(name, loss, step):
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"The {name} loss became {loss.item()} at step {step}; training stopped and "
            "the model keeps the weights from the start of that step. Lower the learning "
            "rates or the loss weights, and check the data for extreme values."
        )


class TrainingStep:
    """Run GACC training steps on a set of networks with their optimizers.

    Parameters
    ----------
    networks : GACCNetworks
    weights : LossWeights
    learning_rates : dict
        ``{"generator": ..., "discriminator": ..., "predictor": ...}``.
    hide_probability : float
        Probability of hiding each membership entry (for C x->c) and each
        feature entry (for C c->x).
    positive_weight : Tensor of shape (P,), optional
        Weight of inside-cluster entries in the supervised loss.
    compile_modules : bool
        Wrap the networks in ``torch.compile``.
    columns_per_step : int or None
        Generated clusters the per-column networks see per step, drawn at
        random; None uses all K.
    """

    def __init__(self, networks, weights, learning_rates, hide_probability,
                 positive_weight=None, compile_modules=False, columns_per_step=None):
        self.networks = networks
        self.weights = weights
        self.hide_probability = hide_probability
        self.positive_weight = positive_weight
        self.columns_per_step = columns_per_step
        self.compiled = False
        # State at the start of the last completed step, restored when the
        # next step finds the generator's output non-finite.
        self._previous_state = None
        self._wrap_modules(compile_modules)
        self.optimizers = {
            "generator": torch.optim.Adam(
                networks.generator.parameters(), lr=learning_rates["generator"]
            ),
            "discriminator": torch.optim.Adam(
                networks.discriminator.parameters(), lr=learning_rates["discriminator"],
                betas=(0.5, 0.999),
            ),
            "xc_predictor": torch.optim.Adam(
                networks.xc_predictor.parameters(), lr=learning_rates["predictor"]
            ),
            "cx_predictor": torch.optim.Adam(
                networks.cx_predictor.parameters(), lr=learning_rates["predictor"]
            ),
        }

    def _wrap_modules(self, compile_modules):
        networks = self.networks
        self.generator = _compiled(networks.generator, compile_modules)
        self.discriminator = _compiled(networks.discriminator, compile_modules)
        self.xc_predictor = _compiled(networks.xc_predictor, compile_modules)
        self.cx_predictor = _compiled(networks.cx_predictor, compile_modules)
        self.compiled = self.generator is not networks.generator

    def disable_compile(self):
        """Run the networks eagerly from now on, after torch.compile failed."""
        self._wrap_modules(False)

    def set_learning_rates(self, generator, discriminator, predictor):
        """Set the learning rate of every optimizer, for example after loading its state."""
        rates = {"generator": generator, "discriminator": discriminator,
                 "xc_predictor": predictor, "cx_predictor": predictor}
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = rates[name]

    def _update(self, name, loss, step):
        _check_finite(name, loss, step)
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        module = getattr(self.networks, name)
        norm = nn.utils.clip_grad_norm_(module.parameters(), MAX_GRADIENT_NORM)
        if not torch.isfinite(norm):
            raise NonFiniteLossError(
                f"The {name} gradients became non-finite at step {step}; training stopped "
                "and the model keeps the weights from the start of that step. Lower the "
                "learning rates."
            )
        optimizer.step()

    def _draw_masks(self, batch, num_clusters, generator):
        size, length, num_data = batch.data.shape
        device = batch.data.device
        entries = torch.rand(size, num_clusters, length, device=device, generator=generator)
        features = torch.rand(size, length, num_data, device=device, generator=generator)
        membership_hidden = (entries < self.hide_probability).float()  # (B, K, N)
        feature_hidden = (features < self.hide_probability).float()  # (B, N, T)
        return membership_hidden, feature_hidden

    def _fake_visibility(self, known_columns, num_clusters, generator):
        # Each generated column is shown on the known-entry pattern of a random
        # real column of the same set, so visibility alone gives nothing away.
        size, num_known, length = known_columns.shape
        choice = torch.randint(
            num_known, (size, num_clusters), device=known_columns.device, generator=generator
        )
        return known_columns.gather(1, choice.unsqueeze(-1).expand(-1, -1, length))  # (B, K, N)

    def _cooperative_terms(self, batch, columns, membership_hidden, feature_hidden):
        losses = {}
        if self.weights.xc:
            logits = self.xc_predictor(
                batch.tokens, columns * (1.0 - membership_hidden), membership_hidden
            )  # (B, K, N)
            losses["xc"] = entity_to_cluster_loss(logits, columns, membership_hidden)
        if self.weights.cx:
            masked_tokens = torch.cat(
                (batch.data * (1.0 - feature_hidden), feature_hidden, batch.position), dim=-1
            )  # (B, N, 2T + E)
            reconstruction = self.cx_predictor(masked_tokens, columns)  # (B, K, N, T)
            losses["cx"] = cluster_to_entity_loss(reconstruction, batch.data, feature_hidden)
        return losses

    def _snapshot(self):
        """Copy the weights of every network and the state of every optimizer."""
        return {
            "networks": _clone(self.networks.state_dict()),
            "optimizers": {
                name: _clone(optimizer.state_dict()) for name, optimizer in self.optimizers.items()
            },
        }

    def _restore(self, snapshot):
        self.networks.load_state_dict(snapshot["networks"])
        for name, optimizer in self.optimizers.items():
            # Cloned again, because load_state_dict may keep the given tensors.
            optimizer.load_state_dict(_clone(snapshot["optimizers"][name]))

    def __call__(self, batch, step, generator):
        """Run one training step and return every loss term as a float.

        Raises
        ------
        NonFiniteLossError
            If a loss or a gradient becomes NaN or infinite. Every network and
            optimizer is first restored to its state at the start of this
            step. When the generator's output is already non-finite, the
            previous step's update caused it, so the state at the start of
            the previous step is restored and the error's
            ``rolled_back_steps`` is 1 (0 otherwise).

        Any other error or interruption during the updates, such as running
        out of memory or KeyboardInterrupt, also restores the state at the
        start of this step before it propagates. The step can then be
        retried, and the weights always match a whole number of steps.
        """
        logits = self.generator(batch.tokens)  # (B, N, K)
        if not torch.isfinite(logits).all():
            rolled_back_steps = 0
            if self._previous_state is not None:
                self._restore(self._previous_state)
                self._previous_state = None
                rolled_back_steps = 1
            error = NonFiniteLossError(
                f"The generator's output became non-finite at step {step}; training stopped "
                "and the model keeps the last weights whose output was finite. Lower the "
                "learning rates, and check the data for extreme values."
            )
            error.rolled_back_steps = rolled_back_steps
            raise error

        start_state = self._snapshot()
        try:
            logged = self._train(batch, logits, step, generator)
        except NonFiniteLossError as error:
            self._restore(start_state)
            error.rolled_back_steps = 0
            raise
        except BaseException:
            # Some networks may have been updated already.
            del logits
            self._restore(start_state)
            raise
        self._previous_state = start_state
        return logged

    def _train(self, batch, logits, step, generator):
        num_clusters = logits.shape[-1]
        num_known = batch.targets.shape[-1]
        columns = torch.sigmoid(logits).transpose(1, 2)  # (B, K, N)
        device = logits.device
        if self.columns_per_step is not None and self.columns_per_step < num_clusters:
            # The per-column networks see a random subset of C generated
            # clusters per step: an unbiased estimate of the mean over all K.
            chosen = torch.randperm(num_clusters, device=device, generator=generator)
            columns = columns[:, chosen[:self.columns_per_step]]  # (B, C, N)
        num_columns = columns.shape[1]
        detached = columns.detach()
        membership_hidden, feature_hidden = self._draw_masks(batch, num_columns, generator)
        logged = {}

        if self.weights.adversarial:
            known_columns = batch.known.transpose(1, 2)  # (B, P, N)
            real_columns = batch.targets.transpose(1, 2) * known_columns
            real_visible = known_columns
            if num_columns < num_known:
                chosen = torch.randperm(num_known, device=device, generator=generator)
                chosen = chosen[:num_columns]
                real_columns, real_visible = real_columns[:, chosen], known_columns[:, chosen]
            fake_visible = self._fake_visibility(known_columns, num_columns, generator)
            real_logits = self.discriminator(batch.tokens, real_columns, real_visible)
            fake_logits = self.discriminator(batch.tokens, detached * fake_visible, fake_visible)
            loss = discriminator_loss(real_logits, fake_logits)
            self._update("discriminator", loss, step)
            logged["discriminator"] = loss.item()

        predictor_losses = self._cooperative_terms(
            batch, detached, membership_hidden, feature_hidden
        )
        for term, loss in predictor_losses.items():
            self._update(f"{term}_predictor", loss, step)
            logged[f"{term}_predictor"] = loss.item()

        # Generator update; the other networks are frozen so that only the
        # generator's weights receive gradients from its objective.
        frozen = [self.networks.discriminator, self.networks.xc_predictor,
                  self.networks.cx_predictor]
        for module in frozen:
            module.requires_grad_(False)
        try:
            terms = {}
            if self.weights.supervised:
                terms["supervised"] = supervised_loss(
                    logits[..., :num_known], batch.targets, batch.known, self.positive_weight
                )
            if self.weights.adversarial:
                fake_logits = self.discriminator(
                    batch.tokens, columns * fake_visible, fake_visible
                )
                terms["adversarial"] = adversarial_generator_loss(fake_logits)
            terms.update(
                self._cooperative_terms(batch, columns, membership_hidden, feature_hidden)
            )
            total = sum(getattr(self.weights, term) * value for term, value in terms.items())
            self._update("generator", total, step)
        finally:
            for module in frozen:
                module.requires_grad_(True)

        logged.update({term: value.item() for term, value in terms.items()})
        logged["generator"] = total.item()
        return logged
