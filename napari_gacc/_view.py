"""Anatomical slice planes for volumes in RAS+ voxel order (no Qt)."""

from gacc.exceptions import InvalidInputError

# For each plane: the spatial axis under the slider, then the axes drawn as
# rows and columns (0 = x, 1 = y, 2 = z, counted from the last three axes).
_PLANES = {
    "axial": (2, 1, 0),
    "coronal": (1, 2, 0),
    "sagittal": (0, 2, 1),
}
SLICE_PLANES = tuple(_PLANES)


def set_slice_plane(viewer, plane):
    """Show axial, coronal or sagittal slices of layers in RAS+ voxel order.

    The last three viewer axes are taken as x (left to right), y (posterior
    to anterior) and z (inferior to superior), as the plugin's reader
    arranges them. Rows are flipped so that anterior or superior is at the
    top, and the subject's right is drawn on the right (neurological view).

    Parameters
    ----------
    viewer : napari.Viewer
    plane : {"axial", "coronal", "sagittal"}
    """
    if plane not in _PLANES:
        raise InvalidInputError(f"plane={plane!r} is invalid; use one of {SLICE_PLANES}.")
    ndim = viewer.dims.ndim
    if ndim < 3:
        return
    first_spatial = ndim - 3
    leading = list(range(first_spatial))
    viewer.dims.ndisplay = 2
    viewer.dims.order = tuple(leading + [first_spatial + axis for axis in _PLANES[plane]])
    viewer.camera.orientation2d = ("up", "right")
    viewer.reset_view()
