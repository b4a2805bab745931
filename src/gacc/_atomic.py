"""Crash-safe file writing: write to a temporary file, then rename."""

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path`` and move it to ``path`` on success.

    The temporary file lies in the same folder, so the final ``os.replace`` is
    atomic on POSIX and Windows: a crash or a full disk leaves either the old
    file or the new one, never a half-written file. The suffix of ``path`` is
    kept (``.nii.gz`` included) so that writers that pick a format from the
    file name still work.

    Parameters
    ----------
    path : str or Path
        Final destination.

    Yields
    ------
    tmp_path : Path
        Where the caller writes the content.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Cannot write {str(path)!r}: folder {str(folder)!r} does not exist. "
            "Create it first or choose another output path."
        )
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
    os.close(fd)
    tmp_path = Path(tmp_name)
    # mkstemp creates the file readable by its owner only; give the result the
    # permissions a plain open() would, under the user's umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
