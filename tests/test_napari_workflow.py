"""Full plugin loop: open NIfTI, annotate, train, predict, threshold, correct, export."""

import nibabel as nib
import numpy as np
import pytest
import torch
from qtpy.QtCore import QThreadPool

from napari_gacc import _metadata as md
from napari_gacc._annotations import annotation_layers
from napari_gacc._io import read_nifti
from napari_gacc._results import find_probability_layer, prediction_label_layers
from napari_gacc._results_widget import ResultsWidget
from napari_gacc._setup_widget import SetupWidget
from napari_gacc._training_widget import TrainingWidget

pytestmark = pytest.mark.gui

SHAPE = (7, 8, 9)
N_VOLUMES = 6
# Voxel axes run anterior, left and superior, so the reader must reorient.
AFFINE = np.array(
    [[0.0, -2.0, 0.0, 10.0], [3.0, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 5.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture(autouse=True)
def _recovery_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_GACC_RECOVERY_DIR", str(tmp_path / "recovery"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny training steps run far slower with several intra-op threads on a
    # busy machine, because the threads spin waiting for each other.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _wait_for_workers(qtbot):
    assert QThreadPool.globalInstance().waitForDone(60000)
    qtbot.wait(50)


@pytest.fixture
def nifti_files(tmp_path):
    rng = np.random.default_rng(0)
    first = np.zeros(SHAPE, dtype=bool)
    first[:4] = True
    second = np.zeros(SHAPE, dtype=bool)
    second[3:, :5] = True
    courses = rng.normal(size=(2, N_VOLUMES))
    data = rng.normal(scale=0.3, size=SHAPE + (N_VOLUMES,))
    data += first[..., None] * courses[0] + second[..., None] * courses[1]
    data_img = nib.Nifti1Image(data.astype(np.float32), AFFINE)
    data_img.header.set_xyzt_units("mm", "sec")
    data_img.header["pixdim"][4] = 2.0
    data_path = tmp_path / "bold.nii.gz"
    nib.save(data_img, str(data_path))
    # Probabilistic atlas of the two overlapping clusters, known everywhere.
    atlas = np.stack([first, second], axis=-1).astype(np.float32) * 0.9
    atlas_path = tmp_path / "atlas_probseg.nii.gz"
    nib.save(nib.Nifti1Image(atlas, AFFINE), str(atlas_path))
    return data_path, atlas_path


def test_full_loop(make_napari_viewer, qtbot, nifti_files, tmp_path):
    data_path, atlas_path = nifti_files
    viewer = make_napari_viewer()
    viewer.open(str(data_path), plugin="napari-gacc")
    setup = SetupWidget(viewer)
    training = TrainingWidget(viewer)
    results = ResultsWidget(viewer)
    for widget in (setup, training, results):
        viewer.window.add_dock_widget(widget)

    # Annotate: import the atlas, then hide half of it by erasing slabs.
    setup.import_atlas(atlas_path)
    _wait_for_workers(qtbot)
    imported = annotation_layers(viewer.layers)
    assert len(imported) == 2
    for layer in imported:
        layer.data[::2] = 0
        layer.refresh()

    # Train with a tiny budget, then predict.
    training.num_clusters.setValue(3)
    training.set_size.setValue(4)
    training.batch_size.setValue(4)
    training.epochs.setValue(2)
    training.num_batches.setValue(3)
    training.device.setCurrentText("cpu")
    training.seed.setValue(1)
    with qtbot.waitSignal(training.prediction_shown, timeout=60000):
        training.start()
    _wait_for_workers(qtbot)

    proba = find_probability_layer(viewer.layers, "bold")
    assert results.probability_layer() is proba
    assert proba.data.shape == (3, 8, 7, 9)
    assert results.table.rowCount() == 3
    statistics = results.statistics()
    assert list(statistics["cluster"]) == [0, 1, 2]
    assert statistics["dice"].iloc[:2].notna().all()
    assert statistics["dice"].iloc[2:].isna().all()
    np.testing.assert_allclose(
        statistics["volume_mm3"], statistics["voxels"] * 2.0 * 3.0 * 2.5
    )

    # Threshold again: the label layers are updated in place, not re-added.
    label_layers = prediction_label_layers(viewer.layers, proba)
    n_layers = len(viewer.layers)
    with qtbot.waitSignal(results.thresholded, timeout=30000):
        results.apply_threshold(0.3)
    _wait_for_workers(qtbot)
    relabelled = prediction_label_layers(viewer.layers, proba)
    assert relabelled[0] is label_layers[0]
    assert len(viewer.layers) - len(relabelled) == n_layers - len(label_layers)
    expected = np.moveaxis(proba.data, 0, -1) >= 0.3
    drawn = np.zeros_like(expected)
    for layer in relabelled:
        for k in md.gacc_info(layer)["clusters"]:
            drawn[..., k] = layer.data == k + 1
    np.testing.assert_array_equal(drawn, expected)

    # Use the prediction as annotation and continue training.
    with qtbot.waitSignal(results.annotations_created, timeout=30000):
        results.use_as_annotation()
    _wait_for_workers(qtbot)
    used = annotation_layers(viewer.layers, SHAPE[1::-1] + SHAPE[2:], used_only=True)
    assert used
    assert all(layer.name.startswith("corrected") for layer in used)
    assert not any(md.gacc_info(layer)["use"] for layer in imported)
    steps_before = training.model.n_steps_
    with qtbot.waitSignal(training.prediction_shown, timeout=60000):
        training.start(warm_start=True)
    _wait_for_workers(qtbot)
    assert training.model.n_steps_ == steps_before + 6

    # Export with the original affine and the data file's header.
    paths = results.export(tmp_path / ".", stem="bold")
    probseg = nib.load(str(tmp_path / "bold_probseg.nii.gz"))
    assert probseg.shape == SHAPE + (3,)
    np.testing.assert_array_equal(probseg.affine, AFFINE)
    [(read_back, _kwargs, _type)] = read_nifti(str(tmp_path / "bold_probseg.nii.gz"))
    np.testing.assert_array_equal(read_back, proba.data)
    dseg_paths = sorted(tmp_path.glob("bold_clusters-*_dseg.nii.gz"))
    assert len(dseg_paths) == len(prediction_label_layers(viewer.layers, proba))
    first_dseg = nib.load(str(dseg_paths[0]))
    np.testing.assert_array_equal(first_dseg.affine, AFFINE)
    assert first_dseg.header.get_intent()[0] == "label"
    assert (tmp_path / "bold_dseg.tsv").read_text().splitlines()[1] == "1\tvolume_0"
    assert (tmp_path / "bold_clusters.tsv").exists()
    assert len(paths) == 3 + len(dseg_paths)

    model_path = results.save_model(tmp_path / "model.pt")
    assert model_path.exists()
