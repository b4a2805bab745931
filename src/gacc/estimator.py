"""The GACC estimator: fit on a 4D volume with partial clusters, predict memberships."""

import logging
import math
import numbers
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from . import checkpoint
from .devices import resolve_device
from .exceptions import InvalidInputError, NonFiniteLossError
from .preprocessing import (
    MinMaxScaling,
    check_cluster_xyzp,
    check_data_xyzt,
    foreground_indices,
    iter_voxels,
    positional_encoding,
)
from .sampling import draw_local_training_sets, draw_training_sets, prediction_sets
from .training import (
    Batch,
    GACCNetworks,
    LossWeights,
    TrainingStep,
    is_out_of_memory,
    release_cached_memory,
)

logger = logging.getLogger(__name__)

__all__ = ["GACC"]

# Cap of the "balanced" weight of inside-cluster entries, so a cluster with a
# handful of known inside voxels cannot dominate the supervised loss.
MAX_POSITIVE_WEIGHT = 50.0


def _is_real(value):
    """Return whether ``value`` is a real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_positive_int(value):
    """Return whether ``value`` is an integer >= 1 (numpy integers included), not a bool."""
    return (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
            and value >= 1)


def _first_sentence(error):
    """Return the first sentence of an error message, without its final period."""
    message = str(error).strip() or type(error).__name__
    return message.splitlines()[0].split(". ")[0].rstrip(".")


class GACC(BaseEstimator):
    """Generative Adversarial-Cooperative Clustering of 4D volumes.

    GACC learns overlapping memberships of voxels in ``num_clusters``
    clusters from a volume of feature vectors (``data_xyzt``) and partly
    known clusters (``cluster_xyzp``). The first P predicted clusters follow
    the given ones; the remaining K - P are discovered. Memberships are
    independent sigmoids, so a voxel may belong to several clusters.

    Parameters
    ----------
    num_clusters : int, default=50
        K, the number of clusters predicted; at least the number of given
        clusters P.
    run_eagerly : bool, default=True
        True runs plain eager PyTorch, easiest to debug. False compiles the
        networks with ``torch.compile``, falling back to eager mode with a
        logged warning where compiling is not possible.
    min_max_scale_range : sequence of two floats or None, default=(0.0, 1.0)
        Range each feature is scaled to, with minimum and maximum learned on
        the foreground voxels in ``fit`` and reused in ``predict``. None turns
        scaling off.
    set_size : int, default=8
        N, voxels per set.
    set_sampling : {"global", "local"}, default="local"
        How a set is drawn, in training and in prediction alike. "local": N
        voxels drawn at random from one cube of ``window_size`` voxels per
        side, the cubes laid over the volume at a random offset, so a voxel's
        memberships can draw on its neighbours. "global": N voxels drawn
        uniformly at random from the whole foreground. On held-out labels of
        semi-synthetic fMRI, "local" scored a mean Dice of 0.68 against 0.05
        (benchmarks/quality.py).
    window_size : int, default=5
        Side of the cubes of "local" sampling, in voxels.
    annotated_fraction : float, default=0.0
        With "global" sampling, the probability that a training set member is
        drawn from the voxels with at least one known label rather than from
        the whole foreground. Sparse annotations get more supervision per step.
    batch_size : int, default=32
        B, sets per training step.
    hidden_size : int, default=64
        Width of the generator's transformer.
    column_hidden_size : int, default=32
        Width of the discriminator and the cooperative predictors.
    num_heads : int, default=4
        Attention heads; must divide both widths.
    num_layers : int, default=2
        Transformer blocks of the generator.
    num_frequencies : int, default=6
        Frequencies per axis of the positional encoding.
    learning_rate : float, default=1e-3
        Adam learning rate of the generator.
    discriminator_learning_rate : float, default=1e-3
    predictor_learning_rate : float, default=1e-3
        Adam learning rate of both cooperative predictors.
    supervised_weight, adversarial_weight, xc_weight, cx_weight : float
        Weights of the generator's loss terms (defaults 1.0, 0.1, 0.01, 0.1).
        ``xc`` is the entity-to-cluster predictor's error, ``cx`` the
        cluster-to-entity predictor's error. A weight of 0 turns the term off
        and skips training the network behind it. The ``xc`` error is lowest
        for empty, trivially predictable clusters, so a large ``xc_weight``
        pulls memberships towards 0.
    columns_per_step : int or None, default=16
        Generated clusters that the discriminator and the cooperative
        predictors see per training step, drawn at random each step; their
        cost grows with this number. None uses all K clusters every step.
    hide_probability : float, default=0.5
        Probability of hiding each membership entry from the entity-to-cluster
        predictor and each feature entry from the cluster-to-entity predictor.
    class_weight : {None, "balanced"}, default=None
        "balanced" weighs known inside-cluster entries by the ratio of known
        outside to inside entries of their cluster (at most 50).
    prediction_repeats : int, default=8
        Random partitions of the foreground into sets at prediction; each
        voxel's memberships are averaged over them.
    prediction_batch_size : int, default=4096
        Sets per forward pass at prediction; lower it if memory runs out.
    device : str or torch.device, default="auto"
        "auto" picks CUDA, then Apple MPS, then the CPU.
    random_state : int or None, default=None
        Seed of weight initialisation, set sampling and hiding masks, from 0
        to 2**32 - 1. With an int, CPU runs repeat exactly. Prediction is
        deterministic either way.

    Attributes
    ----------
    history_ : dict of str to list of float
        Every loss term at every training step, over all fits.
    n_steps_ : int
        Training steps run so far.
    n_features_in_ : int
        T, features per voxel seen in ``fit``.
    n_known_clusters_ : int
        P, number of given clusters.
    spatial_shape_ : tuple of int
        (X, Y, Z) of the fitted volume.
    scaling_ : MinMaxScaling
        Scaling statistics learned in the first ``fit``.
    networks_ : GACCNetworks
        The trained networks.
    device_ : torch.device

    Examples
    --------
    >>> model = GACC(num_clusters=50, run_eagerly=True, min_max_scale_range=[0.0, 1.0])
    >>> model.fit(data_xyzt=data_xyzt, cluster_xyzp=cluster_xyzp, num_batches=10, epochs=40)
    >>> cluster_xyzk = model.predict(data_xyzt=data_xyzt)  # (X, Y, Z, K) in [0, 1]
    """

    def __init__(
        self,
        num_clusters=50,
        *,
        run_eagerly=True,
        min_max_scale_range=(0.0, 1.0),
        set_size=8,
        set_sampling="local",
        window_size=5,
        annotated_fraction=0.0,
        columns_per_step=16,
        batch_size=32,
        hidden_size=64,
        column_hidden_size=32,
        num_heads=4,
        num_layers=2,
        num_frequencies=6,
        learning_rate=1e-3,
        discriminator_learning_rate=1e-3,
        predictor_learning_rate=1e-3,
        supervised_weight=1.0,
        adversarial_weight=0.1,
        xc_weight=0.01,
        cx_weight=0.1,
        hide_probability=0.5,
        class_weight=None,
        prediction_repeats=8,
        prediction_batch_size=4096,
        device="auto",
        random_state=None,
    ):
        self.num_clusters = num_clusters
        self.run_eagerly = run_eagerly
        self.min_max_scale_range = min_max_scale_range
        self.set_size = set_size
        self.set_sampling = set_sampling
        self.window_size = window_size
        self.annotated_fraction = annotated_fraction
        self.columns_per_step = columns_per_step
        self.batch_size = batch_size
        self.hidden_size = hidden_size
        self.column_hidden_size = column_hidden_size
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_frequencies = num_frequencies
        self.learning_rate = learning_rate
        self.discriminator_learning_rate = discriminator_learning_rate
        self.predictor_learning_rate = predictor_learning_rate
        self.supervised_weight = supervised_weight
        self.adversarial_weight = adversarial_weight
        self.xc_weight = xc_weight
        self.cx_weight = cx_weight
        self.hide_probability = hide_probability
        self.class_weight = class_weight
        self.prediction_repeats = prediction_repeats
        self.prediction_batch_size = prediction_batch_size
        self.device = device
        self.random_state = random_state

    # ------------------------------------------------------------------
    # Parameter checks

    def _validate_params(self):
        positive_ints = (
            "num_clusters", "set_size", "batch_size", "hidden_size", "column_hidden_size",
            "num_heads", "num_layers", "num_frequencies", "prediction_repeats",
            "prediction_batch_size", "window_size",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise InvalidInputError(f"{name}={value!r} must be an integer >= 1.")
        value = self.columns_per_step
        if value is not None and not _is_positive_int(value):
            raise InvalidInputError(
                f"columns_per_step={value!r} must be an integer >= 1, or None for all clusters."
            )
        annotated_fraction = self.annotated_fraction
        if not (_is_real(annotated_fraction) and 0 <= annotated_fraction < 1):
            raise InvalidInputError(
                f"annotated_fraction={annotated_fraction!r} must be a number in [0, 1)."
            )
        if self.set_size < 2:
            raise InvalidInputError(
                f"set_size={self.set_size} must be >= 2: a set needs several voxels for the "
                "transformer to relate them."
            )
        for name in ("hidden_size", "column_hidden_size"):
            if getattr(self, name) % self.num_heads:
                raise InvalidInputError(
                    f"{name}={getattr(self, name)} must be a multiple of "
                    f"num_heads={self.num_heads}."
                )
        for name in ("learning_rate", "discriminator_learning_rate", "predictor_learning_rate"):
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value) and value > 0):
                raise InvalidInputError(f"{name}={value!r} must be a finite number > 0.")
        for name in ("supervised_weight", "adversarial_weight", "xc_weight", "cx_weight"):
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value) and value >= 0):
                raise InvalidInputError(f"{name}={value!r} must be a finite number >= 0.")
        if self._loss_weights().supervised == 0 and not any(
            (self.adversarial_weight, self.xc_weight, self.cx_weight)
        ):
            raise InvalidInputError("All loss weights are 0; set at least one weight above 0.")
        if not (_is_real(self.hide_probability) and 0 < self.hide_probability < 1):
            raise InvalidInputError(
                f"hide_probability={self.hide_probability!r} must lie strictly between 0 and 1."
            )
        if self.set_sampling not in ("global", "local"):
            raise InvalidInputError(
                f"set_sampling={self.set_sampling!r} is not supported; use 'global' or 'local'."
            )
        if self.class_weight not in (None, "balanced"):
            raise InvalidInputError(
                f"class_weight={self.class_weight!r} is not supported; use None or 'balanced'."
            )
        # torch's CPU generator keeps only the low 32 bits of a seed, so larger
        # seeds would repeat smaller ones.
        seed = self.random_state
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
            or not 0 <= seed < 2**32
        ):
            raise InvalidInputError(
                f"random_state={seed!r} must be None or an integer from 0 to 2**32 - 1."
            )
        return MinMaxScaling(self.min_max_scale_range)

    def _loss_weights(self):
        return LossWeights(
            supervised=float(self.supervised_weight),
            adversarial=float(self.adversarial_weight),
            xc=float(self.xc_weight),
            cx=float(self.cx_weight),
        )

    # ------------------------------------------------------------------
    # Shared preprocessing

    def _check_fitted_shape(self, data):
        if data.shape[:3] != self.spatial_shape_ or data.shape[3] != self.n_features_in_:
            raise InvalidInputError(
                f"data_xyzt has shape {data.shape} but the model was fitted on "
                f"{self.spatial_shape_ + (self.n_features_in_,)}; give data on the same grid "
                "with the same features (resample it with nilearn if needed), or fit a new model."
            )

    def _voxel_tokens(self, data, flat_indices):
        """Return the tokens (n_voxels, T + E) of the voxels at ``flat_indices``.

        Each row contains the scaled data, then the positional encoding. The
        rows are built a chunk at a time, so the only full-size array made
        is the result itself.
        """
        n_features = self.n_features_in_
        n_position = 6 * self.num_frequencies
        tokens = np.empty((len(flat_indices), n_features + n_position), dtype=np.float32)
        start = 0
        n_overflow = 0
        for indices, voxels in iter_voxels(data, flat_indices):
            stop = start + len(indices)
            scaled = self.scaling_.transform(voxels)
            n_overflow += int(np.count_nonzero(~np.isfinite(scaled).all(axis=1)))
            tokens[start:stop, :n_features] = scaled
            tokens[start:stop, n_features:] = positional_encoding(
                indices, self.spatial_shape_, self.num_frequencies
            )
            start = stop
        if n_overflow:
            low, high = self.scaling_.data_min_.min(), self.scaling_.data_max_.max()
            raise InvalidInputError(
                f"Scaling data_xyzt with the minimum and maximum learned in fit (values from "
                f"{low:g} to {high:g}) overflows float32 in {n_overflow} voxels: their values "
                "lie far outside the range the model was fitted on. Give data on the fitted "
                "scale, or fit a new model."
            )
        return tokens

    # ------------------------------------------------------------------
    # Training

    def fit(self, data_xyzt, cluster_xyzp=None, *, known_mask=None, mask=None, num_batches=10,
            epochs=40, callbacks=None, stop_event=None, warm_start=False):
        """Train GACC on a volume and its partly known clusters.

        Parameters
        ----------
        data_xyzt : ndarray of shape (X, Y, Z, T)
            Feature vector of every voxel: time points of an fMRI run or a
            stack of maps.
        cluster_xyzp : ndarray of shape (X, Y, Z, P)
            Given clusters: 1 inside, 0 outside, NaN unknown; probabilistic
            maps in [0, 1] are used as soft targets. P <= ``num_clusters``.
        known_mask : ndarray of bool of shape (X, Y, Z, P), optional
            Marks the entries of ``cluster_xyzp`` that are known; combined
            with the NaN entries.
        mask : ndarray of bool of shape (X, Y, Z), optional
            Foreground (brain) mask. Voxels outside are never sampled.
            Default: the voxels whose data are not all zero.
        num_batches : int, default=10
            Training steps per epoch.
        epochs : int, default=40
        callbacks : list of gacc.callbacks.Callback, optional
        stop_event : threading.Event, optional
            Setting it from another thread stops training after the current
            step.
        warm_start : bool, default=False
            Continue from the current weights, optimizer state and scaling
            instead of starting afresh; the data must have the fitted shape.

        Returns
        -------
        self : GACC

        Raises
        ------
        InvalidInputError
            For invalid parameters or inputs.
        NonFiniteLossError
            If a loss becomes NaN or infinite. Every network keeps the
            weights from before the update that made it non-finite, and
            ``n_steps_`` and ``history_`` count the steps those weights
            went through.
        """
        for _ in self.fit_iter(
            data_xyzt, cluster_xyzp, known_mask=known_mask, mask=mask, num_batches=num_batches,
            epochs=epochs, callbacks=callbacks, stop_event=stop_event, warm_start=warm_start,
        ):
            pass
        return self

    def fit_iter(self, data_xyzt, cluster_xyzp=None, *, known_mask=None, mask=None,
                 num_batches=10, epochs=40, callbacks=None, stop_event=None, warm_start=False):
        """Validate the inputs, then return a generator that trains one step per item.

        Takes the same parameters as :meth:`fit`. Inputs are checked before
        this method returns, so errors surface at once. Each item is a dict
        with ``step``, ``epoch``, ``num_steps`` and ``losses``. Closing the
        generator stops training cleanly after the last completed step, which
        suits GUI workers such as napari's ``thread_worker``.
        """
        for name, value in (("num_batches", num_batches), ("epochs", epochs)):
            if not _is_positive_int(value):
                raise InvalidInputError(f"{name}={value!r} must be an integer >= 1.")
        scaling = self._validate_params()
        data = check_data_xyzt(data_xyzt)
        if cluster_xyzp is None:
            raise InvalidInputError(
                "cluster_xyzp is missing; GACC is semi-supervised and needs some known "
                "clusters (NaN marks unknown entries)."
            )
        values, known = check_cluster_xyzp(cluster_xyzp, data.shape[:3], self.num_clusters,
                                           known_mask)
        flat_indices = foreground_indices(data, mask)
        if len(flat_indices) < self.set_size:
            raise InvalidInputError(
                f"The foreground has {len(flat_indices)} voxels, fewer than "
                f"set_size={self.set_size}; lower set_size or enlarge the mask."
            )

        known_values = values.reshape(-1, values.shape[3])[flat_indices]
        known_entries = known.reshape(-1, known.shape[3])[flat_indices]
        if not known_entries.any():
            raise InvalidInputError(
                "No known cluster entry lies inside the foreground mask; annotate voxels "
                "inside the mask."
            )

        continuing = warm_start and hasattr(self, "networks_")
        self._train_batch_size = self.batch_size
        if continuing:
            self._check_fitted_shape(data)
            if values.shape[3] != self.n_known_clusters_:
                raise InvalidInputError(
                    f"cluster_xyzp has P={values.shape[3]} clusters but the model was fitted "
                    f"with P={self.n_known_clusters_}; keep the same clusters to continue "
                    "training, or fit a new model."
                )
        else:
            self._initialise(data, values, flat_indices, scaling)

        self._warn_unannotated(known_values, known_entries)

        tensors = self._training_tensors(data, flat_indices, known_values, known_entries)
        self._build_trainer(known_values, known_entries, reuse_optimizers=continuing)
        logger.info(
            "Training GACC on %s for %d steps (%d foreground voxels, T=%d, P=%d, K=%d)",
            self.device_, num_batches * epochs, len(flat_indices), self.n_features_in_,
            self.n_known_clusters_, self.num_clusters,
        )
        return self._training_loop(tensors, num_batches, epochs, list(callbacks or []),
                                   stop_event)

    def _initialise(self, data, values, flat_indices, scaling):
        self.device_ = resolve_device(self.device)
        self.spatial_shape_ = tuple(int(s) for s in data.shape[:3])
        self.n_features_in_ = int(data.shape[3])
        self.n_known_clusters_ = int(values.shape[3])
        self.scaling_ = scaling.fit_chunks(
            voxels for _, voxels in iter_voxels(data, flat_indices)
        )
        seed = self.random_state
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31 - 1))
        self._sampling_generator = torch.Generator().manual_seed(int(seed))
        self._mask_generator = torch.Generator(device=self.device_).manual_seed(int(seed) + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.networks_ = GACCNetworks(
                self.n_features_in_, 6 * self.num_frequencies, self.num_clusters,
                hidden_size=self.hidden_size, num_heads=self.num_heads,
                num_layers=self.num_layers, column_hidden_size=self.column_hidden_size,
            ).to(self.device_)
        self.history_ = {}
        self.n_steps_ = 0
        self._optimizer_states = None

    def _warn_unannotated(self, known_values, known_entries):
        inside = (known_values > 0.5) & known_entries
        missing = np.flatnonzero(~inside.any(axis=0))
        if len(missing):
            logger.warning(
                "Clusters %s have no known inside voxel in the foreground; GACC cannot learn "
                "where they are from the annotations.", (missing + 1).tolist(),
            )

    def _training_tensors(self, data, flat_indices, known_values, known_entries):
        tokens = self._voxel_tokens(data, flat_indices)
        device = self.device_
        return {
            "tokens": torch.from_numpy(tokens).to(device),
            "targets": torch.from_numpy(known_values).to(device),
            "known": torch.from_numpy(known_entries.astype(np.float32)).to(device),
            "ijk": np.stack(np.unravel_index(flat_indices, self.spatial_shape_), axis=1),
            "annotated": torch.from_numpy(np.flatnonzero(known_entries.any(axis=1))),
        }

    def _build_trainer(self, known_values, known_entries, reuse_optimizers):
        positive_weight = None
        if self.class_weight == "balanced":
            inside = ((known_values > 0.5) & known_entries).sum(axis=0)
            outside = ((known_values <= 0.5) & known_entries).sum(axis=0)
            ratio = outside / np.maximum(inside, 1)
            positive_weight = torch.as_tensor(
                np.clip(ratio, 1.0, MAX_POSITIVE_WEIGHT), dtype=torch.float32, device=self.device_
            )
        previous = getattr(self, "_trainer", None)
        if reuse_optimizers and previous is not None:
            self._optimizer_states = {
                name: optimizer.state_dict() for name, optimizer in previous.optimizers.items()
            }
        self._trainer = TrainingStep(
            self.networks_,
            self._loss_weights(),
            {
                "generator": self.learning_rate,
                "discriminator": self.discriminator_learning_rate,
                "predictor": self.predictor_learning_rate,
            },
            self.hide_probability,
            positive_weight=positive_weight,
            compile_modules=not self.run_eagerly,
            columns_per_step=self.columns_per_step,
        )
        if reuse_optimizers and self._optimizer_states:
            for name, state in self._optimizer_states.items():
                self._trainer.optimizers[name].load_state_dict(state)
            # The learning rates in effect are the current parameters, not the saved ones.
            self._trainer.set_learning_rates(
                self.learning_rate, self.discriminator_learning_rate, self.predictor_learning_rate
            )

    def _sample_batch(self, tensors):
        if self.set_sampling == "local":
            positions = draw_local_training_sets(
                tensors["ijk"], self._train_batch_size, self.set_size, self.window_size,
                self._sampling_generator,
            )
        else:
            positions = draw_training_sets(
                len(tensors["tokens"]), self._train_batch_size, self.set_size,
                self._sampling_generator, annotated=tensors["annotated"],
                annotated_fraction=self.annotated_fraction,
            )
        positions = positions.to(self.device_)  # (B, N)
        tokens = tensors["tokens"][positions]  # (B, N, T + E)
        return Batch(
            tokens=tokens,
            data=tokens[..., :self.n_features_in_],  # (B, N, T)
            position=tokens[..., self.n_features_in_:],  # (B, N, E)
            targets=tensors["targets"][positions],
            known=tensors["known"][positions],
        )

    def _run_step(self, batch):
        try:
            return self._trainer(batch, self.n_steps_ + 1, self._mask_generator)
        except NonFiniteLossError as error:
            # The trainer restored the weights from before the last completed
            # step, so that step no longer counts.
            for _ in range(getattr(error, "rolled_back_steps", 0)):
                self._forget_last_step()
            raise
        except Exception as error:  # noqa: BLE001 - only to fall back from torch.compile
            if not self._trainer.compiled or is_out_of_memory(error):
                raise
            logger.warning(
                "torch.compile failed (%s: %s); continuing in eager mode.",
                type(error).__name__, error,
            )
            self._trainer.disable_compile()
            return self._trainer(batch, self.n_steps_ + 1, self._mask_generator)

    def _train_step(self, tensors):
        """Sample a batch and train on it, halving the batch after out-of-memory errors.

        A step that fails or is interrupted also puts the random generators
        back to their state at its start, so that a model saved afterwards
        resumes exactly like an uninterrupted run.
        """
        while True:
            random_states = (self._sampling_generator.get_state(),
                             self._mask_generator.get_state())
            try:
                return self._run_step(self._sample_batch(tensors))
            except RuntimeError as error:
                self._sampling_generator.set_state(random_states[0])
                self._mask_generator.set_state(random_states[1])
                if not is_out_of_memory(error):
                    raise
                failure = error
            except BaseException:
                self._sampling_generator.set_state(random_states[0])
                self._mask_generator.set_state(random_states[1])
                raise
            # Outside the except clause and after dropping the error, whose
            # traceback references the failed step's tensors, so they are freed.
            self._halve_batch(failure)
            del failure
            release_cached_memory(self.device_)

    def _halve_batch(self, error):
        """Halve the training batch after ``error``, or raise MemoryError at one set."""
        summary = _first_sentence(error)
        if self._train_batch_size == 1:
            on_cpu = "" if self.device_.type == "cpu" else ", or train on device='cpu'"
            raise MemoryError(
                f"Training ran out of memory on {self.device_} even with one set per step "
                f"(batch_size={self.batch_size} was halved down to 1): {summary}. Lower "
                f"set_size, hidden_size or num_clusters, free memory used by other "
                f"programs{on_cpu}."
            ) from error
        self._train_batch_size //= 2
        logger.warning(
            "Out of memory on %s (%s); retrying the step with %d sets per batch. Pass "
            "batch_size=%d to start with that size.",
            self.device_, summary, self._train_batch_size, self._train_batch_size,
        )

    def _record(self, losses):
        for name in losses.keys() - self.history_.keys():
            self.history_[name] = [math.nan] * self.n_steps_
        for name, values in self.history_.items():
            values.append(losses.get(name, math.nan))
        self.n_steps_ += 1

    def _forget_last_step(self):
        for values in self.history_.values():
            del values[-1]
        self.n_steps_ -= 1

    def _training_loop(self, tensors, num_batches, epochs, callbacks, stop_event):
        self.stop_training = False
        self.networks_.train()
        num_steps = num_batches * epochs
        for callback in callbacks:
            callback.on_train_begin(self)
        start = time.perf_counter()
        completed = 0
        try:
            for epoch in range(1, epochs + 1):
                for _ in range(num_batches):
                    if self.stop_training or (stop_event is not None and stop_event.is_set()):
                        logger.info("Training stopped on request after %d steps", completed)
                        return
                    losses = self._train_step(tensors)
                    self._record(losses)
                    completed += 1
                    step_logs = {
                        "step": self.n_steps_,
                        "epoch": epoch,
                        "num_steps": num_steps,
                        "losses": losses,
                    }
                    for callback in callbacks:
                        callback.on_step_end(self, step_logs)
                    yield step_logs
                logger.debug("Epoch %d/%d: %s", epoch, epochs, losses)
        finally:
            self.networks_.eval()
            elapsed = time.perf_counter() - start
            logger.info("Ran %d training steps in %.1f s", completed, elapsed)
            for callback in callbacks:
                callback.on_train_end(self)

    # ------------------------------------------------------------------
    # Prediction

    def predict(self, data_xyzt, *, mask=None):
        """Predict cluster memberships of every foreground voxel.

        Each voxel is placed in ``prediction_repeats`` random sets drawn like
        the training sets, and its memberships are averaged over them. The
        result is deterministic for a given model and input.

        Memory: a float32 ``data_xyzt``, memory-mapped or not, is read in
        place. On top of it, predict allocates about 4 * n_voxels * (T + 6 *
        num_frequencies + 2 * K) bytes of tokens and sums, the (X, Y, Z, K)
        float32 result, and one forward pass of ``prediction_batch_size``
        sets at a time. A pass that runs out of device memory is retried
        with half as many sets.

        Parameters
        ----------
        data_xyzt : ndarray of shape (X, Y, Z, T)
            On the fitted grid, with the fitted features. NaN and infinite
            values are allowed outside ``mask``.
        mask : ndarray of bool of shape (X, Y, Z), optional
            Foreground; default: the voxels whose data are finite and not
            all zero.

        Returns
        -------
        ndarray of shape (X, Y, Z, K), float32
            Memberships in [0, 1]; 0 outside the foreground.

        Raises
        ------
        InvalidInputError
            For data of another shape, NaN or infinite values inside
            ``mask``, or values so far outside the fitted range that scaling
            overflows.
        NonFiniteLossError
            If memberships come out NaN or infinite, which happens only when
            the model's weights are not finite or the network overflows.
        MemoryError
            If a forward pass of a single set runs out of memory.
        """
        check_is_fitted(self, "networks_")
        data = check_data_xyzt(data_xyzt)
        self._check_fitted_shape(data)
        flat_indices = foreground_indices(data, mask)
        if len(flat_indices) < self.set_size:
            raise InvalidInputError(
                f"The foreground has {len(flat_indices)} voxels, fewer than "
                f"set_size={self.set_size}; enlarge the mask."
            )
        tokens = torch.from_numpy(self._voxel_tokens(data, flat_indices)).to(self.device_)
        ijk = np.stack(np.unravel_index(flat_indices, self.spatial_shape_), axis=1)
        memberships = self._predict_tokens(tokens, ijk)

        output = np.zeros((int(np.prod(self.spatial_shape_)), self.num_clusters), np.float32)
        output[flat_indices] = memberships
        return output.reshape(self.spatial_shape_ + (self.num_clusters,))

    def _predict_tokens(self, tokens, ijk):
        """Return averaged memberships (n_voxels, K) for voxel tokens (n_voxels, F)."""
        n_voxels = len(tokens)
        total = torch.zeros(n_voxels, self.num_clusters, device=self.device_)
        seed = 0 if self.random_state is None else int(self.random_state)
        self.networks_.eval()
        chunk_size = self.prediction_batch_size
        window = self.window_size if self.set_sampling == "local" else None
        for sets, counted in prediction_sets(n_voxels, self.set_size, self.prediction_repeats,
                                             seed, ijk=ijk, window=window):
            start = 0
            while start < len(sets):
                stop = start + chunk_size
                try:
                    self._add_memberships(total, tokens, sets[start:stop], counted[start:stop])
                except RuntimeError as error:
                    if not is_out_of_memory(error):
                        raise
                    failure = error
                else:
                    start = stop
                    continue
                chunk_size = self._halve_prediction_chunk(chunk_size, failure)
                del failure
                release_cached_memory(self.device_)
        self._check_finite_memberships(total)
        return (total / self.prediction_repeats).clamp_(0.0, 1.0).cpu().numpy()

    def _add_memberships(self, total, tokens, sets, counted):
        """Add the memberships predicted for ``sets`` (S, N) into ``total`` (n_voxels, K)."""
        with torch.inference_mode():
            chunk = torch.from_numpy(sets).to(self.device_)
            weight = torch.from_numpy(counted).to(self.device_, torch.float32)
            probabilities = torch.sigmoid(self.networks_.generator(tokens[chunk]))  # (S, N, K)
            probabilities = probabilities * weight.unsqueeze(-1)
            total.index_add_(0, chunk.reshape(-1), probabilities.reshape(-1, self.num_clusters))

    def _halve_prediction_chunk(self, chunk_size, error):
        """Return half of ``chunk_size`` after ``error``, or raise MemoryError at one set."""
        summary = _first_sentence(error)
        if chunk_size == 1:
            on_cpu = (
                "" if self.device_.type == "cpu"
                else ", or predict on the CPU (GACC.load(path, device='cpu'))"
            )
            raise MemoryError(
                f"Prediction ran out of memory on {self.device_} even with one set per forward "
                f"pass (prediction_batch_size={self.prediction_batch_size} was halved down to "
                f"1): {summary}. Free memory used by other programs{on_cpu}."
            ) from error
        logger.warning(
            "Out of memory on %s (%s); retrying with %d sets per forward pass. Set "
            "prediction_batch_size=%d to start with that size.",
            self.device_, summary, chunk_size // 2, chunk_size // 2,
        )
        return chunk_size // 2

    def _check_finite_memberships(self, total):
        n_bad = int(torch.count_nonzero(~torch.isfinite(total).all(dim=1)))
        if not n_bad:
            return
        weights = self.networks_.generator.state_dict().values()
        weights_finite = all(bool(torch.isfinite(value).all()) for value in weights)
        if weights_finite:
            reason = (
                "the network overflowed on these data. Check data_xyzt for values far outside "
                "the range of the data the model was fitted on, or retrain the model with lower "
                "learning rates."
            )
        else:
            reason = (
                "the generator's weights contain NaN or infinite values, so the model is "
                "damaged. Retrain it, or load another model file."
            )
        raise NonFiniteLossError(
            f"The predicted memberships of {n_bad} voxels are NaN or infinite because {reason}"
        )

    # ------------------------------------------------------------------
    # Saving and loading

    def save(self, path):
        """Save weights, optimizer state, parameters, scaling and history to one file.

        The file is written to a temporary name and renamed, so a failure
        never leaves a half-written model behind.
        """
        check_is_fitted(self, "networks_")
        checkpoint.save_model(self, path)
        logger.info("Saved GACC model to %s", path)
        return path

    @classmethod
    def load(cls, path, *, device="auto"):
        """Load a model saved with :meth:`save` onto ``device``.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        gacc.ModelFileError
            If the file is damaged, not a GACC model, or from an incompatible
            format version.
        """
        return checkpoint.load_model(cls, path, device=device)
