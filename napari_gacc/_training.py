"""Training and prediction jobs that the training widget runs in worker threads.

Nothing here touches Qt or a layer: the widget copies what it needs from the
layers on the GUI thread and hands plain arrays to these functions.
"""

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from gacc.exceptions import InvalidInputError, NonFiniteLossError

from ._layers import layer_to_engine
from ._results import threshold_prediction

logger = logging.getLogger(__name__)


class TrainingFailedError(Exception):
    """Wrapper for an error raised during training, stored in ``error``.

    superqt's generator workers treat any RuntimeError (which includes
    :class:`gacc.NonFiniteLossError` and CUDA out-of-memory errors) as a sign
    that the worker was deleted: they drop it with a warning and never emit
    ``errored`` or ``finished``. Raising this wrapper, which is not a
    RuntimeError, gets the error to the GUI.
    """

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


@dataclass
class TrainingRun:
    """State shared between the GUI thread and one training worker.

    Attributes
    ----------
    num_steps : int
        Steps requested for this run.
    stop_event : threading.Event
        Set by the GUI to stop after the current step.
    done_event : threading.Event
        Set by the worker when the generator has ended, however it ended.
    steps_done : int
        Steps completed in this run.
    start_time : float
        ``time.perf_counter()`` when the run started, for the ETA.
    paused_seconds : float
        Time spent paused, left out of the ETA.
    """

    num_steps: int
    stop_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)
    steps_done: int = 0
    start_time: float = field(default_factory=time.perf_counter)
    paused_seconds: float = 0.0
    _paused_at: float = None

    def mark_paused(self):
        """Record that the worker has paused."""
        self._paused_at = time.perf_counter()

    def mark_resumed(self):
        """Record that the worker has resumed, adding the pause to ``paused_seconds``."""
        if self._paused_at is not None:
            self.paused_seconds += time.perf_counter() - self._paused_at
            self._paused_at = None

    def seconds_left(self):
        """Estimate the remaining training time from the mean step time so far, or None."""
        if self.steps_done == 0:
            return None
        elapsed = time.perf_counter() - self.start_time - self.paused_seconds
        return elapsed / self.steps_done * (self.num_steps - self.steps_done)


def train_steps(model, data_layer_array, annotations, mask, run, *, num_batches, epochs,
                warm_start, callbacks=None):
    """Train ``model``, yielding the engine's log dict after every step.

    Parameters
    ----------
    model : gacc.GACC
    data_layer_array : ndarray of shape (T, X, Y, Z)
        The data layer's array; the move to (X, Y, Z, T) happens here, off
        the GUI thread.
    annotations : napari_gacc._annotations.AnnotationSnapshot
        Copied annotation layers, turned into ``cluster_xyzp`` here.
    mask : ndarray of shape (X, Y, Z), bool, or None
    run : TrainingRun
    num_batches, epochs : int
    warm_start : bool
    callbacks : list of gacc.callbacks.Callback or None, default=None
        Passed to :meth:`gacc.GACC.fit_iter`, such as the recovery checkpoint.

    Yields
    ------
    step_logs : dict
        ``{"step", "epoch", "num_steps", "losses"}`` from :meth:`gacc.GACC.fit_iter`.

    Raises
    ------
    TrainingFailedError
        Wrapping any error of the engine.
    """
    steps = None
    try:
        data_xyzt = np.ascontiguousarray(layer_to_engine(data_layer_array), dtype=np.float32)
        steps = model.fit_iter(
            data_xyzt,
            annotations.to_cluster_xyzp(),
            mask=mask,
            num_batches=num_batches,
            epochs=epochs,
            stop_event=run.stop_event,
            warm_start=warm_start,
            callbacks=callbacks,
        )
        for step_logs in steps:
            run.steps_done += 1
            yield step_logs
    except Exception as error:
        raise TrainingFailedError(error) from error
    finally:
        # Closing the engine's generator (also when the worker is aborted and
        # closes this one) ends its training loop cleanly.
        if steps is not None:
            steps.close()
        release_device_memory(model)
        run.done_event.set()


def predict_layer_array(model, data_layer_array, mask):
    """Predict memberships and return them with the cluster axis first.

    Returns
    -------
    proba_kxyz : ndarray of shape (K, X, Y, Z), float32
    """
    data_xyzt = np.ascontiguousarray(layer_to_engine(data_layer_array), dtype=np.float32)
    proba_xyzk = model.predict(data_xyzt, mask=mask)
    return np.ascontiguousarray(np.moveaxis(proba_xyzk, -1, 0))


def predict_and_threshold(model, data_layer_array, mask, *, threshold, names, voxel_volume_mm3,
                          annotations=None):
    """Predict, then threshold and group the clusters for display (worker-thread job).

    ``annotations`` (an AnnotationSnapshot or None) gives the Dice column.

    Returns
    -------
    proba_kxyz : ndarray of shape (K, X, Y, Z), float32
    result : napari_gacc._results.ThresholdedPrediction
    """
    proba_kxyz = predict_layer_array(model, data_layer_array, mask)
    cluster_xyzp = None if annotations is None else annotations.to_cluster_xyzp()
    result = threshold_prediction(
        proba_kxyz, threshold, names, voxel_volume_mm3, cluster_xyzp=cluster_xyzp
    )
    return proba_kxyz, result


def release_device_memory(model):
    """Return cached CUDA memory to the driver after training or prediction."""
    device = getattr(model, "device_", None)
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
        logger.info("Released cached CUDA memory on %s", device)


def is_out_of_memory(error):
    """Return True if ``error`` reports that a device ran out of memory."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def training_error_message(error, *, device=None):
    """Explain a training or prediction failure to the user, with what to do next."""
    if isinstance(error, TrainingFailedError):
        error = error.error
    if isinstance(error, NonFiniteLossError):
        return (
            f"Training stopped: {error} The model keeps the weights of the last finite "
            "step. Lower the learning rates or the adversarial and cooperative weights."
        )
    if is_out_of_memory(error):
        where = f" on {device}" if device is not None else ""
        return (
            f"Out of memory{where}: {error}. The model keeps its last weights. Lower the "
            "batch size or set size, use a brain mask, or pick the CPU device."
        )
    if isinstance(error, InvalidInputError):
        return f"Cannot train: {error}"
    return f"Training failed ({type(error).__name__}): {error}"
