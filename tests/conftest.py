"""Test setup. The CUDA tests run under Numba's CUDA simulator unless NUMBA_ENABLE_CUDASIM=0 is set
(on a machine with a GPU); this must happen before numba is first imported."""

import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import sys  # noqa: E402

if os.environ["NUMBA_ENABLE_CUDASIM"] == "1":
    # the simulator's barriers wait on Python's thread switch (5 ms by default)
    sys.setswitchinterval(2e-4)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["cpu", "cuda"])
def ops(request):
    """Each backend's kernel module; the CUDA one at toy sizes under the simulator in CI."""
    from rnnlm.backends import get_backend

    return get_backend(request.param)
