"""Dock widget to pick the 4D data and build the partial ground truth.

Everything the widget edits lives in layers (see :mod:`napari_gacc._metadata`),
so the training and results widgets read it without referring to this one.
"""

import logging
from pathlib import Path

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QColorDialog,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from gacc.exceptions import InvalidInputError

from . import _metadata as md
from ._annotations import (
    annotation_layers,
    apply_cluster_table,
    current_cluster_table,
    is_annotation_layer,
    is_data_layer,
    known_voxel_counts,
    load_atlas_annotations,
    new_annotation_layer,
    snapshot_annotations,
)
from ._layers import background_label, default_cluster_colors, table_clusters
from ._nifti_layers import layer_nifti_metadata, strip_nifti_suffix
from ._qt_layer_combo import LayerComboBox, connect_while_alive
from ._qt_workers import FunctionWorker
from ._recovery import find_orphaned_sessions
from ._view import SLICE_PLANES, set_slice_plane

logger = logging.getLogger(__name__)

# Wait this long after the last brush stroke before recounting known voxels.
COUNT_DELAY_MS = 300

_NAME_COLUMN, _COLOR_COLUMN, _INSIDE_COLUMN, _OUTSIDE_COLUMN = 1, 2, 3, 4


class SetupWidget(QWidget):
    """Pick the data layer, paint or import annotations, and edit the cluster table.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    #: Emitted with the error message when an atlas import fails.
    import_failed = Signal(str)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        # Clusters named before any annotation layer exists to hold the table.
        self._pending_clusters = []
        self._count_worker = None
        self._import_worker = None
        self._count_timer = QTimer(self)
        self._count_timer.setSingleShot(True)
        self._count_timer.setInterval(COUNT_DELAY_MS)
        self._count_timer.timeout.connect(self.update_counts)

        self.data_combo = LayerComboBox(napari_viewer, is_data_layer)
        self.plane_combo = QComboBox()
        self.plane_combo.addItems(["(napari default)", *SLICE_PLANES])
        self.plane_combo.setToolTip("Slice plane for volumes opened with napari-gacc (RAS+ order).")
        self.data_info = QLabel()
        self.data_info.setWordWrap(True)
        self.layer_table = self._make_layer_table()
        self.new_layer_button = QPushButton("New annotation layer")
        self.import_button = QPushButton("Import atlas…")
        self.threshold = QDoubleSpinBox(minimum=0.01, maximum=1.0, singleStep=0.05, value=0.5)
        self.threshold.setToolTip("Probabilities at or above this value count as inside a cluster.")
        self.resample = QCheckBox("Resample to the data grid")
        self.resample.setToolTip("Resample an atlas on another grid instead of rejecting it.")
        self.cluster_table = self._make_cluster_table()
        self.add_cluster_button = QPushButton("Add cluster")
        self.remove_cluster_button = QPushButton("Remove last")
        self.paint_button = QPushButton("Paint selected")
        self.paint_background_button = QPushButton("Paint background")
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self._make_recovery_notice()
        self._build_layout()
        self._connect_signals()
        self._on_data_changed()

    # ------------------------------------------------------------------
    # Layout

    def _make_layer_table(self):
        table = QTableWidget(0, 3)
        table.setHorizontalHeaderLabels(["Use", "Annotation layer", "Complete"])
        table.horizontalHeaderItem(2).setToolTip(
            "Checked: a painted voxel is outside every cluster not painted there.\n"
            "Unchecked: a painted label only marks inside; only background marks outside."
        )
        header = table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeToContents)
        table.verticalHeader().setVisible(False)
        table.setSelectionMode(QAbstractItemView.NoSelection)
        table.setMaximumHeight(130)
        return table

    def _make_cluster_table(self):
        table = QTableWidget(0, 5)
        table.setHorizontalHeaderLabels(["Label", "Name", "", "Inside", "Outside"])
        table.horizontalHeaderItem(_COLOR_COLUMN).setToolTip("Colour (double-click to change)")
        table.horizontalHeaderItem(_INSIDE_COLUMN).setToolTip("Voxels known to be inside")
        table.horizontalHeaderItem(_OUTSIDE_COLUMN).setToolTip("Voxels known to be outside")
        header = table.horizontalHeader()
        for column in range(table.columnCount()):
            header.setSectionResizeMode(column, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(_NAME_COLUMN, QHeaderView.Stretch)
        header.setSectionResizeMode(_COLOR_COLUMN, QHeaderView.Fixed)
        table.setColumnWidth(_COLOR_COLUMN, 22)
        table.verticalHeader().setVisible(False)
        table.setSelectionBehavior(QAbstractItemView.SelectRows)
        table.setSelectionMode(QAbstractItemView.SingleSelection)
        return table

    def _make_recovery_notice(self):
        """Build the notice shown when a crashed session left autosaved work.

        Restoring happens in the training widget because it also loads the
        autosaved model, so the button only opens that widget.
        """
        self.recovery_notice = QGroupBox("Unsaved work from a previous session")
        orphans = find_orphaned_sessions()
        label = QLabel(
            "GACC training did not end normally last time. Open GACC training to "
            "restore the autosaved annotations and model"
            + (f" from {orphans[0]}." if orphans else ".")
        )
        label.setWordWrap(True)
        self.open_training_button = QPushButton("Open GACC training")
        self.open_training_button.clicked.connect(self._open_training_widget)
        notice_layout = QVBoxLayout(self.recovery_notice)
        notice_layout.addWidget(label)
        notice_layout.addWidget(self.open_training_button)
        self.recovery_notice.setVisible(bool(orphans))

    def _open_training_widget(self):
        self.viewer.window.add_plugin_dock_widget("napari-gacc", "GACC training")
        self.recovery_notice.setVisible(False)

    def _build_layout(self):
        data_box = QGroupBox("Data")
        data_form = QFormLayout(data_box)
        data_form.addRow("4D image", self.data_combo)
        data_form.addRow("Slice plane", self.plane_combo)
        data_form.addRow(self.data_info)

        annotation_box = QGroupBox("Annotation layers")
        annotation_layout = QVBoxLayout(annotation_box)
        annotation_layout.addWidget(self.layer_table)
        buttons = QHBoxLayout()
        buttons.addWidget(self.new_layer_button)
        buttons.addWidget(self.import_button)
        annotation_layout.addLayout(buttons)
        import_form = QFormLayout()
        import_form.addRow("Atlas threshold", self.threshold)
        import_form.addRow(self.resample)
        annotation_layout.addLayout(import_form)
        convention = QLabel(
            "Paint label k inside cluster k, background where no cluster is; "
            "unpainted voxels are unknown. Paint overlapping clusters in separate layers."
        )
        convention.setWordWrap(True)
        annotation_layout.addWidget(convention)

        cluster_box = QGroupBox("Clusters")
        cluster_layout = QVBoxLayout(cluster_box)
        cluster_layout.addWidget(self.cluster_table)
        row = QHBoxLayout()
        row.addWidget(self.add_cluster_button)
        row.addWidget(self.remove_cluster_button)
        cluster_layout.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(self.paint_button)
        row.addWidget(self.paint_background_button)
        cluster_layout.addLayout(row)
        cluster_layout.addWidget(self.summary)

        # Wide enough for cluster names next to the known-voxel counts.
        self.setMinimumWidth(400)
        layout = QVBoxLayout(self)
        layout.addWidget(self.recovery_notice)
        layout.addWidget(data_box)
        layout.addWidget(annotation_box)
        layout.addWidget(cluster_box, stretch=1)

    def _connect_signals(self):
        self.data_combo.currentIndexChanged.connect(self._on_data_changed)
        self.plane_combo.currentTextChanged.connect(self._on_plane_changed)
        self.new_layer_button.clicked.connect(self.add_annotation_layer)
        self.import_button.clicked.connect(self._choose_atlas)
        self.add_cluster_button.clicked.connect(self.add_cluster)
        self.remove_cluster_button.clicked.connect(self.remove_last_cluster)
        self.paint_button.clicked.connect(self._paint_selected)
        self.paint_background_button.clicked.connect(self.paint_background)
        self.layer_table.itemChanged.connect(self._on_layer_item_changed)
        self.cluster_table.itemChanged.connect(self._on_cluster_item_changed)
        self.cluster_table.cellDoubleClicked.connect(self._on_cluster_double_clicked)
        layer_events = self.viewer.layers.events
        connect_while_alive(self, layer_events.inserted, self._on_layer_inserted)
        connect_while_alive(self, layer_events.removed, self._on_layers_changed)
        for layer in self.viewer.layers:
            self._watch_layer(layer)

    # ------------------------------------------------------------------
    # Layer bookkeeping

    def data_layer(self):
        """Return the selected 4D data layer, or None."""
        return self.data_combo.current_layer()

    def _spatial_shape(self):
        layer = self.data_layer()
        return None if layer is None else tuple(layer.data.shape[-3:])

    def _annotation_layers(self):
        shape = self._spatial_shape()
        if shape is None:
            return []
        return annotation_layers(self.viewer.layers, shape)

    def _watch_layer(self, layer):
        connect_while_alive(self, layer.events.name, self._on_layers_changed)
        if is_annotation_layer(layer):
            connect_while_alive(self, layer.events.paint, self._schedule_count)
            connect_while_alive(self, layer.events.data, self._schedule_count)
            connect_while_alive(self, layer.events.features, self._on_table_changed)

    def _on_layer_inserted(self, event):
        self._watch_layer(event.value)
        self._on_layers_changed()

    def _on_layers_changed(self, event=None):
        self._refresh_layer_table()
        self._refresh_cluster_table()
        self._schedule_count()

    def _on_table_changed(self, event=None):
        self._refresh_cluster_table()
        self._schedule_count()

    def _on_data_changed(self, index=None):
        layer = self.data_layer()
        if layer is None:
            self.data_info.setText("Open a 4D NIfTI image or load the GACC demo sample.")
        else:
            n_volumes, *spatial = layer.data.shape
            voxel = " x ".join(f"{size:g}" for size in layer.scale[-3:])
            self.data_info.setText(
                f"{n_volumes} volumes of {' x '.join(map(str, spatial))} voxels ({voxel} mm)"
            )
        for widget in (self.new_layer_button, self.import_button):
            widget.setEnabled(layer is not None)
        self._on_layers_changed()

    def _on_plane_changed(self, plane):
        if plane in SLICE_PLANES:
            set_slice_plane(self.viewer, plane)

    def _refresh_layer_table(self):
        layers = self._annotation_layers()
        self.layer_table.blockSignals(True)
        self.layer_table.setRowCount(len(layers))
        for row, layer in enumerate(layers):
            info = md.gacc_info(layer)
            use = QTableWidgetItem()
            use.setCheckState(Qt.Checked if info.get("use", True) else Qt.Unchecked)
            name = QTableWidgetItem(layer.name)
            name.setFlags(name.flags() & ~Qt.ItemIsEditable)
            complete = QTableWidgetItem()
            complete.setCheckState(Qt.Checked if info.get("complete", True) else Qt.Unchecked)
            for column, item in enumerate((use, name, complete)):
                self.layer_table.setItem(row, column, item)
        self.layer_table.blockSignals(False)

    def _on_layer_item_changed(self, item):
        layers = self._annotation_layers()
        if item.row() >= len(layers):
            return
        key = {0: "use", 2: "complete"}.get(item.column())
        if key is not None:
            md.gacc_info(layers[item.row()])[key] = item.checkState() == Qt.Checked
            self._schedule_count()

    # ------------------------------------------------------------------
    # Cluster table

    def clusters(self):
        """Return the (name, hex colour) pairs of the cluster table."""
        table = current_cluster_table(self._annotation_layers())
        if table is None:
            return list(self._pending_clusters)
        return table_clusters(table)

    def set_clusters(self, clusters):
        """Replace the cluster table with ``(name, colour)`` pairs in every annotation layer."""
        clusters = [(str(name), str(color)) for name, color in clusters]
        self._pending_clusters = clusters
        names = [name for name, _color in clusters]
        colors = [color for _name, color in clusters]
        apply_cluster_table(self.viewer.layers, names, colors)
        self._refresh_cluster_table()
        self._schedule_count()

    def add_cluster(self, name=None):
        """Append a cluster with a default colour."""
        clusters = self.clusters()
        index = len(clusters)
        color = default_cluster_colors(index + 1)[index]
        self.set_clusters(clusters + [(name or f"cluster {index + 1}", color)])

    def remove_last_cluster(self):
        """Remove the last cluster and erase its label from the annotation layers."""
        clusters = self.clusters()
        if not clusters:
            return
        label = len(clusters)
        for layer in annotation_layers(self.viewer.layers):
            data = layer.data
            if (data == label).any():
                data[data == label] = 0
                layer.refresh()
        self.set_clusters(clusters[:-1])

    def set_cluster_color(self, index, color):
        """Set the colour of cluster ``index`` (0-based) to a hex string or QColor."""
        clusters = self.clusters()
        clusters[index] = (clusters[index][0], QColor(color).name())
        self.set_clusters(clusters)

    def _refresh_cluster_table(self):
        clusters = self.clusters()
        self.cluster_table.blockSignals(True)
        self.cluster_table.setRowCount(len(clusters))
        for row, (name, color) in enumerate(clusters):
            label = QTableWidgetItem(str(row + 1))
            label.setFlags(label.flags() & ~Qt.ItemIsEditable)
            swatch = QTableWidgetItem()
            swatch.setBackground(QColor(color))
            swatch.setFlags(swatch.flags() & ~Qt.ItemIsEditable)
            swatch.setToolTip("Double-click to change the colour")
            self.cluster_table.setItem(row, 0, label)
            self.cluster_table.setItem(row, _NAME_COLUMN, QTableWidgetItem(name))
            self.cluster_table.setItem(row, _COLOR_COLUMN, swatch)
            for column in (_INSIDE_COLUMN, _OUTSIDE_COLUMN):
                existing = self.cluster_table.item(row, column)
                count = QTableWidgetItem(existing.text() if existing is not None else "")
                count.setFlags(count.flags() & ~Qt.ItemIsEditable)
                self.cluster_table.setItem(row, column, count)
        self.cluster_table.blockSignals(False)

    def _on_cluster_item_changed(self, item):
        if item.column() != _NAME_COLUMN:
            return
        clusters = self.clusters()
        if item.row() < len(clusters):
            clusters[item.row()] = (item.text(), clusters[item.row()][1])
            self.set_clusters(clusters)

    def _on_cluster_double_clicked(self, row, column):
        if column != _COLOR_COLUMN:
            return
        color = QColorDialog.getColor(QColor(self.clusters()[row][1]), self, "Cluster colour")
        if color.isValid():
            self.set_cluster_color(row, color)

    # ------------------------------------------------------------------
    # Annotation layers

    def add_annotation_layer(self, name=None):
        """Add an empty annotation layer on the data grid and start painting in it.

        Returns
        -------
        layer : napari.layers.Labels or None
            None when no data layer is selected.
        """
        data_layer = self.data_layer()
        if data_layer is None:
            show_error("Select a 4D data layer first.")
            return None
        if not self.clusters():
            self._pending_clusters = [("cluster 1", default_cluster_colors(1)[0])]
        clusters = self.clusters()
        table = apply_cluster_table(
            self.viewer.layers,
            [cluster_name for cluster_name, _color in clusters],
            [color for _name, color in clusters],
        )
        name = name or self._unique_name("annotations")
        layer = new_annotation_layer(data_layer, table, name=name)
        self.viewer.add_layer(layer)
        self.paint_label(1)
        return layer

    def _unique_name(self, stem):
        existing = {layer.name for layer in self.viewer.layers}
        index = 1
        while f"{stem} {index}" in existing:
            index += 1
        return f"{stem} {index}"

    def _paint_target(self):
        active = self.viewer.layers.selection.active
        layers = self._annotation_layers()
        if active in layers:
            return active
        used = [layer for layer in layers if md.gacc_info(layer).get("use", True)]
        if used:
            return used[0]
        return self.add_annotation_layer()

    def paint_label(self, label):
        """Select ``label`` for painting in the active (or first) annotation layer."""
        layer = self._paint_target()
        if layer is None:
            return
        self.viewer.layers.selection.active = layer
        layer.selected_label = int(label)
        layer.mode = "paint"

    def paint_background(self):
        """Select the reserved "inside none of the clusters" label for painting."""
        layer = self._paint_target()
        if layer is not None:
            self.paint_label(background_label(layer.data.dtype))

    def _paint_selected(self):
        rows = self.cluster_table.selectionModel().selectedRows()
        if not rows:
            show_info("Select a cluster in the table first.")
            return
        self.paint_label(rows[0].row() + 1)

    # ------------------------------------------------------------------
    # Atlas import

    def _choose_atlas(self):
        path, _filter = QFileDialog.getOpenFileName(
            self, "Import atlas", "", "NIfTI images (*.nii *.nii.gz)"
        )
        if path:
            self.import_atlas(path)

    def import_atlas(self, path):
        """Import a 4D probabilistic or 3D label atlas as annotation layers.

        The atlas is read in a worker thread; its clusters are appended to the
        cluster table and drawn in as many layers as their overlap needs.

        Returns
        -------
        worker : napari.qt.threading.FunctionWorker or None
        """
        data_layer = self.data_layer()
        if data_layer is None:
            show_error("Select a 4D data layer before importing an atlas.")
            return None
        nifti = layer_nifti_metadata(
            data_layer.metadata, data_layer.scale, data_layer.translate, data_layer.data.shape
        )
        offset = len(self.clusters())
        worker = create_worker(
            load_atlas_annotations,
            str(path),
            nifti,
            threshold=self.threshold.value(),
            resample=self.resample.isChecked(),
            label_offset=offset,
            _start_thread=False,
            _ignore_errors=True,
            _worker_class=FunctionWorker,
        )
        worker.returned.connect(
            lambda result: self._add_atlas_layers(result, data_layer, Path(path), offset)
        )
        worker.errored.connect(self._on_import_error)
        worker.finished.connect(lambda: self.import_button.setEnabled(True))
        self.import_button.setEnabled(False)
        self._import_worker = worker
        worker.start()
        return worker

    def _add_atlas_layers(self, result, data_layer, path, offset):
        label_arrays, names = result
        clusters = self.clusters()[:offset]
        colors = default_cluster_colors(offset + len(names))[offset:]
        clusters += list(zip(names, colors))
        self._pending_clusters = clusters
        table = apply_cluster_table(
            self.viewer.layers, [name for name, _ in clusters], [color for _, color in clusters]
        )
        stem = strip_nifti_suffix(path)
        for index, labels in enumerate(label_arrays):
            name = stem if len(label_arrays) == 1 else f"{stem} {index + 1}"
            layer = new_annotation_layer(data_layer, table, name=name, labels=labels)
            self.viewer.add_layer(layer)
        # Tables of older uint8 layers may need widening for the new labels.
        self.set_clusters(clusters)
        show_info(f"Imported {len(names)} clusters from {path.name} in {len(label_arrays)} layers.")

    def _on_import_error(self, error):
        logger.warning("Atlas import failed: %s", error, exc_info=error)
        show_error(f"Atlas import failed: {error}")
        self.import_failed.emit(str(error))

    # ------------------------------------------------------------------
    # Known-voxel counts

    def _schedule_count(self, event=None):
        self._count_timer.start()

    def update_counts(self):
        """Count known voxels per cluster in a worker thread and show them in the table.

        Returns
        -------
        worker : napari.qt.threading.FunctionWorker or None
            None when there is nothing to count.
        """
        shape = self._spatial_shape()
        if shape is None:
            self.summary.setText("")
            return None
        try:
            snapshot = snapshot_annotations(self.viewer.layers, shape)
        except InvalidInputError as error:
            self.summary.setText(str(error))
            return None
        worker = create_worker(
            _count_known_voxels,
            snapshot,
            _start_thread=False,
            _ignore_errors=True,
            _worker_class=FunctionWorker,
        )
        worker.returned.connect(self._show_counts)
        worker.errored.connect(lambda error: self.summary.setText(str(error)))
        self._count_worker = worker
        worker.start()
        return worker

    def _show_counts(self, counts):
        inside, outside, n_known_voxels = counts
        self.cluster_table.blockSignals(True)
        for row in range(min(self.cluster_table.rowCount(), len(inside))):
            for column, values in ((_INSIDE_COLUMN, inside), (_OUTSIDE_COLUMN, outside)):
                item = self.cluster_table.item(row, column)
                if item is not None:
                    item.setText(f"{int(values[row]):,}")
        self.cluster_table.blockSignals(False)
        unannotated = [str(row + 1) for row, count in enumerate(inside) if count == 0]
        text = f"{n_known_voxels:,} voxels annotated for at least one cluster."
        if unannotated:
            text += f" No voxel inside cluster {', '.join(unannotated)} yet."
        self.summary.setText(text)

    def counts(self):
        """Return the (inside, outside) counts shown in the table, as lists of int."""
        def cell_value(row, column):
            return int(self.cluster_table.item(row, column).text().replace(",", "") or 0)

        rows = range(self.cluster_table.rowCount())
        inside = [cell_value(row, _INSIDE_COLUMN) for row in rows]
        outside = [cell_value(row, _OUTSIDE_COLUMN) for row in rows]
        return inside, outside


def _count_known_voxels(snapshot):
    """Return per-cluster inside and outside counts and the number of known voxels."""
    cluster_xyzp = snapshot.to_cluster_xyzp()
    inside, outside = known_voxel_counts(cluster_xyzp)
    n_known_voxels = int((~_all_nan(cluster_xyzp)).sum())
    return inside, outside, n_known_voxels


def _all_nan(cluster_xyzp):
    return np.isnan(cluster_xyzp).all(axis=-1)
