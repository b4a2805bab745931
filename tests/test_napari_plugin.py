"""Plugin registration: manifest, reader and writers through napari, sample data."""

import nibabel as nib
import npe2
import numpy as np
import pytest
from sklearn.utils import Bunch

from napari_gacc import _metadata as md
from napari_gacc._layers import annotations_to_cluster_xyzp
from napari_gacc._sample_data import demo_layer_data

SHAPE = (7, 8, 9)


def test_manifest_is_valid_and_importable():
    manifest = npe2.PluginManifest.from_distribution("napari-gacc")
    assert manifest.name == "napari-gacc"
    for command in manifest.contributions.commands:
        # Resolving imports the module and looks the object up.
        assert callable(npe2.manifest.utils.import_python_name(command.python_name))
    widget_commands = {widget.command for widget in manifest.contributions.widgets}
    assert widget_commands == {
        "napari-gacc.setup_widget",
        "napari-gacc.training_widget",
        "napari-gacc.results_widget",
    }
    menus = manifest.contributions.menus
    assert "napari/layers/segment" in menus
    assert "napari/layers/annotate" in menus


def test_manifest_menu_ids_are_contributable():
    from napari._app_model.constants._menus import is_menu_contributable

    manifest = npe2.PluginManifest.from_distribution("napari-gacc")
    for menu_id in manifest.contributions.menus:
        assert is_menu_contributable(menu_id), menu_id


def _small_demo_bunch():
    rng = np.random.default_rng(0)
    affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    data = rng.random(SHAPE + (4,)).astype(np.float32)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:6, 1:7, 1:8] = True
    clusters = np.zeros(SHAPE + (3,), dtype=np.float32)
    clusters[1:4, ..., 0] = 1
    clusters[3:6, ..., 1] = 1  # overlaps cluster 0
    clusters[5, ..., 2] = 1
    template = nib.Nifti1Image(
        rng.random((14, 16, 18)).astype(np.float32), np.diag([-1.0, 1.0, 1.5, 1.0])
    )
    return Bunch(
        data_img=nib.Nifti1Image(data, affine),
        cluster_img=nib.Nifti1Image(clusters, affine),
        mask_img=nib.Nifti1Image(mask.astype(np.uint8), affine),
        template_img=template,
        cluster_xyzp=clusters,
        mask=mask,
        cluster_names=["first", "second", "third"],
    )


def test_demo_layer_data_builds_annotations():
    bunch = _small_demo_bunch()
    layer_data = demo_layer_data(bunch)

    names = [kwargs["name"] for _data, kwargs, _type in layer_data]
    assert names[:3] == ["MNI template", "demo data", "brain mask"]
    data, data_kwargs, data_type = layer_data[1]
    assert data_type == "image"
    assert data.shape == (4,) + SHAPE
    annotations = [
        item
        for item in layer_data
        if item[1]["metadata"][md.GACC_KEY]["role"] == md.ROLE_ANNOTATION
    ]
    assert len(annotations) == 2
    assert list(annotations[0][1]["features"]["name"])[1:4] == ["first", "second", "third"]

    cluster_xyzp = annotations_to_cluster_xyzp([item[0] for item in annotations], 3)
    # The x axis is flipped for display (negative voxel size in the affine).
    expected = bunch.cluster_xyzp[::-1].copy()
    expected[~bunch.mask[::-1]] = np.nan
    np.testing.assert_array_equal(np.isnan(cluster_xyzp), np.isnan(expected))
    np.testing.assert_array_equal(
        np.nan_to_num(cluster_xyzp, nan=-1), np.nan_to_num(expected, nan=-1)
    )


def test_demo_layer_data_paints_known_slices_only():
    from gacc.splits import hide_slices

    bunch = _small_demo_bunch()
    bunch.split = hide_slices(
        bunch.cluster_xyzp, axis=2, n_known_slices=2, mask=bunch.mask, random_state=0
    )
    layer_data = demo_layer_data(bunch)

    annotations = [
        item[0]
        for item in layer_data
        if item[1]["metadata"][md.GACC_KEY]["role"] == md.ROLE_ANNOTATION
    ]
    painted = np.zeros(SHAPE, dtype=bool)
    for labels in annotations:
        painted |= labels > 0
    known_slices = sorted({z for slices in bunch.split.known_slices for z in slices})
    assert sorted(np.flatnonzero(painted.any(axis=(0, 1)))) == known_slices
    cluster_xyzp = annotations_to_cluster_xyzp(annotations, 3)[::-1]
    inside = cluster_xyzp == 1
    np.testing.assert_array_equal(inside, (bunch.split.cluster_xyzp == 1) & bunch.mask[..., None])


@pytest.mark.gui
@pytest.mark.slow
def test_sample_data_opens_in_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-gacc", "demo")
    data_layer = viewer.layers["demo data"]
    assert data_layer.data.ndim == 4
    assert data_layer.data.shape[1:] == (53, 63, 51)
    annotation_names = [
        layer.name for layer in viewer.layers if md.layer_role(layer) == md.ROLE_ANNOTATION
    ]
    assert annotation_names
    # 28 regions plus the background and "unknown" rows of the cluster table.
    assert len(viewer.layers[annotation_names[0]].features) == 28 + 2
    painted = np.zeros(data_layer.data.shape[1:], dtype=bool)
    for name in annotation_names:
        painted |= viewer.layers[name].data > 0
    painted_slices = np.flatnonzero(painted.any(axis=(0, 1)))
    # Each region is known on 6 axial slices, so many slices stay unpainted.
    assert 6 <= len(painted_slices) < 51
    assert painted.mean() < 0.5


@pytest.mark.gui
def test_viewer_open_and_save_round_trip(make_napari_viewer, tmp_path):
    affine = np.array(
        [[0.0, -2.0, 0.0, 10.0], [3.0, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0.0, 0.0, 0.0, 1.0]]
    )
    rng = np.random.default_rng(1)
    data = rng.random(SHAPE + (5,)).astype(np.float32)
    source = tmp_path / "bold.nii.gz"
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(source))
    viewer = make_napari_viewer()

    [layer] = viewer.open(str(source), plugin="napari-gacc")
    assert layer.data.shape == (5, 8, 7, 9)
    target = tmp_path / "saved.nii.gz"
    layer.save(str(target), plugin="napari-gacc")

    saved = nib.load(str(target))
    np.testing.assert_array_equal(saved.affine, affine)
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), data)
    assert saved.header.get_xyzt_units() == ("mm", "sec")


@pytest.mark.gui
def test_widgets_listed_in_layers_menu(make_napari_viewer):
    from napari._app_model import get_app_model

    make_napari_viewer()
    app = get_app_model()
    segment_items = app.menus.get_menu("napari/layers/segment")
    submenus = [getattr(item, "submenu", None) for item in segment_items]
    assert "napari-gacc.clustering" in submenus
    commands = {item.command.id for item in app.menus.get_menu("napari-gacc.clustering")}
    assert commands == {
        "napari-gacc.setup_widget",
        "napari-gacc.training_widget",
        "napari-gacc.results_widget",
    }
