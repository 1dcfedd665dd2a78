"""The numba-cuda coupling of the CUDA backend: launching kernels, device arrays, workspaces, launch geometry.

Every use of numba-cuda beyond ``cuda.jit`` and the kernels' own API (``cuda.grid``, shared and local
arrays) is here. Two of them reach into numba-cuda's internals, written against the versions that
``NUMBA_CUDA`` names (pyproject.toml's extras pin the same range; tests/test_backend_contract.py checks
that they agree):

- ``launch`` skips numba-cuda's per-call typing and argument marshalling. The first launch of a kernel
  with arguments of given kinds goes through numba (compiling it); later ones pass the compiled kernel
  (``overload._codelibrary.get_cufunc().kernel``, ``overload.cooperative``) and its parameters, laid out as
  numba lays them out (``DeviceArray.launch_params``), to cuda.core's ``launch`` on the default stream
  (``driver._to_core_stream(0)``; ``numba.cuda._compat.CUDA_CORE_GE_1_0`` names the cooperative flag).
  numba-cuda's own launch costs tens of microseconds of host time, which bounds a training step at small
  sizes, where a step is a few dozen launches of kernels that each run for microseconds.
- ``DeviceArray`` subclasses ``DeviceNDArray``: its transpose is a view, as a numpy array's is (numba's
  ``.T`` launches a transpose kernel into a new array; ``rnnlm.step`` keeps W_x column-major as
  ``asarray(W_xᵀ).T``), and its transposes, reshapes and slices are built once and kept (building a view
  costs numba-cuda tens of microseconds of host time, and a step asks for the same views at every window).

Under the simulator (NUMBA_ENABLE_CUDASIM=1) ``launch`` is numba's own launch and arrays are the
simulator's, whose transposes already are views.
"""

import functools

import numpy as np
from numba import config, cuda

NUMBA_CUDA = ">=0.30,<0.31"  # the numba-cuda releases whose internals launch and DeviceArray use
SIMULATOR = bool(config.ENABLE_CUDASIM)
ELEMENTWISE_THREADS = 256
REDUCE_THREADS = 256  # threads of a block that reduces
PER_THREAD = 4  # elements a thread of a grid-stride or reducing kernel takes at least, before more threads


# ---------------------------------------------------------------------------------------- launch geometry


def blocks(n, threads):
    """⌈n / threads⌉."""
    return (n + threads - 1) // threads


def threads(n, cap):
    """The smallest power of two ≥ n, at most ``cap``: small problems (the simulator's) get small blocks."""
    return min(cap, 1 << max(0, int(n) - 1).bit_length())


def spread(n, cap):
    """(blocks, threads per block ≤ cap) covering n elements, PER_THREAD or more per thread."""
    n_threads = threads(blocks(n, PER_THREAD), cap)
    return max(1, blocks(n, PER_THREAD * n_threads)), n_threads


def elementwise_grid(n):
    """(blocks, threads) for a grid-stride loop over n elements: a few waves of blocks at most."""
    n_blocks, n_threads = spread(n, ELEMENTWISE_THREADS)
    return min(n_blocks, 32 * sm_count()), n_threads


def row_grid(R, m):
    """(blocks, (tx, ty)) for kernels over rows (R, m): x-threads along a row, y-threads over rows."""
    tx = threads(m, 32)
    n_blocks, ty = spread(R, REDUCE_THREADS // tx)
    return min(n_blocks, 4 * sm_count()), (tx, ty)


@functools.cache
def sm_count():
    """Streaming multiprocessors of the GPU; the simulator has no such attribute and counts as one."""
    return getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1)


def inlined(function):
    """A device function that NVVM inlines into every caller (``forceinline``; the simulator takes no such
    option): for the pieces of a kernel's hot loop that are written as functions of their own."""
    return cuda.jit(device=True, **({} if SIMULATOR else {"forceinline": True}))(function)


def launch_bounds(max_threads, min_blocks=1):
    """jit options that cap a kernel's registers so that min_blocks blocks of max_threads fit on an SM.

    Empty under the simulator, which takes no launch bounds (and has no registers).
    """
    return {} if SIMULATOR else {"launch_bounds": (max_threads, min_blocks)}


# ---------------------------------------------------------------------------------------- launching

if SIMULATOR:

    def launch(kernel, griddim, blockdim, *args):
        """kernel[griddim, blockdim](*args)."""
        kernel[griddim, blockdim](*args)

