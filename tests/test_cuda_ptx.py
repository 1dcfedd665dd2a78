"""The optional PTX compile check (see tests/launch_log.py): every kernel that the CUDA tests launch under
the simulator, compiled for sm_90 by numba's real CUDA compiler with the argument types it was launched
with. Needs NVVM and NVRTC (the dev extra installs them); skipped where they are missing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUDA_TESTS = ["tests/test_kernels.py", "tests/test_direct.py", "tests/test_cuda_backend.py", "tests/test_score.py",
              "tests/test_dynamic.py", "tests/test_hs.py", "tests/test_bf16.py", "-k", "cuda"]
COMPILER_PROBE = """
from numba import cuda, types
def kernel(a):
    a[0] = 1
cuda.compile_ptx(kernel, (types.float32[::1],), cc=(9, 0))
"""


def run(args, **env):
    return subprocess.run([sys.executable, *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True)


@pytest.mark.slow
def test_every_kernel_the_cuda_tests_launch_compiles_to_ptx(tmp_path):
    if run(["-c", COMPILER_PROBE], NUMBA_ENABLE_CUDASIM="0").returncode != 0:
        pytest.skip("no NVVM and NVRTC to compile with (pip install -e '.[dev]' brings them)")
    log = tmp_path / "launches.pkl"
    recorded = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS], NUMBA_ENABLE_CUDASIM="1",
                   RNNLM_LAUNCH_LOG=str(log))
    assert recorded.returncode == 0, recorded.stdout[-3000:]
    compiled = run(["-m", "tests.launch_log", str(log)], NUMBA_ENABLE_CUDASIM="0")
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    signatures = int(re.search(r"(\d+) kernel signatures", compiled.stdout).group(1))
    assert signatures >= 40, compiled.stdout  # the recording saw the backend's kernels
