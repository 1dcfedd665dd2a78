"""CPU backend: Numba kernels (``@njit``, ``prange``) and numpy's BLAS for the three output-layer GEMMs.

Every op here has a twin of the same name and signature in the ``cuda`` package; what each computes is
written once, in ``rnnlm.backends.OPS``, and the docstrings here say how the CPU computes it.
``rnnlm/step.py`` composes them into a training or evaluation step once for both. Arrays are numpy
arrays, float32 in training (float64 works too, for the gradient checks); token ids are int32.

All kernels live in this one file on purpose: Numba's cache hashes only the file of the decorated
function, so a helper kept elsewhere could leave stale compiled callers behind. The helpers that kernels
call are inlined at Numba's level (``inline="always"``): linked as separate functions, a freshly compiled
caller and the same caller loaded from the cache rounded differently, and a resumed run must compute
exactly what the interrupted one would have.
"""

import math

import numba
import numpy as np
from numba import njit, prange

name = "cpu"

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.0)
_EXPONENT_BIAS = np.int32(127)
_MANTISSA_BITS = np.int32(23)
_HALF = np.float32(0.5)
_INT32_MIN = np.int32(-2147483648)
_INT32_MAX = np.int32(2147483647)
_ONE = np.float32(1.0)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
# tanh as a rational function, the coefficients of Eigen's float tanh (relative error < 4e-7)
_TANH_CLAMP = np.float32(7.90531110763549805)
_TANH_ALPHA = tuple(np.float32(c) for c in (
    4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
    -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16))
_TANH_BETA = tuple(np.float32(c) for c in (
    4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06))


# ---------------------------------------------------------------------------------------- arrays


def asarray(array, dtype=None):
    """A C-ordered numpy copy."""
    return np.array(array, dtype=dtype, order="C")


def to_numpy(array):
    """A numpy copy."""
    return np.array(array)


def zeros(shape, dtype=np.float32):
    """np.zeros."""
    return np.zeros(shape, dtype)


def copy_into(src, dst):
    """numpy's assignment."""
    dst[...] = src


def synchronize():
    """Nothing to wait for: CPU work is synchronous."""


# ---------------------------------------------------------------------------------------- GEMMs


def matmul_nt(A, B, out):
    """numpy's matmul (BLAS) into out."""
    np.matmul(A, B.T, out=out)


def matmul_nn(A, B, out):
    """numpy's matmul (BLAS) into out."""
    np.matmul(A, B, out=out)


def matmul_tn(A, B, out):
    """numpy's matmul (BLAS) into out."""
    np.matmul(A.T, B, out=out)


# ---------------------------------------------------------------------------------------- recurrence


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
    """The B streams are independent: each thread runs a band of whole streams, four at a time through
    ``_matvecs``; float32 tanh by a vectorizable rational approximation."""
    _forward(W_s, b_s, U, S, numba.get_num_threads())


def backward(W_s, S, dL_ds_out, dL_da):
    """Parallel over bands of streams, as ``forward``, multiplying by W_sᵀ through ``_matvecs``."""
    _backward(W_s, S, dL_ds_out, dL_da, numba.get_num_threads())


