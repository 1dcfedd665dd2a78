"""Thread and cache settings that must be in place before numpy, SciPy or Numba load.

Numba's OpenMP workers and OpenBLAS's pool both spin-wait by default and fight for the cores between
kernels; passive waiting lets a kernel and a GEMM hand the cores to each other. A short spin
(GOMP_SPINCOUNT, about 0.1 ms) keeps Numba's workers awake between back-to-back kernels: waking a sleeping
worker costs tens of microseconds per parallel loop, which the class softmax's small kernels would pay
about twenty times a step. ``rnnlm/__init__.py`` imports this module first. Variables the user already set
are kept. These variables are process-wide: a benchmark that compares rnnlm with another library runs that
library in a process of its own (benchmarks/common.py).
"""

import hashlib
import os

from rnnlm._version import __version__

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
os.environ.setdefault("KMP_BLOCKTIME", "0")



def _kernel_digest():
    """A digest of the CPU kernels' sources and of ``rnnlm.backends`` (whose hash constants they compile in):
    cache=True checks only a kernel's own file, and the kernels inline helpers from their sibling modules, so
    any change to any of them must start a fresh cache."""
    backends = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backends")
    folder = os.path.join(backends, "cpu")
    paths = [os.path.join(backends, "__init__.py")]
    paths += [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith(".py")]
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as source:
            digest.update(os.path.basename(path).encode() + b"\0" + source.read())
    return digest.hexdigest()[:16]


os.environ.setdefault(
    "NUMBA_CACHE_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "rnnlm", f"numba-{__version__}-{_kernel_digest()}"),
)


def set_threads(n_threads):
    """Use ``n_threads`` for both Numba's parallel loops and every BLAS pool; None keeps the defaults."""
    if n_threads is None:
        return
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(limits=n_threads, user_api="blas")
