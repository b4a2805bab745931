"""Sample data: the GACC demo case (data, partial ground truth, mask, template)."""

import numpy as np

from . import _metadata as md
from ._annotations import annotation_layer_data
from ._layers import cluster_table, cluster_xyzp_to_annotations
from ._nifti_layers import derived_nifti_metadata, img_to_layer_data
from ._orientation import to_display_order


def demo_layer_data(bunch, *, name="demo"):
    """Convert a :func:`gacc.datasets.load_demo` bunch to napari layer data.

    Returns, bottom to top: the anatomical template, the 4D data (volume
    axis first), the brain mask and the annotation layers built from the
    partial ground truth, with overlapping clusters in separate layers.
    """
    template = img_to_layer_data(bunch.template_img, name="MNI template", role=md.ROLE_ANATOMY)
    data = img_to_layer_data(bunch.data_img, name=f"{name} data", role=md.ROLE_DATA)
    mask = img_to_layer_data(bunch.mask_img, name="brain mask", role=md.ROLE_MASK)
    data_kwargs = data[1]
    data_kwargs.update(opacity=0.6, blending="additive")
    mask[1].update(visible=False, opacity=0.3)

    nifti = data_kwargs["metadata"][md.NIFTI_KEY]
    cluster_xyzp = np.array(bunch.cluster_xyzp, dtype=np.float32)
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
    """Load the GACC demo case as napari layers (the sample data command)."""
    # Imported here so that napari's plugin discovery does not load the
    # dataset module.
    from gacc.datasets import load_demo

    return demo_layer_data(load_demo())
