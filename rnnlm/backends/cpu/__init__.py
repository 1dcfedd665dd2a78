"""CPU backend: Numba kernels (``@njit``, ``prange``) and numpy's BLAS for the output layer's GEMMs.

Every op here has a twin of the same name and signature in the ``cuda`` package; what each computes is
written once, in ``rnnlm.backends.OPS``, and the docstrings here say how the CPU computes it.
``rnnlm/step.py`` composes them into a training or evaluation step once for both. Arrays are numpy
arrays, float32 in training (float64 works too, for the gradient checks); token ids are int32. The modules
follow the sections of the ``cuda`` package, in its order: ``arrays``, ``gemm``, ``recurrence``,
``softmax``, ``class_softmax``, ``hsoftmax``, ``direct``, ``update``.

The helpers that kernels call are inlined at Numba's level (``inline="always"``): linked as separate
functions, a freshly compiled caller and the same caller loaded from the cache rounded differently, and a
resumed run must compute exactly what the interrupted one would have. Numba's cache checks only the file
of the decorated function, so a kernel whose inlined helper lives in another module could be loaded stale
after that module changed: ``rnnlm._env`` keys the cache folder on a digest of every module here.
"""

from rnnlm.backends import export_ops
from rnnlm.backends.cpu import arrays, class_softmax, direct, gemm, hsoftmax, recurrence, softmax, update

name = "cpu"

__all__ = export_ops(globals(), (arrays, gemm, recurrence, softmax, class_softmax, hsoftmax, direct, update))
