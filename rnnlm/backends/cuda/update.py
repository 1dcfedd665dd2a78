"""Update: the gradient norm and clipping factor on the device, SGD and Adam (float32 or bfloat16 moments), dense
and on slotted gradients' rows (``rnnlm.backends``).

The norm launches one kernel per parameter into one buffer of block sums, which one block adds into the
norm and the clipping factor on the device; the update kernels read the factor there, so that a training
step never waits for the device. Plain array arguments throughout: numba-cuda dispatches tuples of arrays
so slowly that fusing launches that way costs more than it saves.
"""

import math

import numpy as np
from numba import cuda

from rnnlm.backends import MIX_GOLDEN, MIX_MULTIPLIERS
from rnnlm.backends.cuda import device
from rnnlm.backends.cuda.arrays import flat
from rnnlm.backends.cuda.reductions import norm, slotted_sum_squares_kernel, sum_squares_kernel


def grad_norm(pairs, clip, clipping):
    """Each array's block sums of squares (one launch per array) into one buffer, which one block adds in a
    fixed order into the norm and the factor."""
    launches = []
    for array, slot in pairs:
        if slot is None:
            flat_array = flat(array)
            blocks, threads = device.spread(flat_array.size, device.REDUCE_THREADS)
            launches.append((sum_squares_kernel, min(blocks, 4 * device.sm_count()), threads, (flat_array,)))
        else:
            blocks, threads = device.row_grid(*array.shape)
            launches.append((slotted_sum_squares_kernel, blocks, threads, (array, slot)))
    partials = device.workspace("sums of squares", (sum(blocks for _, blocks, _, _ in launches),), np.float64)
    offset = 0
    for kernel, blocks, threads, args in launches:
        device.launch(kernel, blocks, threads, *args, partials[offset : offset + blocks])
        offset += blocks
    norm(partials, clip, clipping)


@cuda.jit
def _sgd_kernel(param, grad, lr, shrink, clipping):
    """param = shrink · param - lr · clipping[1] · grad over flat arrays (grid-stride)."""
    step = param.dtype.type(lr * clipping[1])
    k = cuda.grid(1)
    while k < param.shape[0]:
        param[k] = shrink * param[k] - step * grad[k]
        k += cuda.gridsize(1)


def sgd_update(param, grad, lr, shrink, clipping):
    """A grid-stride kernel over the flat arrays (param and grad laid out alike, C or F)."""
    out = flat(param)
    blocks, threads = device.elementwise_grid(out.size)
    device.launch(_sgd_kernel, blocks, threads, out, flat(grad), float(lr), shrink, clipping)


def sgd_updates(pairs, lr, shrink, clipping):
    """One launch per pair."""
    for param, grad in pairs:
        sgd_update(param, grad, lr, param.dtype.type(shrink), clipping)


@cuda.jit(device=True)
def _unclaim(claimed):
    """claimed[0] = 0 (no slot in use), written by one thread of the launch."""
    if cuda.blockIdx.x == 0 and cuda.threadIdx.x == 0 and cuda.threadIdx.y == 0:
        claimed[0] = 0


@cuda.jit
def _sparse_sgd_kernel(param_rows, grad_rows, slot, claimed, lr, clipping):
    """param_rows[r] -= lr · clipping[1] · grad_rows[slot[r]], then that gradient row is zeroed and slot[r] =
    -1, for the rows r with a slot; claimed[0] = 0.

    A block takes blockDim.y rows per sweep (grid-stride), x-threads along a row; every thread of the block
    runs every sweep, reads its row's slot before the sweep's barrier, and the slot is cleared after it:
    no thread clears a slot another has yet to read, and one launch suffices.
    """
    step = param_rows.dtype.type(lr * clipping[1])
    R, m = param_rows.shape
    r0 = cuda.blockIdx.x * cuda.blockDim.y
    while r0 < R:  # the same trip count for every thread of the block
        r = r0 + cuda.threadIdx.y
        s = slot[r] if r < R else -1
        cuda.syncthreads()
        if s >= 0:
            i = cuda.threadIdx.x
            while i < m:
                param_rows[r, i] -= step * grad_rows[s, i]
                grad_rows[s, i] = 0
                i += cuda.blockDim.x
            if cuda.threadIdx.x == 0:
                slot[r] = -1
        r0 += cuda.gridDim.x * cuda.blockDim.y
    _unclaim(claimed)


