"""Keys that the plugin stores in ``layer.metadata``.

Widgets never hold references to each other. They find the layers they work
on through two entries of ``layer.metadata``:

``metadata["gacc"]``
    A dict with at least ``"role"`` (one of the ``ROLE_*`` constants below).
    Annotation layers add ``"use"`` (bool, whether training reads the layer)
    and ``"complete"`` (bool, whether a painted voxel is fully annotated).
    Prediction Labels layers add ``"group"``, ``"clusters"`` (the 0-based
    cluster indices they draw) and ``"data_layer"``. Probability layers add
    ``"model"`` (the fitted :class:`gacc.GACC`), ``"names"``, ``"colors"``,
    ``"mask"``, ``"threshold"`` and ``"data_layer"``.
``metadata["nifti"]``
    The geometry of the NIfTI file the layer came from or was derived from
    (see :mod:`napari_gacc._nifti_layers`), so that saving restores the
    original affine, header and voxel order.
"""

GACC_KEY = "gacc"
NIFTI_KEY = "nifti"

ROLE_DATA = "data"
ROLE_ANNOTATION = "annotation"
ROLE_MASK = "mask"
ROLE_ANATOMY = "anatomy"
ROLE_PROBABILITIES = "probabilities"
ROLE_PREDICTION = "prediction"
ROLE_LABELS = "labels"

# Roles shown as napari Labels layers; the others are Image layers.
LABEL_ROLES = (ROLE_ANNOTATION, ROLE_MASK, ROLE_PREDICTION, ROLE_LABELS)


def layer_role(layer):
    """Return the plugin role of ``layer``, or None for layers the plugin did not tag."""
    info = layer.metadata.get(GACC_KEY)
    if isinstance(info, dict):
        return info.get("role")
    return None


def gacc_info(layer):
    """Return the plugin's metadata dict of ``layer``, creating it if missing."""
    info = layer.metadata.get(GACC_KEY)
    if not isinstance(info, dict):
        info = {}
        layer.metadata[GACC_KEY] = info
    return info
