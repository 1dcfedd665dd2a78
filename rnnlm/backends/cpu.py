"""CPU backend: Numba kernels (``@njit``, ``prange``) and numpy's BLAS for the three output-layer GEMMs.

Every function here has a twin of the same name and signature in ``cuda.py``; ``rnnlm/step.py``
composes them into a training or evaluation step once for both. Arrays are C-contiguous numpy arrays,
float32 in training (float64 works too, for the gradient checks); token ids are int32.

All kernels live in this one file on purpose: Numba's cache hashes only the file of the decorated
function, so a helper kept elsewhere could leave stale compiled callers behind.
"""

import math

import numpy as np
import numba
from numba import njit, prange

name = "cpu"

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)


# ---------------------------------------------------------------------------------------- arrays


def asarray(array, dtype=None):
    """A C-contiguous backend array holding a copy of ``array``."""
    return np.array(array, dtype=dtype, order="C")


def to_numpy(array):
    """A numpy copy of a backend array."""
    return np.array(array)


def zeros(shape, dtype=np.float32):
    return np.zeros(shape, dtype)


def copy_into(src, dst):
    """dst[...] = src."""
    dst[...] = src


def synchronize():
    """CPU work is synchronous; the CUDA twin waits for the device."""


# ---------------------------------------------------------------------------------------- GEMMs


def matmul_nt(A, B, out):
    """out = A Bᵀ.  A (n, k), B (p, k), out (n, p)."""
    np.matmul(A, B.T, out=out)


def matmul_nn(A, B, out):
    """out = A B.  A (n, k), B (k, p), out (n, p)."""
    np.matmul(A, B, out=out)


def matmul_tn(A, B, out):
    """out = Aᵀ B.  A (k, n), B (k, p), out (n, p)."""
    np.matmul(A.T, B, out=out)


# ---------------------------------------------------------------------------------------- recurrence


@njit(parallel=True, fastmath=True, cache=True)
def forward(W_x, W_s, b_s, inputs, S):
    """Run the recurrence over a window: S[t + 1] = tanh(W_s S[t] + W_x[:, inputs[t]] + b_s).

    W_x (m, V), W_s (m, m), b_s (m,); inputs (T, B) int32 ids x_{t-1};
    S (T + 1, B, m): S[0] holds the carried state on entry, S[1:] is written.
    """
    T, B = inputs.shape
    m = W_s.shape[0]
    for t in range(T):
        for k in prange(B * m):
            b, i = k // m, k % m
            s_prev = S[t, b]
            W_s_row = W_s[i]
            a_t = b_s[i] + W_x[i, inputs[t, b]]
            for j in range(m):
                a_t += W_s_row[j] * s_prev[j]
            S[t + 1, b, i] = math.tanh(a_t)


@njit(parallel=True, fastmath=True, cache=True)
def backward(W_s, S, dL_ds_out, dL_da):
    """Backpropagation through time over a window, from the output layer's gradient.

    S (T + 1, B, m) from ``forward``; dL_ds_out (T, B, m) = W_oᵀ dL/dz per step.
    Writes dL_da (T, B, m): dL/ds_t = dL_ds_out[t] + W_sᵀ dL/da_{t+1}, dL/da_t = (1 - s_t²) ⊙ dL/ds_t.
    The state carried into the window gets no gradient (truncated BPTT).
    """
    T, B, m = dL_da.shape
    for t in range(T - 1, -1, -1):
        for b in prange(B):
            dL_ds = dL_ds_out[t, b].copy()
            if t + 1 < T:
                dL_da_next = dL_da[t + 1, b]
                for i in range(m):
                    W_s_row = W_s[i]
                    g = dL_da_next[i]
                    for j in range(m):
                        dL_ds[j] += W_s_row[j] * g
            s_t = S[t + 1, b]
            for i in range(m):
                dL_da[t, b, i] = (1 - s_t[i] * s_t[i]) * dL_ds[i]


@njit(parallel=True, cache=True)
def input_grads(inputs, dL_da, dW_x, db_s):
    """dW_x[:, x_{t-1}] += dL/da_t and db_s = Σ_t dL/da_t over the window (both overwritten).

    inputs (T, B) int32; dL_da (T, B, m); dW_x (m, V); db_s (m,). Parallel over the m rows, so the
    scatter into repeated tokens' columns never races.
    """
    T, B, m = dL_da.shape
    for i in prange(m):
        dW_x[i, :] = 0
        total = 0.0
        for t in range(T):
            for b in range(B):
                g = dL_da[t, b, i]
                dW_x[i, inputs[t, b]] += g
                total += g
        db_s[i] = total


