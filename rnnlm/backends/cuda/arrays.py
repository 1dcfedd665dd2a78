"""Arrays: host-device copies, zeros, and the flat views and grid-stride kernels that treat every element alike.

Backend arrays are ``device.DeviceArray``s (the simulator's own arrays under NUMBA_ENABLE_CUDASIM=1).
"""

import numpy as np
from numba import cuda

from rnnlm.backends.cuda import device


def asarray(array, dtype=None):
    """A host array copied to the device, C-contiguous."""
    return device.to_device(np.ascontiguousarray(array, dtype=dtype))


def to_numpy(array):
    """Copied from the device."""
    return array.copy_to_host()


def zeros(shape, dtype=np.float32):
    """Allocated, then filled by a kernel."""
    array = device.device_array(shape, dtype)
    fill(array, 0)
    return array


def copy_into(src, dst):
    """A host ``src`` (any layout) is copied to the device; a device ``src`` laid out like dst is copied by
    a kernel (numba-cuda's device-to-device copy costs several times a launch in host time)."""
    if isinstance(src, np.ndarray):
        dst.copy_to_device(np.asarray(src, dtype=dst.dtype))
        return
    out = flat(dst)
    blocks, threads = device.elementwise_grid(out.size)
    device.launch(_copy_kernel, blocks, threads, flat(src), out)


def synchronize():
    """Waits until the device finished all work launched so far."""
    device.synchronize()


def flat(array):
    """A 1-D view of a C- or F-contiguous device array, for kernels that treat every element alike."""
    if array.ndim == 2 and not array.flags["C_CONTIGUOUS"]:
        array = array.T
    return array.reshape(array.size)


@cuda.jit
def _fill_kernel(out, value):
    """out[:] = value (grid-stride)."""
    k = cuda.grid(1)
    while k < out.shape[0]:
        out[k] = value
        k += cuda.gridsize(1)


@cuda.jit
def _copy_kernel(src, dst):
    """dst[:] = src[:] over flat arrays (grid-stride)."""
    k = cuda.grid(1)
    while k < dst.shape[0]:
        dst[k] = src[k]
        k += cuda.gridsize(1)


def fill(array, value):
    """array[...] = value."""
    out = flat(array)
    blocks, threads = device.elementwise_grid(out.size)
    device.launch(_fill_kernel, blocks, threads, out, value)
