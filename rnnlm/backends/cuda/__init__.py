"""CUDA backend: ``numba.cuda`` kernels on device arrays, the twin of ``rnnlm.backends.cpu`` op for op.

The ops and what each computes are listed once, in ``rnnlm.backends.OPS``; the docstrings here say how this
side computes them. The modules follow the sections of the cpu package, in its order:

- ``arrays``: host-device copies, zeros, flat views and grid-stride fills and copies;
- ``gemm``: the three GEMM layouts through one tiled shared-memory kernel;
- ``recurrence``: the window's forward and backward passes in one launch each, the first layer's input term
  (``embed``) and the gradients that end in the recurrence;
- ``softmax``: one block per row; the loss as a ``DeviceSum``;
- ``class_softmax``: the word half of the class-based softmax, by row and then by word;
- ``hsoftmax``: the hierarchical softmax, by row and then by tree node;
- ``direct``: the direct features' hash keys, scores and sparse table step;
- ``update``: the gradient norm and clipping factor on the device, SGD and Adam;

and two that serve them: ``reductions`` (sums in a fixed order: block trees, column sums, linked lists of
positions by key) and ``device``, the one module coupled to numba-cuda (launching, device arrays,
workspaces, launch geometry; the numba-cuda versions it is written against).

Arrays are numba device arrays, C-contiguous except W_x and its gradient, which ``rnnlm.step`` keeps
column-major as transposed views; float32 in training (float64 works too, for the gradient checks); token
ids are int32. Everything runs on the default stream, so kernels follow each other in launch order; only
the scalars a caller asks for (a loss, a norm) come back to the host, and a training step is queued whole
before the host waits for the device. Every sum runs in a fixed order, without floating-point atomics:
results do not change from run to run. Kernels whose shared or local arrays need a compile-time element
type are built by small factories cached per dtype (and per tile constant).
"""

from rnnlm.backends import export_ops
from rnnlm.backends.cuda import arrays, class_softmax, direct, gemm, hsoftmax, recurrence, softmax, update

name = "cuda"

__all__ = export_ops(globals(), (arrays, gemm, recurrence, softmax, class_softmax, hsoftmax, direct, update))
