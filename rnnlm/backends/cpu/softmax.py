"""Softmax: per row of logits, a vectorized maximum on the float bits, exp by a polynomial, the loss, the
per-row log-probabilities and dL/dz."""

import numba
import numpy as np
from numba import njit, prange

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
