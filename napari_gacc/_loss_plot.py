"""Live plot of the training losses, embedded in a dock widget with matplotlib."""

import math

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QPushButton, QVBoxLayout, QWidget

# Redraw at most this often while steps arrive; a matplotlib redraw of eight
# curves takes tens of milliseconds on the GUI thread.
REDRAW_INTERVAL_MS = 300

# Curves in a fixed order: the generator's terms first, then the networks
# that are trained against or with it.
LOSS_ORDER = (
    "generator",
    "supervised",
    "adversarial",
    "xc",
    "cx",
    "discriminator",
    "xc_predictor",
    "cx_predictor",
)


class LossPlot(QWidget):
    """One curve per loss term against the training step, redrawn at a limited rate."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.figure = Figure(figsize=(4, 3.2), layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(240)
        self.axes = self.figure.add_subplot(1, 1, 1)
        self.log_scale = QCheckBox("Log scale")
        self.log_scale.setChecked(True)
        self.log_scale.toggled.connect(self._mark_dirty)
        self.clear_button = QPushButton("Clear")
        self.clear_button.clicked.connect(self.clear)
        self._steps = {}
        self._values = {}
        self._background = "#ffffff"
        self._foreground = "#000000"
        self._dirty = False
        self.redraw_count = 0
        self._timer = QTimer(self)
        self._timer.setInterval(REDRAW_INTERVAL_MS)
        self._timer.timeout.connect(self._redraw_if_dirty)
        self._timer.start()

        controls = QHBoxLayout()
        controls.addWidget(self.log_scale)
        controls.addStretch(1)
        controls.addWidget(self.clear_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        layout.addLayout(controls)
        self._dirty = True

    def append(self, step, losses):
        """Add the losses of one training step; the plot updates at the next redraw tick."""
        for name, value in losses.items():
            self._steps.setdefault(name, []).append(int(step))
            self._values.setdefault(name, []).append(float(value))
        self._dirty = True

    def set_history(self, history):
        """Replace the curves with a model's ``history_`` (one value per step, from 1)."""
        self._steps, self._values = {}, {}
        for name, values in history.items():
            self._steps[name] = list(range(1, len(values) + 1))
            self._values[name] = [float(value) for value in values]
        self._dirty = True

    def set_colors(self, *, background, foreground):
        """Draw with these colours (hex strings), for example those of napari's theme."""
        self._background, self._foreground = background, foreground
        self._mark_dirty()

    def clear(self):
        """Remove every curve."""
        self._steps, self._values = {}, {}
        self._dirty = True

    def curves(self):
        """Return ``{loss name: (steps, values)}`` as plotted."""
        return {name: (self._steps[name], self._values[name]) for name in self._values}

    def _mark_dirty(self, *_):
        self._dirty = True
        self._redraw_if_dirty()

    def _redraw_if_dirty(self):
        # A hidden canvas is redrawn when shown; drawing it now would queue a
        # matplotlib draw that fails if the widget is deleted first.
        if self._dirty and self.isVisible():
            self._draw()

    def showEvent(self, event):
        """Draw pending changes as soon as the plot becomes visible."""
        super().showEvent(event)
        self._redraw_if_dirty()

    def _draw(self):
        self._dirty = False
        self.redraw_count += 1
        axes = self.axes
        axes.clear()
        self.figure.legends.clear()
        names = [name for name in LOSS_ORDER if name in self._values]
        names += sorted(set(self._values) - set(LOSS_ORDER))
        use_log = self.log_scale.isChecked()
        for name in names:
            values = self._values[name]
            if use_log:
                # Log axes cannot show zero or negative values; leave gaps there.
                values = [
                    value if value > 0 and math.isfinite(value) else math.nan for value in values
                ]
            axes.plot(self._steps[name], values, label=name, linewidth=1.2)
        axes.set_xlabel("training step")
        axes.set_ylabel("loss")
        if use_log and names:
            axes.set_yscale("log")
        if names:
            # Below the axes, so the legend never hides the curves.
            self.figure.legend(loc="outside lower center", ncol=3, fontsize="x-small",
                               frameon=False)
        else:
            axes.text(0.5, 0.5, "Losses appear here during training", ha="center",
                      va="center", transform=axes.transAxes, color="gray")
        axes.grid(True, alpha=0.3)
        self._paint_colors()
        # Drawn at once: the timer already limits the rate, and matplotlib's
        # deferred draw fails when the widget is deleted before it runs.
        self.canvas.draw()

    def _paint_colors(self):
        axes, foreground = self.axes, self._foreground
        self.figure.set_facecolor(self._background)
        axes.set_facecolor(self._background)
        axes.tick_params(colors=foreground, which="both")
        axes.xaxis.label.set_color(foreground)
        axes.yaxis.label.set_color(foreground)
        for spine in axes.spines.values():
            spine.set_color(foreground)
        for legend in self.figure.legends:
            for text in legend.get_texts():
                text.set_color(foreground)
