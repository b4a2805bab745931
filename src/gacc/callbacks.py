"""Callbacks that observe and stop GACC training.

A callback receives every step's losses. Setting ``model.stop_training =
True`` inside any hook, or setting the ``stop_event`` passed to
:meth:`gacc.GACC.fit` from another thread, ends training after the current
step; the model keeps the weights of that step.
"""

import logging

__all__ = ["Callback", "LambdaCallback", "ProgressBar"]

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
