"""Stored arrays (rnnlm.stored): members of an .npz copied into another byte for byte, and read into CPU and
CUDA (simulator) arrays a piece at a time, in C and Fortran order."""

import io

import numpy as np
import pytest

from rnnlm import untrusted
from rnnlm.backends import get_backend
from rnnlm.errors import RnnlmError
from rnnlm.model import write_npz
from rnnlm.stored import StoredArray, put, stored_as


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((7, 3)).astype(np.float32)
    return {"rows": rows, "columns": rng.standard_normal((7, 3)).astype(np.float32).T, "bias": rows[:, 0].copy()}


@pytest.fixture
def npz(tmp_path, arrays, monkeypatch):
    monkeypatch.setattr(untrusted, "CHUNK", 8)  # two float32 a piece: every member in several pieces
    path = tmp_path / "a.npz"
    with open(path, "wb") as f:
        write_npz(f, arrays)
    return path


def test_a_copied_member_has_the_bytes_of_the_array_it_holds(npz, arrays):
    copied, written = io.BytesIO(), io.BytesIO()
    write_npz(copied, stored_as(npz, "", arrays))
    write_npz(written, arrays)
    assert copied.getvalue() == written.getvalue()
    assert StoredArray.like(npz, "columns", arrays["columns"]).fortran_order


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_put_reads_a_member_into_an_array_laid_out_like_it(npz, arrays, device):
    ops = get_backend(device)
    for name, array in arrays.items():
        dst = ops.zeros(array.shape[::-1], np.float32).T if name == "columns" else ops.zeros(array.shape, np.float32)
        put(ops, StoredArray.like(npz, name, array), dst)
        np.testing.assert_array_equal(ops.to_numpy(dst), array, err_msg=name)
    dst = ops.zeros((3, 7), np.float32)  # C order where the member is in Fortran's: read whole, then copied
    put(ops, StoredArray.like(npz, "columns", arrays["columns"]), dst)
    np.testing.assert_array_equal(ops.to_numpy(dst), arrays["columns"])


def test_a_stored_member_that_is_not_finite_or_not_its_shape_is_an_error(tmp_path, arrays):
    path = tmp_path / "bad.npz"
    with open(path, "wb") as f:
        write_npz(f, {"rows": np.where(arrays["rows"] > 1, np.nan, arrays["rows"]).astype(np.float32)})
    with pytest.raises(RnnlmError, match="NaN or infinite"):
        StoredArray.like(path, "rows", arrays["rows"]).to_numpy()
    with pytest.raises(RnnlmError, match="shape"):
        StoredArray(path, "rows", (3, 7), False).to_numpy()
