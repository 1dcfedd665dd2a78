"""Recurrence: the window's forward and backward passes over bands of streams, the first layer's input
term (``embed``) and the gradients that end in the recurrence."""

import functools
import itertools
import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit, prange
from threadpoolctl import ThreadpoolController

# from this many streams of at least this state size, forward and backward step through BLAS products
GEMM_MIN_STREAMS, GEMM_MIN_STATE = 256, 128

# tanh as a rational function, the coefficients of Eigen's float tanh (relative error < 4e-7)
_TANH_CLAMP = np.float32(7.90531110763549805)
_TANH_ALPHA = tuple(np.float32(c) for c in (
    4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
    -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16))
_TANH_BETA = tuple(np.float32(c) for c in (
    4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06))


@njit(parallel=True, cache=True)
def embed(W_x, inputs, U):
    """A parallel loop over the window's positions."""
    T, B, m = U.shape
    for k in prange(T * B):
        t, b = k // B, k % B
        x = inputs[t, b]
        for i in range(m):
            U[t, b, i] = W_x[i, x]


def forward(W_s, b_s, U, S):
    """The B streams are independent: each thread runs a band of whole streams. Below GEMM_MIN_STREAMS
    streams (or GEMM_MIN_STATE units), four at a time through ``_matvecs``, float32 tanh by a vectorizable
    rational approximation; from there, as ``forward_packed`` (a BLAS product per step and band)."""
    T, B, m = U.shape
    if not _through_blas(B, m):
        _recurrence(W_s, b_s, U, S, U, U, False, numba.get_num_threads())
        return
    forward_packed(W_s, b_s, U.reshape(T * B, m), None, S[0], S[1:].reshape(T * B, m), np.arange(0, T * B + 1, B))


def backward(W_s, S, dL_ds_out, dL_da):
    """Parallel over bands of streams, as ``forward``, multiplying by W_sᵀ through ``_matvecs`` or, from
    GEMM_MIN_STREAMS streams of GEMM_MIN_STATE units, a BLAS product per step and band (``_backward_band``)."""
    B = S.shape[1]
    if not _through_blas(B, S.shape[2]):
        _recurrence(W_s, W_s[0], dL_da, S, dL_ds_out, dL_da, True, numba.get_num_threads())
        return
    in_threads(lambda lo, hi: _backward_band(W_s, S, dL_ds_out, dL_da, lo, hi), np.arange(1, B + 1))


def _through_blas(B, m):
    """Whether B streams of m units step through BLAS products (``forward``, ``backward``)."""
    return B >= GEMM_MIN_STREAMS and m >= GEMM_MIN_STATE


def _backward_band(W_s, S, dL_ds_out, dL_da, lo, hi):
    """Streams lo ≤ b < hi back through the window: dL/ds_t = dL_ds_out[t] + W_sᵀ dL/da_{t+1}, as rows
    (dL/da_{t+1} W_s, into a band-sized buffer, so that dL_da may be dL_ds_out)."""
    T = dL_da.shape[0]
    later = np.zeros_like(dL_da[0, lo:hi])
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            np.matmul(dL_da[t + 1, lo:hi], W_s, out=later)
        _backpropagate_rows(later, dL_ds_out[t, lo:hi], S[t + 1, lo:hi], dL_da[t, lo:hi])


@njit(fastmath=True, cache=True, nogil=True)
def _backpropagate_rows(later, dL_ds_out, S_next, dL_da):
    """dL_da = (1 - S_next²) ⊙ (later + dL_ds_out), row by row (dL_da may be dL_ds_out)."""
    one = dL_da.dtype.type(1)
    for r in range(dL_da.shape[0]):
        g, d, s, out = later[r], dL_ds_out[r], S_next[r], dL_da[r]
        for i in range(out.shape[0]):
            out[i] = (g[i] + d[i]) * (one - s[i] * s[i])