# ---------------------------------------------------------------------------------------- softmax


@njit(fastmath=True, cache=True)
def _exp_shifted_row(row, shift, bits):
    """row[j] = exp(row[j] - shift) in place, returning the sum; ``bits`` is int32 scratch of len(row).

    float32 rows use a Cephes-style polynomial with the 2^n factor built from its exponent bits, which
    vectorizes (Numba's np.exp in a loop is a scalar libm call); float64 rows, the gradient checks',
    use np.exp. The branch is on a compile-time constant.
    """
    total = 0.0
    if row.itemsize != 4:
        for j in range(row.shape[0]):
            e = np.exp(row[j] - shift)
            row[j] = e
            total += e
        return total
    for j in range(row.shape[0]):
        x = max(row[j] - shift, _EXP_MIN)
        fx = np.floor(x * _LOG2E + _HALF)
        x = x - fx * _LN2_HI - fx * _LN2_LO
        y = ((((_P0 * x + _P1) * x + _P2) * x + _P3) * x + _P4) * x + _P5
        row[j] = y * (x * x) + x + _ONE
        bits[j] = (np.int32(fx) + 127) << 23
    pow2 = bits.view(np.float32)
    for j in range(row.shape[0]):
        e = row[j] * pow2[j]
        row[j] = e
        total += e
    return total


@njit(fastmath=True, cache=True)
def _add_bias_max(row, b_o):
    """row += b_o in place; returns the row's maximum."""
    top = -np.inf
    for j in range(row.shape[0]):
        z = row[j] + b_o[j]
        row[j] = z
        top = max(top, z)
    return top


def softmax_xent_grad(Z, b_o, targets, scale, db_o):
    """Fused softmax + cross-entropy + its gradient over all rows of a window.

    Z (N, V): logits W_o s_t without the bias on entry; on return Z = scale · dL/dz = scale · (p_t -
    onehot(x̂_t)). b_o (V,); targets (N,) int32; db_o (V,) is overwritten with Σ_rows of the new Z.
    Returns Σ_rows -log p_t(x̂_t) as float64.
    """
    return _softmax_xent_grad(Z, b_o, targets, scale, db_o, numba.get_num_threads())


def softmax_xent(Z, b_o, targets):
    """Σ_rows -log softmax(Z + b_o)[target] for evaluation; Z (N, V) is used as scratch."""
    return _softmax_xent(Z, b_o, targets, numba.get_num_threads())


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
            top = _add_bias_max(row, b_o)
            z_y = row[y]
            total = _exp_shifted_row(row, top, bits)
            losses[c] += top + np.log(total) - z_y
            inv = scale / total
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
def _softmax_xent(Z, b_o, targets, n_threads):
    N, V = Z.shape
    losses = np.zeros(N)
    n_chunks = min(N, n_threads)
    for c in prange(n_chunks):
        bits = np.empty(V, np.int32)
        for r in range(c * N // n_chunks, (c + 1) * N // n_chunks):
            row = Z[r]
            top = _add_bias_max(row, b_o)
            z_y = row[targets[r]]
            losses[r] = top + np.log(_exp_shifted_row(row, top, bits)) - z_y
    return losses.sum()


@njit(parallel=True, fastmath=True, cache=True)
def softmax_rows(Z, b_o):
    """Z (N, V) := softmax(Z + b_o) row by row (used for sampling)."""
    N, V = Z.shape
    for r in prange(N):
        bits = np.empty(V, np.int32)
        row = Z[r]
        top = _add_bias_max(row, b_o)
        inv = 1.0 / _exp_shifted_row(row, top, bits)
        for j in range(V):
            row[j] *= inv


# ---------------------------------------------------------------------------------------- update


@njit(parallel=True, fastmath=True, cache=True)
def sum_squares(array):
    """Σ array² as float64 (for the gradient norm)."""
    flat = array.reshape(-1)
    total = 0.0
    for k in prange(flat.shape[0]):
        total += flat[k] * flat[k]
    return total


@njit(parallel=True, fastmath=True, cache=True)
def sgd_update(param, grad, step, shrink):
    """param = shrink · param - step · grad, any shape; step and shrink have the param's dtype.

    SGD on the clipped gradient plus the L2 term: step = lr · clip_scale, shrink = 1 - lr · 2λ.
    """
    p = param.reshape(-1)
    g = grad.reshape(-1)
    for k in prange(p.shape[0]):
        p[k] = shrink * p[k] - step * g[k]
