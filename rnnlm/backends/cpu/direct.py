"""Direct features: the n-gram hash keys of every position, the hashed scores they add to the logits, and the
sparse step on the hash table (what each op computes: ``rnnlm.backends.OPS``)."""

import numba
from numba import njit, prange

from rnnlm.backends import DIRECT_BASE, DIRECT_MODULUS, DIRECT_PRIMES


@njit(cache=True, inline="always")
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


@njit(parallel=True, cache=True)
def direct_keys(history, boundary_id, keys):
    """A parallel loop over the rows, each row's keys from its own column of history."""
    R, N = keys.shape
    B = history.shape[1]
    before = history.shape[0] - R // B
    for r in prange(R):
        t, b = r // B, r % B
        for n in range(N):
            keys[r, n] = _context_key(history, before + t, b, n, boundary_id)


@njit(parallel=True, fastmath=True, cache=True)
def direct_scores(W_d, keys, offset, size, row_classes, bounds, out):
    """A parallel loop over the rows (each row its own output), each key's run through the table in contiguous
    pieces."""
    R, N = keys.shape
    for r in prange(R):
        lo = bounds[row_classes[r]]
        width = bounds[row_classes[r] + 1] - lo
        row = out[r]
        for n in range(N):
            if keys[r, n] < 0:
                continue
            position = (keys[r, n] + lo) % size
            j = 0
            while j < width:  # contiguous runs up to the table's end, then from its start
                run = min(width - j, size - position)
                _add_into(row[j:j + run], W_d[offset + position:offset + position + run], row.dtype.type(1))
                j += run
                position = 0


@njit(fastmath=True, cache=True, inline="always")
def _add_into(dst, src, factor):
    """dst += factor · src over two 1-D slices of one length (the form that vectorizes)."""
    for i in range(dst.shape[0]):
        dst[i] += factor * src[i]


def direct_scatter(W_d, keys, offset, size, row_classes, bounds, G, factor):
    """The table split into one slice per thread; each thread walks every (row, order) and adds the part of
    its run that falls in the thread's slice, so that no two threads write one entry."""
    _direct_scatter(W_d, keys, offset, size, row_classes, bounds, G, W_d.dtype.type(factor),
                    min(size, numba.get_num_threads()))


@njit(parallel=True, fastmath=True, cache=True)
def _direct_scatter(W_d, keys, offset, size, row_classes, bounds, G, factor, n_slices):
    R, N = keys.shape
    for s in prange(n_slices):
        first = s * size // n_slices
        span = (s + 1) * size // n_slices - first
        for r in range(R):
            lo = bounds[row_classes[r]]
            width = bounds[row_classes[r] + 1] - lo
            for n in range(N):
                if keys[r, n] < 0:
                    continue
                # column j lands span-relative at (rel + j) mod size: runs inside the slice, gaps of size - span
                rel = (keys[r, n] + lo - first) % size
                j = 0
                while j < width:
                    if rel < span:
                        run = min(span - rel, width - j)
                        start = offset + first + rel
                        _add_into(W_d[start:start + run], G[r, j:j + run], factor)
                        j += run
                        rel = span
                    j += size - rel
                    rel = 0
