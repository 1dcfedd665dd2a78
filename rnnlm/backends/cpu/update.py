"""Update: sums of squares for the gradient norm, SGD and Adam (float32 or bfloat16 moments), dense and on
slotted gradients' rows (``rnnlm.backends``)."""

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from rnnlm.backends import MIX_GOLDEN, MIX_MULTIPLIERS


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
def _slotted_sum_squares(rows, slot):
    """Σ rows[slot[r]]² over the rows r with a slot, as float64. rows (R, m) any layout; slot int32 (R,)."""
    R, m = rows.shape
    total = 0.0
    for r in prange(R):
        row_total = 0.0
        if slot[r] >= 0:
            row = rows[slot[r]]
            for i in range(m):
                row_total += row[i] * row[i]
        total += row_total
    return total


@njit(parallel=True, fastmath=True, cache=True)
def sparse_sgd_update(param_rows, grad_rows, slot, claimed, lr, clipping):
    """A parallel loop over the rows."""
    step = param_rows.dtype.type(lr * clipping[1])
    R, m = param_rows.shape
    for r in prange(R):
        if slot[r] >= 0:
            p, g = param_rows[r], grad_rows[slot[r]]
            for i in range(m):
                p[i] -= step * g[i]
                g[i] = 0
            slot[r] = -1
    claimed[0] = 0


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
def sparse_adam_update(param_rows, grad_rows, moment1, moment2, slot, claimed, every, lr_t, clipping, decay, beta1,
                       beta2, eps):
    """A parallel loop over the rows, each row's elements by ``_adam_element`` (a row without a slot, with every,
    on a shared row of zeros), its gradient cleared while it is in cache."""
    R, m = param_rows.shape
    one = param_rows.dtype.type(1)
    grad_scale = param_rows.dtype.type(clipping[1])
    zero = np.zeros(m, param_rows.dtype)
    for r in prange(R):
        if slot[r] >= 0 or every:
            g = grad_rows[slot[r]] if slot[r] >= 0 else zero
            p, m1, m2 = param_rows[r], moment1[r], moment2[r]
            for i in range(m):
                _adam_element(p, g, m1, m2, i, lr_t, grad_scale, decay, beta1, one - beta1, beta2, one - beta2, eps)
            if slot[r] >= 0:
                g[:] = 0
                slot[r] = -1
    claimed[0] = 0


_MASK32 = np.uint64(0xFFFFFFFF)
_LOW16 = np.uint64(0xFFFF)
_EXPONENT = np.uint64(0x7F800000)
_MANTISSA = np.uint64(0x007FFFFF)
_QUIET = np.uint64(0x40)
_NONE = np.uint64(0)
_SHIFTS = (np.uint64(13), np.uint64(16), np.uint64(32))


