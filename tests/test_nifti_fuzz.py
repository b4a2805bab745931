"""Property-based tests: damaged or unusual NIfTI files raise only documented errors.

Each example writes a small NIfTI file, then may change header fields,
overwrite bytes, truncate it or damage its gzip stream. Every loader must
then either return valid arrays or raise InvalidInputError or
FileNotFoundError, never another exception.
"""

import gzip
import struct
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gacc import nifti
from gacc.exceptions import InvalidInputError

DOCUMENTED_ERRORS = (InvalidInputError, FileNotFoundError)

DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "float32", "float64", "complex64"]

# Header fields of NIfTI-1 (byte offset, struct format) that a damaged or
# badly written file may get wrong.
NIFTI1_FIELDS = {
    "sizeof_hdr": (0, "i"),
    "dim": (40, "8h"),
    "datatype": (70, "h"),
    "bitpix": (72, "h"),
    "pixdim": (76, "8f"),
    "vox_offset": (108, "f"),
    "scl_slope": (112, "f"),
    "scl_inter": (116, "f"),
    "qform_code": (252, "h"),
    "sform_code": (254, "h"),
    "quatern": (256, "6f"),
    "srow": (280, "12f"),
    "magic": (344, "4s"),
}

finite_or_odd_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, 1.0, -1.0, 1e30, np.nan, np.inf]),
)
dim_values = st.integers(min_value=-3, max_value=40) | st.sampled_from([0, 1, 32767, -32768])


@st.composite
def field_edits(draw):
    name = draw(st.sampled_from(sorted(NIFTI1_FIELDS)))
    offset, fmt = NIFTI1_FIELDS[name]
    count = int(fmt[:-1]) if fmt[:-1] else 1
    kind = fmt[-1]
    if kind == "s":
        values = [draw(st.binary(min_size=4, max_size=4))]
    elif kind == "f":
        values = draw(st.lists(finite_or_odd_floats, min_size=count, max_size=count))
    elif name == "dim":
        values = draw(st.lists(dim_values, min_size=count, max_size=count))
    elif kind == "h":
        values = [draw(st.integers(min_value=-32768, max_value=32767))]
    else:
        values = [draw(st.integers(min_value=-(2**31), max_value=2**31 - 1))]
    return offset, fmt, values


@st.composite
def nifti_files(draw):
    """Return (file bytes, suffix) of a possibly damaged NIfTI file."""
    ndim = draw(st.integers(min_value=2, max_value=5))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    byte_order = draw(st.sampled_from("<>"))
    image_class = draw(st.sampled_from([nib.Nifti1Image, nib.Nifti2Image]))
    compressed = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))

    values = np.random.default_rng(seed).normal(scale=50, size=shape)
    if draw(st.booleans()):
        values.flat[0] = draw(st.sampled_from([np.nan, np.inf, 0.0]))
    if draw(st.booleans()):
        values[...] = 3.0
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        values = np.nan_to_num(values, nan=0, posinf=info.max, neginf=info.min)
        values = np.clip(values, info.min, info.max)
    header = image_class.header_class(endianness=byte_order)
    image = image_class(values.astype(dtype), np.diag([2.0, 2.5, 3.0, 1.0]), header=header)
    image.header.set_data_dtype(dtype)
    content = bytearray(image.to_bytes())

    damage = draw(st.sampled_from(["none", "field", "bytes", "truncate", "gzip"]))
    if damage == "field" and image_class is nib.Nifti1Image:
        for offset, fmt, field_values in draw(st.lists(field_edits(), min_size=1, max_size=3)):
            struct.pack_into(byte_order + fmt, content, offset, *field_values)
    elif damage == "bytes":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, len(content) - 1))
            content[position] = draw(st.integers(0, 255))
    elif damage == "truncate":
        content = content[: draw(st.integers(0, len(content) - 1))]

    if compressed:
        content = bytearray(gzip.compress(bytes(content), mtime=0))
        if damage == "gzip":
            position = draw(st.integers(0, len(content) - 1))
            cut = draw(st.booleans())
            if cut:
                content = content[:position]
            else:
                content[position] ^= 0xFF
    return bytes(content), ".nii.gz" if compressed else ".nii"


def _check_loaders(path):
    """Run every loader on ``path`` and check what each returns."""
    for load in (
        lambda: nifti.load_data(path),
        lambda: nifti.load_data(path, nan_policy="zero", allow_3d=True, mmap=False),
    ):
        try:
            data_xyzt, image = load()
        except DOCUMENTED_ERRORS:
            continue
        assert data_xyzt.ndim == 4
        assert data_xyzt.dtype == np.float32
        assert np.isfinite(data_xyzt).all()
        assert image.shape == data_xyzt.shape

    try:
        cluster_xyzp, names = nifti.load_clusters(path, threshold=None)
    except DOCUMENTED_ERRORS:
        pass
    else:
        assert cluster_xyzp.ndim == 4
        assert len(names) == cluster_xyzp.shape[3]
        # NaN marks unknown entries, and the known ones are probabilities.
        known = cluster_xyzp[~np.isnan(cluster_xyzp)]
        assert np.all(known >= 0.0)
        assert np.all(known <= 1.0)

    try:
        mask = nifti.load_mask(path)
    except DOCUMENTED_ERRORS:
        pass
    else:
        assert mask.dtype == bool
        assert mask.ndim == 3
        assert mask.any()


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(nifti_files())
def test_loaders_raise_only_documented_errors(file):
    content, suffix = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(content)
        # nibabel and numpy may warn about odd headers, which is allowed.
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check_loaders(path)
