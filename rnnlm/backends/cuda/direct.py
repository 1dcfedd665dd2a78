"""Direct features: the n-gram hash keys (a thread per row), the scores they add to the logits (a block per
row, a thread per column) and the sparse step on the hash table (a thread per slice of the table, so that no
two threads write one entry and each entry's terms add in a fixed order, without atomics)."""

from numba import cuda

from rnnlm.backends import DIRECT_BASE, DIRECT_MODULUS, DIRECT_PRIMES
from rnnlm.backends.cuda import device

SCATTER_SLICES = 8192  # the most slices (threads) the table is split into for a sparse step


@device.inlined
def _context_key(history, row, b, n, boundary_id):
    """The key of the n tokens history[row - n + 1 .. row, b] (most recent last), or -1 when cut."""
    key = DIRECT_BASE
    for i in range(1, n + 1):
        token = history[row - i + 1, b]
        if token < 0 or (i < n and token == boundary_id):
            return -1
        multiplier = DIRECT_PRIMES[(n * DIRECT_PRIMES[i] + i) % DIRECT_PRIMES.shape[0]]
        key = (key + multiplier * (token + 1)) % DIRECT_MODULUS
    return key


@cuda.jit
def _keys_kernel(history, boundary_id, keys):
    r = cuda.grid(1)
    R, N = keys.shape
    if r >= R:
        return
    B = history.shape[1]
    t = r // B
    for n in range(N):
        keys[r, n] = _context_key(history, history.shape[0] - R // B + t, r - t * B, n, boundary_id)


def direct_keys(history, boundary_id, keys):
    """A thread per row."""
    n_threads = device.threads(keys.shape[0], device.ELEMENTWISE_THREADS)
    device.launch(_keys_kernel, device.blocks(keys.shape[0], n_threads), n_threads, history, boundary_id, keys)


@cuda.jit
def _scores_kernel(W_d, keys, offset, size, row_classes, bounds, out):
    r = cuda.blockIdx.x
    lo = bounds[row_classes[r]]
    width = bounds[row_classes[r] + 1] - lo
    j = cuda.threadIdx.x
    while j < width:
        acc = out[r, j]
        for n in range(keys.shape[1]):
            if keys[r, n] >= 0:
                acc += W_d[offset + (keys[r, n] + lo + j) % size]
        out[r, j] = acc
        j += cuda.blockDim.x


def direct_scores(W_d, keys, offset, size, row_classes, bounds, out):
    """A block per row, its threads over the row's columns, each column's orders added in order."""
    device.launch(_scores_kernel, keys.shape[0], device.threads(out.shape[1], device.REDUCE_THREADS), W_d, keys,
                  offset, size, row_classes, bounds, out)


@cuda.jit
def _scatter_kernel(W_d, keys, offset, size, row_classes, bounds, G, factor, n_slices):
    s = cuda.grid(1)
    if s >= n_slices:
        return
    first = s * size // n_slices
    span = (s + 1) * size // n_slices - first
    for r in range(keys.shape[0]):
        lo = bounds[row_classes[r]]
        width = bounds[row_classes[r] + 1] - lo
        for n in range(keys.shape[1]):
            if keys[r, n] < 0:
                continue
            # column j lands span-relative at (rel + j) mod size: runs inside the slice, gaps of size - span
            rel = (keys[r, n] + lo - first) % size
            j = 0
            while j < width:
                if rel < span:
                    run = min(span - rel, width - j)
                    for k in range(run):
                        W_d[offset + first + rel + k] += factor * G[r, j + k]
                    j += run
                    rel = span
                j += size - rel
                rel = 0


def direct_scatter(W_d, keys, offset, size, row_classes, bounds, G, factor):
    """A thread per slice of the table, walking every (row, order) for the part of its run in the slice."""
    n_slices = min(size, SCATTER_SLICES)
    n_threads = device.threads(n_slices, device.ELEMENTWISE_THREADS)
    device.launch(_scatter_kernel, device.blocks(n_slices, n_threads), n_threads, W_d, keys, offset, size,
                  row_classes, bounds, G, W_d.dtype.type(factor), n_slices)