@njit(fastmath=True, cache=True, inline="always")
def _matvecs(M, M_T, X, add, out, b, end):
    """out[k] = M X[k] + add[k] for the four streams k = b .. b + 3, those ≥ end standing in for end - 1.

    M (m, m) and its transpose M_T (m, m), both C-contiguous; X, add, out (B, m), a row per stream. Each
    pass over a row pair of M feeds eight accumulators (two rows times four streams), so every element
    loaded serves two or four multiply-adds: a matrix-vector product per stream would load two elements
    per multiply-add and reread M from L2 for every stream. A stand-in stream writes its row again with
    the same values; an odd m repeats its last row the same way.

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
        out[k3, i2] = c3 + add[k3, i2]
        out[k2, i2] = c2 + add[k2, i2]
        out[k1, i2] = c1 + add[k1, i2]
        out[k0, i2] = c0 + add[k0, i2]
        out[k3, i] = a3 + add[k3, i]
        out[k2, i] = a2 + add[k2, i]
        out[k1, i] = a1 + add[k1, i]
        out[k0, i] = a0 + add[k0, i]
    for k in range(b, min(b + 4, end)):
        x, out_k = X[k], out[k]
        for j in range(body, m):
            column, y = M_T[j], x[j]
            for i in range(m):
                out_k[i] += column[i] * y


@njit(parallel=True, fastmath=True, cache=True)
def _forward(W_s, b_s, U, S, n_threads):
    T, B, m = U.shape
    W_sT = np.ascontiguousarray(W_s.T)
    n_bands = min(B, n_threads)
    for band in prange(n_bands):
        end = (band + 1) * B // n_bands
        for b in range(band * B // n_bands, end, 4):
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


@njit(parallel=True, fastmath=True, cache=True)
def _backward(W_s, S, dL_ds_out, dL_da, n_threads):
    T, B, m = dL_da.shape
    W_sT = np.ascontiguousarray(W_s.T)
    n_bands = min(B, n_threads)
    for band in prange(n_bands):
        end = (band + 1) * B // n_bands
        for b in range(band * B // n_bands, end, 4):
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
def input_grads(inputs, dL_dU, dW_x, touched):
    """The window's positions are grouped by token and each token's column is one thread's, summed in one
    contiguous pass: repeated tokens never race, and the order of their sum is fixed."""
    T, B, m = dL_dU.shape
    tokens = inputs.reshape(T * B)
    rows = dL_dU.reshape(T * B, m)
    columns = dW_x.T  # (V, m): token x's column as a contiguous row
    start, order = _group_by(tokens, touched.shape[0])
    present = np.nonzero(start[1:] > start[:-1])[0]
    for k in prange(present.shape[0]):
        x = present[k]
        column = columns[x]
        for p in range(start[x], start[x + 1]):
            g = rows[order[p]]
            for i in range(m):
                column[i] += g[i]
        touched[x] = 1


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


@njit(parallel=True, cache=True)
def masked_add_rows(dst_rows, src_rows, src_mask, dst_mask):
    """A parallel loop over the rows."""
    R, m = dst_rows.shape
    for r in prange(R):
        if src_mask[r]:
            for i in range(m):
                dst_rows[r, i] += src_rows[r, i]
                src_rows[r, i] = 0
            src_mask[r] = 0
            dst_mask[r] = 1


# ---------------------------------------------------------------------------------------- softmax


@njit(fastmath=True, cache=True, inline="always")
def _biased_max(row, b_o, bits):
    """max_j (row[j] + b_o[j]); bits: int32 scratch (len(row)).

    float32 rows are compared as integers: a float's bits, with the magnitude bits flipped when it is
    negative, order as int32s do, and Numba vectorizes an integer max reduction (its float max
    reductions stay scalar). float64 rows, the gradient checks', take a plain loop.
    """
    if row.itemsize != 4:
        top = row[0] + b_o[0]
        for j in range(row.shape[0]):
            top = max(top, row[j] + b_o[j])
        return top
    biased = bits.view(np.float32)
    top = _INT32_MIN
    for j in range(row.shape[0]):
        biased[j] = row[j] + b_o[j]
        top = max(top, _ordered_bits(bits[j]))
    bits[0] = _ordered_bits(top)  # its own inverse: back to the float's bits
    return biased[0]


@njit(cache=True, inline="always")
def _ordered_bits(k):
    """A float32's int32 bits k with the magnitude bits flipped when negative, which makes the int32 order
    the float order; applied twice it gives k back."""
    return k ^ ((k >> 31) & _INT32_MAX)


@njit(fastmath=True, cache=True, inline="always")
def _exp_shifted_row(row, b_o, shift, bits):
    """row[j] = exp(row[j] + b_o[j] - shift) in place, returning the sum; ``bits``: int32 scratch (len(row)).

    float32 rows use a Cephes-style polynomial with the 2^n factor built from its exponent bits, which
    vectorizes (Numba's np.exp in a loop is a scalar libm call); float64 rows, the gradient checks',
    use np.exp. The branch is on a compile-time constant.
    """
    total = row.dtype.type(0)
    if row.itemsize != 4:
        for j in range(row.shape[0]):
            e = np.exp(row[j] + b_o[j] - shift)
            row[j] = e
            total += e
        return total
    for j in range(row.shape[0]):
        x = row[j] + b_o[j] - shift
        x = x if x > _EXP_MIN else _EXP_MIN
        n = np.int32(x * _LOG2E - _HALF)  # x ≤ 0: truncation rounds to nearest (np.floor is scalar)
        fx = np.float32(n)
        x = x - fx * _LN2_HI - fx * _LN2_LO
        y = ((((_P0 * x + _P1) * x + _P2) * x + _P3) * x + _P4) * x + _P5
        row[j] = y * (x * x) + x + _ONE
        bits[j] = (n + _EXPONENT_BIAS) << _MANTISSA_BITS
    pow2 = bits.view(np.float32)
    for j in range(row.shape[0]):
        e = row[j] * pow2[j]
        row[j] = e
        total += e
    return total


def softmax_xent_grad(Z, b_o, targets, scale, db_o):
    """Rows in one chunk per thread, each row's max, exponentials, loss and gradient in one pass over it;
    db_o from the chunks' partial sums, added in chunk order."""
    return _softmax_xent_grad(Z, b_o, targets, scale, db_o, numba.get_num_threads())


def softmax_log_probs(Z, b_o, targets, out):
    """out[r] = log softmax(Z[r] + b_o)[targets[r]] for every row: the log-probability of each row's target.

    Z (N, V) is used as scratch; b_o (V,); targets (N,) int32; out (N,) float64.
    """
    _softmax_log_probs(Z, b_o, targets, out, numba.get_num_threads())


def softmax_xent(Z, b_o, targets):
    """Σ_rows -log softmax(Z + b_o)[target] for evaluation, from ``softmax_log_probs``; Z (N, V) is scratch."""
    out = np.empty(Z.shape[0])
    softmax_log_probs(Z, b_o, targets, out)
    return -out.sum()


# The thread count is an argument: calling numba.get_num_threads inside a kernel would stop caching.


@njit(parallel=True, fastmath=True, cache=True)
def _softmax_xent_grad(Z, b_o, targets, scale, db_o, n_threads):
    N, V = Z.shape
    n_chunks = min(N, n_threads)
    losses = np.zeros(n_chunks)
    db_partial = np.zeros((n_chunks, V), Z.dtype)
    for c in prange(n_chunks):
        bits = np.empty(V, np.int32)
        db = db_partial[c]
        for r in range(c * N // n_chunks, (c + 1) * N // n_chunks):
            row = Z[r]
            y = targets[r]
            z_y = row[y] + b_o[y]
            top = _biased_max(row, b_o, bits)
            total = _exp_shifted_row(row, b_o, top, bits)
            losses[c] += top + np.log(total) - z_y
            inv = row.dtype.type(scale / total)
            for j in range(V):
                row[j] *= inv
            row[y] -= scale
            for j in range(V):
                db[j] += row[j]
    for j in prange(V):
        acc = db_partial[0, j]
        for c in range(1, n_chunks):
            acc += db_partial[c, j]
        db_o[j] = acc
    return losses.sum()


@njit(parallel=True, fastmath=True, cache=True)
def _softmax_log_probs(Z, b_o, targets, out, n_threads):
    N, V = Z.shape
    n_chunks = min(N, n_threads)
    for c in prange(n_chunks):
        bits = np.empty(V, np.int32)
        for r in range(c * N // n_chunks, (c + 1) * N // n_chunks):
            row = Z[r]
            z_y = row[targets[r]] + b_o[targets[r]]
            top = _biased_max(row, b_o, bits)
            loss = top + np.log(_exp_shifted_row(row, b_o, top, bits)) - z_y
            out[r] = -loss


# ---------------------------------------------------------------------------------------- class softmax


@njit(parallel=True, fastmath=True, cache=True)
def class_xent_grad(S_next, W_o, b_o, targets, target_classes, class_bounds, scale, dW_o, db_o, dL_ds, touched,
                    dW_o_norm):
    """Rows are grouped by class and each class is one thread's, so no two threads write the same rows.
    A class's rows are taken four at a time, so that each pass over W_o[class] and dW_o[class] serves
    four of them (a class of the rare words holds hundreds of words, more than the cache keeps). The norm
    of dW_o's rows is summed while they are in cache, so that the gradient norm needs no second pass.
    """
    m = S_next.shape[1]
    C = class_bounds.shape[0] - 1
    db_o[:] = 0
    start, order = _group_by(target_classes, C)
    losses = np.zeros(C)
    squares = np.zeros(C)
    for c in prange(C):
        if start[c] == start[c + 1]:
            continue
        lo, hi = class_bounds[c], class_bounds[c + 1]
        W_class, b_class, dW_class = W_o[lo:hi], b_o[lo:hi], dW_o[lo:hi]
        touched[lo:hi] = 1
        # four rows' states, their logits (then scale · dL/dz, zero for a missing fourth) and dL/ds
        S_four = np.zeros((4, m), S_next.dtype)
        Z_four = np.zeros((4, hi - lo), S_next.dtype)
        dS_four = np.empty((4, m), S_next.dtype)
        bits = np.empty(hi - lo, np.int32)
        s0, s1, s2, s3 = S_four[0], S_four[1], S_four[2], S_four[3]
        d0, d1, d2, d3 = dS_four[0], dS_four[1], dS_four[2], dS_four[3]
        for first in range(start[c], start[c + 1], 4):
            n_rows = min(4, start[c + 1] - first)
            for j in range(n_rows):
                S_four[j] = S_next[order[first + j]]
            _four_rows_logits(W_class, S_four, Z_four)
            for j in range(4):
                z = Z_four[j]
                if j >= n_rows:
                    z[:] = 0
                    continue
                y = targets[order[first + j]] - lo
                z_y = z[y] + b_class[y]
                top = _biased_max(z, b_class, bits)
                total = _exp_shifted_row(z, b_class, top, bits)
                losses[c] += top + np.log(total) - z_y
                inv = S_next.dtype.type(scale / total)
                for w in range(hi - lo):
                    z[w] *= inv
                z[y] -= scale
            dS_four[:] = 0
            for w in range(hi - lo):
                g0, g1, g2, g3 = Z_four[0, w], Z_four[1, w], Z_four[2, w], Z_four[3, w]
                db_o[lo + w] += g0 + g1 + g2 + g3
                for i in range(m):
                    x = W_class[w, i]
                    dW_class[w, i] += g0 * s0[i] + g1 * s1[i] + g2 * s2[i] + g3 * s3[i]
                    d0[i] += g0 * x
                    d1[i] += g1 * x
                    d2[i] += g2 * x
                    d3[i] += g3 * x
            for j in range(n_rows):
                dL_ds_r = dL_ds[order[first + j]]
                for i in range(m):
                    dL_ds_r[i] += dS_four[j, i]
        for w in range(hi - lo):
            for i in range(m):
                squares[c] += dW_class[w, i] * dW_class[w, i]
    dW_o_norm[0] = np.sqrt(squares.sum())
    return losses.sum()


def class_xent(S_next, W_o, b_o, targets, target_classes, class_bounds):
    """Σ_r -log p(targets[r] | its class) for evaluation (see ``class_xent_grad``), from ``class_log_probs``."""
    out = np.empty(S_next.shape[0])
    class_log_probs(S_next, W_o, b_o, targets, target_classes, class_bounds, out)
    return -out.sum()


@njit(parallel=True, fastmath=True, cache=True)
def class_log_probs(S_next, W_o, b_o, targets, target_classes, class_bounds, out):
    """out[r] = log p(targets[r] | its class), the word half of the class softmax (see ``class_xent_grad``),
    for every row of S_next (N, m); out (N,) float64.

    Rows are grouped by class and each class is one thread's, its rows taken four at a time as in
    ``class_xent_grad``, so that each pass over W_o[class] serves four of them.
    """
    m = S_next.shape[1]
    C = class_bounds.shape[0] - 1
    start, order = _group_by(target_classes, C)
    for c in prange(C):
        if start[c] == start[c + 1]:
            continue
        lo, hi = class_bounds[c], class_bounds[c + 1]
        b_class = b_o[lo:hi]
        S_four = np.zeros((4, m), S_next.dtype)
        Z_four = np.empty((4, hi - lo), S_next.dtype)
        bits = np.empty(hi - lo, np.int32)
        for first in range(start[c], start[c + 1], 4):
            n_rows = min(4, start[c + 1] - first)
            for j in range(n_rows):
                S_four[j] = S_next[order[first + j]]
            _four_rows_logits(W_o[lo:hi], S_four, Z_four)
            for j in range(n_rows):
                r = order[first + j]
                z = Z_four[j]
                y = targets[r] - lo
                z_y = z[y] + b_class[y]
                top = _biased_max(z, b_class, bits)
                loss = top + np.log(_exp_shifted_row(z, b_class, top, bits)) - z_y
                out[r] = -loss


@njit(fastmath=True, cache=True, inline="always")
def _four_rows_logits(W_class, S_four, Z_four):
    """Z_four[j, w] = W_class[w] · S_four[j] for the four rows of S_four (4, m): one pass over W_class."""
    zero = S_four.dtype.type(0)
    s0, s1, s2, s3 = S_four[0], S_four[1], S_four[2], S_four[3]
    for w in range(W_class.shape[0]):
        a0 = a1 = a2 = a3 = zero
        for i in range(W_class.shape[1]):
            x = W_class[w, i]
            a0 += x * s0[i]
            a1 += x * s1[i]
            a2 += x * s2[i]
            a3 += x * s3[i]
        Z_four[0, w], Z_four[1, w], Z_four[2, w], Z_four[3, w] = a0, a1, a2, a3


# ---------------------------------------------------------------------------------------- update


@njit(parallel=True, fastmath=True, cache=True)
def _sum_squares(array):
    """Σ array² as float64 (for the gradient norm)."""
    flat = array.reshape(-1)
    total = 0.0
    for k in prange(flat.shape[0]):
        total += flat[k] * flat[k]
    return total


@njit(parallel=True, fastmath=True, cache=True)
def sgd_update(param, grad, lr, shrink, clipping):
    """A parallel loop over the flat arrays."""
    step = param.dtype.type(lr * clipping[1])
    p = param.reshape(-1)
    g = grad.reshape(-1)
    for k in prange(p.shape[0]):
        p[k] = shrink * p[k] - step * g[k]


@njit(parallel=True, fastmath=True, cache=True)
def _masked_sum_squares(rows, mask):
    """Σ rows[r]² over the rows r with mask[r] set, as float64. rows (R, m) any layout; mask uint8 (R,)."""
    R, m = rows.shape
    total = 0.0
    for r in prange(R):
        row_total = 0.0
        if mask[r]:
            for i in range(m):
                row_total += rows[r, i] * rows[r, i]
        total += row_total
    return total


@njit(parallel=True, fastmath=True, cache=True)
def masked_sgd_update(param_rows, grad_rows, mask, lr, clipping):
    """A parallel loop over the rows."""
    step = param_rows.dtype.type(lr * clipping[1])
    R, m = param_rows.shape
    for r in prange(R):
        if mask[r]:
            for i in range(m):
                param_rows[r, i] -= step * grad_rows[r, i]
                grad_rows[r, i] = 0
            mask[r] = 0


@njit(fastmath=True, cache=True, inline="always")
def _adam_element(param, grad, moment1, moment2, k, lr_t, grad_scale, decay, beta1, rest1, beta2, rest2, eps):
    """The Adam step of element k of 1-D arrays (``rnnlm.backends.OPS``); rest1 = 1 - β1, rest2 = 1 - β2."""
    g = grad_scale * grad[k] + decay * param[k]
    moment1[k] = beta1 * moment1[k] + rest1 * g
    moment2[k] = beta2 * moment2[k] + rest2 * g * g
    param[k] -= lr_t * moment1[k] / (np.sqrt(moment2[k]) + eps)


@njit(parallel=True, fastmath=True, cache=True)
def adam_update(param, grad, moment1, moment2, lr_t, clipping, decay, beta1, beta2, eps):
    """A parallel loop over the flat arrays, each element by ``_adam_element``."""
    # one view per statement: a tuple assignment of reshaped views loses the writes under parallel=True
    p = param.reshape(-1)
    g = grad.reshape(-1)
    m1 = moment1.reshape(-1)
    m2 = moment2.reshape(-1)
    one = param.dtype.type(1)
    grad_scale = param.dtype.type(clipping[1])
    for k in prange(p.shape[0]):
        _adam_element(p, g, m1, m2, k, lr_t, grad_scale, decay, beta1, one - beta1, beta2, one - beta2, eps)


@njit(parallel=True, fastmath=True, cache=True)
def masked_adam_update(param_rows, grad_rows, moment1, moment2, mask, lr_t, clipping, decay, beta1, beta2, eps):
    """A parallel loop over the rows, each marked row's elements by ``_adam_element``."""
    R, m = param_rows.shape
    one = param_rows.dtype.type(1)
    grad_scale = param_rows.dtype.type(clipping[1])
    for r in prange(R):
        if mask[r]:
            p, g = param_rows[r], grad_rows[r]
            m1, m2 = moment1[r], moment2[r]
            for i in range(m):
                _adam_element(p, g, m1, m2, i, lr_t, grad_scale, decay, beta1, one - beta1, beta2, one - beta2, eps)


def grad_norm(pairs, clip, clipping):
    """One parallel sum of squares per array (marked rows alone for a mask), added on the host."""
    norm = math.sqrt(sum(_sum_squares(a) if mask is None else _masked_sum_squares(a, mask) for a, mask in pairs))
    clipping[0] = norm
    clipping[1] = clip / norm if 0 < clip < norm else 1.0


def sgd_updates(pairs, lr, shrink, clipping):
    """One ``sgd_update`` per pair."""
    for param, grad in pairs:
        sgd_update(param, grad, lr, param.dtype.type(shrink), clipping)
