"""Sums in a fixed order, shared by the sections: block trees, column sums, norms, and lists of positions by key.

No sum here uses floating-point atomics: each runs in an order fixed by the launch, so results do not
change from run to run.
"""

import functools
import math

import numpy as np
from numba import cuda, float64, from_dtype

from rnnlm.backends.cuda import device
from rnnlm.backends.cuda.arrays import fill
from rnnlm.backends.cuda.device import REDUCE_THREADS

FAN_IN = 16  # partial results a thread merges per level of a block's reduction tree


@cuda.jit(device=True)
def block_sum(value, partials):
    """partials[blockIdx.x] = Σ of ``value`` (float64) over the block's threads (x and y), in a fixed order:
    a tree of fan-in FAN_IN in shared memory."""
    sums = cuda.shared.array(REDUCE_THREADS, float64)
    tid = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    sums[tid] = value
    cuda.syncthreads()
    n_partial = cuda.blockDim.x * cuda.blockDim.y
    while n_partial > 1:
        n_next = (n_partial + FAN_IN - 1) // FAN_IN
        if tid < n_next:
            k = tid + n_next
            while k < n_partial:
                value += sums[k]
                k += n_next
            sums[tid] = value
        cuda.syncthreads()
        n_partial = n_next
    if tid == 0:
        partials[cuda.blockIdx.x] = sums[0]


@cuda.jit
def sum_squares_kernel(flat, partials):
    """partials[block] = Σ flat[k]² over the block's grid-stride share of a 1-D array, in float64."""
    total = 0.0
    k = cuda.grid(1)
    while k < flat.shape[0]:
        v = float64(flat[k])
        total += v * v
        k += cuda.gridsize(1)
    block_sum(total, partials)


@cuda.jit
def slotted_sum_squares_kernel(rows, slot, partials):
    """partials[block] = Σ rows[slot[r], i]² over the rows r with a slot in the block's grid-stride share of a
    slotted gradient (x-threads along a row), in float64."""
    total = 0.0
    R, m = rows.shape
    r = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    while r < R:
        s = slot[r]
        if s >= 0:
            i = cuda.threadIdx.x
            while i < m:
                v = float64(rows[s, i])
                total += v * v
                i += cuda.blockDim.x
        r += cuda.gridDim.x * cuda.blockDim.y
    block_sum(total, partials)


@cuda.jit
def _norm_kernel(partials, clip, out):
    """out[0] = √(Σ partials), the norm of a gradient from the partial sums of its squares; when out has
    a second element, out[1] = min(1, clip / norm), the clipping factor (clip = 0: 1).

    One block: each thread adds a strided share of the partials, then the block's tree (fixed order).
    """
    total = 0.0
    k = cuda.threadIdx.x
    while k < partials.shape[0]:
        total += partials[k]
        k += cuda.blockDim.x
    block_sum(total, out)  # out[0] = Σ partials
    if cuda.threadIdx.x == 0:
        norm = math.sqrt(out[0])
        out[0] = norm
        if out.shape[0] > 1:
            out[1] = clip / norm if 0 < clip < norm else 1.0


def norm(partials, clip, out):
    """``_norm_kernel`` on float64 partials (n,) into out (1,) or (2,)."""
    device.launch(_norm_kernel, 1, device.threads(partials.size, device.REDUCE_THREADS), partials, float(clip), out)


@functools.cache
def _column_sums_kernel(dtype):
    """out[j] = Σ_r X[r, j] for X (N, V): blocks of (≤ 32 columns, ≤ 32 row phases), each column's
    phases summed in order in shared memory."""
    dt = from_dtype(np.dtype(dtype))
    zero = np.dtype(dtype).type(0)

    @cuda.jit
    def column_sums(X, out):
        partial = cuda.shared.array((32, 32), dt)
        N, V = X.shape
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        j = cuda.blockIdx.x * cuda.blockDim.x + tx
        total = zero
        if j < V:
            r = ty
            while r < N:
                total += X[r, j]
                r += cuda.blockDim.y
        partial[ty, tx] = total
        cuda.syncthreads()
        if ty == 0 and j < V:
            for y in range(1, cuda.blockDim.y):
                total += partial[y, tx]
            out[j] = total

    return column_sums


def column_sums(X, out):
    """out (V,) = Σ_rows X (N, V)."""
    N, V = X.shape
    tx = device.threads(V, 32)
    ty = device.threads(device.blocks(N, 16), 32)
    device.launch(_column_sums_kernel(X.dtype), device.blocks(V, tx), (tx, ty), X, out)


@cuda.jit
def _link_kernel(keys, next_pos, first):
    """Link the positions holding each key into a list: next_pos[p] = the next position q > p with
    keys[q] = keys[p] (N when none), first[key] = the first position holding key.

    keys (N,) int32; next_pos (N,) int32; first (n_keys,) int32, N on entry: absent keys keep it.
    """
    p = cuda.grid(1)
    N = keys.shape[0]
    if p >= N:
        return
    key = keys[p]
    q = p + 1
    while q < N and keys[q] != key:
        q += 1
    next_pos[p] = q
    q = p - 1
    while q >= 0 and keys[q] != key:
        q -= 1
    if q < 0:
        first[key] = p


def link(keys, n_keys, absent=True):
    """(next_pos, first) of ``_link_kernel`` for keys (N,) int32 below n_keys, in workspaces: a scatter-add
    walks each key's list in position order, one thread per key (and column), deterministically.

    With ``absent`` False, first[key] is left undefined for the keys not in ``keys`` (one launch fewer):
    for callers that only look up keys they hold.
    """
    N = keys.shape[0]
    next_pos = device.workspace("next position", (N,), np.int32)
    first = device.workspace("first position", (n_keys,), np.int32)
    if absent:
        fill(first, N)
    n_threads = device.threads(N, device.ELEMENTWISE_THREADS)
    device.launch(_link_kernel, device.blocks(N, n_threads), n_threads, keys, next_pos, first)
    return next_pos, first
