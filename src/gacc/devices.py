"""Choice of the torch device that GACC trains and predicts on."""

import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["available_devices", "resolve_device"]


def _mps_available():
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def available_devices():
    """List the torch devices this machine can run GACC on, fastest first.

    Returns
    -------
    devices : list of str
        For example ``["cuda:0", "cuda:1", "cpu"]`` or ``["mps", "cpu"]``.
        ``"cpu"`` is always last.
    """
    devices = []
    if torch.cuda.is_available():
        devices.extend(f"cuda:{index}" for index in range(torch.cuda.device_count()))
    if _mps_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def resolve_device(device="auto"):
    """Turn a device request into a :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "cuda:N", "mps"} or torch.device, default="auto"
        ``"auto"`` picks CUDA, then Apple MPS, then the CPU.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the device is not understood or not available on this machine.
    """
    if isinstance(device, torch.device):
        requested = device
    elif device is None or device == "auto":
        requested = torch.device(available_devices()[0])
        logger.info("Device 'auto' resolved to %s", requested)
        return requested
    else:
        try:
            requested = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"device={device!r} is not a valid torch device; use 'auto', 'cpu', "
                f"'cuda', 'cuda:N' or 'mps'. Available here: {available_devices()}."
            ) from error

    if requested.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was requested but CUDA is not available on this "
                f"machine; use device='auto' or one of {available_devices()}."
            )
        index = 0 if requested.index is None else requested.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} was requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); use one of {available_devices()}."
            )
        return torch.device("cuda", index)
    if requested.type == "mps" and not _mps_available():
        raise ValueError(
            f"device={device!r} was requested but Apple MPS is not available; "
            f"use device='auto' or one of {available_devices()}."
        )
    if requested.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"device={device!r} is not supported; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
        )
    return requested