def sparse_sgd_update(param_rows, grad_rows, slot, claimed, lr, clipping):
    """Blocks of rows in sweeps, x-threads along a row, one launch (see ``_sparse_sgd_kernel``)."""
    blocks, threads = device.row_grid(*param_rows.shape)
    device.launch(_sparse_sgd_kernel, blocks, threads, param_rows, grad_rows, slot, claimed, float(lr), clipping)


@cuda.jit(device=True)
def _adam_element(param, gradient, moment1, moment2, k, lr_t, grad_scale, decay, beta1, rest1, beta2, rest2, eps):
    """The Adam step of element k of 1-D arrays, its gradient the value ``gradient``; rest1 = 1 - β1, rest2 =
    1 - β2."""
    g = grad_scale * gradient + decay * param[k]
    moment1[k] = beta1 * moment1[k] + rest1 * g
    moment2[k] = beta2 * moment2[k] + rest2 * g * g
    param[k] -= lr_t * moment1[k] / (math.sqrt(moment2[k]) + eps)


@cuda.jit
def _sparse_adam_kernel(param_rows, grad_rows, moment1, moment2, slot, claimed, every, lr_t, clipping, decay, beta1,
                        rest1, beta2, rest2, eps):
    """The Adam step of ``sparse_adam_update`` on the rows with a slot, and with ``every`` on the others too, on
    a zero gradient; each slotted row's gradient and slot cleared after its step, claimed[0] = 0: blockDim.y
    rows per sweep (grid-stride), x-threads along a row, slots read before the sweep's barrier and cleared
    after it, as in ``_sparse_sgd_kernel``."""
    grad_scale = param_rows.dtype.type(clipping[1])
    zero = param_rows.dtype.type(0)
    R, m = param_rows.shape
    r0 = cuda.blockIdx.x * cuda.blockDim.y
    while r0 < R:  # the same trip count for every thread of the block
        r = r0 + cuda.threadIdx.y
        s = slot[r] if r < R else -1
        cuda.syncthreads()
        if r < R and (s >= 0 or every):
            i = cuda.threadIdx.x
            while i < m:
                g = grad_rows[s, i] if s >= 0 else zero
                _adam_element(param_rows[r], g, moment1[r], moment2[r], i, lr_t, grad_scale, decay, beta1, rest1,
                              beta2, rest2, eps)
                if s >= 0:
                    grad_rows[s, i] = 0
                i += cuda.blockDim.x
            if cuda.threadIdx.x == 0 and s >= 0:
                slot[r] = -1
        r0 += cuda.gridDim.x * cuda.blockDim.y
    _unclaim(claimed)


def sparse_adam_update(param_rows, grad_rows, moment1, moment2, slot, claimed, every, lr_t, clipping, decay, beta1,
                       beta2, eps):
    """Blocks of rows in sweeps, x-threads along a row, one launch (see ``_sparse_adam_kernel``)."""
    one = param_rows.dtype.type(1)
    blocks, threads = device.row_grid(*param_rows.shape)
    device.launch(_sparse_adam_kernel, blocks, threads, param_rows, grad_rows, moment1, moment2, slot, claimed,
                  bool(every), lr_t, clipping, decay, beta1, one - beta1, beta2, one - beta2, eps)


@cuda.jit
def _adam_kernel(param, grad, moment1, moment2, lr_t, clipping, decay, beta1, rest1, beta2, rest2, eps):
    """The Adam step of ``adam_update`` on flat arrays (grid-stride); rest1 = 1 - β1, rest2 = 1 - β2."""
    grad_scale = param.dtype.type(clipping[1])
    k = cuda.grid(1)
    while k < param.shape[0]:
        _adam_element(param, grad[k], moment1, moment2, k, lr_t, grad_scale, decay, beta1, rest1, beta2, rest2, eps)
        k += cuda.gridsize(1)


def adam_update(param, grad, moment1, moment2, lr_t, clipping, decay, beta1, beta2, eps):
    """A grid-stride kernel over the flat arrays."""
    one = param.dtype.type(1)
    out = flat(param)
    blocks, threads = device.elementwise_grid(out.size)
    moments = flat(moment1), flat(moment2)
    device.launch(_adam_kernel, blocks, threads, out, flat(grad), *moments, lr_t, clipping, decay, beta1,
                  one - beta1, beta2, one - beta2, eps)


_MASK32 = np.uint64(0xFFFFFFFF)
_LOW16 = np.uint64(0xFFFF)
_EXPONENT = np.uint64(0x7F800000)
_MANTISSA = np.uint64(0x007FFFFF)
_QUIET = np.uint64(0x40)
_NONE = np.uint64(0)
_SHIFTS = (np.uint64(13), np.uint64(16), np.uint64(32))

