"""Dock widget that trains GACC in a worker thread and shows the live losses.

Training runs in a napari ``thread_worker`` generator around
:meth:`gacc.GACC.fit_iter`: the GUI thread only copies the annotations,
starts the worker and draws what it yields. Pause and resume act between
steps; Stop sets the engine's ``stop_event``, so the model keeps the weights
of the last completed step.
"""

import logging

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

import gacc
from gacc.exceptions import InvalidInputError

from . import _metadata as md
from ._annotations import (
    current_cluster_table,
    is_data_layer,
    mask_xyz_of,
    snapshot_annotations,
    spatial_placement,
)
from ._loss_plot import LossPlot
from ._qt_layer_combo import LayerComboBox, connect_while_alive
from ._qt_workers import ClosingGeneratorWorker, FunctionWorker
from ._recovery import (
    RecoverySession,
    discard_folder,
    find_orphaned_sessions,
    load_annotations,
    model_path,
    restore_annotation_layers,
)
from ._results import (
    cluster_names_and_colors,
    find_probability_layer,
    show_probabilities,
    show_thresholded,
)
from ._training import (
    TrainingRun,
    predict_and_threshold,
    release_device_memory,
    train_steps,
    training_error_message,
)

logger = logging.getLogger(__name__)

# Clusters left for discovery beyond the annotated ones when K follows the table.
N_DISCOVERED_CLUSTERS = 10
# The engine's default K, kept while the table has fewer annotated clusters.
DEFAULT_NUM_CLUSTERS = 50


def default_num_clusters(n_annotated):
    """Return the default K: 50 like :class:`gacc.GACC`, or P + 10 for larger tables."""
    return max(DEFAULT_NUM_CLUSTERS, n_annotated + N_DISCOVERED_CLUSTERS)


def _is_mask_candidate(layer):
    return isinstance(layer, (Labels, Image)) and layer.data.ndim == 3


def _format_seconds(seconds):
    if seconds is None:
        return "--:--"
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _float_box(value, minimum, maximum, decimals, step, tooltip):
    box = QDoubleSpinBox(minimum=minimum, maximum=maximum, decimals=decimals, singleStep=step)
    box.setValue(value)
    box.setToolTip(tooltip)
    return box


def _int_box(value, minimum, maximum, tooltip):
    box = QSpinBox(minimum=minimum, maximum=maximum)
    box.setValue(value)
    box.setToolTip(tooltip)
    return box