@intrinsic
def _float32_bits(typingctx, value):
    """The bits of a float32, as a uint64 below 2³² (an LLVM bitcast)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.uint64(types.float32), codegen


@intrinsic
def _from_bf16(typingctx, bits):
    """The float32 of a uint16 of bfloat16 bits (the float32's upper half; an LLVM bitcast)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(cache=True, inline="always")
def _mix(x):
    """murmur3's fmix32 of a uint64 x < 2³² (``rnnlm.backends``)."""
    x ^= x >> _SHIFTS[1]
    x = (x * MIX_MULTIPLIERS[0]) & _MASK32
    x ^= x >> _SHIFTS[0]
    x = (x * MIX_MULTIPLIERS[1]) & _MASK32
    x ^= x >> _SHIFTS[1]
    return x


@njit(cache=True, inline="always")
def _random_bits(k, step_mix):
    """r(t, k) of ``rnnlm.backends`` for a uint64 flat index k, step_mix = mix(t mod 2³²)."""
    return _mix((((k & _MASK32) * MIX_GOLDEN) & _MASK32) ^ step_mix ^ (k >> _SHIFTS[2]))


@njit(cache=True, inline="always")
def _to_bf16(value, u):
    """The stochastic rounding bf16(value, u) of ``rnnlm.backends`` (u < 2¹⁶), as a uint64 below 2¹⁶."""
    bits = _float32_bits(np.float32(value))
    if (bits & _EXPONENT) == _EXPONENT:
        return (bits >> _SHIFTS[1]) | (_QUIET if bits & _MANTISSA else _NONE)
    return (bits + u) >> _SHIFTS[1]


@njit(cache=True, inline="always")
def _adam_element_bf16(param, grad, moment1, moment2, k, index, step_mix, lr_t, grad_scale, decay, beta1, rest1,
                       beta2, rest2, eps):
    """The Adam step of element k of 1-D arrays with bfloat16 moments; index: its flat index (uint64) for the
    random bits. Compiled without fastmath: no fused multiply-adds, so that the moments before rounding are
    the CUDA kernel's to the bit."""
    g = grad_scale * grad[k] + decay * param[k]
    m1 = beta1 * _from_bf16(moment1[k]) + rest1 * g
    m2 = beta2 * _from_bf16(moment2[k]) + rest2 * g * g
    param[k] -= lr_t * m1 / (np.sqrt(m2) + eps)
    r = _random_bits(index, step_mix)
    moment1[k] = _to_bf16(m1, r & _LOW16)
    moment2[k] = _to_bf16(m2, r >> _SHIFTS[1])


@njit(parallel=True, cache=True)
def adam_update_bf16(param, grad, moment1, moment2, t, lr_t, clipping, decay, beta1, beta2, eps):
    """A parallel loop over the flat arrays, each element by ``_adam_element_bf16``."""
    p = param.reshape(-1)
    g = grad.reshape(-1)
    m1 = moment1.reshape(-1)
    m2 = moment2.reshape(-1)
    one = param.dtype.type(1)
    grad_scale = param.dtype.type(clipping[1])
    step_mix = _mix(np.uint64(t) & _MASK32)
    for k in prange(p.shape[0]):
        _adam_element_bf16(p, g, m1, m2, k, np.uint64(k), step_mix, lr_t, grad_scale, decay, beta1, one - beta1,
                           beta2, one - beta2, eps)


@njit(parallel=True, cache=True)
def sparse_adam_update_bf16(param_rows, grad_rows, moment1, moment2, slot, claimed, every, t, lr_t, clipping, decay,
                            beta1, beta2, eps):
    """A parallel loop over the rows as in ``sparse_adam_update``, each row's elements by ``_adam_element_bf16``."""
    R, m = param_rows.shape
    one = param_rows.dtype.type(1)
    grad_scale = param_rows.dtype.type(clipping[1])
    step_mix = _mix(np.uint64(t) & _MASK32)
    zero = np.zeros(m, param_rows.dtype)
    for r in prange(R):
        if slot[r] >= 0 or every:
            g = grad_rows[slot[r]] if slot[r] >= 0 else zero
            p, m1, m2 = param_rows[r], moment1[r], moment2[r]
            first = np.uint64(r) * np.uint64(m)
            for i in range(m):
                _adam_element_bf16(p, g, m1, m2, i, first + np.uint64(i), step_mix, lr_t, grad_scale, decay, beta1,
                                   one - beta1, beta2, one - beta2, eps)
            if slot[r] >= 0:
                g[:] = 0
                slot[r] = -1
    claimed[0] = 0


def grad_norm(pairs, clip, clipping):
    """One parallel sum of squares per array (its slotted rows alone for a slot array), added on the host."""
    norm = math.sqrt(sum(_sum_squares(a) if slot is None else _slotted_sum_squares(a, slot) for a, slot in pairs))
    clipping[0] = norm
    clipping[1] = clip / norm if 0 < clip < norm else 1.0


def sgd_updates(pairs, lr, shrink, clipping):
    """One ``sgd_update`` per pair."""
    for param, grad in pairs:
        sgd_update(param, grad, lr, param.dtype.type(shrink), clipping)


@njit(fastmath=True, cache=True, inline="always")
def _power(x, n):
    """xⁿ for an integer n ≥ 1 by repeated squaring (the same products on both backends)."""
    result = x
    n -= 1
    while n > 0:
        if n & 1:
            result *= x
        x *= x
        n >>= 1
    return result


@njit(parallel=True, fastmath=True, cache=True)
def decay_rows(param_rows, start_rows, keep_rows, rows, powers):
    """A parallel loop over the listed rows."""
    m = param_rows.shape[1]
    for j in prange(rows.shape[0]):
        r = rows[j]
        n = powers[j]
        for i in range(m):
            keep = _power(keep_rows[r, i], n)
            param_rows[r, i] = start_rows[r, i] + keep * (param_rows[r, i] - start_rows[r, i])


@njit(parallel=True, fastmath=True, cache=True)
def pulled_rms_update(param, grad, start, keep, moment2, lr, clipping, eps):
    """A parallel loop over the flat arrays, each element pulled toward start, then stepped."""
    # one view per statement: a tuple assignment of reshaped views loses the writes under parallel=True
    p = param.reshape(-1)
    g = grad.reshape(-1)
    s = start.reshape(-1)
    k_keep = keep.reshape(-1)
    v = moment2.reshape(-1)
    grad_scale = param.dtype.type(clipping[1])
    for k in prange(p.shape[0]):
        pulled = s[k] + k_keep[k] * (p[k] - s[k])
        p[k] = pulled - lr * (grad_scale * g[k]) / (np.sqrt(v[k]) + eps)
