"""Dock widget to threshold, inspect, correct and export GACC predictions.

It works from the probability layer that the training widget creates
(see :mod:`napari_gacc._results`); thresholding runs in a worker thread and
updates the prediction Labels layers in place.
"""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from gacc.exceptions import InvalidInputError

from . import _metadata as md
from ._annotations import (
    annotation_layers,
    apply_cluster_table,
    new_annotation_layer,
    snapshot_annotations,
)
from ._io import write_image, write_labels
from ._qt_layer_combo import LayerComboBox, connect_while_alive
from ._qt_workers import FunctionWorker
from ._recovery import discard_sessions_of_this_process
from ._results import (
    prediction_as_annotations,
    prediction_label_layers,
    show_thresholded,
    threshold_prediction,
)

logger = logging.getLogger(__name__)

# Wait this long after the threshold slider stops before thresholding again.
THRESHOLD_DELAY_MS = 200

_COLUMNS = (
    ("Label", "cluster"),
    ("Name", "name"),
    ("Voxels", "voxels"),
    ("mm³", "volume_mm3"),
    ("Dice", "dice"),
    ("Overlaps", "overlapping_clusters"),
)


def _is_probability_layer(layer):
    return isinstance(layer, Image) and md.layer_role(layer) == md.ROLE_PROBABILITIES


def _layer_meta(layer):
    """Return the ``meta`` dict that napari passes to writers, for ``layer``."""
    return {"metadata": layer.metadata, "scale": layer.scale, "translate": layer.translate}


