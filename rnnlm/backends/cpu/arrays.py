"""Arrays: numpy arrays themselves, C-ordered; copies, zeros, and nothing to wait for."""

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


def copy_into(src, dst):
    """numpy's assignment."""
    dst[...] = src


def synchronize():
    """Nothing to wait for: CPU work is synchronous."""
