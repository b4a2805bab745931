"""Saving and loading GACC models as single files.

A model file is a ``torch.save`` archive of plain types and tensors only, so
it loads with ``weights_only=True`` and never runs code from the file. It
contains the parameters, the network weights, the optimizer states, the random
generator states, the scaling statistics, the fitted shapes, the loss
history, the format version and the package version.
"""

import errno
import io
import logging
import os
import pickle
import zipfile
from pathlib import Path

import torch

from ._atomic import atomic_path
from ._version import __version__
from .devices import resolve_device
from .exceptions import ModelFileError
from .preprocessing import MinMaxScaling
from .training import GACCNetworks

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load_model", "save_model"]

FORMAT_NAME = "gacc-model"
# Bump when the file layout or the network architecture changes in a way
# that older files cannot be loaded into.
FORMAT_VERSION = 1


def _cpu(value):
    """Copy every tensor in a nested structure to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(item) for item in value)
    return value


def save_model(model, path):
    """Write a fitted model to ``path`` atomically."""
    trainer = getattr(model, "_trainer", None)
    optimizers = None
    if trainer is not None:
        optimizers = {name: _cpu(opt.state_dict()) for name, opt in trainer.optimizers.items()}
    elif model._optimizer_states is not None:
        optimizers = _cpu(model._optimizer_states)
    params = model.get_params()
    params["device"] = str(params["device"])
    if params["min_max_scale_range"] is not None:
        params["min_max_scale_range"] = [float(v) for v in params["min_max_scale_range"]]
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "gacc_version": __version__,
        "torch_version": str(torch.__version__),
        "params": params,
        "fit": {
            "spatial_shape": list(model.spatial_shape_),
            "n_features_in": model.n_features_in_,
            "n_known_clusters": model.n_known_clusters_,
            "n_steps": model.n_steps_,
            "history": {name: list(values) for name, values in model.history_.items()},
            "scaling": model.scaling_.state_dict(),
        },
        "networks": _cpu(model.networks_.state_dict()),
        "optimizers": optimizers,
        "random_states": {
            "sampling": model._sampling_generator.get_state(),
            "masks": model._mask_generator.get_state().cpu(),
            "masks_device": model._mask_generator.device.type,
        },
    }
    # Serialised in memory first, because torch.save reports a failed write
    # (a full disk, for example) as a bare RuntimeError without the cause.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getbuffer())


def write_bytes_atomic(path, data):
    """Write ``data`` to ``path`` through a temporary file, synced to disk before the rename.

    Raises
    ------
    FileNotFoundError
        If the folder of ``path`` does not exist.
    OSError
        Of the same type and errno as the failure, with a message that names
        ``path`` and the fix, if writing fails (a full disk or a folder
        without write permission, for example). ``path`` is left as it was.
    """
    try:
        with atomic_path(path) as tmp_path, open(tmp_path, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except FileNotFoundError:
        raise
    except OSError as error:
        raise write_error(path, error) from error


# errno values of failed writes that more free space fixes.
_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def write_error(path, error):
    """Return an OSError like ``error`` whose message names ``path`` and the fix."""
    reason = error.strerror or str(error)
    if error.errno in _NO_SPACE_ERRNOS:
        fix = "Free disk space, or write to another disk."
    elif isinstance(error, PermissionError) or error.errno == errno.EROFS:
        fix = "Choose a folder you can write to."
    else:
        fix = "Check the path and the disk."
    return type(error)(error.errno, f"Cannot write {str(path)!r}: {reason}. {fix}")


def _read_payload(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No GACC model file at {str(path)!r}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError,
            KeyError, AttributeError, TypeError) as error:
        raise ModelFileError(
            f"{str(path)!r} is not a readable GACC model file: it is damaged or not a model "
            f"saved with GACC.save() ({type(error).__name__})."
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{str(path)!r} is a PyTorch file but not a GACC model; save models with "
            "GACC.save()."
        )
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{str(path)!r} has model format version {version} (written by gacc "
            f"{payload.get('gacc_version')}), but this gacc {__version__} reads format "
            f"version {FORMAT_VERSION}; load it with the gacc version that wrote it, or retrain."
        )
    if payload.get("gacc_version") != __version__:
        logger.warning(
            "%s was written by gacc %s; this is gacc %s. The format is the same, so it loads.",
            path, payload.get("gacc_version"), __version__,
        )
    return payload


def load_model(cls, path, device="auto"):
    """Rebuild a fitted model of class ``cls`` from a file written by :func:`save_model`."""
    payload = _read_payload(path)
    # Resolved first, so that an unavailable device is reported as such and
    # not as a damaged file.
    torch_device = resolve_device(device)
    try:
        params = dict(payload["params"])
        params["device"] = device
        model = cls(**params)
        fit = payload["fit"]
        model.device_ = torch_device
        model.spatial_shape_ = tuple(int(s) for s in fit["spatial_shape"])
        model.n_features_in_ = int(fit["n_features_in"])
        model.n_known_clusters_ = int(fit["n_known_clusters"])
        model.n_steps_ = int(fit["n_steps"])
        model.history_ = {name: list(values) for name, values in fit["history"].items()}
        model.scaling_ = MinMaxScaling.from_state_dict(fit["scaling"])
        model.networks_ = GACCNetworks(
            model.n_features_in_, 6 * model.num_frequencies, model.num_clusters,
            hidden_size=model.hidden_size, num_heads=model.num_heads,
            num_layers=model.num_layers, column_hidden_size=model.column_hidden_size,
        )
        model.networks_.load_state_dict(payload["networks"])
        model._optimizer_states = _checked_optimizer_states(
            model.networks_, payload.get("optimizers"), path
        )
        model._sampling_generator = torch.Generator()
        model._sampling_generator.set_state(payload["random_states"]["sampling"])
        model._mask_generator = torch.Generator(device=model.device_)
        states = payload["random_states"]
        if states.get("masks_device") == model.device_.type:
            model._mask_generator.set_state(states["masks"])
        else:
            # Generator states are device specific; a model moved to another kind
            # of device continues with a fresh, seeded mask generator.
            model._mask_generator.manual_seed(model.n_steps_)
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise ModelFileError(
            f"{str(path)!r} contains a GACC model whose contents do not match its parameters "
            f"(damaged or edited file): {type(error).__name__}: {error}"
        ) from error
    _check_finite_weights(model.networks_, path)
    model.networks_.to(model.device_).eval()
    return model


def _checked_optimizer_states(networks, states, path):
    """Return ``states`` after loading each into a fresh Adam optimizer of its network.

    This finds a damaged optimizer state at load time, not at the first warm
    start, where it would surface as a bare ValueError.
    """
    if states is None:
        return None
    expected = {"generator", "discriminator", "xc_predictor", "cx_predictor"}
    if not isinstance(states, dict) or set(states) != expected:
        found = sorted(states) if isinstance(states, dict) else type(states).__name__
        raise ModelFileError(
            f"{str(path)!r} contains optimizer states for {found}, but a GACC model has one for "
            f"each of {sorted(expected)} (damaged or edited file). Retrain the model, or load "
            "it and fit without warm_start."
        )
    for name, state in states.items():
        module = getattr(networks, name)
        optimizer = torch.optim.Adam(module.parameters())
        try:
            # load_state_dict keeps references to the given tensors, so give it copies.
            optimizer.load_state_dict(_cpu_copy(state))
            _check_state_shapes(optimizer)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
            raise ModelFileError(
                f"{str(path)!r} contains a damaged optimizer state for the {name} "
                f"({type(error).__name__}: {error}). Retrain the model, or load it and fit "
                "without warm_start."
            ) from error
    return states


def _cpu_copy(value):
    """Copy every tensor in a nested structure of dicts and lists."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return value


def _check_state_shapes(optimizer):
    """Raise ValueError if a per-parameter tensor of ``optimizer`` does not match its parameter."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if key == "step":
                    continue
                if not isinstance(value, torch.Tensor) or value.shape != parameter.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                    raise ValueError(
                        f"state {key!r} has shape {shape} for a parameter of shape "
                        f"{tuple(parameter.shape)}"
                    )


def _check_finite_weights(networks, path):
    # Training never keeps non-finite weights, so a file that has them is damaged.
    bad = [name for name, value in networks.state_dict().items()
           if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ModelFileError(
            f"{str(path)!r} contains NaN or infinite weights in {len(bad)} tensors (first: "
            f"{bad[0]}), so the file is damaged. Retrain the model, or load another file."
        )
