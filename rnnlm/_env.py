"""Thread and cache settings that must be in place before numpy, SciPy or Numba load.

Numba's OpenMP workers and OpenBLAS's pool both spin-wait by default and fight for the cores between
kernels; passive waiting lets a kernel and a GEMM hand the cores to each other. A short spin
(GOMP_SPINCOUNT, about 0.1 ms) keeps Numba's workers awake between back-to-back kernels: waking a sleeping
worker costs tens of microseconds per parallel loop, which the class softmax's small kernels would pay
about twenty times a step. ``rnnlm/__init__.py`` imports this module first. Variables the user already set
are kept. These variables are process-wide: a benchmark that compares rnnlm with another library runs that
library in a process of its own (benchmarks/common.py).
"""

import os

from rnnlm._version import __version__

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
os.environ.setdefault("KMP_BLOCKTIME", "0")

# cache=True only hashes a kernel's own file: keying the cache folder on the package version keeps a
# release from reusing another's compiled kernels.
os.environ.setdefault(
    "NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "rnnlm", "numba-" + __version__)
)


def set_threads(n_threads):
    """Use ``n_threads`` for both Numba's parallel loops and every BLAS pool; None keeps the defaults."""
    if n_threads is None:
        return
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(limits=n_threads, user_api="blas")
