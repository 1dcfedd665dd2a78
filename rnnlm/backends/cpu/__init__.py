"""CPU backend: Numba kernels (``@njit``, ``prange``) and numpy's BLAS for the output layer's GEMMs.

Every op here has a twin of the same name and signature in the ``cuda`` package; what each computes is
written once, in ``rnnlm.backends.OPS``, and the docstrings here say how the CPU computes it.
``rnnlm/step.py`` composes them into a training or evaluation step once for both. Arrays are numpy
arrays, float32 in training (float64 works too, for the gradient checks); token ids are int32. The modules
follow the sections of the ``cuda`` package, in its order: ``arrays``, ``gemm``, ``recurrence``,
``softmax``, ``class_softmax``, ``update``.

The helpers that kernels call are inlined at Numba's level (``inline="always"``): linked as separate
functions, a freshly compiled caller and the same caller loaded from the cache rounded differently, and a
resumed run must compute exactly what the interrupted one would have. Numba's cache checks only the file
of the decorated function, so a kernel whose inlined helper lives in another module could be loaded stale
after that module changed: ``rnnlm._env`` keys the cache folder on a digest of every module here.
"""

from rnnlm.backends.cpu.arrays import asarray, copy_into, synchronize, to_numpy, zeros
from rnnlm.backends.cpu.class_softmax import class_log_probs, class_xent, class_xent_grad
from rnnlm.backends.cpu.gemm import matmul_nn, matmul_nt, matmul_tn
from rnnlm.backends.cpu.recurrence import backward, bias_grad, embed, forward, input_grads, masked_add_rows, multiply
from rnnlm.backends.cpu.softmax import softmax_log_probs, softmax_xent, softmax_xent_grad
from rnnlm.backends.cpu.update import (
    adam_update,
    grad_norm,
    masked_adam_update,
    masked_sgd_update,
    sgd_update,
    sgd_updates,
)

name = "cpu"

__all__ = [
    "adam_update", "asarray", "backward", "bias_grad", "class_log_probs", "class_xent", "class_xent_grad",
    "copy_into", "embed", "forward", "grad_norm", "input_grads", "masked_adam_update", "masked_add_rows",
    "masked_sgd_update", "matmul_nn", "matmul_nt", "matmul_tn", "multiply", "name", "sgd_update", "sgd_updates",
    "softmax_log_probs", "softmax_xent", "softmax_xent_grad", "synchronize", "to_numpy", "zeros",
]