class TrainingWidget(QWidget):
    """Set GACC's hyperparameters, train without blocking the GUI, and predict.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    #: Emitted with the number of steps completed when a training run ends.
    training_finished = Signal(int)
    #: Emitted when a prediction has been drawn into the result layers.
    prediction_shown = Signal()

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.model = None
        self.worker = None
        self.run = None
        # True from start() until _on_finished has handled the end of the run.
        self._running = False
        self._run_data_layer = None
        self._progress = None
        self._predict_worker = None
        # The destroyed handler stops the runs in this list. It keeps a reference
        # to the list, not to the widget, which is gone by then.
        self._live_runs = []
        live_runs = self._live_runs
        # Autosave folder of this widget, plus restored folders of crashed
        # sessions; all are removed on a save or a normal close.
        self.recovery = RecoverySession()
        self._adopted_recovery = []
        recovery, adopted = self.recovery, self._adopted_recovery
        self.destroyed.connect(lambda *_: _close_session(live_runs, recovery, adopted))

        self.data_combo = LayerComboBox(napari_viewer, is_data_layer)
        self.mask_combo = LayerComboBox(
            napari_viewer, _is_mask_candidate, none_text="(none: voxels with nonzero data)"
        )
        self.data_combo.currentIndexChanged.connect(self._select_default_mask)
        self._select_default_mask()
        self._make_parameter_boxes()
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("Train a new model from scratch.")
        self.continue_button = QPushButton("Continue training")
        self.continue_button.setToolTip(
            "Train the current model further with the current annotations (warm start)."
        )
        self.pause_button = QPushButton("Pause")
        self.stop_button = QPushButton("Stop")
        self.predict_button = QPushButton("Predict")
        self.save_button = QPushButton("Save model…")
        self.load_button = QPushButton("Load model…")
        self.predict_after = QCheckBox("Predict when training ends")
        self.predict_after.setChecked(True)
        self.status = QLabel("Not trained.")
        self.status.setWordWrap(True)
        self.loss_plot = LossPlot()
        self._make_recovery_notice()
        self._apply_theme()
        connect_while_alive(self, napari_viewer.events.theme, self._apply_theme)
        # K follows the cluster table until the user sets it.
        self._num_clusters_set_by_user = False
        self._follow_cluster_table()
        self.num_clusters.valueChanged.connect(self._on_num_clusters_changed)
        for emitter in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            connect_while_alive(self, emitter, self._follow_cluster_table)
        self._build_layout()
        self._connect_signals()
        self._update_buttons()
        self.check_recovery()

    # ------------------------------------------------------------------
    # Layout

    def _make_parameter_boxes(self):
        self._setting_num_clusters = False
        self.num_clusters = _int_box(
            DEFAULT_NUM_CLUSTERS, 1, 1000,
            "K, clusters predicted: the annotated ones first, then discovered ones. Until "
            "you change it, K is 50, or the number of annotated clusters plus 10 if larger."
        )
        self.epochs = _int_box(40, 1, 100000, "Training epochs.")
        self.num_batches = _int_box(10, 1, 100000, "Training steps per epoch.")
        self.set_size = _int_box(8, 2, 4096, "N, voxels per set.")
        self.batch_size = _int_box(32, 1, 65536, "B, sets per training step.")
        self.learning_rate = _float_box(
            1e-3, 1e-6, 1.0, 6, 1e-4, "Adam learning rate of the generator."
        )
        self.discriminator_learning_rate = _float_box(
            1e-3, 1e-6, 1.0, 6, 1e-4, "Adam learning rate of the discriminator."
        )
        self.predictor_learning_rate = _float_box(
            1e-3, 1e-6, 1.0, 6, 1e-4, "Adam learning rate of both cooperative predictors."
        )
        self.supervised_weight = _float_box(
            1.0, 0.0, 1000.0, 3, 0.1, "Weight of the masked cross-entropy on annotated voxels."
        )
        self.adversarial_weight = _float_box(
            0.1, 0.0, 1000.0, 3, 0.05, "Weight of the adversarial term (0 turns it off)."
        )
        self.xc_weight = _float_box(
            0.01, 0.0, 1000.0, 3, 0.01, "Weight of the entity-to-cluster predictor's error."
        )
        self.cx_weight = _float_box(
            0.1, 0.0, 1000.0, 3, 0.05, "Weight of the cluster-to-entity predictor's error."
        )
        self.balance = QCheckBox("Balance inside and outside")
        self.balance.setChecked(False)
        self.balance.setToolTip(
            "Weigh annotated inside voxels by the outside-to-inside ratio of their cluster "
            "(class_weight='balanced'). It helps small clusters that stay below 0.5, but "
            "tends to make predicted clusters much larger than the annotated ones."
        )
        self.device = QComboBox()
        self.device.addItems(["auto", *gacc.available_devices()])
        self.device.setToolTip("auto picks CUDA, then Apple MPS, then the CPU.")
        self.seed = _int_box(0, -1, 2**31 - 1, "Random seed; 'random' draws a new one each run.")
        self.seed.setSpecialValueText("random")

    def _build_layout(self):
        data_box = QGroupBox("Input")
        data_form = QFormLayout(data_box)
        data_form.addRow("4D data", self.data_combo)
        data_form.addRow("Brain mask", self.mask_combo)

        model_box = QGroupBox("Model")
        model_form = QFormLayout(model_box)
        model_form.addRow("Clusters (K)", self.num_clusters)
        model_form.addRow("Set size", self.set_size)
        model_form.addRow("Device", self.device)
        model_form.addRow("Seed", self.seed)

        training_box = QGroupBox("Training")
        training_form = QFormLayout(training_box)
        training_form.addRow("Epochs", self.epochs)
        training_form.addRow("Batches per epoch", self.num_batches)
        training_form.addRow("Sets per batch", self.batch_size)
        training_form.addRow("Learning rate", self.learning_rate)
        training_form.addRow("Discriminator LR", self.discriminator_learning_rate)
        training_form.addRow("Predictor LR", self.predictor_learning_rate)
        training_form.addRow("Supervised weight", self.supervised_weight)
        training_form.addRow("Adversarial weight", self.adversarial_weight)
        training_form.addRow("X→C weight", self.xc_weight)
        training_form.addRow("C→X weight", self.cx_weight)
        training_form.addRow(self.balance)

        run_row = QHBoxLayout()
        for button in (self.start_button, self.continue_button):
            run_row.addWidget(button)
        control_row = QHBoxLayout()
        for button in (self.pause_button, self.stop_button):
            control_row.addWidget(button)
        model_row = QHBoxLayout()
        for button in (self.predict_button, self.save_button, self.load_button):
            model_row.addWidget(button)

        layout = QVBoxLayout(self)
        layout.addWidget(self.recovery_notice)
        layout.addWidget(data_box)
        layout.addWidget(model_box)
        layout.addWidget(training_box)
        layout.addLayout(run_row)
        layout.addLayout(control_row)
        layout.addWidget(self.predict_after)
        layout.addLayout(model_row)
        layout.addWidget(self.status)
        layout.addWidget(self.loss_plot, stretch=1)

    def _connect_signals(self):
        self.start_button.clicked.connect(lambda: self.start(warm_start=False))
        self.continue_button.clicked.connect(lambda: self.start(warm_start=True))
        self.pause_button.clicked.connect(self.toggle_pause)
        self.stop_button.clicked.connect(self.stop)
        self.predict_button.clicked.connect(self.predict)
        self.save_button.clicked.connect(self._choose_save_path)
        self.load_button.clicked.connect(self._choose_model_file)

    def _apply_theme(self, event=None):
        from napari.utils.theme import get_theme

        theme = get_theme(self.viewer.theme)
        self.loss_plot.set_colors(
            background=theme.background.as_hex(), foreground=theme.text.as_hex()
        )

    def _update_buttons(self):
        running = self.is_training()
        busy = running or self._predict_worker is not None
        self.start_button.setEnabled(not busy)
        self.continue_button.setEnabled(not busy and self.model is not None)
        self.pause_button.setEnabled(running)
        self.stop_button.setEnabled(running)
        self.predict_button.setEnabled(not busy and self.model is not None)
        self.save_button.setEnabled(not running and self.model is not None)
        self.load_button.setEnabled(not busy)
        for box in (self.num_clusters, self.set_size, self.device, self.seed):
            box.setEnabled(not running)

    # ------------------------------------------------------------------
    # Crash recovery

    def _make_recovery_notice(self):
        self.recovery_notice = QGroupBox("Unsaved work from a previous session")
        self.recovery_label = QLabel()
        self.recovery_label.setWordWrap(True)
        self.restore_button = QPushButton("Restore")
        self.restore_button.setToolTip(
            "Add the autosaved annotation layers and load the autosaved model."
        )
        self.discard_recovery_button = QPushButton("Discard")
        self.discard_recovery_button.setToolTip("Delete the autosaved files.")
        self.restore_button.clicked.connect(self.restore_recovery)
        self.discard_recovery_button.clicked.connect(self._discard_orphan)
        row = QHBoxLayout()
        row.addWidget(self.restore_button)
        row.addWidget(self.discard_recovery_button)
        notice_layout = QVBoxLayout(self.recovery_notice)
        notice_layout.addWidget(self.recovery_label)
        notice_layout.addLayout(row)
        self.recovery_notice.setVisible(False)
        self._orphan_folder = None

    def check_recovery(self):
        """Look for autosaved work of a session that crashed and offer it in the notice.

        Returns
        -------
        folder : Path or None
            The newest such folder, or None.
        """
        exclude = [self.recovery.folder, *self._adopted_recovery]
        orphans = find_orphaned_sessions(self.recovery.root, exclude=exclude)
        self._orphan_folder = orphans[0] if orphans else None
        if self._orphan_folder is not None:
            has_model = model_path(self._orphan_folder) is not None
            self.recovery_label.setText(
                "GACC training did not end normally last time. Autosaved annotations"
                + (" and model" if has_model else "")
                + f" are in {self._orphan_folder}."
            )
        self.recovery_notice.setVisible(self._orphan_folder is not None)
        return self._orphan_folder

    def restore_recovery(self):
        """Add the autosaved annotation layers and load the autosaved model.

        The restored folder is kept until the model is saved or the widget
        closes normally, so a second crash loses nothing.

        Returns
        -------
        layers : list of napari.layers.Labels
            The restored annotation layers (empty if none were saved).
        """
        folder = self._orphan_folder
        if folder is None:
            return []
        try:
            snapshot, info = load_annotations(folder)
        except (OSError, ValueError, KeyError) as error:
            show_error(f"Cannot read the autosaved annotations in {folder}: {error}")
            return []
        layers = [] if snapshot is None else restore_annotation_layers(
            self.viewer, snapshot, info
        )
        checkpoint = model_path(folder)
        if checkpoint is not None and not self.is_training():
            self.load_model(checkpoint)
        self._adopted_recovery.append(folder)
        self.check_recovery()
        show_info(f"Restored {len(layers)} annotation layers from {folder}.")
        return layers

    def _discard_orphan(self):
        if self._orphan_folder is not None:
            discard_folder(self._orphan_folder)
        self.check_recovery()

    def discard_recovery(self):
        """Remove this widget's autosaved files (after the work has been saved)."""
        self.recovery.discard()
        for folder in self._adopted_recovery:
            discard_folder(folder)
        self._adopted_recovery.clear()

    # ------------------------------------------------------------------
    # Parameters

    def model_parameters(self):
        """Return the :class:`gacc.GACC` keyword arguments set in the widget."""
        seed = self.seed.value()
        return {
            "num_clusters": self.num_clusters.value(),
            "set_size": self.set_size.value(),
            "batch_size": self.batch_size.value(),
            "learning_rate": self.learning_rate.value(),
            "discriminator_learning_rate": self.discriminator_learning_rate.value(),
            "predictor_learning_rate": self.predictor_learning_rate.value(),
            "supervised_weight": self.supervised_weight.value(),
            "adversarial_weight": self.adversarial_weight.value(),
            "xc_weight": self.xc_weight.value(),
            "cx_weight": self.cx_weight.value(),
            "class_weight": "balanced" if self.balance.isChecked() else None,
            "device": self.device.currentText(),
            "random_state": None if seed < 0 else seed,
        }

    def _on_num_clusters_changed(self, value):
        if not self._setting_num_clusters:
            self._num_clusters_set_by_user = True

    def _follow_cluster_table(self, event=None):
        """Set K to its default for the current cluster table, unless the user set K."""
        if self._num_clusters_set_by_user:
            return
        table = current_cluster_table(self.viewer.layers)
        n_annotated = 0 if table is None else int((table["cluster"] >= 0).sum())
        self._set_num_clusters(default_num_clusters(n_annotated))

    def _set_num_clusters(self, value):
        self._setting_num_clusters = True
        try:
            self.num_clusters.setValue(value)
        finally:
            self._setting_num_clusters = False

    def _select_default_mask(self, index=None):
        """Pick a brain mask layer on the data grid when none is selected yet."""
        data_layer = self.data_combo.current_layer()
        if data_layer is None or self.mask_combo.current_layer() is not None:
            return
        spatial_shape = tuple(data_layer.data.shape[-3:])
        for layer in self.viewer.layers:
            if md.layer_role(layer) == md.ROLE_MASK and tuple(layer.data.shape) == spatial_shape:
                self.mask_combo.set_current_layer(layer)
                return

    def _mask(self, spatial_shape):
        layer = self.mask_combo.current_layer()
        return None if layer is None else mask_xyz_of(layer, spatial_shape)

    # ------------------------------------------------------------------
    # Training

    def is_training(self):
        """Return True from the start of a training run until its end is handled (paused counts)."""
        return self._running

    def start(self, *, warm_start=False):
        """Start training in a worker thread.

        Parameters
        ----------
        warm_start : bool, default=False
            Continue the current model from its weights instead of a new model.

        Returns
        -------
        worker : napari.qt.threading.GeneratorWorker or None
            None when the inputs are invalid (the reason is shown as an error).
        """
        if self.is_training():
            show_info("Training is already running.")
            return None
        data_layer = self.data_combo.current_layer()
        try:
            if data_layer is None:
                raise InvalidInputError("Select a 4D data layer first.")
            spatial_shape = tuple(data_layer.data.shape[-3:])
            snapshot = snapshot_annotations(self.viewer.layers, spatial_shape)
            mask = self._mask(spatial_shape)
            if not warm_start:
                self._follow_cluster_table()
            model = self._model_for_run(warm_start, len(snapshot.cluster_names))
        except InvalidInputError as error:
            show_error(str(error))
            return None

        # Only the model's trainable settings may change between warm starts.
        if warm_start:
            for key in ("batch_size", "learning_rate", "discriminator_learning_rate",
                        "predictor_learning_rate", "supervised_weight", "adversarial_weight",
                        "xc_weight", "cx_weight", "class_weight"):
                setattr(model, key, self.model_parameters()[key])
        num_batches, epochs = self.num_batches.value(), self.epochs.value()
        callbacks = self._autosave(snapshot, data_layer)
        run = TrainingRun(num_steps=num_batches * epochs)
        worker = create_worker(
            train_steps,
            model,
            np.asarray(data_layer.data),
            snapshot,
            mask,
            run,
            num_batches=num_batches,
            epochs=epochs,
            warm_start=warm_start,
            callbacks=callbacks,
            _start_thread=False,
            _ignore_errors=True,
            _worker_class=ClosingGeneratorWorker,
        )
        worker.yielded.connect(self._on_step)
        worker.errored.connect(self._on_error)
        worker.paused.connect(self._on_paused)
        worker.resumed.connect(self._on_resumed)
        worker.finished.connect(self._on_finished)

        self.run, self.worker = run, worker
        self._running = True
        self._live_runs.append((run, worker))
        self._pending_model = model
        self._run_data_layer = data_layer
        self._run_names = (snapshot.cluster_names, snapshot.cluster_colors)
        self._run_mask = mask
        if not warm_start:
            self.loss_plot.clear()
        self._progress = progress(total=run.num_steps, desc="GACC training")
        self.status.setText(f"Training on {gacc.resolve_device(model.device)}: starting…")
        worker.start()
        self._update_buttons()
        return worker

    def _autosave(self, snapshot, data_layer):
        """Write the annotations for crash recovery; return the checkpoint callbacks."""
        try:
            self.recovery.save_annotations(
                snapshot, data_layer_name=data_layer.name,
                placement=spatial_placement(data_layer),
            )
            return [self.recovery.model_checkpoint()]
        except OSError as error:
            # Training goes on without crash recovery rather than not at all.
            logger.error("Autosave to %s failed: %s", self.recovery.folder, error)
            show_error(f"Crash recovery is off for this run: autosave failed ({error}).")
            return []

    def _model_for_run(self, warm_start, n_known):
        if warm_start:
            if self.model is None:
                raise InvalidInputError("No trained model to continue; press Start first.")
            fitted_known = getattr(self.model, "n_known_clusters_", n_known)
            if fitted_known != n_known:
                raise InvalidInputError(
                    f"The cluster table has {n_known} clusters but the model was trained with "
                    f"{fitted_known}; press Start to train a new model with the new table."
                )
            return self.model
        parameters = self.model_parameters()
        if parameters["num_clusters"] < n_known:
            raise InvalidInputError(
                f"Clusters (K) is {parameters['num_clusters']} but the cluster table has "
                f"{n_known} annotated clusters; set K to at least {n_known}."
            )
        return gacc.GACC(**parameters)

    def _on_step(self, step_logs):
        run = self.run
        self.loss_plot.append(step_logs["step"], step_logs["losses"])
        if self._progress is not None:
            self._progress.update(1)
        self.status.setText(
            f"Step {run.steps_done}/{run.num_steps} (epoch {step_logs['epoch']}, "
            f"total steps {step_logs['step']}), "
            f"generator loss {step_logs['losses'].get('generator', float('nan')):.4g}, "
            f"time left {_format_seconds(run.seconds_left())}"
        )

    def _on_paused(self):
        self.run.mark_paused()
        self.pause_button.setText("Resume")
        self.status.setText(f"Paused after step {self.run.steps_done}/{self.run.num_steps}.")

    def _on_resumed(self):
        self.run.mark_resumed()
        self.pause_button.setText("Pause")

    def toggle_pause(self):
        """Pause training after the current step, or resume it."""
        if not self.is_training():
            return
        if self.worker.is_paused:
            self.worker.resume()
        else:
            self.worker.pause()

    def stop(self):
        """Stop training after the current step; the model keeps its weights."""
        if not self.is_training():
            return
        self.run.stop_event.set()
        if self.worker.is_paused:
            self.worker.resume()
        self.status.setText("Stopping after the current step…")

    def _on_error(self, error):
        model = getattr(self, "_pending_model", None)
        message = training_error_message(error, device=getattr(model, "device_", None))
        logger.error("%s", message, exc_info=getattr(error, "error", error))
        show_error(message)

    def _on_finished(self):
        run, model = self.run, self._pending_model
        self._running = False
        self._live_runs[:] = [(r, w) for r, w in self._live_runs if r is not run]
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.pause_button.setText("Pause")
        if run.steps_done > 0 and hasattr(model, "networks_"):
            # A new model replaces the previous one only once it has trained.
            self.model = model
        self.status.setText(
            f"Trained {run.steps_done}/{run.num_steps} steps "
            f"({getattr(self.model, 'n_steps_', 0)} in total)."
            if run.steps_done
            else "Training ended before the first step."
        )
        self._update_buttons()
        self.training_finished.emit(run.steps_done)
        if run.steps_done > 0 and self.predict_after.isChecked() and self.model is model:
            self.predict()

    # ------------------------------------------------------------------
    # Prediction and model files

    def predict(self):
        """Predict with the current model in a worker thread and show the result layers.

        Returns
        -------
        worker : napari.qt.threading.FunctionWorker or None
        """
        if self.model is None:
            show_error("No trained model; train or load one first.")
            return None
        data_layer = self.data_combo.current_layer()
        if data_layer is None:
            show_error("Select the 4D data layer to predict on.")
            return None
        spatial_shape = tuple(data_layer.data.shape[-3:])
        try:
            mask = self._mask(spatial_shape)
        except InvalidInputError as error:
            show_error(str(error))
            return None
        try:
            snapshot = snapshot_annotations(self.viewer.layers, spatial_shape)
            known_names, known_colors = snapshot.cluster_names, snapshot.cluster_colors
        except InvalidInputError:
            # A loaded model can predict without annotations; name clusters by number.
            snapshot, known_names, known_colors = None, [], []
        model = self.model
        names, colors = cluster_names_and_colors(known_names, known_colors, model.num_clusters)
        existing = find_probability_layer(self.viewer.layers, data_layer.name)
        threshold = 0.5 if existing is None else float(md.gacc_info(existing).get("threshold", 0.5))
        worker = create_worker(
            predict_and_threshold,
            model,
            np.asarray(data_layer.data),
            mask,
            threshold=threshold,
            names=names,
            voxel_volume_mm3=float(np.prod(data_layer.scale[-3:])),
            annotations=snapshot,
            _start_thread=False,
            _ignore_errors=True,
            _worker_class=FunctionWorker,
        )
        worker.returned.connect(
            lambda output: self._show_prediction(data_layer, output, model, names, colors, mask)
        )
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_predict_finished)
        self._predict_worker = worker
        self.status.setText("Predicting…")
        worker.start()
        self._update_buttons()
        return worker

    def _show_prediction(self, data_layer, output, model, names, colors, mask):
        proba_kxyz, result = output
        layer = show_probabilities(
            self.viewer, data_layer, proba_kxyz, model=model, names=names, colors=colors, mask=mask
        )
        show_thresholded(self.viewer, layer, result)
        self.status.setText(
            f"Predicted {model.num_clusters} clusters; {len(result.groups)} label layers "
            f"at threshold {result.threshold:g}."
        )
        self.prediction_shown.emit()

    def _on_predict_finished(self):
        self._predict_worker = None
        release_device_memory(self.model)
        self._update_buttons()

    def save_model(self, path):
        """Save the current model with :meth:`gacc.GACC.save`."""
        if self.model is None:
            show_error("No trained model to save.")
            return None
        self.model.save(path)
        show_info(f"Saved the GACC model to {path}.")
        self.discard_recovery()
        return path

    def load_model(self, path):
        """Load a model saved with :meth:`gacc.GACC.save` onto the selected device."""
        try:
            self.model = gacc.GACC.load(path, device=self.device.currentText())
        except (OSError, ValueError) as error:
            show_error(f"Cannot load the model: {error}")
            return None
        self._set_num_clusters(self.model.num_clusters)
        self._num_clusters_set_by_user = True
        self.loss_plot.set_history(self.model.history_)
        self.status.setText(f"Loaded a model trained for {self.model.n_steps_} steps.")
        self._update_buttons()
        return self.model

    def _choose_save_path(self):
        path, _filter = QFileDialog.getSaveFileName(
            self, "Save GACC model", "gacc_model.pt", "GACC model (*.pt)"
        )
        if path:
            self.save_model(path)

    def _choose_model_file(self):
        path, _filter = QFileDialog.getOpenFileName(
            self, "Load GACC model", "", "GACC model (*.pt);;All files (*)"
        )
        if path:
            self.load_model(path)


def _close_session(live_runs, recovery, adopted_folders):
    """Stop the widget's runs and remove its recovery folders (a normal close)."""
    _stop_runs(live_runs)
    recovery.discard()
    for folder in adopted_folders:
        discard_folder(folder)


def _stop_runs(live_runs):
    """Ask every listed training run to stop after its current step.

    napari aborts its workers when the viewer closes; this also covers a
    training widget removed from a viewer that stays open.
    """
    for run, worker in list(live_runs):
        run.stop_event.set()
        if worker.is_paused:
            worker.resume()
