"""End-to-end tests of the gacc command line on small NIfTI files."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import gacc
from engine_fixtures import (
    make_volume,
    network_weights,
    same_weights,
    torch_single_thread,  # noqa: F401
)
from gacc.cli import main

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SPATIAL_SHAPE = (9, 10, 8)
# Left-posterior-superior axes rotated about z: not RAS and not aligned with
# the scanner, so an output that drops or rebuilds the affine shows.
_ANGLE = np.deg2rad(15.0)
AFFINE = np.array([
    [-2.0 * np.cos(_ANGLE), -2.5 * np.sin(_ANGLE), 0.0, 30.0],
    [-2.0 * np.sin(_ANGLE), 2.5 * np.cos(_ANGLE), 0.0, -40.0],
    [0.0, 0.0, 3.0, 5.0],
    [0.0, 0.0, 0.0, 1.0],
])
TR = 2.5

# Options of a tiny network and budget: a fit takes well under a second.
TINY_OPTIONS = [
    "--num-clusters", "4", "--epochs", "2", "--num-batches", "3", "--batch-size", "4",
    "--hidden-size", "8", "--column-hidden-size", "8", "--num-heads", "2", "--num-layers", "1",
    "--prediction-repeats", "2", "--device", "cpu", "-q",
]


def _save(path, array, affine=AFFINE):
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header["pixdim"][4] = TR
    image.header["descrip"] = b"gacc cli test"
    nib.save(image, path)
    return path


@pytest.fixture(scope="module")
def volume():
    return make_volume(SPATIAL_SHAPE)


@pytest.fixture
def files(tmp_path, volume):
    """Write data (9, 10, 8, 12), clusters (9, 10, 8, 3) and a mask as NIfTI files."""
    data, clusters = volume
    mask = np.zeros(SPATIAL_SHAPE, dtype=np.uint8)
    mask[1:8, 1:9, 1:7] = 1
    return {
        "data": _save(tmp_path / "bold.nii.gz", data),
        "clusters": _save(tmp_path / "clusters.nii.gz", clusters),
        "mask": _save(tmp_path / "mask.nii.gz", mask),
        "folder": tmp_path,
    }


def _fit_args(files, *extra):
    return ["fit", str(files["data"]), str(files["clusters"]), "-o",
            str(files["folder"] / "model.pt"), *TINY_OPTIONS, *extra]


def _error_line(capsys, command):
    """Return the one line on standard error, checking that it is a command error."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"gacc {command}: error: ")
    return lines[0]


def _assert_same_grid(path, reference_path):
    result = nib.load(path)
    reference = nib.load(reference_path)
    np.testing.assert_array_equal(result.affine, reference.affine)
    assert result.shape[:3] == reference.shape[:3]
    assert result.header.get_xyzt_units() == ("mm", "sec")
    assert result.header["pixdim"][4] == pytest.approx(TR)
    assert result.header["descrip"].item() == b"gacc cli test"
    assert int(result.header["qform_code"]) == int(reference.header["qform_code"])
    assert int(result.header["sform_code"]) == int(reference.header["sform_code"])


# ----------------------------------------------------------------------
# Help


@pytest.mark.parametrize("command", [None, "demo", "fit", "predict", "evaluate"])
def test_help(capsys, command):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gacc" if command is None else f"usage: gacc {command}")
    if command == "fit":
        for option in ("--checkpoint", "--checkpoint-every", "--resume", "--hidden-size"):
            assert option in out


# ----------------------------------------------------------------------
# fit, predict and evaluate


