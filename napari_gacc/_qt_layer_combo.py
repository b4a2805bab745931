"""A combo box of viewer layers that follows layer insertion, removal and renaming."""

import contextlib

from qtpy.QtWidgets import QComboBox


def connect_while_alive(widget, emitter, callback):
    """Connect ``callback`` to a napari event emitter until ``widget`` is destroyed.

    napari keeps emitting to a bound method of a deleted Qt widget, which then
    raises RuntimeError; disconnecting on ``destroyed`` prevents that.
    """
    emitter.connect(callback)
    widget.destroyed.connect(lambda *_: _disconnect(emitter, callback))


def _disconnect(emitter, callback):
    # A viewer that closed before the widget has already torn down its
    # emitters, which then raise AttributeError.
    with contextlib.suppress(AttributeError, RuntimeError):
        emitter.disconnect(callback)


class LayerComboBox(QComboBox):
    """Combo box listing the viewer layers that satisfy ``predicate``.

    Parameters
    ----------
    viewer : napari.Viewer
    predicate : callable
        ``predicate(layer) -> bool`` selects the layers listed.
    none_text : str or None, default=None
        When given, a first entry with this text stands for "no layer".
    """

    def __init__(self, viewer, predicate, *, none_text=None, parent=None):
        super().__init__(parent)
        self._viewer = viewer
        self._predicate = predicate
        self._none_text = none_text
        self._layers = []
        layer_events = viewer.layers.events
        for emitter in (layer_events.inserted, layer_events.removed, layer_events.moved):
            connect_while_alive(self, emitter, self._on_layers_changed)
        for layer in viewer.layers:
            connect_while_alive(self, layer.events.name, self.refresh)
        self.refresh()

    def _on_layers_changed(self, event=None):
        if event is not None and getattr(event, "type", None) == "inserted":
            connect_while_alive(self, event.value.events.name, self.refresh)
        self.refresh()

    def refresh(self, event=None):
        """Rebuild the entries, keeping the current layer selected if it still exists."""
        current = self.current_layer()
        self._layers = [layer for layer in self._viewer.layers if self._predicate(layer)]
        self.blockSignals(True)
        self.clear()
        if self._none_text is not None:
            self.addItem(self._none_text)
        for layer in self._layers:
            self.addItem(layer.name)
        self.blockSignals(False)
        if current in self._layers:
            self.set_current_layer(current)
        else:
            # The selection changed (the old layer is gone): tell listeners.
            self.currentIndexChanged.emit(self.currentIndex())

    def current_layer(self):
        """Return the selected layer, or None."""
        index = self.currentIndex() - (1 if self._none_text is not None else 0)
        if 0 <= index < len(self._layers):
            return self._layers[index]
        return None

    def set_current_layer(self, layer):
        """Select ``layer`` (None selects the "no layer" entry when there is one)."""
        offset = 1 if self._none_text is not None else 0
        if layer is None:
            self.setCurrentIndex(0 if offset else -1)
            return
        self.setCurrentIndex(self._layers.index(layer) + offset)
