"""Crash recovery: autosave annotations and the model during training (no Qt).

Each training widget owns one session folder under :func:`recovery_root`
(``~/.napari-gacc/recovery``, or ``$NAPARI_GACC_RECOVERY_DIR``). When a run
starts, the annotations and their cluster table go to ``annotations.npz``
and the model is checkpointed to ``model.pt`` during and after training.
Every file is written to a temporary name and renamed, so a crash during a
write leaves the previous file. The folder is removed when the user saves
the model, exports the results or closes the widget normally. A folder left
by a crashed session is offered for restoring when a training widget opens.
"""

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from napari.layers import Layer

from gacc._atomic import atomic_path
from gacc.callbacks import ModelCheckpoint

from . import _metadata as md
from ._annotations import (
    AnnotationSnapshot,
    annotation_layer_data,
    is_data_layer,
    new_annotation_layer,
)
from ._layers import cluster_table

logger = logging.getLogger(__name__)

RECOVERY_DIR_VARIABLE = "NAPARI_GACC_RECOVERY_DIR"
ANNOTATIONS_FILE = "annotations.npz"
MODEL_FILE = "model.pt"
SESSION_FILE = "session.json"
# Steps between periodic model saves; training also saves when it ends.
CHECKPOINT_EVERY_N_STEPS = 50