def test_fit_predict_evaluate(files, capsys):
    folder = files["folder"]
    assert main(_fit_args(files, "--mask", str(files["mask"]))) == 0
    out = capsys.readouterr().out
    assert "Trained 6 steps on 3 known clusters (K=4)" in out
    model = gacc.GACC.load(folder / "model.pt", device="cpu")
    assert model.n_steps_ == 6
    assert model.hidden_size == 8
    history = (folder / "model_history.csv").read_text().splitlines()
    assert len(history) == 7

    proba_path = folder / "proba.nii.gz"
    clusters_path = folder / "predicted.nii.gz"
    assert main(["predict", str(folder / "model.pt"), str(files["data"]), "-o", str(proba_path),
                 "--clusters-output", str(clusters_path), "--mask", str(files["mask"]),
                 "--device", "cpu", "--prediction-batch-size", "7", "-q"]) == 0
    assert "written to" in capsys.readouterr().out
    proba = nib.load(proba_path)
    assert proba.shape == SPATIAL_SHAPE + (4,)
    assert proba.get_data_dtype() == np.float32
    values = proba.get_fdata()
    assert values.min() >= 0.0
    assert values.max() <= 1.0
    mask = nib.load(files["mask"]).get_fdata() > 0
    assert np.all(values[~mask] == 0.0)
    _assert_same_grid(proba_path, files["data"])
    clusters = nib.load(clusters_path)
    assert clusters.get_data_dtype() == np.uint8
    _assert_same_grid(clusters_path, files["data"])

    scores_path = folder / "scores.json"
    assert main(["evaluate", str(proba_path), str(files["clusters"]), "--mask",
                 str(files["mask"]), "-o", str(scores_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "Mean Dice" in out
    assert "over 3 reference clusters" in out
    scores = json.loads(scores_path.read_text())
    assert len(scores["dice"]) == 3
    assert scores["names"] == ["volume_0", "volume_1", "volume_2"]


def test_fit_label_image_and_resample(files, capsys, volume):
    # A 3D label atlas on a grid twice as fine: read as one cluster per label
    # and resampled onto the data grid with --resample.
    _, clusters = volume
    labels = np.argmax(clusters, axis=-1).astype(np.int16) + 1
    fine = np.repeat(np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1), 2, axis=2)
    fine_affine = AFFINE.copy()
    fine_affine[:3, :3] /= 2
    fine_affine[:3, 3] -= AFFINE[:3, :3].sum(axis=1) / 4
    labels_path = _save(files["folder"] / "labels.nii.gz", fine, fine_affine)
    argv = ["fit", str(files["data"]), str(labels_path), "-o",
            str(files["folder"] / "model.pt"), *TINY_OPTIONS]

    assert main(argv) == 1
    line = _error_line(capsys, "fit")
    assert "not on the grid of the data" in line
    assert "resample" in line

    assert main([*argv, "--resample"]) == 0
    assert "on 3 known clusters" in capsys.readouterr().out


def test_warm_start_continues(files, capsys):
    assert main(_fit_args(files)) == 0
    assert main(_fit_args(files, "--warm-start")) == 0
    assert "Trained 12 steps" in capsys.readouterr().out


# ----------------------------------------------------------------------
# Bad input: status 1 and one line on standard error


def _write_text(path):
    path.write_text("not an image\n")
    return path


BAD_FIT_INPUTS = [
    ("missing-data", lambda f: {"data": f["folder"] / "missing.nii.gz"}, [], "does not exist"),
    ("not-nifti", lambda f: {"data": _write_text(f["folder"] / "bold.txt")}, [],
     "not a NIfTI file"),
    ("damaged-nifti", lambda f: {"data": _write_text(f["folder"] / "junk.nii")}, [],
     "damaged or is not a NIfTI image"),
    ("data-3d", lambda f: {"data": _save(f["folder"] / "3d.nii", np.ones(SPATIAL_SHAPE))}, [],
     r"3D image of shape \(9, 10, 8\).*must be a 4D"),
    ("clusters-other-grid",
     lambda f: {"clusters": _save(f["folder"] / "c.nii", np.ones((9, 10, 7, 3), np.float32))},
     [], r"shape \(9, 10, 7\).*resample"),
    ("more-clusters-than-k",
     lambda f: {"clusters": _save(f["folder"] / "c.nii", np.ones(SPATIAL_SHAPE + (5,),
                                                                   np.float32))},
     [], r"P=5 clusters, more than num_clusters=4"),
    ("constant-data",
     lambda f: {"data": _save(f["folder"] / "c.nii", np.full(SPATIAL_SHAPE + (4,), 3.0))}, [],
     r"constant \(every value is 3\)"),
    ("all-empty-clusters",
     lambda f: {"clusters": _save(f["folder"] / "c.nii", np.zeros(SPATIAL_SHAPE + (2,),
                                                                    np.float32))},
     [], "Every cluster in .* is empty"),
    ("bad-option-value", lambda f: {}, ["--num-heads", "3"],
     "hidden_size=8 must be a multiple of num_heads=3"),
]


@pytest.mark.parametrize(
    "replace, extra, message",
    [pytest.param(replace, extra, message, id=name)
     for name, replace, extra, message in BAD_FIT_INPUTS],
)
def test_bad_fit_input(files, capsys, replace, extra, message):
    files = {**files, **replace(files)}
    assert main(_fit_args(files, *extra)) == 1
    line = _error_line(capsys, "fit")
    assert re.search(message, line), line
    assert not (files["folder"] / "model.pt").exists()


def test_nan_inside_mask(files, capsys, volume):
    data, _ = volume
    data = data.copy()
    data[0] = np.nan  # outside the mask: never read
    data[4, 5, 3, 2] = np.nan  # inside the mask
    files = {**files, "data": _save(files["folder"] / "nan.nii.gz", data)}
    assert main(_fit_args(files, "--mask", str(files["mask"]))) == 1
    line = _error_line(capsys, "fit")
    assert "1 NaN or infinite values in 1 voxels inside the mask" in line

    data[4, 5, 3, 2] = 1.0
    _save(files["data"], data)
    assert main(_fit_args(files, "--mask", str(files["mask"]))) == 0


def test_empty_cluster_warns(files, capsys, volume):
    _, clusters = volume
    clusters = clusters.copy()
    clusters[..., 1] = 0.0
    files = {**files, "clusters": _save(files["folder"] / "c.nii.gz", clusters)}
    argv = [argument for argument in _fit_args(files) if argument != "-q"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Cluster 'volume_1'" in err
    assert "contains no voxel" in err


def test_predict_other_grid(files, capsys, volume):
    assert main(_fit_args(files)) == 0
    data, _ = volume
    for other, shape in ((data[:, :, :7], "(9, 10, 7, 12)"), (data[..., :5], "(9, 10, 8, 5)")):
        other_path = _save(files["folder"] / "other.nii.gz", np.ascontiguousarray(other))
        assert main(["predict", str(files["folder"] / "model.pt"), str(other_path), "-o",
                     str(files["folder"] / "proba.nii.gz"), "--device", "cpu", "-q"]) == 1
        line = _error_line(capsys, "predict")
        assert f"has shape {shape} but the model was fitted on (9, 10, 8, 12)" in line
    assert not (files["folder"] / "proba.nii.gz").exists()


def test_predict_damaged_model(files, capsys):
    model_path = files["folder"] / "model.pt"
    model_path.write_bytes(b"PK\x03\x04 damaged")
    assert main(["predict", str(model_path), str(files["data"]), "-o",
                 str(files["folder"] / "proba.nii.gz"), "-q"]) == 1
    assert "not a readable GACC model file" in _error_line(capsys, "predict")


def test_evaluate_bad_prediction(files, capsys):
    assert main(["evaluate", str(files["data"]), str(files["clusters"]), "-q"]) == 1
    assert "membership probabilities in [0, 1]" in _error_line(capsys, "evaluate")


def test_full_disk_on_output(files, capsys, monkeypatch):
    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gacc.checkpoint.os, "fsync", full_disk)
    assert main(_fit_args(files)) == 1
    line = _error_line(capsys, "fit")
    assert "model.pt': No space left on device. Free disk space" in line
    assert sorted(os.listdir(files["folder"])) == ["bold.nii.gz", "clusters.nii.gz",
                                                   "mask.nii.gz"]


def test_missing_output_folder(files, capsys):
    argv = _fit_args(files)
    argv[argv.index("-o") + 1] = str(files["folder"] / "missing" / "model.pt")
    assert main(argv) == 1
    assert "folder" in _error_line(capsys, "fit")


def test_checkpoint_every_needs_checkpoint(files, capsys):
    with pytest.raises(SystemExit) as exited:
        main(_fit_args(files, "--checkpoint-every", "2"))
    assert exited.value.code == 2
    assert "--checkpoint-every needs --checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------
# Checkpoints, Ctrl+C and resuming


def _interrupt_at_call(monkeypatch, call, error):
    original = gacc.training.TrainingStep.__call__
    calls = []

    def step(self, batch, step_number, generator):
        calls.append(step_number)
        if len(calls) == call:
            raise error
        return original(self, batch, step_number, generator)

    monkeypatch.setattr(gacc.training.TrainingStep, "__call__", step)


def test_interrupt_saves_checkpoint(files, capsys, monkeypatch):
    checkpoint = files["folder"] / "checkpoint.pt"
    _interrupt_at_call(monkeypatch, 5, KeyboardInterrupt())
    assert main(_fit_args(files, "--checkpoint", str(checkpoint), "--checkpoint-every",
                          "3")) == 130
    err = capsys.readouterr().err
    assert f"interrupted after 4 steps; the model of the last completed step is saved in " \
           f"{checkpoint}" in err
    assert f"--resume {checkpoint}" in err
    assert gacc.GACC.load(checkpoint, device="cpu").n_steps_ == 4
    assert not (files["folder"] / "model.pt").exists()


def test_interrupt_without_checkpoint_saves_output(files, capsys, monkeypatch):
    _interrupt_at_call(monkeypatch, 3, KeyboardInterrupt())
    assert main(_fit_args(files)) == 130
    output = files["folder"] / "model.pt"
    assert f"saved in {output}" in capsys.readouterr().err
    assert gacc.GACC.load(output, device="cpu").n_steps_ == 2


def test_interrupt_before_first_step(files, capsys, monkeypatch):
    _interrupt_at_call(monkeypatch, 1, KeyboardInterrupt())
    assert main(_fit_args(files)) == 130
    assert "nothing was saved" in capsys.readouterr().err
    assert not (files["folder"] / "model.pt").exists()


def test_resume_equals_uninterrupted(files, capsys, monkeypatch, tmp_path):
    folder = files["folder"]
    assert main(_fit_args(files)) == 0
    whole = gacc.GACC.load(folder / "model.pt", device="cpu")
    (folder / "model.pt").unlink()

    checkpoint = folder / "checkpoint.pt"
    _interrupt_at_call(monkeypatch, 4, KeyboardInterrupt())
    assert main(_fit_args(files, "--checkpoint", str(checkpoint), "--checkpoint-every",
                          "2")) == 130
    monkeypatch.undo()
    capsys.readouterr()

    assert main(_fit_args(files, "--resume", str(checkpoint))) == 0
    assert f"Resuming from {checkpoint} at step 3; 3 steps left." in capsys.readouterr().out
    resumed = gacc.GACC.load(folder / "model.pt", device="cpu")
    assert resumed.n_steps_ == 6
    assert resumed.history_ == whole.history_
    assert same_weights(network_weights(resumed.networks_), network_weights(whole.networks_))
    history = (folder / "model_history.csv").read_text().splitlines()
    assert len(history) == 7


def test_out_of_memory_one_line(files, capsys, monkeypatch):
    def out_of_memory(self, batch, step_number, generator):
        raise gacc.training.torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(gacc.training.TrainingStep, "__call__", out_of_memory)
    assert main(_fit_args(files)) == 1
    line = _error_line(capsys, "fit")
    assert "(batch_size=4 was halved down to 1): CUDA out of memory" in line


def test_training_error_names_checkpoint(files, capsys, monkeypatch):
    checkpoint = files["folder"] / "checkpoint.pt"
    _interrupt_at_call(monkeypatch, 3, gacc.NonFiniteLossError("The generator loss became nan."))
    assert main(_fit_args(files, "--checkpoint", str(checkpoint))) == 1
    line = _error_line(capsys, "fit")
    assert f"The model of step 2 was saved to {checkpoint}." in line


# ----------------------------------------------------------------------
# The installed entry point in a real process


def _gacc_command():
    executable = shutil.which("gacc")
    return [executable] if executable else [sys.executable, "-m", "gacc.cli"]


def test_entry_point_subprocess(files):
    # A real process logs through the handler that main installs, so any
    # stray warning before the error would show as a second line.
    assert main(_fit_args(files)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*_gacc_command(), "predict", str(files["folder"] / "model.pt"), str(files["mask"]),
         "-o", str(files["folder"] / "proba.nii.gz")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gacc predict: error: ")
    assert "mask.nii.gz' is a 3D image of shape (9, 10, 8)" in lines[0]
    assert result.stdout == ""
    assert not (files["folder"] / "proba.nii.gz").exists()


# ----------------------------------------------------------------------
# The demo job on the real demo data


def test_demo_end_to_end(demo_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["demo", "--epochs", "1", "--num-batches", "2", "--data-dir", str(demo_data_dir),
            "-o", str(out), "-q", "--device", "cpu", "--hidden-size", "8",
            "--column-hidden-size", "8", "--num-heads", "2", "--num-layers", "1",
            "--batch-size", "4", "--prediction-repeats", "1"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "Held-out Dice (mean over 28 clusters):" in stdout

    expected = ["annotations_xyzp.nii.gz", "clusters.png", "clusters_xyzk.nii.gz",
                "history.csv", "model.pt", "proba_xyzk.nii.gz", "scores.json"]
    assert sorted(os.listdir(out)) == expected
    assert (out / "clusters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    demo = gacc.datasets.load_demo(data_dir=demo_data_dir)
    for name in ("proba_xyzk.nii.gz", "clusters_xyzk.nii.gz", "annotations_xyzp.nii.gz"):
        image = nib.load(out / name)
        np.testing.assert_array_equal(image.affine, demo.data_img.affine)
        assert image.shape[:3] == demo.data_img.shape[:3]
    assert nib.load(out / "proba_xyzk.nii.gz").shape[3] == 50
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["per_cluster"]) == 28
    assert gacc.GACC.load(out / "model.pt", device="cpu").n_steps_ == 2


@pytest.mark.parametrize(
    "output, message",
    [
        ("bold.nii.gz", "names a NIfTI file"),
        ("", "is a folder"),
        ("missing/model.pt", "does not exist"),
        ("bold.nii.gz/model.pt", "is a file, not a folder"),
    ],
    ids=["nifti-name", "folder", "missing-folder", "file-as-folder"],
)
def test_fit_bad_output_before_training(files, capsys, output, message, monkeypatch):
    from gacc import estimator

    def fail_fit(*args, **kwargs):
        raise AssertionError("training started before the output path was checked")

    monkeypatch.setattr(estimator.GACC, "fit", fail_fit)
    data_before = files["data"].read_bytes()
    args = ["fit", str(files["data"]), str(files["clusters"]), "-o",
            str(files["folder"] / output), *TINY_OPTIONS]

    assert main(args) == 1
    assert message in _error_line(capsys, "fit")
    assert files["data"].read_bytes() == data_before


def test_predict_refuses_to_overwrite_input(files, capsys):
    model_path = files["folder"] / "model.pt"
    assert main(_fit_args(files, "-q")) == 0
    capsys.readouterr()
    data_before = files["data"].read_bytes()

    status = main(["predict", str(model_path), str(files["data"]), "-o", str(files["data"])])

    assert status == 1
    assert "would overwrite it" in _error_line(capsys, "predict")
    assert files["data"].read_bytes() == data_before


def test_predict_threshold_out_of_range(files, capsys):
    status = main(["predict", str(files["folder"] / "model.pt"), str(files["data"]),
                   "--threshold", "1.5"])

    assert status == 1
    assert "--threshold 1.5" in _error_line(capsys, "predict")