# Bit casts, and float32 products and sums that the compiler may not fuse into FMAs (NVVM contracts a * b + c by
# default; the CPU's kernel does not): libdevice's on a GPU, numpy's scalars in the simulator, which has no
# libdevice (and whose float32 arithmetic is IEEE's, operation by operation; its math.sqrt would be float64's).
if device.SIMULATOR:
    @cuda.jit(device=True)
    def _sqrt(x):
        return np.sqrt(x)

    @cuda.jit(device=True)
    def _float32_bits(value):
        return np.uint64(np.float32(value).view(np.uint32))

    @cuda.jit(device=True)
    def _from_bf16(bits):
        return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)

    @cuda.jit(device=True)
    def _mul(a, b):
        return a * b

    @cuda.jit(device=True)
    def _add(a, b):
        return a + b
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _sqrt(x):
        return math.sqrt(x)

    @cuda.jit(device=True)
    def _float32_bits(value):
        return np.uint64(np.uint32(libdevice.float_as_int(value)))

    @cuda.jit(device=True)
    def _from_bf16(bits):
        return libdevice.int_as_float(np.int32(np.uint32(bits) << np.uint32(16)))

    @cuda.jit(device=True)
    def _mul(a, b):
        return libdevice.fmul_rn(a, b)

    @cuda.jit(device=True)
    def _add(a, b):
        return libdevice.fadd_rn(a, b)


@cuda.jit(device=True)
def _mix(x):
    """murmur3's fmix32 of a uint64 x < 2³² (``rnnlm.backends``)."""
    x ^= x >> _SHIFTS[1]
    x = (x * MIX_MULTIPLIERS[0]) & _MASK32
    x ^= x >> _SHIFTS[0]
    x = (x * MIX_MULTIPLIERS[1]) & _MASK32
    x ^= x >> _SHIFTS[1]
    return x


@cuda.jit(device=True)
def _to_bf16(value, u):
    """The stochastic rounding bf16(value, u) of ``rnnlm.backends`` (u < 2¹⁶), as a uint64 below 2¹⁶."""
    bits = _float32_bits(value)
    if (bits & _EXPONENT) == _EXPONENT:
        return (bits >> _SHIFTS[1]) | (_QUIET if bits & _MANTISSA else _NONE)
    return (bits + u) >> _SHIFTS[1]


@cuda.jit(device=True)
def _adam_element_bf16(param, gradient, moment1, moment2, k, index, step_mix, lr_t, grad_scale, decay, beta1, rest1,
                       beta2, rest2, eps):
    """The Adam step of element k of 1-D arrays with bfloat16 moments, its gradient the value ``gradient``; index:
    its flat index (uint64) for the random bits r(t, index) of ``rnnlm.backends``."""
    g = _add(_mul(grad_scale, gradient), _mul(decay, param[k]))
    m1 = _add(_mul(beta1, _from_bf16(moment1[k])), _mul(rest1, g))
    m2 = _add(_mul(beta2, _from_bf16(moment2[k])), _mul(_mul(rest2, g), g))
    param[k] -= lr_t * m1 / (_sqrt(m2) + eps)
    r = _mix((((index & _MASK32) * MIX_GOLDEN) & _MASK32) ^ step_mix ^ (index >> _SHIFTS[2]))
    moment1[k] = _to_bf16(m1, r & _LOW16)
    moment2[k] = _to_bf16(m2, r >> _SHIFTS[1])


@cuda.jit
def _adam_bf16_kernel(param, grad, moment1, moment2, t, lr_t, clipping, decay, beta1, rest1, beta2, rest2, eps):
    """The Adam step of ``adam_update_bf16`` on flat arrays (grid-stride)."""
    grad_scale = param.dtype.type(clipping[1])
    step_mix = _mix(np.uint64(t) & _MASK32)
    k = cuda.grid(1)
    while k < param.shape[0]:
        _adam_element_bf16(param, grad[k], moment1, moment2, k, np.uint64(k), step_mix, lr_t, grad_scale, decay, beta1,
                           rest1, beta2, rest2, eps)
        k += cuda.gridsize(1)


def adam_update_bf16(param, grad, moment1, moment2, t, lr_t, clipping, decay, beta1, beta2, eps):
    """A grid-stride kernel over the flat arrays."""
    one = param.dtype.type(1)
    out = flat(param)
    blocks, threads = device.elementwise_grid(out.size)
    moments = flat(moment1), flat(moment2)
    device.launch(_adam_bf16_kernel, blocks, threads, out, flat(grad), *moments, int(t), lr_t, clipping, decay, beta1,
                  one - beta1, beta2, one - beta2, eps)


