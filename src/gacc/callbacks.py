"""Callbacks that observe and stop GACC training.

A callback receives every step's losses. Setting ``model.stop_training =
True`` inside any hook, or setting the ``stop_event`` passed to
:meth:`gacc.GACC.fit` from another thread, ends training after the current
step; the model keeps the weights of that step.
"""

import logging
import sys
from pathlib import Path

__all__ = ["Callback", "LambdaCallback", "ModelCheckpoint", "ProgressBar"]

logger = logging.getLogger(__name__)


class Callback:
    """Base class for training callbacks; override the hooks you need."""

    def on_train_begin(self, model):
        """Run before the first step of a ``fit`` call."""

    def on_step_end(self, model, step_logs):
        """Run after each step.

        ``step_logs`` is a dict with ``step`` (counted over all fits of the
        model), ``epoch``, ``num_steps`` (steps in this fit) and ``losses``
        (loss name to float).
        """

    def on_train_end(self, model):
        """Run once training ends, whether it finished, was stopped or failed."""


class LambdaCallback(Callback):
    """Build a callback from plain functions, for example ``LambdaCallback(on_step_end=f)``."""

    def __init__(self, on_train_begin=None, on_step_end=None, on_train_end=None):
        self._train_begin = on_train_begin
        self._step_end = on_step_end
        self._train_end = on_train_end

    def on_train_begin(self, model):
        if self._train_begin is not None:
            self._train_begin(model)

    def on_step_end(self, model, step_logs):
        if self._step_end is not None:
            self._step_end(model, step_logs)

    def on_train_end(self, model):
        if self._train_end is not None:
            self._train_end(model)


class ProgressBar(Callback):
    """Show a tqdm progress bar with the latest generator and supervised losses."""

    def __init__(self, **tqdm_kwargs):
        self.tqdm_kwargs = tqdm_kwargs
        self._bar = None

    def on_train_begin(self, model):
        from tqdm.auto import tqdm

        self._bar = None
        self._tqdm = tqdm

    def on_step_end(self, model, step_logs):
        if self._bar is None:
            kwargs = {"desc": "GACC fit", "unit": "step", **self.tqdm_kwargs}
            self._bar = self._tqdm(total=step_logs["num_steps"], **kwargs)
        losses = step_logs["losses"]
        shown = {name: f"{losses[name]:.3g}" for name in ("supervised", "generator") if name in losses}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def on_train_end(self, model):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ModelCheckpoint(Callback):
    """Save the model every few steps and when training ends, for any reason.

    Training that finishes, is stopped, fails (for example with
    :class:`gacc.NonFiniteLossError`) or is interrupted with Ctrl+C ends
    with a save of the last completed step, so a long run can be resumed
    with :meth:`gacc.GACC.load` and ``fit(..., warm_start=True)``. Each file
    is written to a temporary name and renamed, so an interruption during a
    save leaves the previous checkpoint intact.

    Parameters
    ----------
    path : str or Path
        Model file. It may contain ``{step}``, with a format spec if needed
        (``"model_{step:06d}.pt"``), which is replaced by the step count.
    every_n_steps : int or None, default=100
        Save after every step whose count (over all fits of the model, as
        ``step_logs["step"]``) is a multiple of this; None saves only when
        training ends.
    keep_last : bool, default=True
        When ``path`` contains ``{step}``, delete the file of the previous
        save after each new one, so that only the latest checkpoint stays on
        disk. False keeps every one. Without ``{step}``, each save replaces
        the file.

    Attributes
    ----------
    last_path_ : Path or None
        File of the latest successful save.
    last_step_ : int or None
        Step count of the model in that file.

    Notes
    -----
    A periodic save that fails (a full disk, for example) is logged as an
    error and training goes on; the next save tries again. A failed save
    at the end of training raises, unless training itself is failing, in
    which case the save error is logged and the training error propagates.
    """

    def __init__(self, path, every_n_steps=100, keep_last=True):
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps={every_n_steps!r} must be an integer >= 1 or None.")
        self.path = path
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self._templated = "{" in str(path)
        try:
            str(path).format(step=0)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"path={str(path)!r} is not a valid template: use {{step}} (or a format such "
                f"as {{step:06d}}) as the only field, and double other braces ({error})."
            ) from None
        self.last_path_ = None
        self.last_step_ = None

    def on_step_end(self, model, step_logs):
        if self.every_n_steps is None or step_logs["step"] % self.every_n_steps:
            return
        try:
            self._save(model)
        except OSError as error:
            logger.error("Checkpoint of step %d not saved, training goes on: %s",
                         model.n_steps_, error)

    def on_train_end(self, model):
        if model.n_steps_ == 0 or self.last_step_ == model.n_steps_:
            return
        failing = sys.exc_info()[1] is not None
        try:
            self._save(model)
        except OSError as error:
            if not failing:
                raise
            logger.error("Checkpoint of step %d not saved: %s", model.n_steps_, error)

    def _save(self, model):
        path = Path(str(self.path).format(step=model.n_steps_))
        model.save(path)
        previous = self.last_path_
        self.last_path_, self.last_step_ = path, model.n_steps_
        logger.info("Saved the checkpoint of step %d to %s", model.n_steps_, path)
        if self.keep_last and self._templated and previous is not None and previous != path:
            previous.unlink(missing_ok=True)