def recovery_root():
    """Return the parent folder of all session folders (not created here)."""
    configured = os.environ.get(RECOVERY_DIR_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".napari-gacc" / "recovery"


def _process_is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process exists but belongs to another user.
        return True
    except OSError:
        return False
    return True


class RecoverySession:
    """Autosave folder of one training widget.

    Parameters
    ----------
    root : str or Path or None, default=None
        Parent folder; None uses :func:`recovery_root`.
    """

    def __init__(self, root=None):
        self.root = Path(root) if root is not None else recovery_root()
        self.session_id = uuid.uuid4().hex
        self.folder = self.root / self.session_id

    def _ensure_folder(self):
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            info = {"pid": os.getpid(), "created": time.time()}
            with atomic_path(self.folder / SESSION_FILE) as tmp_path:
                tmp_path.write_text(json.dumps(info))

    def save_annotations(self, snapshot, *, data_layer_name=None, placement=None):
        """Write the annotation snapshot and its cluster table to ``annotations.npz``.

        Parameters
        ----------
        snapshot : napari_gacc._annotations.AnnotationSnapshot
        data_layer_name : str or None
            Name of the data layer the annotations lie on, used to place the
            restored layers.
        placement : dict or None
            Scale, translate and axis labels of the spatial axes, used when
            no layer of that name is open at restore time.

        Returns
        -------
        path : Path
        """
        self._ensure_folder()
        header = {
            "layer_names": list(snapshot.layer_names),
            "complete": [bool(value) for value in snapshot.complete],
            "cluster_names": list(snapshot.cluster_names),
            "cluster_colors": list(snapshot.cluster_colors),
            "data_layer_name": data_layer_name,
            "placement": _jsonable_placement(placement),
            "saved": time.time(),
        }
        arrays = {f"labels_{index}": array for index, array in enumerate(snapshot.label_arrays)}
        path = self.folder / ANNOTATIONS_FILE
        with atomic_path(path) as tmp_path:
            np.savez_compressed(tmp_path, header=np.array(json.dumps(header)), **arrays)
        logger.info("Autosaved %d annotation layers to %s", len(arrays), path)
        return path

    def model_checkpoint(self, every_n_steps=CHECKPOINT_EVERY_N_STEPS):
        """Return a :class:`gacc.callbacks.ModelCheckpoint` that writes ``model.pt`` here."""
        self._ensure_folder()
        return _SessionCheckpoint(self, every_n_steps)

    def discard(self):
        """Remove this session's folder, if any."""
        discard_folder(self.folder)


class _SessionCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that recreates the session folder if a save or export removed it."""

    def __init__(self, session, every_n_steps):
        super().__init__(session.folder / MODEL_FILE, every_n_steps=every_n_steps)
        self.session = session

    def on_step_end(self, model, step_logs):
        if self.every_n_steps is not None and step_logs["step"] % self.every_n_steps == 0:
            self.session._ensure_folder()
        super().on_step_end(model, step_logs)

    def on_train_end(self, model):
        self.session._ensure_folder()
        super().on_train_end(model)


def _jsonable_placement(placement):
    if placement is None:
        return None
    return {key: [_plain(value) for value in values] for key, values in placement.items()}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def discard_folder(folder):
    """Remove a recovery session folder and everything in it."""
    folder = Path(folder)
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("Removed the recovery folder %s", folder)


def find_orphaned_sessions(root=None, *, exclude=()):
    """Return session folders left by sessions that ended without cleaning up, newest first.

    A folder counts when it contains annotations or a model and its
    ``session.json`` names a process that no longer runs or this process.
    Folders of this process come from widgets that ended without cleaning
    up, or from a test that simulates a crash. Folders of other running
    processes are skipped because those sessions may still be training.

    Parameters
    ----------
    root : str or Path or None, default=None
        None uses :func:`recovery_root`.
    exclude : iterable of Path
        Folders to skip, such as the caller's own session folder.
    """
    root = Path(root) if root is not None else recovery_root()
    if not root.is_dir():
        return []
    excluded = {Path(folder).resolve() for folder in exclude}
    found = []
    for folder in root.iterdir():
        if not folder.is_dir() or folder.resolve() in excluded:
            continue
        if not ((folder / ANNOTATIONS_FILE).is_file() or (folder / MODEL_FILE).is_file()):
            continue
        try:
            pid = int(json.loads((folder / SESSION_FILE).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pid = None
        if pid is not None and pid != os.getpid() and _process_is_running(pid):
            continue
        found.append(folder)
    found.sort(key=lambda folder: folder.stat().st_mtime, reverse=True)
    return found


def load_annotations(folder):
    """Read ``annotations.npz`` of a session folder.

    Returns
    -------
    snapshot : napari_gacc._annotations.AnnotationSnapshot or None
        None when the folder has no annotations.
    info : dict
        ``data_layer_name``, ``placement`` and ``saved`` (seconds since the epoch).
    """
    path = Path(folder) / ANNOTATIONS_FILE
    if not path.is_file():
        return None, {}
    with np.load(path, allow_pickle=False) as archive:
        header = json.loads(str(archive["header"]))
        label_arrays = [archive[f"labels_{index}"] for index in range(len(header["layer_names"]))]
    snapshot = AnnotationSnapshot(
        label_arrays=label_arrays,
        layer_names=header["layer_names"],
        complete=header["complete"],
        cluster_names=header["cluster_names"],
        cluster_colors=header["cluster_colors"],
    )
    info = {key: header.get(key) for key in ("data_layer_name", "placement", "saved")}
    return snapshot, info


def model_path(folder):
    """Return the checkpoint of a session folder, or None if it has none."""
    path = Path(folder) / MODEL_FILE
    return path if path.is_file() else None


def discard_sessions_of_this_process(root=None):
    """Remove every session folder written by this process (after a save or an export)."""
    root = Path(root) if root is not None else recovery_root()
    if not root.is_dir():
        return
    for folder in root.iterdir():
        try:
            pid = int(json.loads((folder / SESSION_FILE).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid == os.getpid():
            discard_folder(folder)


def restore_annotation_layers(viewer, snapshot, info):
    """Add the autosaved annotation layers to ``viewer``.

    The layers are placed on the open data layer of the saved name, or else
    on any 4D data layer of the same spatial shape, and get its NIfTI
    metadata. Without such a layer they use the saved scale and translate.

    Returns
    -------
    layers : list of napari.layers.Labels
    """
    spatial_shape = tuple(snapshot.label_arrays[0].shape)
    candidates = [
        layer for layer in viewer.layers
        if is_data_layer(layer) and tuple(layer.data.shape[-3:]) == spatial_shape
    ]
    candidates.sort(key=lambda layer: layer.name != info.get("data_layer_name"))
    data_layer = candidates[0] if candidates else None
    restored = []
    for labels, name, complete in zip(snapshot.label_arrays, snapshot.layer_names,
                                      snapshot.complete):
        table = cluster_table(snapshot.cluster_names, snapshot.cluster_colors, dtype=labels.dtype)
        if data_layer is not None:
            layer = new_annotation_layer(data_layer, table, name=name, labels=labels)
        else:
            placement = {key: tuple(value) for key, value in (info.get("placement") or {}).items()}
            metadata = {md.GACC_KEY: {"role": md.ROLE_ANNOTATION}}
            layer = Layer.create(*annotation_layer_data(
                labels, table, name=name, placement=placement, metadata=metadata
            ))
        md.gacc_info(layer)["complete"] = bool(complete)
        restored.append(viewer.add_layer(layer))
    return restored