@cuda.jit
def _sparse_adam_bf16_kernel(param_rows, grad_rows, moment1, moment2, slot, claimed, every, t, lr_t, clipping, decay,
                             beta1, rest1, beta2, rest2, eps):
    """The Adam step of ``sparse_adam_update_bf16``, rows swept as in ``_sparse_adam_kernel``."""
    grad_scale = param_rows.dtype.type(clipping[1])
    zero = param_rows.dtype.type(0)
    step_mix = _mix(np.uint64(t) & _MASK32)
    R, m = param_rows.shape
    r0 = cuda.blockIdx.x * cuda.blockDim.y
    while r0 < R:  # the same trip count for every thread of the block
        r = r0 + cuda.threadIdx.y
        s = slot[r] if r < R else -1
        cuda.syncthreads()
        if r < R and (s >= 0 or every):
            i = cuda.threadIdx.x
            while i < m:
                g = grad_rows[s, i] if s >= 0 else zero
                _adam_element_bf16(param_rows[r], g, moment1[r], moment2[r], i,
                                   np.uint64(r) * np.uint64(m) + np.uint64(i), step_mix, lr_t, grad_scale, decay,
                                   beta1, rest1, beta2, rest2, eps)
                if s >= 0:
                    grad_rows[s, i] = 0
                i += cuda.blockDim.x
            if cuda.threadIdx.x == 0 and s >= 0:
                slot[r] = -1
        r0 += cuda.gridDim.x * cuda.blockDim.y
    _unclaim(claimed)


def sparse_adam_update_bf16(param_rows, grad_rows, moment1, moment2, slot, claimed, every, t, lr_t, clipping, decay,
                            beta1, beta2, eps):
    """Blocks of rows in sweeps, x-threads along a row, one launch (see ``_sparse_adam_bf16_kernel``)."""
    one = param_rows.dtype.type(1)
    blocks, threads = device.row_grid(*param_rows.shape)
    device.launch(_sparse_adam_bf16_kernel, blocks, threads, param_rows, grad_rows, moment1, moment2, slot, claimed,
                  bool(every), int(t), lr_t, clipping, decay, beta1, one - beta1, beta2, one - beta2, eps)


@cuda.jit(device=True)
def _power(x, n):
    """xⁿ for an integer n ≥ 1 by repeated squaring (the CPU's products, in its order)."""
    result = x
    n -= 1
    while n > 0:
        if n & 1:
            result *= x
        x *= x
        n >>= 1
    return result


@cuda.jit
def _decay_rows_kernel(param_rows, start_rows, keep_rows, rows, powers):
    """The pull of ``decay_rows``: blockDim.y listed rows per sweep (grid-stride), x-threads along a row."""
    m = param_rows.shape[1]
    j = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    while j < rows.shape[0]:
        r = rows[j]
        i = cuda.threadIdx.x
        while i < m:
            keep = _power(keep_rows[r, i], powers[j])
            param_rows[r, i] = start_rows[r, i] + keep * (param_rows[r, i] - start_rows[r, i])
            i += cuda.blockDim.x
        j += cuda.gridDim.x * cuda.blockDim.y


def decay_rows(param_rows, start_rows, keep_rows, rows, powers):
    """Blocks of listed rows in sweeps, x-threads along a row, one launch (see ``_decay_rows_kernel``)."""
    blocks, threads = device.row_grid(rows.shape[0], param_rows.shape[1])
    device.launch(_decay_rows_kernel, blocks, threads, param_rows, start_rows, keep_rows, rows, powers)


@cuda.jit
def _pulled_rms_kernel(param, grad, start, keep, moment2, lr, clipping, eps):
    """The pull and step of ``pulled_rms_update`` on flat arrays (grid-stride)."""
    grad_scale = param.dtype.type(clipping[1])
    k = cuda.grid(1)
    while k < param.shape[0]:
        pulled = start[k] + keep[k] * (param[k] - start[k])
        param[k] = pulled - lr * (grad_scale * grad[k]) / (math.sqrt(moment2[k]) + eps)
        k += cuda.gridsize(1)


def pulled_rms_update(param, grad, start, keep, moment2, lr, clipping, eps):
    """A grid-stride kernel over the flat arrays."""
    out = flat(param)
    blocks, threads = device.elementwise_grid(out.size)
    device.launch(_pulled_rms_kernel, blocks, threads, out, flat(grad), flat(start), flat(keep), flat(moment2), lr,
                  clipping, eps)
