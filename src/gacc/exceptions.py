"""Exception types raised by the GACC engine.

Each type subclasses the builtin that scikit-learn and nibabel users already
catch, so ``except ValueError`` keeps working.
"""

from sklearn.exceptions import NotFittedError

__all__ = [
    "InvalidInputError",
    "ModelFileError",
    "NonFiniteLossError",
    "NotFittedError",
]


class InvalidInputError(ValueError):
    """Input data, clusters, masks or files that GACC cannot use as given.

    The message names the offending value and how to fix it.
    """


class ModelFileError(ValueError):
    """A saved model file that is damaged, from another version or for other data."""


class NonFiniteLossError(RuntimeError):
    """A training loss, a gradient or a prediction became NaN or infinite.

    In training, training stops and the model keeps the weights of the last
    step whose losses were all finite. In prediction, no output is returned.
    """