else:
    import ctypes

    from cuda.core import LaunchConfig
    from cuda.core import launch as core_launch
    from numba.cuda import types as nb_types
    from numba.cuda._compat import CUDA_CORE_GE_1_0
    from numba.cuda.cudadrv import driver

    _SCALARS = {nb_types.float32: ctypes.c_float, nb_types.float64: ctypes.c_double, nb_types.int64: ctypes.c_int64,
                nb_types.int32: ctypes.c_int32, nb_types.uint8: ctypes.c_uint8}
    _prepared = {}  # (kernel, argument kinds) -> (compiled kernel, cooperative, ctypes per scalar) or None
    _configs = {}

    def _kind(arg):
        """What selects the compiled kernel for an argument: a device array's numba type, else its Python type."""
        return getattr(arg, "_numba_type_", None) or type(arg)

    def _prepare(kernel, args):
        """(compiled kernel, cooperative, per argument: None for a device array, else its ctypes type), or None
        when an argument is neither (numba's own launch then handles it)."""
        overload = kernel.overloads.get(tuple(kernel.typeof_pyval(a) for a in args))
        if overload is None:
            return None
        packers = []
        for arg, ty in zip(args, overload.argument_types, strict=True):
            if isinstance(ty, nb_types.Array) and isinstance(arg, DeviceArray):
                packers.append(None)
            elif ty in _SCALARS:
                packers.append(_SCALARS[ty])
            else:
                return None
        return overload._codelibrary.get_cufunc().kernel, overload.cooperative, packers

    def _launch_config(griddim, blockdim, cooperative):
        key = (griddim, blockdim, cooperative)
        launch_config = _configs.get(key)
        if launch_config is None:
            flag = "is_cooperative" if CUDA_CORE_GE_1_0 else "cooperative_launch"  # as numba-cuda builds it
            launch_config = _configs[key] = LaunchConfig(grid=griddim, block=blockdim, **{flag: cooperative})
        return launch_config

    def launch(kernel, griddim, blockdim, *args):
        """kernel[griddim, blockdim](*args), without numba-cuda's per-call typing and argument marshalling."""
        key = (kernel, *map(_kind, args))
        entry = _prepared.get(key, False)
        if entry is False:
            kernel[griddim, blockdim](*args)
            _prepared[key] = _prepare(kernel, args)
            return
        if entry is None:
            kernel[griddim, blockdim](*args)
            return
        compiled, cooperative, packers = entry
        params = []
        for arg, pack in zip(args, packers, strict=True):
            if pack is None:
                params += arg.launch_params
            else:
                params.append(pack(arg))
        core_launch(_default_stream(), _launch_config(griddim, blockdim, cooperative), compiled, *params)

    @functools.cache
    def _default_stream():
        return driver._to_core_stream(0)


# ---------------------------------------------------------------------------------------- device arrays

if SIMULATOR:
    import sys
    import threading

    from numba.core.types import Type
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    from numba.np.numpy_support import as_dtype

    _shared_lock = threading.Lock()

    def _shared_array(self, shape, dtype, alignment=None):
        """The simulator's cuda.shared.array, one array per call site and block, allocated under a lock.

        numba-cuda's own looks its call site up and stores a new array without a lock, and the stack walk in
        between invites a thread switch: two threads of a block could then get different arrays, and a
        kernel's result would depend on the interleaving of the simulator's threads.
        """
        if alignment is not None or shape == 0:
            raise NotImplementedError("the backend's kernels use static, unaligned shared arrays in the simulator")
        caller = sys._getframe(1)
        key = caller.f_code.co_filename, caller.f_lineno
        with _shared_lock:
            array = self._allocations.get(key)
            if array is None:
                array = self._allocations[key] = np.empty(shape, as_dtype(dtype) if isinstance(dtype, Type) else dtype)
        return array

    FakeCUDAShared.array = _shared_array

    def viewing(array):
        """The simulator's arrays wrap numpy arrays: their transposes already are views."""
        return array

else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    def _index_key(item):
        """A hashable stand-in for an index (slices are unhashable before Python 3.12)."""
        if isinstance(item, slice):
            return "slice", item.start, item.stop, item.step
        if isinstance(item, tuple):
            return tuple(map(_index_key, item))
        return item

    class DeviceArray(DeviceNDArray):
        """A device array whose transpose is a view and whose views are built once (see the module's text).
        Slices and reshapes keep the class (numba builds them with ``type(self)``)."""

        @functools.cached_property
        def _views(self):
            return {}

        @functools.cached_property
        def launch_params(self):
            """The array as a kernel parameter, as numba-cuda passes it: meminfo, parent, size, itemsize, data
            pointer, shape, strides (bytes)."""
            pointer = self.device_ctypes_pointer.value or 0
            return (0, 0, self.size, self.dtype.itemsize, pointer, *self.shape, *self.strides)

        def _view(self, key, build):
            """The view cached under key, built by build() the first time (an element, which is a copy of a
            value and not an array, is not kept)."""
            view = self._views.get(key)
            if view is None:
                view = build()
                if isinstance(view, DeviceNDArray):
                    self._views[key] = view
            return view

        def transpose(self, axes=None):
            if self.ndim != 2 or (axes is not None and tuple(axes) != (1, 0)):
                raise NotImplementedError("only 2-D device arrays are transposed (as views)")
            return self._view("T", lambda: DeviceArray(
                self.shape[::-1], self.strides[::-1], self.dtype, self.stream, self.gpu_data))

        def reshape(self, *newshape, **kws):
            key = "reshape", newshape, tuple(sorted(kws.items()))
            return self._view(key, lambda: DeviceNDArray.reshape(self, *newshape, **kws))

        def __getitem__(self, item):
            return self._view(_index_key(item), lambda: DeviceNDArray.__getitem__(self, item))

    def viewing(array):
        """``array`` as a DeviceArray sharing its memory."""
        return DeviceArray(array.shape, array.strides, array.dtype, array.stream, array.gpu_data)


def device_array(shape, dtype):
    """An uninitialized device array."""
    return viewing(cuda.device_array(shape, dtype))


def to_device(array):
    """A device array holding a copy of the C-contiguous host array ``array``."""
    return viewing(cuda.to_device(array))


def synchronize():
    """Wait until the device finished all work launched so far."""
    cuda.synchronize()


_workspaces = {}


def workspace(purpose, shape, dtype):
    """A device scratch array kept across calls, one per (purpose, shape, dtype).

    Reusing it is safe because every kernel runs on the default stream: the next user of a workspace
    starts after the last one finished. It spares a cudaMalloc (and numba's deferred, synchronizing
    cudaFree) per training step.
    """
    key = (purpose, tuple(shape), np.dtype(dtype))
    array = _workspaces.get(key)
    if array is None:
        array = _workspaces[key] = device_array(shape, dtype)
    return array
