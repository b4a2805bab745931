"""GACC: Generative Adversarial-Cooperative Clustering of 4D volumes in PyTorch.

>>> import gacc
>>> model = gacc.GACC(num_clusters=50, run_eagerly=True, min_max_scale_range=[0.0, 1.0])
>>> model.fit(data_xyzt=data_xyzt, cluster_xyzp=cluster_xyzp, num_batches=10, epochs=40)
>>> cluster_xyzk = model.predict(data_xyzt=data_xyzt)
"""

import logging

from . import atlases, callbacks, datasets, metrics, nifti, splits
from ._version import __version__
from .devices import available_devices, resolve_device
from .estimator import GACC
from .exceptions import InvalidInputError, ModelFileError, NonFiniteLossError, NotFittedError

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "GACC",
    "InvalidInputError",
    "ModelFileError",
    "NonFiniteLossError",
    "NotFittedError",
    "__version__",
    "atlases",
    "available_devices",
    "callbacks",
    "datasets",
    "metrics",
    "nifti",
    "resolve_device",
    "splits",
]