@njit(fastmath=True, cache=True, inline="always")
def _matvecs(M, M_T, X, add, out, b, end):
    """out[k] = M X[k] + add[k] for the four streams k = b .. b + 3, those ≥ end standing in for end - 1.

    M (m, m) and its transpose M_T (m, m), both C-contiguous; X, add, out (B, m), a row per stream. Each
    pass over a row pair of M feeds eight accumulators (two rows times four streams), so every element
    loaded serves two or four multiply-adds: a matrix-vector product per stream would load two elements
    per multiply-add and reread M from L2 for every stream. A stand-in stream writes its row again with
    the same values; an odd m repeats its last row the same way. Each row pair's ``add`` values are read
    before any of its ``out`` values is written, so ``out`` may be ``add`` (each value then read once, before
    its one new value is written, stand-ins included).

    The dot products run over the first m - m % 16 columns, whole float32 vectors of AVX-512, and the
    last m % 16 columns are added as columns of M_T (a loop over the rows, vectorized along them), which
    leaves none to the compiler's scalar remainder loop.
    """
    m = M.shape[0]
    body = m - m % 16
    k0, k1, k2, k3 = b, min(b + 1, end - 1), min(b + 2, end - 1), min(b + 3, end - 1)
    x0, x1, x2, x3 = X[k0], X[k1], X[k2], X[k3]
    for i in range(0, m, 2):
        i2 = min(i + 1, m - 1)
        row, row2 = M[i], M[i2]
        a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = M.dtype.type(0)
        for j in range(body):
            w, v = row[j], row2[j]
            y0, y1, y2, y3 = x0[j], x1[j], x2[j], x3[j]
            a0 += w * y0
            a1 += w * y1
            a2 += w * y2
            a3 += w * y3
            c0 += v * y0
            c1 += v * y1
            c2 += v * y2
            c3 += v * y3
        d0, d1, d2, d3 = add[k0, i], add[k1, i], add[k2, i], add[k3, i]
        e0, e1, e2, e3 = add[k0, i2], add[k1, i2], add[k2, i2], add[k3, i2]
        out[k3, i2] = c3 + e3
        out[k2, i2] = c2 + e2
        out[k1, i2] = c1 + e1
        out[k0, i2] = c0 + e0
        out[k3, i] = a3 + d3
        out[k2, i] = a2 + d2
        out[k1, i] = a1 + d1
        out[k0, i] = a0 + d0
    for k in range(b, min(b + 4, end)):
        x, out_k = X[k], out[k]
        for j in range(body, m):
            column, y = M_T[j], x[j]
            for i in range(m):
                out_k[i] += column[i] * y


