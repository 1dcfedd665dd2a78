"""Softmax: one block per row of logits, an online max and sum in one pass, the gradient in a second.

The row losses are written to a float64 workspace and come back as a ``DeviceSum``, which the caller reads
once the whole step is queued: a training step never waits for the device in its middle.
"""

import functools
import math

import numpy as np
from numba import cuda, from_dtype

from rnnlm.backends.cuda import device
from rnnlm.backends.cuda.device import REDUCE_THREADS
from rnnlm.backends.cuda.reductions import FAN_IN, column_sums


@functools.cache
def row_functions(dtype):
    """(row_stats, write_grad): a block's pass over one row of logits, and the gradient it leads to."""
    dt = from_dtype(np.dtype(dtype))
    lowest = np.finfo(dtype).min  # a finite "-inf": merging two empty partial sums stays 0, not NaN
    zero, one = np.dtype(dtype).type(0), np.dtype(dtype).type(1)

    @cuda.jit(device=True)
    def row_stats(Z, r, b, n):
        """(max, Σ exp(z - max)) over z_j = Z[r, j] + b[j], j < n, for every thread of the block.

        Each thread keeps a running max and a sum rescaled whenever the max grows (one pass over the
        row), then a tree in shared memory merges the threads' pairs.
        """
        tops = cuda.shared.array(REDUCE_THREADS, dt)
        totals = cuda.shared.array(REDUCE_THREADS, dt)
        tid = cuda.threadIdx.x
        top, total = lowest, zero
        j = tid
        while j < n:
            z = Z[r, j] + b[j]
            if z > top:
                total = total * math.exp(top - z) + one
                top = z
            else:
                total += math.exp(z - top)
            j += cuda.blockDim.x
        tops[tid] = top
        totals[tid] = total
        cuda.syncthreads()
        n_partial = cuda.blockDim.x
        while n_partial > 1:  # a tree of fan-in FAN_IN: few barriers (each one costs the simulator)
            n_next = (n_partial + FAN_IN - 1) // FAN_IN
            if tid < n_next:
                k = tid + n_next
                while k < n_partial:
                    top_b, total_b = tops[k], totals[k]
                    top_ab = max(top, top_b)
                    total = total * math.exp(top - top_ab) + total_b * math.exp(top_b - top_ab)
                    top = top_ab
                    k += n_next
                tops[tid] = top
                totals[tid] = total
            cuda.syncthreads()
            n_partial = n_next
        return tops[0], totals[0]

    @cuda.jit(device=True)
    def write_grad(Z, r, b, n, y, top, total, scale):
        """Z[r, j] = scale · (softmax_j - [j = y]) for j < n, from ``row_stats``' (top, total)."""
        inv = scale / total
        j = cuda.threadIdx.x
        while j < n:
            dL_dz = math.exp(Z[r, j] + b[j] - top) * inv
            if j == y:
                dL_dz -= scale
            Z[r, j] = dL_dz
            j += cuda.blockDim.x

    return row_stats, write_grad


@functools.cache
def _softmax_kernels(dtype):
    """(xent_grad, xent) kernels of the full softmax for one float dtype: one block per row of Z (N, V)."""
    row_stats, write_grad = row_functions(dtype)

    @cuda.jit
    def xent_grad(Z, b_o, targets, scale, losses):
        """losses[r] = -log p(targets[r]), Z[r] = scale · (p - onehot(targets[r])); p = softmax(Z[r] + b_o).

        Z (N, V); b_o (V,); targets (N,) int32; scale of Z's dtype; losses (N,) float64.
        """
        r = cuda.blockIdx.x
        V = Z.shape[1]
        y = targets[r]
        z_y = Z[r, y] + b_o[y]  # read before any thread overwrites the row
        top, total = row_stats(Z, r, b_o, V)
        if cuda.threadIdx.x == 0:
            losses[r] = top + math.log(total) - z_y
        write_grad(Z, r, b_o, V, y, top, total, scale)

    @cuda.jit
    def xent(Z, b_o, targets, sign, out):
        """out[r] = sign · -log softmax(Z[r] + b_o)[targets[r]]: the loss (sign 1) or the log-probability
        (sign -1); Z is left as it is; out (N,) float64."""
        r = cuda.blockIdx.x
        y = targets[r]
        z_y = Z[r, y] + b_o[y]
        top, total = row_stats(Z, r, b_o, Z.shape[1])
        if cuda.threadIdx.x == 0:
            out[r] = sign * (top + math.log(total) - z_y)

    return xent_grad, xent


def row_threads(n):
    """Threads of a block that reduces a row of n values."""
    return device.spread(n, device.REDUCE_THREADS)[1]


class DeviceSum:
    """Σ of the values of float64 device arrays (a window's row losses), added on the host in float64 when
    ``float()`` asks for it: a training step is queued whole before the host waits for the device.

    The arrays are workspaces that the next window's kernels overwrite: read the sum before that.
    """

    def __init__(self, *arrays):
        self.arrays = arrays

    def __add__(self, other):
        return DeviceSum(*self.arrays, *other.arrays)

    def __float__(self):
        return float(sum(array.copy_to_host().sum() for array in self.arrays))


def softmax_xent_grad(Z, b_o, targets, scale, db_o):
    """One block per row (loss and gradient), then db_o by column sums; the loss is a DeviceSum."""
    N, V = Z.shape
    xent_grad, _ = _softmax_kernels(Z.dtype)
    losses = device.workspace("softmax row losses", (N,), np.float64)
    device.launch(xent_grad, N, row_threads(V), Z, b_o, targets, Z.dtype.type(scale), losses)
    column_sums(Z, db_o)
    return DeviceSum(losses)


def softmax_xent(Z, b_o, targets):
    """One block per row; Z is left unchanged; the loss is a DeviceSum."""
    losses = device.workspace("softmax row losses", (Z.shape[0],), np.float64)
    _row_xent(Z, b_o, targets, 1.0, losses)
    return DeviceSum(losses)


def softmax_log_probs(Z, b_o, targets, out):
    """One block per row, the kernel of ``softmax_xent`` writing the rows' log-probabilities; Z is left
    unchanged."""
    _row_xent(Z, b_o, targets, -1.0, out)


def _row_xent(Z, b_o, targets, sign, out):
    N, V = Z.shape
    _, xent = _softmax_kernels(Z.dtype)
    device.launch(xent, N, row_threads(V), Z, b_o, targets, np.float64(sign), out)