class ResultsWidget(QWidget):
    """Threshold predicted clusters, show their statistics, reuse them and export them.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    #: Emitted after the prediction Labels layers have been redrawn.
    thresholded = Signal()
    #: Emitted after a prediction has been copied into annotation layers.
    annotations_created = Signal()

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._threshold_worker = None
        self._annotation_worker = None
        self.probability_combo = LayerComboBox(napari_viewer, _is_probability_layer)
        self.threshold = QLabeledDoubleSlider(Qt.Horizontal)
        self.threshold.setRange(0.01, 0.99)
        self.threshold.setDecimals(2)
        self.threshold.setValue(0.5)
        self.threshold.setToolTip("Probabilities at or above this value count as inside a cluster.")
        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.setInterval(THRESHOLD_DELAY_MS)
        self._threshold_timer.timeout.connect(self.apply_threshold)
        self.table = QTableWidget(0, len(_COLUMNS))
        self.table.setHorizontalHeaderLabels([title for title, _ in _COLUMNS])
        header = self.table.horizontalHeader()
        for column in range(len(_COLUMNS)):
            header.setSectionResizeMode(column, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.Stretch)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.use_button = QPushButton("Use as annotation")
        self.use_button.setToolTip(
            "Copy the annotated clusters (and any selected discovered ones) at this threshold "
            "into new annotation layers to correct and train again. Painted annotations "
            "override the prediction."
        )
        self.export_button = QPushButton("Export NIfTI…")
        self.export_button.setToolTip(
            "Write the probability maps, the cluster label layers and their tables to a folder."
        )
        self.save_model_button = QPushButton("Save model…")
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        # Wide enough for cluster names next to the statistics.
        self.setMinimumWidth(460)
        self._build_layout()

        self.probability_combo.currentIndexChanged.connect(self._on_layer_changed)
        self.threshold.valueChanged.connect(lambda _value: self._threshold_timer.start())
        self.use_button.clicked.connect(self.use_as_annotation)
        self.export_button.clicked.connect(self._choose_export_folder)
        self.save_model_button.clicked.connect(self._choose_model_path)
        connect_while_alive(self, napari_viewer.layers.events.inserted, self._on_layers_changed)
        connect_while_alive(self, napari_viewer.layers.events.removed, self._on_layers_changed)
        self._watched = set()
        self._on_layer_changed()

    def _build_layout(self):
        form = QFormLayout()
        form.addRow("Probabilities", self.probability_combo)
        form.addRow("Threshold", self.threshold)
        buttons = QHBoxLayout()
        for button in (self.use_button, self.export_button, self.save_model_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.table, stretch=1)
        layout.addWidget(self.summary)
        layout.addLayout(buttons)

    # ------------------------------------------------------------------
    # Layer tracking

    def probability_layer(self):
        """Return the selected probability layer, or None."""
        return self.probability_combo.current_layer()

    def _on_layers_changed(self, event=None):
        layer = self.probability_layer()
        if layer is not None:
            for labels in prediction_label_layers(self.viewer.layers, layer):
                if id(labels) not in self._watched:
                    self._watched.add(id(labels))
                    connect_while_alive(self, labels.events.features, self.refresh_table)
        self.refresh_table()

    def _on_layer_changed(self, index=None):
        layer = self.probability_layer()
        for widget in (self.use_button, self.export_button, self.save_model_button, self.threshold):
            widget.setEnabled(layer is not None)
        if layer is not None:
            self.threshold.blockSignals(True)
            self.threshold.setValue(float(md.gacc_info(layer).get("threshold", 0.5)))
            self.threshold.blockSignals(False)
            connect_while_alive(self, layer.events.data, self._on_layers_changed)
        self._on_layers_changed()

    def statistics(self):
        """Return the per-cluster statistics of the selected prediction, or None."""
        layer = self.probability_layer()
        if layer is None:
            return None
        frames = [labels.features for labels in prediction_label_layers(self.viewer.layers, layer)]
        frames = [frame for frame in frames if len(frame)]
        if not frames:
            return None
        table = pd.concat(frames, ignore_index=True)
        return table.sort_values("cluster").reset_index(drop=True)

    def refresh_table(self, event=None):
        """Show the statistics stored in the prediction layers' features."""
        statistics = self.statistics()
        if statistics is None:
            self.table.setRowCount(0)
            self.summary.setText("Train or load a model and predict to see clusters here.")
            return
        self.table.setRowCount(len(statistics))
        for row, values in enumerate(statistics.itertuples(index=False)):
            values = values._asdict()
            for column, (_title, key) in enumerate(_COLUMNS):
                value = values[key]
                if key == "cluster":
                    text = str(int(value) + 1)
                elif key == "volume_mm3":
                    text = f"{value:,.0f}"
                elif key == "dice":
                    text = "" if pd.isna(value) else f"{value:.2f}"
                elif key in ("voxels", "overlapping_clusters"):
                    text = f"{int(value):,}"
                else:
                    text = str(value)
                item = QTableWidgetItem(text)
                if key == "overlapping_clusters" and values["overlaps_with"]:
                    item.setToolTip(f"Overlaps clusters {values['overlaps_with']}")
                elif key == "dice":
                    item.setToolTip("Dice with the annotated voxels of this cluster")
                self.table.setItem(row, column, item)
        n_empty = int((statistics["voxels"] == 0).sum())
        n_overlapping = int((statistics["overlapping_clusters"] > 0).sum())
        self.summary.setText(
            f"{len(statistics)} clusters, {n_overlapping} overlapping another, {n_empty} empty "
            f"at threshold {self.threshold.value():.2f}."
        )

    # ------------------------------------------------------------------
    # Thresholding

    def _annotations_for(self, layer):
        try:
            return snapshot_annotations(self.viewer.layers, tuple(layer.data.shape[-3:]))
        except InvalidInputError:
            return None

    def apply_threshold(self, threshold=None):
        """Threshold the probabilities again in a worker thread and update the label layers.

        Returns
        -------
        worker : FunctionWorker or None
        """
        layer = self.probability_layer()
        if layer is None:
            return None
        if threshold is not None:
            self.threshold.blockSignals(True)
            self.threshold.setValue(float(threshold))
            self.threshold.blockSignals(False)
        threshold = float(self.threshold.value())
        snapshot = self._annotations_for(layer)
        worker = create_worker(
            _threshold_job,
            np.asarray(layer.data),
            threshold,
            list(md.gacc_info(layer)["names"]),
            float(np.prod(layer.scale[-3:])),
            snapshot,
            _start_thread=False,
            _ignore_errors=True,
            _worker_class=FunctionWorker,
        )
        worker.returned.connect(lambda result: self._show_result(layer, result))
        worker.errored.connect(lambda error: show_error(f"Thresholding failed: {error}"))
        self._threshold_worker = worker
        worker.start()
        return worker

    def _show_result(self, layer, result):
        if layer not in self.viewer.layers:
            return
        show_thresholded(self.viewer, layer, result)
        self._on_layers_changed()
        self.thresholded.emit()

    # ------------------------------------------------------------------
    # Prediction as annotation

    def selected_clusters(self):
        """Return the 0-based clusters of the selected table rows."""
        rows = sorted({index.row() for index in self.table.selectionModel().selectedRows()})
        return [int(self.table.item(row, 0).text()) - 1 for row in rows]

    def use_as_annotation(self, discovered=None):
        """Copy the thresholded prediction into new annotation layers.

        The annotated clusters are always copied; ``discovered`` (0-based
        indices, default: the selected table rows beyond them) are appended
        to the cluster table. Known annotations override the prediction, and
        the earlier annotation layers are kept but no longer used.

        Returns
        -------
        worker : FunctionWorker or None
        """
        layer = self.probability_layer()
        if layer is None:
            show_error("No prediction to copy; predict first.")
            return None
        info = md.gacc_info(layer)
        snapshot = self._annotations_for(layer)
        n_known = 0 if snapshot is None else len(snapshot.cluster_names)
        if discovered is None:
            discovered = [k for k in self.selected_clusters() if k >= n_known]
        if n_known == 0 and not discovered:
            discovered = list(range(len(info["names"])))
        clusters = list(range(n_known)) + sorted(set(discovered))
        names = list(snapshot.cluster_names) if snapshot else []
        colors = list(snapshot.cluster_colors) if snapshot else []
        names += [info["names"][k] for k in clusters[n_known:]]
        colors += [info["colors"][k] for k in clusters[n_known:]]
        worker = create_worker(
            _annotation_job,
            np.asarray(layer.data),
            float(self.threshold.value()),
            info.get("mask"),
            clusters,
            snapshot,
            _start_thread=False,
            _ignore_errors=True,
            _worker_class=FunctionWorker,
        )
        worker.returned.connect(
            lambda label_arrays: self._add_annotation_layers(
                layer, label_arrays, names, colors, grew=len(clusters) > n_known and n_known > 0
            )
        )
        worker.errored.connect(lambda error: show_error(f"Copying the prediction failed: {error}"))
        self._annotation_worker = worker
        worker.start()
        return worker

    def _add_annotation_layers(self, probability_layer, label_arrays, names, colors, *, grew):
        # New layers copy the data layer's grid. The probability layer is on the
        # same grid, so it replaces a data layer that was removed or renamed.
        data_name = md.gacc_info(probability_layer)["data_layer"]
        source = probability_layer
        if data_name in self.viewer.layers:
            source = self.viewer.layers[data_name]
        shape = tuple(probability_layer.data.shape[-3:])
        for old in annotation_layers(self.viewer.layers, shape):
            md.gacc_info(old)["use"] = False
            old.visible = False
        table = apply_cluster_table(self.viewer.layers, names, colors)
        for index, labels in enumerate(label_arrays):
            layer = new_annotation_layer(
                source, table, name=self._unique_name("corrected"), labels=labels
            )
            self.viewer.add_layer(layer)
        message = (
            f"Copied {len(names)} clusters into {len(label_arrays)} annotation layers. "
            "Earlier annotation layers are hidden and no longer used; their labels are included."
        )
        if grew:
            message += " The cluster table grew, so press Start to train a new model."
        show_info(message)
        self.annotations_created.emit()

    def _unique_name(self, stem):
        existing = {layer.name for layer in self.viewer.layers}
        index = 1
        while f"{stem} {index}" in existing:
            index += 1
        return f"{stem} {index}"

    # ------------------------------------------------------------------
    # Export

    def export(self, folder, stem=None):
        """Write the probabilities, the label layers and their tables as NIfTI and TSV.

        Files, with ``stem`` defaulting to the data layer's name:
        ``<stem>_probseg.nii.gz`` (X, Y, Z, K probabilities),
        ``<stem>_clusters-<g>_dseg.nii.gz`` (one per label layer),
        ``<stem>_dseg.tsv`` (label value and name of every cluster) and
        ``<stem>_clusters.tsv`` (the statistics table). Images keep the
        affine and header of the data file.

        Returns
        -------
        paths : list of Path
        """
        layer = self.probability_layer()
        if layer is None:
            show_error("No prediction to export; predict first.")
            return []
        folder = Path(folder)
        stem = stem or md.gacc_info(layer)["data_layer"].replace(" ", "_")
        probseg = folder / f"{stem}_probseg.nii.gz"
        paths = [Path(p) for p in write_image(probseg, layer.data, _layer_meta(layer))]
        for index, labels in enumerate(prediction_label_layers(self.viewer.layers, layer)):
            target = folder / f"{stem}_clusters-{index + 1}_dseg.nii.gz"
            written = write_labels(target, np.asarray(labels.data), _layer_meta(labels))
            paths += [Path(p) for p in written]
        names = md.gacc_info(layer)["names"]
        label_table = pd.DataFrame({"index": np.arange(1, len(names) + 1), "name": names})
        label_path = folder / f"{stem}_dseg.tsv"
        label_table.to_csv(label_path, sep="\t", index=False)
        paths.append(label_path)
        statistics = self.statistics()
        if statistics is not None:
            statistics_path = folder / f"{stem}_clusters.tsv"
            statistics.to_csv(statistics_path, sep="\t", index=False)
            paths.append(statistics_path)
        logger.info("Exported %d files to %s", len(paths), folder)
        show_info(f"Exported {len(paths)} files to {folder}.")
        # The results are on disk now, so the crash-recovery autosave can go.
        discard_sessions_of_this_process()
        return paths

    def save_model(self, path):
        """Save the model that made the selected prediction with :meth:`gacc.GACC.save`."""
        layer = self.probability_layer()
        model = None if layer is None else md.gacc_info(layer).get("model")
        if model is None:
            show_error("The selected prediction has no model attached; predict with a model first.")
            return None
        model.save(path)
        show_info(f"Saved the GACC model to {path}.")
        discard_sessions_of_this_process()
        return Path(path)

    def _choose_export_folder(self):
        folder = QFileDialog.getExistingDirectory(self, "Export GACC results to folder")
        if folder:
            self.export(folder)

    def _choose_model_path(self):
        path, _filter = QFileDialog.getSaveFileName(
            self, "Save GACC model", "gacc_model.pt", "GACC model (*.pt)"
        )
        if path:
            self.save_model(path)


def _threshold_job(proba_kxyz, threshold, names, voxel_volume_mm3, annotations):
    cluster_xyzp = None if annotations is None else annotations.to_cluster_xyzp()
    return threshold_prediction(
        proba_kxyz, threshold, names, voxel_volume_mm3, cluster_xyzp=cluster_xyzp
    )


def _annotation_job(proba_kxyz, threshold, mask, clusters, annotations):
    cluster_xyzp = None if annotations is None else annotations.to_cluster_xyzp()
    return prediction_as_annotations(
        proba_kxyz, threshold, mask, clusters, cluster_xyzp=cluster_xyzp
    )