@njit(parallel=True, fastmath=True, cache=True)
def _recurrence(W_s, b_s, U, S, dL_ds_out, dL_da, backward, n_threads):
    """The forward pass (U, b_s into S) or, with ``backward``, the backward one (S, dL_ds_out into dL_da),
    over min(B, n_threads) bands of whole streams, four streams at a time; the other direction's arrays
    are not read."""
    B = S.shape[1]
    W_sT = np.ascontiguousarray(W_s.T)
    n_bands = min(B, n_threads)
    for band in prange(n_bands):
        end = (band + 1) * B // n_bands
        for b in range(band * B // n_bands, end, 4):
            if backward:
                _backward_streams(W_s, W_sT, S, dL_ds_out, dL_da, b, end)
            else:
                _forward_streams(W_s, W_sT, b_s, U, S, b, end)


@njit(fastmath=True, cache=True, inline="always")
def _forward_streams(W_s, W_sT, b_s, U, S, b, end):
    """Streams b .. min(b + 4, end) - 1 through the window: s_t = tanh(W_s s_{t-1} + U_t + b_s)."""
    T, m = U.shape[0], U.shape[2]
    for t in range(T):
        _matvecs(W_s, W_sT, S[t], U[t], S[t + 1], b, end)  # a_t - b_s = W_s s_{t-1} + W_x x_{t-1}
        for k in range(b, min(b + 4, end)):
            s_t = S[t + 1, k]
            for i in range(m):
                s_t[i] += b_s[i]
            _tanh_inplace(s_t)


@njit(fastmath=True, cache=True, inline="always")
def _tanh_inplace(row):
    """row = tanh(row): a vectorizable rational approximation for float32, math.tanh for float64."""
    if row.itemsize != 4:
        for i in range(row.shape[0]):
            row[i] = math.tanh(row[i])
        return
    a1, a3, a5, a7, a9, a11, a13 = _TANH_ALPHA
    b0, b2, b4, b6 = _TANH_BETA
    for i in range(row.shape[0]):
        x = min(max(row[i], -_TANH_CLAMP), _TANH_CLAMP)
        x2 = x * x
        p = ((((((a13 * x2 + a11) * x2 + a9) * x2 + a7) * x2 + a5) * x2 + a3) * x2 + a1) * x
        q = ((b6 * x2 + b4) * x2 + b2) * x2 + b0
        row[i] = p / q


@njit(fastmath=True, cache=True, inline="always")
def _backward_streams(W_s, W_sT, S, dL_ds_out, dL_da, b, end):
    """Streams b .. min(b + 4, end) - 1 back through the window: dL/da_t = (1 - s_t²) ⊙ dL/ds_t."""
    T, m = dL_da.shape[0], dL_da.shape[2]
    last = min(b + 4, end)
    for t in range(T - 1, -1, -1):  # dL/ds_t, held in dL_da[t] until scaled by 1 - s_t²
        if t == T - 1:
            dL_da[t, b:last] = dL_ds_out[t, b:last]
        else:  # dL/ds_t = dL_ds_out[t] + W_sᵀ dL/da_{t+1}
            _matvecs(W_sT, W_s, dL_da[t + 1], dL_ds_out[t], dL_da[t], b, end)
        for k in range(b, last):
            s_t = S[t + 1, k]
            dL_da_t = dL_da[t, k]
            for i in range(m):
                dL_da_t[i] *= 1 - s_t[i] * s_t[i]


@njit(parallel=True, fastmath=True, cache=True)
def input_grads(inputs, dL_dU, dW_x, slot, claimed):
    """The window's positions are sorted by token (a stable sort of the T·B tokens: no work proportional to
    V), the tokens without a slot claim one in increasing order, and each token's column is one thread's,
    summed in one contiguous pass: repeated tokens never race, and the order of their sum is fixed (position
    order)."""
    T, B, m = dL_dU.shape
    tokens = inputs.reshape(T * B)
    rows = dL_dU.reshape(T * B, m)
    columns = dW_x.T  # (V, m): slot u's column as a contiguous row
    order = np.argsort(tokens, kind="mergesort")
    runs = _run_starts(tokens, order)
    for k in range(runs.shape[0] - 1):
        claim(slot, claimed, tokens[order[runs[k]]])
    for k in prange(runs.shape[0] - 1):
        column = columns[slot[tokens[order[runs[k]]]]]
        for p in range(runs[k], runs[k + 1]):
            g = rows[order[p]]
            for i in range(m):
                column[i] += g[i]


@njit(cache=True, inline="always")
def claim(slot, claimed, row):
    """Give row the next slot of a slotted gradient (``rnnlm.backends``) unless it has one."""
    if slot[row] < 0:
        slot[row] = claimed[0]
        claimed[0] += 1


@njit(cache=True, inline="always")
def _run_starts(keys, order):
    """Where the runs of equal keys begin in ``order`` (keys sorted by it), and len(order) last: (runs + 1,)."""
    N = order.shape[0]
    starts = np.empty(N + 1, np.int64)
    n_runs = 0
    for p in range(N):
        if p == 0 or keys[order[p]] != keys[order[p - 1]]:
            starts[n_runs] = p
            n_runs += 1
    starts[n_runs] = N
    return starts[:n_runs + 1]


@njit(cache=True, inline="always")
def _group_by(keys, n_keys):
    """Positions grouped by key, a stable counting sort: key k's positions, in increasing order, are
    order[start[k]:start[k + 1]]. keys (N,) ints in [0, n_keys); start (n_keys + 1,), order (N,) int64."""
    N = keys.shape[0]
    start = np.zeros(n_keys + 1, np.int64)
    for r in range(N):
        start[keys[r] + 1] += 1
    for k in range(n_keys):
        start[k + 1] += start[k]
    order = np.empty(N, np.int64)
    fill = start[:n_keys].copy()
    for r in range(N):
        order[fill[keys[r]]] = r
        fill[keys[r]] += 1
    return start, order


@njit(parallel=True, cache=True)
def bias_grad(dL_da, db):
    """A parallel loop over the units, each summing its column."""
    N, m = dL_da.shape
    for i in prange(m):
        total = dL_da[0, i] * 0
        for r in range(N):
            total += dL_da[r, i]
        db[i] = total


@njit(parallel=True, fastmath=True, cache=True)
def multiply(a, mask, out):
    """A parallel loop over the flat arrays."""
    x = a.reshape(-1)
    y = mask.reshape(-1)
    z = out.reshape(-1)
    for k in prange(x.shape[0]):
        z[k] = x[k] * y[k]


def forward_packed(W_s, b_s, U, index, S_carried, S, offsets):
    """The streams in bands, one per thread and balanced by their rows, each band run through every step by
    a thread of its own (``in_threads``): numpy's matmul for W_s s, a kernel that releases the GIL for the
    input term and the bias, and numpy's tanh (vectorized, several times faster than a loop's here). The
    threads meet only at the end: a band never waits for another's steps."""
    running = np.diff(offsets)
    rows = np.cumsum(np.searchsorted(-running, -np.arange(running[0]), side="left"))  # by streams 0 .. j
    in_threads(lambda lo, hi: _forward_band(W_s, b_s, U, index, S_carried, S, offsets, lo, hi), rows)


def in_threads(work, sizes):
    """work(lo, hi) for bands [lo, hi) of items with cumulative sizes ``sizes`` (non-decreasing, one per item),
    one band per thread, as even as the items allow: the first band in this thread, every other in one of
    its own, each with one BLAS thread, so that no band ever waits for another before the end."""
    n_bands = min(numba.get_num_threads(), len(sizes))
    cuts = np.searchsorted(sizes, sizes[-1] * np.arange(1, n_bands) / n_bands) if n_bands > 1 else []
    bands = sorted({0, *map(int, cuts), len(sizes)})
    if len(bands) <= 2:
        work(0, len(sizes))
        return
    with _blas_controller().limit(limits=1, user_api="blas"), ThreadPoolExecutor(len(bands) - 2) as pool:
        others = [pool.submit(work, lo, hi) for lo, hi in itertools.pairwise(bands[1:])]
        work(bands[0], bands[1])
        for band in others:
            band.result()


def _forward_band(W_s, b_s, U, index, S_carried, S, offsets, lo, hi):
    """Streams lo ≤ j < hi of forward_packed through every step they run."""
    W_sT = W_s.T
    for t in range(len(offsets) - 1):
        top = min(hi, int(offsets[t + 1] - offsets[t]))
        if top <= lo:
            break
        first = int(offsets[t]) + lo
        rows = S[first : first + top - lo]
        if t > 0:
            previous = int(offsets[t - 1]) + lo
            np.matmul(S[previous : previous + top - lo], W_sT, out=rows)
        elif S_carried is not None:
            np.matmul(S_carried[lo:top], W_sT, out=rows)
        u = U[first : first + top - lo] if index is None else U
        _add_input_term(u, None if index is None else index[first : first + top - lo], b_s, rows,
                        t > 0 or S_carried is not None)
        np.tanh(rows, out=rows)


@functools.cache
def _blas_controller():
    return ThreadpoolController()


@njit(fastmath=True, cache=True, nogil=True)
def _add_input_term(U, index, b_s, S, add):
    """S[r] += U[index[r]] + b_s when ``add``, else S[r] = U[index[r]] + b_s; index None reads U[r]."""
    m = S.shape[1]
    for r in range(S.shape[0]):
        u = U[r] if index is None else U[index[r]]
        row = S[r]
        if add:
            for i in range(m):
                row[i] += u[i] + b_s[i]
        else:
            for i in range(m):
                row[i] = u[i] + b_s[i]
