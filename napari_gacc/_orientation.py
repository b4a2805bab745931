"""Voxel-axis reorientation between NIfTI files and napari layers.

napari places a layer in the world with a per-axis ``scale`` and
``translate`` only (plus an optional affine that its 3D view does not honour
for every layer type), so it cannot show an image whose voxel axes are
permuted, flipped or oblique relative to the scanner axes. The reader
therefore reorders and flips the voxel axes to the closest RAS+ order
(nibabel's ``io_orientation``), keeps the voxel sizes as ``scale`` and the
world position of the first voxel as ``translate``, and drops any remaining
rotation. The orientation applied is stored so that the writer can return
the array to the voxel order of the file it came from.

All functions here take arrays whose first three axes are spatial.
"""

import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

# Off-diagonal terms of the reoriented affine smaller than this fraction of
# the voxel size are rounding noise of the file, not a rotation worth a warning.
OBLIQUE_TOLERANCE = 1e-3

_RAS_ORIENTATION = nib.orientations.axcodes2ornt(("R", "A", "S"))


@dataclass(frozen=True)
class DisplayGeometry:
    """Placement of a NIfTI grid in napari world coordinates (mm, RAS+).

    Attributes
    ----------
    orientation : ndarray of shape (3, 2)
        nibabel orientation that maps the file's voxel axes to RAS+ order
        (column 0: output axis, column 1: +1 or -1 for a flip).
    scale : tuple of 3 float
        Voxel size along each reoriented axis, in mm.
    translate : tuple of 3 float
        World position of the first reoriented voxel, in mm.
    obliquity : float
        Largest rotation left after reorientation, as the maximum
        off-diagonal term of the reoriented affine divided by the voxel size.
        Zero for a grid aligned with the scanner axes.
    """

    orientation: np.ndarray
    scale: tuple
    translate: tuple
    obliquity: float

    @property
    def is_oblique(self):
        """Whether the display drops a rotation larger than the tolerance."""
        return self.obliquity > OBLIQUE_TOLERANCE


def display_geometry(affine, spatial_shape):
    """Compute the RAS+ reorientation and napari placement of a voxel grid.

    Parameters
    ----------
    affine : ndarray of shape (4, 4)
        Voxel-to-world affine of the file.
    spatial_shape : tuple of 3 int
        Shape of the three spatial axes in the file's voxel order.

    Returns
    -------
    geometry : DisplayGeometry
    """
    affine = np.asarray(affine, dtype=float)
    orientation = nib.orientations.io_orientation(affine)
    reoriented = affine @ nib.orientations.inv_ornt_aff(orientation, spatial_shape)
    linear = reoriented[:3, :3]
    voxel_sizes = np.sqrt(np.sum(linear**2, axis=0))
    off_diagonal = linear - np.diag(np.diag(linear))
    obliquity = float(np.max(np.abs(off_diagonal) / voxel_sizes[np.newaxis, :]))
    return DisplayGeometry(
        orientation=orientation,
        scale=tuple(float(size) for size in voxel_sizes),
        translate=tuple(float(offset) for offset in reoriented[:3, 3]),
        obliquity=obliquity,
    )


def to_display_order(array, orientation):
    """Reorder and flip the first three axes of ``array`` into RAS+ order.

    Parameters
    ----------
    array : ndarray of shape (X, Y, Z, ...)
        Array in the file's voxel order.
    orientation : ndarray of shape (3, 2)
        ``DisplayGeometry.orientation`` of the file.

    Returns
    -------
    reoriented : ndarray
        A view of ``array`` where possible.
    """
    return nib.orientations.apply_orientation(array, orientation)


def to_file_order(array, orientation):
    """Undo :func:`to_display_order`: return ``array`` to the file's voxel order.

    Parameters
    ----------
    array : ndarray of shape (X', Y', Z', ...)
        Array in RAS+ voxel order.
    orientation : ndarray of shape (3, 2)
        ``DisplayGeometry.orientation`` of the file.

    Returns
    -------
    restored : ndarray
    """
    inverse = nib.orientations.ornt_transform(_RAS_ORIENTATION, np.asarray(orientation))
    return nib.orientations.apply_orientation(array, inverse)


def spatial_shape_in_display_order(spatial_shape, orientation):
    """Return the shape of a grid after :func:`to_display_order`."""
    shape = [0, 0, 0]
    for file_axis, (display_axis, _flip) in enumerate(np.asarray(orientation)):
        shape[int(display_axis)] = int(spatial_shape[file_axis])
    return tuple(shape)
