"""Arrays: numpy arrays themselves, C-ordered; copies, zeros, releasable zeros, and nothing to wait for."""

import mmap

import numpy as np


def asarray(array, dtype=None):
    """A C-ordered numpy copy."""
    return np.array(array, dtype=dtype, order="C")


def to_numpy(array):
    """A numpy copy."""
    return np.array(array)


def zeros(shape, dtype=np.float32):
    """np.zeros."""
    return np.zeros(shape, dtype)


def releasable_zeros(shape, dtype=np.float32):
    """A numpy array over an anonymous private mapping of its own, advised against huge pages (numpy asks for
    them on large arrays, and one row written would then make 2 MiB resident)."""
    count = int(np.prod(shape))
    mapping = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mapping, dtype, count).reshape(shape)


def release(array):
    """madvise(MADV_DONTNEED) over the whole mapping under ``array``: a private anonymous page read after it
    is a fresh zero page."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    mapping = base.obj if isinstance(base, memoryview) else base
    if not isinstance(mapping, mmap.mmap):
        raise TypeError("release takes an array from releasable_zeros")
    mapping.madvise(mmap.MADV_DONTNEED)


def copy_into(src, dst):
    """numpy's assignment."""
    dst[...] = src


def synchronize():
    """Nothing to wait for: CPU work is synchronous."""
