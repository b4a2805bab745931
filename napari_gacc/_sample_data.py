"""Sample data: the GACC demo case (data, partial ground truth, mask, template)."""

import numpy as np

from . import _metadata as md
from ._annotations import annotation_layer_data
from ._layers import cluster_table, cluster_xyzp_to_annotations
from ._nifti_layers import derived_nifti_metadata, img_to_layer_data
from ._orientation import to_display_order


def demo_layer_data(bunch, *, name="demo"):
    """Convert a :func:`gacc.demo.load_demo_task` bunch to napari layer data.

    Returns, bottom to top: the anatomical template, the 4D data (volume
    axis first), the brain mask and the annotation layers, with overlapping
    clusters in separate layers. The annotations come from
    ``bunch.split.cluster_xyzp``, the clusters known on a few slices with
    NaN elsewhere, so unknown voxels stay unpainted (0). A bunch without
    ``split``, such as :func:`gacc.datasets.load_demo` returns, is painted
    from its complete ``cluster_xyzp``.
    """
    template = img_to_layer_data(bunch.template_img, name="MNI template", role=md.ROLE_ANATOMY)
    data = img_to_layer_data(bunch.data_img, name=f"{name} data", role=md.ROLE_DATA)
    mask = img_to_layer_data(bunch.mask_img, name="brain mask", role=md.ROLE_MASK)
    data_kwargs = data[1]
    data_kwargs.update(opacity=0.6, blending="additive")
    mask[1].update(visible=False, opacity=0.3)

    nifti = data_kwargs["metadata"][md.NIFTI_KEY]
    split = bunch.get("split")
    known_xyzp = bunch.cluster_xyzp if split is None else split.cluster_xyzp
    cluster_xyzp = np.array(known_xyzp, dtype=np.float32)
    # Outside the brain nothing is sampled, so leave it unpainted rather
    # than painting the whole field of view as background.
    cluster_xyzp[~np.asarray(bunch.mask, dtype=bool)] = np.nan
    cluster_xyzp = to_display_order(cluster_xyzp, nifti["orientation"])
    label_arrays, _groups = cluster_xyzp_to_annotations(cluster_xyzp)
    names = [str(cluster_name) for cluster_name in bunch.cluster_names]
    table = cluster_table(names, dtype=label_arrays[0].dtype)
    placement = {
        key: tuple(data_kwargs[key][-3:]) for key in ("scale", "translate", "axis_labels")
    }
    annotations = []
    for index, labels in enumerate(label_arrays):
        metadata = {
            md.NIFTI_KEY: derived_nifti_metadata(nifti),
            md.GACC_KEY: {"role": md.ROLE_ANNOTATION, "use": True},
        }
        annotations.append(
            annotation_layer_data(
                labels,
                table,
                name=f"annotations {index + 1}",
                placement=placement,
                metadata=metadata,
            )
        )
    return [template, data, mask, *annotations]


def load_demo_sample():
    """Load the GACC demo task as napari layers (the sample data command).

    The 28 largest Harvard-Oxford regions are annotated on 6 axial slices
    shared by all regions, as a user would paint them; every other voxel is
    unknown.
    """
    # Imported here so that napari's plugin discovery does not load the
    # dataset module.
    from gacc.demo import load_demo_task

    return demo_layer_data(load_demo_task())
