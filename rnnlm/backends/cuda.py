"""CUDA backend: ``numba.cuda`` kernels on device arrays, the twin of ``cpu.py`` function for function.

Arrays are numba device arrays, C-contiguous except W_x and its gradient, which ``rnnlm.step`` keeps
column-major as transposed views; float32 in training (float64 works too, for the gradient checks);
token ids are int32. Everything runs on the default stream, so kernels follow each other in launch
order; only the scalars a caller asks for (a loss, a sum of squares) come back to the host.

Kernels whose shared or local arrays need a compile-time element type are built by small factories
cached per dtype (and per tile constant). Every sum runs in a fixed order, without floating-point
atomics: results do not change from run to run.

- GEMMs: one shared-memory kernel, a 128 x 128 output tile per block of 256 threads, each thread an 8 x 8
  register micro-tile in runs of four rows and columns that it reads from shared memory as 16-byte vectors
  (32 x 32 tiles of 64 threads for products with ≤ 32 rows or columns), k staged 16 at a time with the
  next slice prefetched into registers; the transpose cases differ only in how a tile is read from global
  memory. Products with few output tiles and a long k split k over blocks (partial products in a
  workspace, then summed in order).
- Recurrence: one persistent launch for the whole window, forward and backward alike. Up to m = 900 (and
  beyond 32 streams) a block owns a few streams for all T steps, a thread one state unit, the block's
  states staged in shared memory: each block reads all of W_s at every step. From m = 900 with few
  streams the blocks split the state units instead and meet at a grid-wide barrier after each step (a
  cooperative launch), so that W_s is read once per step over the whole GPU.
- Softmax: one block per row, an online max/sum in one pass, the gradient in a second.
- Scatter-adds (W_x's columns by input token, the class softmax's W_o rows by class): the positions of
  each key are linked into a list on the device, and one thread sums each list in position order.
- Optimizer: the gradient norm launches one kernel per parameter into one buffer of block sums, which
  one block adds into the norm and the clipping factor on the device; the update kernels read the factor
  there.

Host time, not the device's, bounds a training step at small sizes (m=200, B=20: about 27 launches of
kernels that each run for microseconds). So: no host synchronization inside a step (the loss comes back
as a ``DeviceSum`` that the caller reads once the whole step is queued, and the host's launches overlap
the device's work); kernels launched through ``_launch``, which skips numba-cuda's per-call typing and
argument marshalling (measured on an H100: 19 µs against 34–53 µs for a five-argument kernel); and device
arrays that keep their views and their kernel parameters, since numba-cuda builds a view in tens of
microseconds. Plain array arguments throughout: numba-cuda dispatched tuples of arrays so slowly that
fusing launches that way cost more than it saved.

Hot loops are ``while`` loops and tile offsets come from shifts and masks: numba's ``range`` lowering and
signed floor division keep LLVM from proving indices non-negative, and then every array access carries
numba's negative-index wraparound and the loop's address arithmetic is not strength-reduced.
"""

import functools
import math

import numpy as np
from numba import config, cuda, float64, from_dtype

name = "cuda"

_REDUCE_THREADS = 256  # threads of a block that reduces
_FAN_IN = 16  # partial results a thread merges per level of a block's reduction tree
_ELEMENTWISE_THREADS = 256


# ---------------------------------------------------------------------------------------- launch helpers


def _blocks(n, threads):
    return (n + threads - 1) // threads


def _threads(n, cap):
    """The smallest power of two ≥ n, at most ``cap``: small problems (the simulator's) get small blocks."""
    return min(cap, 1 << max(0, int(n) - 1).bit_length())


_PER_THREAD = 4  # elements a thread of a grid-stride or reducing kernel takes at least, before more threads


def _spread(n, cap):
    """(blocks, threads per block ≤ cap) covering n elements, _PER_THREAD or more per thread."""
    threads = _threads(_blocks(n, _PER_THREAD), cap)
    return max(1, _blocks(n, _PER_THREAD * threads)), threads


@functools.cache
def _sm_count():
    """Streaming multiprocessors of the GPU; the simulator has no such attribute and counts as one."""
    return getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1)


def _launch_bounds(max_threads, min_blocks=1):
    """jit options that cap a kernel's registers so that min_blocks blocks of max_threads fit on an SM.

    Empty under the simulator, which takes no launch bounds (and has no registers).
    """
    return {} if config.ENABLE_CUDASIM else {"launch_bounds": (max_threads, min_blocks)}


if config.ENABLE_CUDASIM:

    def _launch(kernel, griddim, blockdim, *args):
        """kernel[griddim, blockdim](*args)."""
        kernel[griddim, blockdim](*args)

else:
    import ctypes

    from cuda.core import LaunchConfig, launch
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
            if isinstance(ty, nb_types.Array) and isinstance(arg, _DeviceArray):
                packers.append(None)
            elif ty in _SCALARS:
                packers.append(_SCALARS[ty])
            else:
                return None
        return overload._codelibrary.get_cufunc().kernel, overload.cooperative, packers

    def _launch(kernel, griddim, blockdim, *args):
        """kernel[griddim, blockdim](*args), without numba-cuda's per-call typing and argument marshalling.

        numba-cuda spends tens of microseconds of host time per launch (measured on an H100 for a
        five-argument kernel: 34 and 53 µs in two runs, against 19 µs through here), which bounds a training
        step at small sizes. The first launch of a kernel
        with arguments of given types goes through numba (compiling it); later ones pass the compiled
        kernel and its parameters, laid out as numba lays them out (see ``_DeviceArray.launch_params``), to
        cuda.core's launch on the default stream.
        """
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
        config_key = (griddim, blockdim, cooperative)
        launch_config = _configs.get(config_key)
        if launch_config is None:
            flag = "is_cooperative" if CUDA_CORE_GE_1_0 else "cooperative_launch"  # as numba-cuda builds it
            launch_config = _configs[config_key] = LaunchConfig(grid=griddim, block=blockdim, **{flag: cooperative})
        launch(_default_stream(), launch_config, compiled, *params)

    @functools.cache
    def _default_stream():
        return driver._to_core_stream(0)


_workspaces = {}


def _workspace(purpose, shape, dtype):
    """A device scratch array kept across calls, one per (purpose, shape, dtype).

    Reusing it is safe because every kernel runs on the default stream: the next user of a workspace
    starts after the last one finished. It spares a cudaMalloc (and numba's deferred, synchronizing
    cudaFree) per training step.
    """
    key = (purpose, tuple(shape), np.dtype(dtype))
    array = _workspaces.get(key)
    if array is None:
        array = _workspaces[key] = _viewing(cuda.device_array(shape, dtype))
    return array


# ---------------------------------------------------------------------------------------- arrays

if config.ENABLE_CUDASIM:

    def _viewing(array):
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

    class _DeviceArray(DeviceNDArray):
        """A device array whose transpose is a view, as a numpy array's is, and whose views are built once.

        numba's ``DeviceNDArray.T`` launches a transpose kernel into a new array; ``rnnlm.step`` keeps
        W_x column-major as ``asarray(W_xᵀ).T`` and updates it through ``W_x.T``, which need views.
        Building a view costs numba-cuda tens of microseconds of host time, and a training step asks for
        the same views of the same buffers at every window: each transpose, reshape and slice is kept on
        the array it was taken from. Slices and reshapes keep the class (numba builds them with
        ``type(self)``).
        """

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
            return self._view("T", lambda: _DeviceArray(
                self.shape[::-1], self.strides[::-1], self.dtype, self.stream, self.gpu_data))

        def reshape(self, *newshape, **kws):
            key = "reshape", newshape, tuple(sorted(kws.items()))
            return self._view(key, lambda: DeviceNDArray.reshape(self, *newshape, **kws))

        def __getitem__(self, item):
            return self._view(_index_key(item), lambda: DeviceNDArray.__getitem__(self, item))

    def _viewing(array):
        """``array`` as a _DeviceArray sharing its memory."""
        return _DeviceArray(array.shape, array.strides, array.dtype, array.stream, array.gpu_data)


def asarray(array, dtype=None):
    """A C-contiguous device array holding a copy of the host array ``array``."""
    return _viewing(cuda.to_device(np.ascontiguousarray(array, dtype=dtype)))


def to_numpy(array):
    """A numpy copy of a device array."""
    return array.copy_to_host()


def zeros(shape, dtype=np.float32):
    array = _viewing(cuda.device_array(shape, dtype))
    _fill(array, 0)
    return array


def copy_into(src, dst):
    """dst[...] = src; src a host array (any layout) or a device array laid out like dst (copied by a
    kernel: numba-cuda's device-to-device copy costs several times a launch in host time)."""
    if isinstance(src, np.ndarray):
        dst.copy_to_device(np.asarray(src, dtype=dst.dtype))
        return
    flat = _flat(dst)
    blocks, threads = _elementwise_grid(flat.size)
    _launch(_copy_kernel, blocks, threads, _flat(src), flat)


def synchronize():
    """Wait until the device finished all work launched so far."""
    cuda.synchronize()


def _flat(array):
    """A 1-D view of a C- or F-contiguous device array, for kernels that treat every element alike."""
    if array.ndim == 2 and not array.flags["C_CONTIGUOUS"]:
        array = array.T
    return array.reshape(array.size)


def _elementwise_grid(n):
    """(blocks, threads) for a grid-stride loop over n elements: a few waves of blocks at most."""
    blocks, threads = _spread(n, _ELEMENTWISE_THREADS)
    return min(blocks, 32 * _sm_count()), threads


@cuda.jit
def _fill_kernel(flat, value):
    """flat[:] = value (grid-stride)."""
    k = cuda.grid(1)
    while k < flat.shape[0]:
        flat[k] = value
        k += cuda.gridsize(1)


@cuda.jit
def _copy_kernel(src, dst):
    """dst[:] = src[:] over flat arrays (grid-stride)."""
    k = cuda.grid(1)
    while k < dst.shape[0]:
        dst[k] = src[k]
        k += cuda.gridsize(1)


def _fill(array, value):
    flat = _flat(array)
    blocks, threads = _elementwise_grid(flat.size)
    _launch(_fill_kernel, blocks, threads, flat, value)


# ---------------------------------------------------------------------------------------- GEMMs


class _Tile:
    """A GEMM blocking: block tile (BM x BM outputs), k-slice BK, micro-tile TM x TM per thread.

    All powers of two. Derived: the block's (BM/TM)² threads, the elements of each operand's tile a
    thread stages, and the padded shared row width (a multiple of _VECTOR, so that rows stay aligned
    for vector loads, and not of 32, which spreads a warp's transposing stores of a k-contiguous tile
    over several banks).
    """

    def __init__(self, BM, BK, TM):
        self.BM, self.BK, self.TM = BM, BK, TM
        self.grid = BM // TM
        self.threads = self.grid * self.grid
        self.loads = BM * BK // self.threads
        self.width = BM + _VECTOR
        self.size = BK * self.width


_VECTOR = 4  # values a thread reads at once from a shared tile (one 16-byte load in float32)
_LARGE_TILE = _Tile(BM=128, BK=16, TM=8)  # 256 threads
_SMALL_TILE = _Tile(BM=32, BK=16, TM=4)  # 64 threads, for products with ≤ 32 rows or columns
_MIN_K_PER_SPLIT = 64  # shortest k-range worth a block of its own when k is split (4 slices)


def _shift(n):
    return n.bit_length() - 1


@functools.cache
def _tile_loader(tile, k_contiguous):
    """Device functions staging a (BM rows × BK) slice of an operand into a flat shared tile (k-major).

    The operand X is op(A) (rows i) or op(B)ᵀ (rows j): with ``k_contiguous`` element (row, k) is
    X[row, k], else X[k, row]. Consecutive threads read consecutive addresses in both layouts: in a
    k-contiguous operand a thread stages one k of rows row, row + threads/BK, ...; in the other one row
    at k, k + threads/BM, ... (its ``origin`` is its first element's (row, k) in the tile).
    """
    BM, BK, width, loads = tile.BM, tile.BK, tile.width, tile.loads
    BM_shift, BK_shift = _shift(BM), _shift(BK)
    row_step = tile.threads // BK if k_contiguous else 0
    k_step = 0 if k_contiguous else tile.threads // BM

    @cuda.jit(device=True)
    def origin():
        tid = cuda.threadIdx.x
        if k_contiguous:
            return tid >> BK_shift, tid & (BK - 1)
        return tid & (BM - 1), tid >> BM_shift

    @cuda.jit(device=True)
    def load(X, regs, i, k, n_rows, k_end):
        """regs[e] = X(i + e · row_step, k + e · k_step), 0 outside the operand or the k-range."""
        for e in range(loads):
            i_e, k_e = i + e * row_step, k + e * k_step
            if i_e < n_rows and k_e < k_end:
                regs[e] = X[i_e, k_e] if k_contiguous else X[k_e, i_e]
            else:
                regs[e] = 0

    @cuda.jit(device=True)
    def store(regs, tile, row, kk):
        for e in range(loads):
            tile[(kk + e * k_step) * width + row + e * row_step] = regs[e]

    return origin, load, store


@functools.cache
def _gemm_kernel(dtype, tile, a_k_contiguous, b_k_contiguous):
    """C[s] = op(A)[:, ks] op(B)[ks, :] over the k-range ks of split s, for one float dtype and layout.

    op(A) (n, K) is A (n, K) when ``a_k_contiguous`` else Aᵀ with A (K, n); op(B) (K, p) is Bᵀ with
    B (p, K) when ``b_k_contiguous`` else B (K, p). C (splits, n, p). Grid (⌈p/BM⌉, ⌈n/BM⌉, splits),
    tile.threads threads; thread (tx, ty) of the (BM/TM)² grid owns TM rows and TM columns of the block's
    tile in runs of _VECTOR: rows _VECTOR·ty + (BM/TM)·_VECTOR·g + v (g < TM/_VECTOR, v < _VECTOR), the
    columns likewise with tx. Each run is one aligned vector load from a shared tile, and a warp's loads
    are broadcasts (A) or contiguous (B).
    """
    dt = from_dtype(np.dtype(dtype))
    BM, BK, TM, grid_m, width, size, loads = (tile.BM, tile.BK, tile.TM, tile.grid, tile.width, tile.size, tile.loads)
    grid_shift = _shift(grid_m)
    VEC, run_stride = _VECTOR, grid_m * _VECTOR  # a run's length; from one of a thread's runs to the next
    vec_shift = _shift(VEC)
    RUNS = TM // VEC
    vector_bytes = None if config.ENABLE_CUDASIM else VEC * np.dtype(dtype).itemsize  # the simulator takes none
    origin_A, load_A, store_A = _tile_loader(tile, a_k_contiguous)
    origin_B, load_B, store_B = _tile_loader(tile, b_k_contiguous)

    # Two float32 blocks per SM: the large tile then fits in 128 registers (ptxas would take ~135);
    # float64 (the gradient checks') would spill.
    @cuda.jit(**_launch_bounds(tile.threads, 2 if np.dtype(dtype).itemsize == 4 else 1))
    def gemm(A, B, C, K, k_chunk):
        n, p = C.shape[1], C.shape[2]
        tile_A = cuda.shared.array(size, dt, alignment=vector_bytes)
        tile_B = cuda.shared.array(size, dt, alignment=vector_bytes)
        regs_A = cuda.local.array(loads, dt)
        regs_B = cuda.local.array(loads, dt)
        frag_A = cuda.local.array(TM, dt)
        frag_B = cuda.local.array(TM, dt)
        acc = cuda.local.array((TM, TM), dt)
        for r in range(TM):
            for c in range(TM):
                acc[r, c] = 0
        tx = cuda.threadIdx.x & (grid_m - 1)
        ty = (cuda.threadIdx.x >> grid_shift) & (grid_m - 1)
        row0 = cuda.blockIdx.y * BM
        col0 = cuda.blockIdx.x * BM
        split = cuda.blockIdx.z
        k_begin = split * k_chunk
        k_end = min(K, k_begin + k_chunk)
        row_A, kk_A = origin_A()
        row_B, kk_B = origin_B()
        load_A(A, regs_A, row0 + row_A, k_begin + kk_A, n, k_end)
        load_B(B, regs_B, col0 + row_B, k_begin + kk_B, p, k_end)
        k0 = k_begin
        while k0 < k_end:
            store_A(regs_A, tile_A, row_A, kk_A)
            store_B(regs_B, tile_B, row_B, kk_B)
            cuda.syncthreads()
            k0 += BK
            if k0 < k_end:  # prefetch the next slice while this one is multiplied
                load_A(A, regs_A, row0 + row_A, k0 + kk_A, n, k_end)
                load_B(B, regs_B, col0 + row_B, k0 + kk_B, p, k_end)
            a, b = ty << vec_shift, tx << vec_shift  # this thread's first A and B values of slice kk
            while a < size:
                for g in range(RUNS):
                    for v in range(VEC):
                        frag_A[g * VEC + v] = tile_A[a + g * run_stride + v]
                        frag_B[g * VEC + v] = tile_B[b + g * run_stride + v]
                for r in range(TM):
                    for c in range(TM):
                        acc[r, c] += frag_A[r] * frag_B[c]
                a += width
                b += width
            cuda.syncthreads()
        for r in range(TM):
            i = row0 + (ty << vec_shift) + run_stride * (r >> vec_shift) + (r & (VEC - 1))
            for c in range(TM):
                j = col0 + (tx << vec_shift) + run_stride * (c >> vec_shift) + (c & (VEC - 1))
                if i < n and j < p:
                    C[split, i, j] = acc[r, c]

    return gemm


@cuda.jit
def _sum_splits_kernel(partials, out):
    """out[k] = Σ_s partials[s, k], s in order.  partials (splits, n), out (n,)."""
    k = cuda.grid(1)
    while k < out.shape[0]:
        total = partials[0, k]
        for s in range(1, partials.shape[0]):
            total += partials[s, k]
        out[k] = total
        k += cuda.gridsize(1)


def _k_splits(tiles, K, BK):
    """(splits, k_chunk): split k until there are about two blocks per SM, k_chunk a multiple of BK."""
    splits = max(1, min(_blocks(2 * _sm_count(), tiles), K // _MIN_K_PER_SPLIT))
    k_chunk = _blocks(_blocks(K, splits), BK) * BK
    return _blocks(K, k_chunk), k_chunk


def _gemm(A, B, out, K, a_k_contiguous, b_k_contiguous):
    """out (n, p) = op(A) op(B) over K, out C-contiguous."""
    n, p = out.shape
    if K == 0:
        _fill(out, 0)
        return
    tile = _SMALL_TILE if min(n, p) <= _SMALL_TILE.BM else _LARGE_TILE
    tiles = _blocks(n, tile.BM) * _blocks(p, tile.BM)
    splits, k_chunk = _k_splits(tiles, K, tile.BK)
    kernel = _gemm_kernel(out.dtype, tile, a_k_contiguous, b_k_contiguous)
    grid = (_blocks(p, tile.BM), _blocks(n, tile.BM), splits)
    if splits == 1:
        _launch(kernel, grid, tile.threads, A, B, out.reshape(1, n, p), K, k_chunk)
        return
    partials = _workspace("gemm splits", (splits, n, p), out.dtype)
    _launch(kernel, grid, tile.threads, A, B, partials, K, k_chunk)
    blocks, threads = _elementwise_grid(n * p)
    _launch(_sum_splits_kernel, blocks, threads, partials.reshape(splits, n * p), out.reshape(n * p))


def matmul_nt(A, B, out):
    """out = A Bᵀ.  A (n, k), B (p, k), out (n, p)."""
    _gemm(A, B, out, A.shape[1], True, True)


def matmul_nn(A, B, out):
    """out = A B.  A (n, k), B (k, p), out (n, p)."""
    _gemm(A, B, out, A.shape[1], True, False)


def matmul_tn(A, B, out):
    """out = Aᵀ B.  A (k, n), B (k, p), out (n, p)."""
    _gemm(A, B, out, A.shape[0], False, False)


# ---------------------------------------------------------------------------------------- recurrence

_MAX_STREAMS_PER_BLOCK = 8
_MAX_RECURRENCE_THREADS = 1024
_STAGE_BYTES = 4096  # bytes of one stream's state staged in shared memory at a time


@functools.cache
def _recurrence_kernels(dtype, streams_per_block):
    """(transpose, forward, backward) kernels for one float dtype and streams per block (BB).

    A block owns streams b0 .. b0 + BB - 1 for the whole window, thread i state unit i (and i + blockDim,
    ... when m is larger than the block). Each step is a matrix-vector product per stream, Mᵀ v with M
    row-major so that thread i reads M[j, i] coalesced; the BB vectors v are staged in shared memory,
    so every M[j, i] read serves BB streams. Forward multiplies by W_s through W_sᵀ, backward by W_sᵀ
    through W_s itself. syncthreads() is only ever reached by all threads of a block: two per step and
    chunk of the staged vectors.
    """
    dt = from_dtype(np.dtype(dtype))
    BB = streams_per_block
    chunk = _STAGE_BYTES // np.dtype(dtype).itemsize
    zero, one = np.dtype(dtype).type(0), np.dtype(dtype).type(1)

    @cuda.jit(device=True)
    def matvec_T(M, vecs, b0, i, staged, acc):
        """acc[r] = Σ_j M[j, i] vecs[b0 + r, j] for r < BB (streams past the last one count as zero).

        M (m, m), vecs (B, m); every thread of the block calls this (those with i ≥ m get no result).
        Each chunk starts with a barrier: the block's earlier writes to vecs are complete and its earlier
        reads of ``staged`` are done, so the callers need none of their own between steps.
        """
        m = M.shape[0]
        n_streams = vecs.shape[0]
        for r in range(BB):
            acc[r] = 0
        j0 = 0
        while j0 < m:
            width = min(chunk, m - j0)
            cuda.syncthreads()
            for r in range(BB):
                jj = cuda.threadIdx.x
                while jj < width:
                    staged[r, jj] = vecs[b0 + r, j0 + jj] if b0 + r < n_streams else zero
                    jj += cuda.blockDim.x
            cuda.syncthreads()
            if i < m:
                jj = 0
                while jj < width:
                    w = M[j0 + jj, i]
                    for r in range(BB):
                        acc[r] += w * staged[r, jj]
                    jj += 1
            j0 += chunk

    @cuda.jit
    def transpose(src, dst):
        """dst = srcᵀ for square (m, m) arrays through shared tiles: blocks of (side, rows) threads, a
        side x side tile per block (side ≤ 32, rows dividing it)."""
        tile = cuda.shared.array((32, 33), dt)
        m = src.shape[0]
        side = cuda.blockDim.x
        x0, y0 = cuda.blockIdx.x * side, cuda.blockIdx.y * side
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        for dy in range(0, side, cuda.blockDim.y):
            if y0 + ty + dy < m and x0 + tx < m:
                tile[ty + dy, tx] = src[y0 + ty + dy, x0 + tx]
        cuda.syncthreads()
        for dy in range(0, side, cuda.blockDim.y):
            if x0 + ty + dy < m and y0 + tx < m:
                dst[x0 + ty + dy, y0 + tx] = tile[tx, ty + dy]

    @cuda.jit(**_launch_bounds(_MAX_RECURRENCE_THREADS))
    def forward(W_sT, b_s, U, S):
        """S[t + 1, b] = tanh(W_s S[t, b] + U[t, b] + b_s) for t < T, b in this block's streams.

        W_sT (m, m) = W_sᵀ; b_s (m,); U (T, B, m); S (T + 1, B, m).
        """
        T, B, m = U.shape
        b0 = cuda.blockIdx.x * BB
        staged = cuda.shared.array((BB, chunk), dt)
        acc = cuda.local.array(BB, dt)
        for t in range(T):
            i = cuda.threadIdx.x
            while i - cuda.threadIdx.x < m:  # the same trip count for every thread of the block
                matvec_T(W_sT, S[t], b0, i, staged, acc)
                if i < m:
                    for r in range(BB):
                        b = b0 + r
                        if b < B:
                            a_t = acc[r] + U[t, b, i] + b_s[i]
                            S[t + 1, b, i] = math.tanh(a_t)
                i += cuda.blockDim.x

    @cuda.jit(**_launch_bounds(_MAX_RECURRENCE_THREADS))
    def backward(W_s, S, dL_ds_out, dL_da):
        """dL_da[t, b] = (1 - S[t+1, b]²) ⊙ (dL_ds_out[t, b] + W_sᵀ dL_da[t+1, b]), t from T-1 down to 0.

        W_s (m, m); S (T + 1, B, m); dL_ds_out, dL_da (T, B, m).
        """
        T, B, m = dL_da.shape
        b0 = cuda.blockIdx.x * BB
        staged = cuda.shared.array((BB, chunk), dt)
        acc = cuda.local.array(BB, dt)
        for t in range(T - 1, -1, -1):
            i = cuda.threadIdx.x
            while i - cuda.threadIdx.x < m:  # the same trip count for every thread of the block
                if t + 1 < T:  # the same branch for the whole block
                    matvec_T(W_s, dL_da[t + 1], b0, i, staged, acc)
                else:
                    for r in range(BB):
                        acc[r] = 0
                if i < m:
                    for r in range(BB):
                        b = b0 + r
                        if b < B:
                            s_t = S[t + 1, b, i]
                            dL_da[t, b, i] = (one - s_t * s_t) * (dL_ds_out[t, b, i] + acc[r])
                i += cuda.blockDim.x

    return transpose, forward, backward


_SPLIT_WARPS = 8  # state units a block of the unit-split recurrence takes at a time: one per warp
_SPLIT_STREAMS = 8  # streams a lane of the unit-split recurrence accumulates at once
_SPLIT_STAGE_BYTES = 24576  # shared memory for the vectors a block of the unit-split recurrence stages
_SPLIT_MIN_M = 900  # the recurrence splits the units, not the streams, over blocks from this state size
_SPLIT_MAX_B = 32  # up to this many streams (measured on an H100: faster at m=1024 B=20, slower at 650 x 20, 1024 x 64)


@functools.cache
def _split_recurrence_kernels(dtype):
    """(forward, backward) kernels of the unit-split recurrence for one float dtype.

    The blocks share the state units, all streams each: a warp computes unit i for every stream, its
    lanes along j (M[i, j] read coalesced, the vectors staged by the block in shared memory), each lane
    adding a share of the products; the block adds the 32 shares of each (unit, stream) in order through
    shared memory. So W_s
    is read once per step over the whole GPU (the stream-split kernels read all of it once per block),
    at the price of one grid-wide barrier per step: a cooperative launch whose blocks all fit on the GPU
    at once. Forward multiplies by W_s directly, backward by W_sᵀ through its transposed copy.
    """
    dt = from_dtype(np.dtype(dtype))
    NW, BG = _SPLIT_WARPS, _SPLIT_STREAMS
    chunk = _SPLIT_STAGE_BYTES // (BG * np.dtype(dtype).itemsize)
    stream_bits = _shift(BG)
    one = np.dtype(dtype).type(1)

    @cuda.jit(device=True)
    def lane_products(M, vecs, i, lane, b0, staged, partial):
        """partial[warp, r, lane] = Σ_{j ≡ lane (mod 32)} M[i, j] vecs[b0 + r, j] for r < BG (0 if i ≥ m;
        streams past the last repeat it, their sums unused). M (m, m), vecs (B, m). The block stages the
        BG vectors in shared memory, ``chunk`` values of each at a time; every thread of the block calls this.
        """
        m = M.shape[1]
        last = vecs.shape[0] - 1
        acc = cuda.local.array(BG, dt)
        for r in range(BG):
            acc[r] = 0
        j0 = 0
        while j0 < m:
            width = min(chunk, m - j0)
            cuda.syncthreads()  # the block's reads of the previous chunk are done
            for r in range(BG):
                jj = cuda.threadIdx.x
                while jj < width:
                    staged[r, jj] = vecs[min(b0 + r, last), j0 + jj]
                    jj += cuda.blockDim.x
            cuda.syncthreads()
            if i < m:
                jj = lane
                while jj < width:
                    w = M[i, j0 + jj]
                    for r in range(BG):
                        acc[r] += w * staged[r, jj]
                    jj += 32
            j0 += chunk
        warp = cuda.threadIdx.x >> 5
        for r in range(BG):
            partial[warp, r, lane] = acc[r]

    @cuda.jit(device=True)
    def shares_total(partial):
        """The 32 shares of thread tid's (unit, stream), partial[tid // BG, tid % BG, :], added in order."""
        w, r = cuda.threadIdx.x >> stream_bits, cuda.threadIdx.x & (BG - 1)
        total = partial[w, r, 0]
        for k in range(1, 32):
            total += partial[w, r, k]
        return total

    @cuda.jit
    def forward(W_s, b_s, U, S):
        """S[t + 1] = tanh(W_s S[t] + U[t] + b_s) for t < T: W_s (m, m), b_s (m,), U (T, B, m), S (T + 1, B, m)."""
        T, B, m = U.shape
        grid = cuda.cg.this_grid()
        partial = cuda.shared.array((NW, BG, 33), dt)
        staged = cuda.shared.array((BG, chunk), dt)
        tid = cuda.threadIdx.x
        lane = tid & 31
        for t in range(T):
            u0 = cuda.blockIdx.x * NW
            while u0 < m:  # the same trip counts for every thread of the block
                b0 = 0
                while b0 < B:
                    lane_products(W_s, S[t], u0 + (tid >> 5), lane, b0, staged, partial)
                    cuda.syncthreads()
                    i, b = u0 + (tid >> stream_bits), b0 + (tid & (BG - 1))  # the sum thread tid makes
                    if tid < NW * BG and i < m and b < B:
                        S[t + 1, b, i] = math.tanh(shares_total(partial) + U[t, b, i] + b_s[i])
                    cuda.syncthreads()
                    b0 += BG
                u0 += cuda.gridDim.x * NW
            grid.sync()

    @cuda.jit
    def backward(W_sT, S, dL_ds_out, dL_da):
        """dL_da[t] = (1 - S[t+1]²) ⊙ (dL_ds_out[t] + W_sᵀ dL_da[t+1]), t from T-1 down to 0; W_sT (m, m) = W_sᵀ."""
        T, B, m = dL_da.shape
        grid = cuda.cg.this_grid()
        partial = cuda.shared.array((NW, BG, 33), dt)
        staged = cuda.shared.array((BG, chunk), dt)
        tid = cuda.threadIdx.x
        lane = tid & 31
        for t in range(T - 1, -1, -1):
            later = dL_da[min(t + 1, T - 1)]
            u0 = cuda.blockIdx.x * NW
            while u0 < m:  # the same trip counts for every thread of the block
                b0 = 0
                while b0 < B:
                    # the last step has no later one: unit m, none, gives zero products
                    lane_products(W_sT, later, u0 + (tid >> 5) if t + 1 < T else m, lane, b0, staged, partial)
                    cuda.syncthreads()
                    i, b = u0 + (tid >> stream_bits), b0 + (tid & (BG - 1))  # the sum thread tid makes
                    if tid < NW * BG and i < m and b < B:
                        s_t = S[t + 1, b, i]
                        dL_da[t, b, i] = (one - s_t * s_t) * (dL_ds_out[t, b, i] + shares_total(partial))
                    cuda.syncthreads()
                    b0 += BG
                u0 += cuda.gridDim.x * NW
            grid.sync()

    return forward, backward


def _split_launch(m, dtype):
    """(forward, backward), blocks, threads of the unit-split recurrence: at most one block per SM, so
    that every block of the cooperative launch is resident at once."""
    return _split_recurrence_kernels(dtype), min(_sm_count(), _blocks(m, _SPLIT_WARPS)), 32 * _SPLIT_WARPS


def _streams_per_block(B):
    """Streams per block: 1 while the B blocks fit on half the SMs, else more (up to 8), so that each read of
    W_s serves several streams."""
    streams = 1
    while streams < _MAX_STREAMS_PER_BLOCK and _blocks(B, streams) > max(1, _sm_count() // 2):
        streams *= 2
    return streams


def _recurrence_launch(B, m, dtype):
    """(kernels, grid, threads) of a recurrence over B streams of state size m."""
    streams = _streams_per_block(B)
    threads = min(_MAX_RECURRENCE_THREADS, _blocks(m, 32) * 32)
    return _recurrence_kernels(dtype, streams), _blocks(B, streams), threads


def forward(W_s, b_s, U, S):
    """Run the recurrence over a window: S[t + 1] = tanh(W_s S[t] + U[t] + b_s).

    W_s (m, m), b_s (m,); U (T, B, m): the input term (W_x x_{t-1} for the first layer, W_in times the
    layer below's output for the others); S (T + 1, B, m): S[0] holds the carried state on entry,
    S[1:] is written. One launch for all T steps (after a transpose of W_s, so that the per-step
    products read it coalesced).
    """
    T, B, m = U.shape
    if m >= _SPLIT_MIN_M and B <= _SPLIT_MAX_B:
        (forward_kernel, _), grid, threads = _split_launch(m, S.dtype)
        _launch(forward_kernel, grid, threads, W_s, b_s, U, S)
        return
    (_, forward_kernel, _), grid, threads = _recurrence_launch(B, m, S.dtype)
    _launch(forward_kernel, grid, threads, _transposed(W_s), b_s, U, S)


def _transposed(W_s):
    """W_sᵀ (m, m) in a workspace."""
    m = W_s.shape[0]
    W_sT = _workspace("W_s transposed", (m, m), W_s.dtype)
    side = _threads(m, 32)
    transpose = _recurrence_kernels(W_s.dtype, 1)[0]
    _launch(transpose, (_blocks(m, side), _blocks(m, side)), (side, _threads(side, 8)), W_s, W_sT)
    return W_sT


def backward(W_s, S, dL_ds_out, dL_da):
    """Backpropagation through time over a window, from the output layer's gradient.

    S (T + 1, B, m) from ``forward``; dL_ds_out (T, B, m) = W_oᵀ dL/dz per step.
    Writes dL_da (T, B, m): dL/ds_t = dL_ds_out[t] + W_sᵀ dL/da_{t+1}, dL/da_t = (1 - s_t²) ⊙ dL/ds_t.
    The state carried into the window gets no gradient (truncated BPTT). One launch for all T steps.
    """
    T, B, m = dL_da.shape
    if m >= _SPLIT_MIN_M and B <= _SPLIT_MAX_B:
        (_, backward_kernel), grid, threads = _split_launch(m, S.dtype)
        _launch(backward_kernel, grid, threads, _transposed(W_s), S, dL_ds_out, dL_da)
        return
    (_, _, backward_kernel), grid, threads = _recurrence_launch(B, m, S.dtype)
    _launch(backward_kernel, grid, threads, W_s, S, dL_ds_out, dL_da)


# ---------------------------------------------------------------------------------------- scatter-adds


@cuda.jit
def _link_kernel(keys, next_pos, first):
    """Link the positions holding each key into a list: next_pos[p] = the next position q > p with
    keys[q] = keys[p] (N when none), first[key] = the first position holding key.

    keys (N,) int32; next_pos (N,) int32; first (n_keys,) int32, N on entry: absent keys keep it.
    """
    p = cuda.grid(1)
    N = keys.shape[0]
    if p >= N:
        return
    key = keys[p]
    q = p + 1
    while q < N and keys[q] != key:
        q += 1
    next_pos[p] = q
    q = p - 1
    while q >= 0 and keys[q] != key:
        q -= 1
    if q < 0:
        first[key] = p


def _link(keys, n_keys, absent=True):
    """(next_pos, first) of ``_link_kernel`` for keys (N,) int32 below n_keys, in workspaces.

    With ``absent`` False, first[key] is left undefined for the keys not in ``keys`` (one launch fewer):
    for callers that only look up keys they hold.
    """
    N = keys.shape[0]
    next_pos = _workspace("next position", (N,), np.int32)
    first = _workspace("first position", (n_keys,), np.int32)
    if absent:
        _fill(first, N)
    threads = _threads(N, _ELEMENTWISE_THREADS)
    _launch(_link_kernel, _blocks(N, threads), threads, keys, next_pos, first)
    return next_pos, first


@cuda.jit
def _scatter_columns_kernel(tokens, next_pos, first, dL_dU, dW_x, touched):
    """dW_x[i, x] += Σ over the positions p of token x of dL_dU[p, i], in position order; touched[x] = 1.

    One thread per (state unit i, position p); only a token's first position walks its list, so each
    column is written by one thread for each i. dL_dU (N, m); dW_x (m, V) (column-major: the i of a
    warp are contiguous); touched (V,) uint8.
    """
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    p = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    N, m = dL_dU.shape
    if i >= m or p >= N:
        return
    x = tokens[p]
    if first[x] != p:
        return
    total = dL_dU[p, i]
    q = next_pos[p]
    while q < N:
        total += dL_dU[q, i]
        q = next_pos[q]
    dW_x[i, x] += total
    if i == 0:
        touched[x] = 1


@functools.cache
def _column_sums_kernel(dtype):
    """out[j] = Σ_r X[r, j] for X (N, V): blocks of (≤ 32 columns, ≤ 32 row phases), each column's
    phases summed in order in shared memory."""
    dt = from_dtype(np.dtype(dtype))
    zero = np.dtype(dtype).type(0)

    @cuda.jit
    def column_sums(X, out):
        partial = cuda.shared.array((32, 32), dt)
        N, V = X.shape
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        j = cuda.blockIdx.x * cuda.blockDim.x + tx
        total = zero
        if j < V:
            r = ty
            while r < N:
                total += X[r, j]
                r += cuda.blockDim.y
        partial[ty, tx] = total
        cuda.syncthreads()
        if ty == 0 and j < V:
            for y in range(1, cuda.blockDim.y):
                total += partial[y, tx]
            out[j] = total

    return column_sums


def _column_sums(X, out):
    N, V = X.shape
    tx = _threads(V, 32)
    ty = _threads(_blocks(N, 16), 32)
    _launch(_column_sums_kernel(X.dtype), _blocks(V, tx), (tx, ty), X, out)


@cuda.jit
def _embed_kernel(W_x, tokens, U):
    """U[p, i] = W_x[i, tokens[p]]: one thread per (state unit i, position p); W_x column-major."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    p = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    N, m = U.shape
    if i < m and p < N:
        U[p, i] = W_x[i, tokens[p]]


def _unit_position_grid(m, N):
    """(grid, block) of the kernels with a thread per (state unit, position): units along warps."""
    tx, ty = _threads(m, 32), _threads(N, 8)
    return (_blocks(m, tx), _blocks(N, ty)), (tx, ty)


def embed(W_x, inputs, U):
    """U[t, b] = W_x[:, inputs[t, b]]: the input term W_x x_{t-1} of the first layer.

    W_x (m, V) (column-major on the device: each column contiguous); inputs (T, B) int32; U (T, B, m).
    """
    T, B, m = U.shape
    grid, block = _unit_position_grid(m, T * B)
    _launch(_embed_kernel, grid, block, W_x, inputs.reshape(T * B), U.reshape(T * B, m))


def input_grads(inputs, dL_dU, dW_x, touched):
    """dW_x[:, x_{t-1}] += dL/dU_t over the window and touched[x_{t-1}] = 1.

    inputs (T, B) int32; dL_dU (T, B, m): the gradient of the first layer's input term; dW_x (m, V),
    zero in every column not marked in touched (uint8 (V,)) on entry. Deterministic: the positions of
    each token are linked into a list, and one thread per (row of dW_x, token) sums the list in order.
    """
    T, B, m = dL_dU.shape
    N = T * B
    tokens = inputs.reshape(N)
    next_pos, first = _link(tokens, dW_x.shape[1], absent=False)  # only the tokens' own entries are read
    grid, block = _unit_position_grid(m, N)
    _launch(_scatter_columns_kernel, grid, block, tokens, next_pos, first, dL_dU.reshape(N, m), dW_x, touched)


def bias_grad(dL_da, db):
    """db = Σ_rows dL_da: dL_da (N, m), db (m,) overwritten."""
    _column_sums(dL_da, db)


@cuda.jit
def _multiply_kernel(a, mask, out):
    k = cuda.grid(1)
    while k < out.shape[0]:
        out[k] = a[k] * mask[k]
        k += cuda.gridsize(1)


def multiply(a, mask, out):
    """out = a ⊙ mask, elementwise over C-contiguous arrays of one shape (out may be a)."""
    flat = _flat(out)
    blocks, threads = _elementwise_grid(flat.size)
    _launch(_multiply_kernel, blocks, threads, _flat(a), _flat(mask), flat)


@cuda.jit
def _add_rows_kernel(dst_rows, src_rows, src_mask, dst_mask):
    """dst_rows[r] += src_rows[r], src_rows[r] = 0, dst_mask[r] = 1, src_mask[r] = 0 for the rows marked in
    src_mask: in sweeps with a barrier between reading and clearing the marks (see _masked_sgd_kernel)."""
    R, m = dst_rows.shape
    r0 = cuda.blockIdx.x * cuda.blockDim.y
    while r0 < R:  # the same trip count for every thread of the block
        r = r0 + cuda.threadIdx.y
        marked = r < R and src_mask[r] != 0
        cuda.syncthreads()
        if marked:
            i = cuda.threadIdx.x
            while i < m:
                dst_rows[r, i] += src_rows[r, i]
                src_rows[r, i] = 0
                i += cuda.blockDim.x
            if cuda.threadIdx.x == 0:
                dst_mask[r] = 1
                src_mask[r] = 0
        r0 += cuda.gridDim.x * cuda.blockDim.y


def masked_add_rows(dst_rows, src_rows, src_mask, dst_mask):
    """dst_rows[r] += src_rows[r] and src_rows[r] = 0 for the rows marked in src_mask, which is cleared
    and merged into dst_mask: tied weights fold W_x's sparse gradient into W_o's."""
    blocks, threads = _row_grid(*dst_rows.shape)
    _launch(_add_rows_kernel, blocks, threads, dst_rows, src_rows, src_mask, dst_mask)


# ---------------------------------------------------------------------------------------- softmax


@functools.cache
def _softmax_device_functions(dtype):
    """(row_stats, write_grad): a block's pass over one row of logits, and the gradient it leads to."""
    dt = from_dtype(np.dtype(dtype))
    lowest = np.finfo(dtype).min  # a finite "-inf": merging two empty partial sums stays 0, not NaN
    zero, one = np.dtype(dtype).type(0), np.dtype(dtype).type(1)

    @cuda.jit(device=True)
    def row_stats(Z, r, b, n):
        """(max, Σ exp(z - max)) over z_j = Z[r, j] + b[j], j < n, for every thread of the block.

        Each thread keeps a running max and a sum rescaled whenever the max grows (one pass over the
        row), then a tree in shared memory merges the threads' pairs.
        """
        tops = cuda.shared.array(_REDUCE_THREADS, dt)
        totals = cuda.shared.array(_REDUCE_THREADS, dt)
        tid = cuda.threadIdx.x
        top, total = lowest, zero
        j = tid
        while j < n:
            z = Z[r, j] + b[j]
            if z > top:
                total = total * math.exp(top - z) + one
                top = z
            else:
                total += math.exp(z - top)
            j += cuda.blockDim.x
        tops[tid] = top
        totals[tid] = total
        cuda.syncthreads()
        n_partial = cuda.blockDim.x
        while n_partial > 1:  # a tree of fan-in _FAN_IN: few barriers (each one costs the simulator)
            n_next = (n_partial + _FAN_IN - 1) // _FAN_IN
            if tid < n_next:
                k = tid + n_next
                while k < n_partial:
                    top_b, total_b = tops[k], totals[k]
                    top_ab = max(top, top_b)
                    total = total * math.exp(top - top_ab) + total_b * math.exp(top_b - top_ab)
                    top = top_ab
                    k += n_next
                tops[tid] = top
                totals[tid] = total
            cuda.syncthreads()
            n_partial = n_next
        return tops[0], totals[0]

    @cuda.jit(device=True)
    def write_grad(Z, r, b, n, y, top, total, scale):
        """Z[r, j] = scale · (softmax_j - [j = y]) for j < n, from ``row_stats``' (top, total)."""
        inv = scale / total
        j = cuda.threadIdx.x
        while j < n:
            dL_dz = math.exp(Z[r, j] + b[j] - top) * inv
            if j == y:
                dL_dz -= scale
            Z[r, j] = dL_dz
            j += cuda.blockDim.x

    return row_stats, write_grad


@functools.cache
def _softmax_kernels(dtype):
    """(xent_grad, xent) kernels of the full softmax for one float dtype: one block per row of Z (N, V)."""
    row_stats, write_grad = _softmax_device_functions(dtype)

    @cuda.jit
    def xent_grad(Z, b_o, targets, scale, losses):
        """losses[r] = -log p(targets[r]), Z[r] = scale · (p - onehot(targets[r])); p = softmax(Z[r] + b_o).

        Z (N, V); b_o (V,); targets (N,) int32; scale of Z's dtype; losses (N,) float64.
        """
        r = cuda.blockIdx.x
        V = Z.shape[1]
        y = targets[r]
        z_y = Z[r, y] + b_o[y]  # read before any thread overwrites the row
        top, total = row_stats(Z, r, b_o, V)
        if cuda.threadIdx.x == 0:
            losses[r] = top + math.log(total) - z_y
        write_grad(Z, r, b_o, V, y, top, total, scale)

    @cuda.jit
    def xent(Z, b_o, targets, losses):
        """losses[r] = -log softmax(Z[r] + b_o)[targets[r]]; Z is left as it is."""
        r = cuda.blockIdx.x
        y = targets[r]
        z_y = Z[r, y] + b_o[y]
        top, total = row_stats(Z, r, b_o, Z.shape[1])
        if cuda.threadIdx.x == 0:
            losses[r] = top + math.log(total) - z_y

    return xent_grad, xent


def _row_threads(n):
    """Threads of a block that reduces a row of n values."""
    return _spread(n, _REDUCE_THREADS)[1]


class DeviceSum:
    """Σ of the values of float64 device arrays (a window's row losses), added on the host in float64 when
    ``float()`` asks for it: a training step is queued whole before the host waits for the device.

    The arrays are workspaces that the next window's kernels overwrite: read the sum before that.
    """

    def __init__(self, *arrays):
        self.arrays = arrays

    def __add__(self, other):
        return DeviceSum(*self.arrays, *other.arrays)

    def __float__(self):
        return float(sum(array.copy_to_host().sum() for array in self.arrays))


def softmax_xent_grad(Z, b_o, targets, scale, db_o):
    """Fused softmax + cross-entropy + its gradient over all rows of a window.

    Z (N, V): logits W_o s_t without the bias on entry; on return Z = scale · dL/dz = scale · (p_t -
    onehot(x̂_t)). b_o (V,); targets (N,) int32; db_o (V,) is overwritten with Σ_rows of the new Z.
    Returns Σ_rows -log p_t(x̂_t) as a DeviceSum (the rows' losses added in float64).
    """
    N, V = Z.shape
    xent_grad, _ = _softmax_kernels(Z.dtype)
    losses = _workspace("softmax row losses", (N,), np.float64)
    _launch(xent_grad, N, _row_threads(V), Z, b_o, targets, Z.dtype.type(scale), losses)
    _column_sums(Z, db_o)
    return DeviceSum(losses)


def softmax_xent(Z, b_o, targets):
    """Σ_rows -log softmax(Z + b_o)[target] for evaluation, a DeviceSum; Z (N, V) is left unchanged."""
    N, V = Z.shape
    _, xent = _softmax_kernels(Z.dtype)
    losses = _workspace("softmax row losses", (N,), np.float64)
    _launch(xent, N, _row_threads(V), Z, b_o, targets, losses)
    return DeviceSum(losses)


# ---------------------------------------------------------------------------------------- class softmax


@functools.cache
def _class_kernels(dtype):
    """(class_grad, class_loss, class_weight_grads) kernels of the class softmax's word half."""
    row_stats, write_grad = _softmax_device_functions(dtype)
    zero = np.dtype(dtype).type(0)

    @cuda.jit(device=True)
    def class_logits(S_next, W_o, r, lo, n, G):
        """G[r, w] = W_o[lo + w] · S_next[r] for w < n (a thread per word), then a block barrier."""
        m = S_next.shape[1]
        w = cuda.threadIdx.x
        while w < n:
            acc = zero
            i = 0
            while i < m:
                acc += W_o[lo + w, i] * S_next[r, i]
                i += 1
            G[r, w] = acc
            w += cuda.blockDim.x
        cuda.syncthreads()

    @cuda.jit
    def class_grad(S_next, W_o, b_o, targets, target_classes, class_bounds, scale, G, losses, dL_ds):
        """Row r's softmax over the words of its class: losses[r] = -log p(targets[r] | class),
        G[r, :n] = scale · dL/dz, dL_ds[r] += W_o[class]ᵀ G[r, :n]. One block per row.

        S_next, dL_ds (N, m); W_o (V, m); b_o (V,); targets, target_classes (N,) and class_bounds
        (C + 1,) int32; G (N, ≥ the largest class) scratch; losses (N,) float64.
        """
        r = cuda.blockIdx.x
        c = target_classes[r]
        lo = class_bounds[c]
        n = class_bounds[c + 1] - lo
        b = b_o[lo : lo + n]
        y = targets[r] - lo
        class_logits(S_next, W_o, r, lo, n, G)
        z_y = G[r, y] + b[y]  # read before any thread overwrites the row
        top, total = row_stats(G, r, b, n)
        if cuda.threadIdx.x == 0:
            losses[r] = top + math.log(total) - z_y
        write_grad(G, r, b, n, y, top, total, scale)
        cuda.syncthreads()
        i = cuda.threadIdx.x
        while i < S_next.shape[1]:
            acc = zero
            w = 0
            while w < n:
                acc += G[r, w] * W_o[lo + w, i]
                w += 1
            dL_ds[r, i] += acc
            i += cuda.blockDim.x

    @cuda.jit
    def class_loss(S_next, W_o, b_o, targets, target_classes, class_bounds, G, losses):
        """losses[r] = -log p(targets[r] | its class) (see class_grad); G scratch."""
        r = cuda.blockIdx.x
        c = target_classes[r]
        lo = class_bounds[c]
        n = class_bounds[c + 1] - lo
        b = b_o[lo : lo + n]
        y = targets[r] - lo
        class_logits(S_next, W_o, r, lo, n, G)
        z_y = G[r, y] + b[y]
        top, total = row_stats(G, r, b, n)
        if cuda.threadIdx.x == 0:
            losses[r] = top + math.log(total) - z_y

    @cuda.jit
    def class_weight_grads(S_next, G, next_row, first_row, class_bounds, dW_o, db_o, touched):
        """dW_o[v, i] += Σ_r G[r, v - lo] S_next[r, i] and db_o[v] = Σ_r G[r, v - lo] over the rows r of
        word v's class (in row order, through the class's row list); touched[v] = 1 for those classes,
        db_o[v] = 0 for the others. One thread per (unit i, word v).
        """
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        v = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        V, m = dW_o.shape
        N = next_row.shape[0]
        if v >= V:
            return
        c, c_end = 0, class_bounds.shape[0] - 1  # bisect: class_bounds[c] ≤ v < class_bounds[c + 1]
        while c_end - c > 1:
            mid = (c + c_end) // 2
            if class_bounds[mid] <= v:
                c = mid
            else:
                c_end = mid
        w = v - class_bounds[c]
        p = first_row[c]
        if i < m and p < N:
            acc = zero
            q = p
            while q < N:
                acc += G[q, w] * S_next[q, i]
                q = next_row[q]
            dW_o[v, i] += acc
        if i == 0:
            total = zero
            q = p
            while q < N:
                total += G[q, w]
                q = next_row[q]
            db_o[v] = total
            if p < N:
                touched[v] = 1

    return class_grad, class_loss, class_weight_grads


_class_shapes = {}  # id(class bounds) -> (that array, the widest class's size, the number of classes)


def _class_scratch(S_next, class_bounds):
    """(G, losses, C): scratch for every row's class logits and loss, and the number of classes.

    The class bounds are read from the device once per array (they are uploaded once, by ``step.Window``,
    and never written): a read stops the host until the device has caught up, in the middle of a step.
    The array stays referenced from its entry, so that its id is not reused.
    """
    entry = _class_shapes.get(id(class_bounds))
    if entry is None:
        bounds = class_bounds.copy_to_host()
        entry = _class_shapes[id(class_bounds)] = class_bounds, int(np.diff(bounds).max()), len(bounds) - 1
    _, width, n_classes = entry
    N = S_next.shape[0]
    G = _workspace("class logits", (N, width), S_next.dtype)
    return G, _workspace("class row losses", (N,), np.float64), n_classes


def class_xent_grad(S_next, W_o, b_o, targets, target_classes, class_bounds, scale, dW_o, db_o, dL_ds, touched,
                    dW_o_norm):
    """Word half of the class-based softmax, p(w) = p(class(w)) · p(w | class(w)), with its gradient.

    Row r predicts targets[r] from s = S_next[r] (N, m) with a softmax over the words of its class
    c = target_classes[r], ids class_bounds[c] ≤ w < class_bounds[c + 1]: z = W_o[w] s + b_o[w].
    Adds scale · dL/dz ⊗ s to those rows of dW_o (V, m) and W_o[class]ᵀ dL/dz to dL_ds[r] (N, m);
    overwrites db_o (V,); marks touched[w] = 1 for the rows of every class it used. dW_o must be zero
    in the rows of those classes on entry (the sparse update leaves it so). dW_o_norm (1,) float64
    receives the Euclidean norm of those rows of dW_o. Returns Σ -log p(w | c) as a DeviceSum.
    One block per row computes its class's logits, loss and dL/dz into a scratch array; then one
    thread per (word, unit) sums over the rows of the word's class, linked into a list: deterministic.
    """
    N, m = S_next.shape
    V = W_o.shape[0]
    class_grad, _, class_weight_grads = _class_kernels(S_next.dtype)
    G, losses, n_classes = _class_scratch(S_next, class_bounds)
    threads = _row_threads(max(G.shape[1], m))
    _launch(class_grad, N, threads, S_next, W_o, b_o, targets, target_classes, class_bounds,
            S_next.dtype.type(scale), G, losses, dL_ds)
    next_row, first_row = _link(target_classes, n_classes)
    tx, ty = _threads(m, 32), _threads(V, 8)
    grid = (_blocks(m, tx), _blocks(V, ty))
    _launch(class_weight_grads, grid, (tx, ty), S_next, G, next_row, first_row, class_bounds, dW_o, db_o, touched)
    blocks, threads = _row_grid(V, m)
    partials = _workspace("class gradient norm", (blocks,), np.float64)
    _launch(_masked_sum_squares_kernel, blocks, threads, dW_o, touched, partials)
    _norm(partials, 0.0, dW_o_norm)
    return DeviceSum(losses)


def class_xent(S_next, W_o, b_o, targets, target_classes, class_bounds):
    """Σ_r -log p(targets[r] | its class) for evaluation, a DeviceSum (see ``class_xent_grad``); one block
    per row."""
    _, class_loss, _ = _class_kernels(S_next.dtype)
    G, losses, _ = _class_scratch(S_next, class_bounds)
    threads = _row_threads(G.shape[1])
    _launch(class_loss, S_next.shape[0], threads, S_next, W_o, b_o, targets, target_classes, class_bounds, G, losses)
    return DeviceSum(losses)


# ---------------------------------------------------------------------------------------- update


@cuda.jit(device=True)
def _block_sum(value, partials):
    """partials[blockIdx.x] = Σ of ``value`` (float64) over the block's threads (x and y), in a fixed order:
    a tree of fan-in _FAN_IN in shared memory."""
    sums = cuda.shared.array(_REDUCE_THREADS, float64)
    tid = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    sums[tid] = value
    cuda.syncthreads()
    n_partial = cuda.blockDim.x * cuda.blockDim.y
    while n_partial > 1:
        n_next = (n_partial + _FAN_IN - 1) // _FAN_IN
        if tid < n_next:
            k = tid + n_next
            while k < n_partial:
                value += sums[k]
                k += n_next
            sums[tid] = value
        cuda.syncthreads()
        n_partial = n_next
    if tid == 0:
        partials[cuda.blockIdx.x] = sums[0]


@cuda.jit
def _sum_squares_kernel(flat, partials):
    """partials[block] = Σ flat[k]² over the block's grid-stride share of a 1-D array, in float64."""
    total = 0.0
    k = cuda.grid(1)
    while k < flat.shape[0]:
        v = float64(flat[k])
        total += v * v
        k += cuda.gridsize(1)
    _block_sum(total, partials)


@cuda.jit
def _masked_sum_squares_kernel(rows, mask, partials):
    """partials[block] = Σ rows[r, i]² over the marked rows of the block's grid-stride share (x-threads
    along a row), in float64."""
    total = 0.0
    R, m = rows.shape
    r = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    while r < R:
        if mask[r]:
            i = cuda.threadIdx.x
            while i < m:
                v = float64(rows[r, i])
                total += v * v
                i += cuda.blockDim.x
        r += cuda.gridDim.x * cuda.blockDim.y
    _block_sum(total, partials)


@cuda.jit
def _norm_kernel(partials, clip, out):
    """out[0] = √(Σ partials), the norm of a gradient from the partial sums of its squares; when out has
    a second element, out[1] = min(1, clip / norm), the clipping factor (clip = 0: 1).

    One block: each thread adds a strided share of the partials, then the block's tree (fixed order).
    """
    total = 0.0
    k = cuda.threadIdx.x
    while k < partials.shape[0]:
        total += partials[k]
        k += cuda.blockDim.x
    _block_sum(total, out)  # out[0] = Σ partials
    if cuda.threadIdx.x == 0:
        norm = math.sqrt(out[0])
        out[0] = norm
        if out.shape[0] > 1:
            out[1] = clip / norm if 0 < clip < norm else 1.0


def _norm(partials, clip, out):
    """``_norm_kernel`` on float64 partials (n,) into out (1,) or (2,)."""
    _launch(_norm_kernel, 1, _threads(partials.size, _REDUCE_THREADS), partials, float(clip), out)


def _row_grid(R, m):
    """(blocks, (tx, ty)) for kernels over rows (R, m): x-threads along a row, y-threads over rows."""
    tx = _threads(m, 32)
    blocks, ty = _spread(R, _REDUCE_THREADS // tx)
    return min(blocks, 4 * _sm_count()), (tx, ty)


def grad_norm(pairs, clip, clipping):
    """clipping[:] = (‖g‖, min(1, clip / ‖g‖)) for the gradients g in pairs (clip = 0: factor 1), on the
    device: the update kernels read the factor there, so a training step never waits for the device.

    pairs: (array, mask) with mask None for a whole array, else uint8 (R,) marking the rows r of an
    array (R, m), any layout, that count. clipping (2,) float64. One launch per array (plain array
    arguments: numba-cuda dispatches tuples of arrays far more slowly), each block's float64 partial sum
    in one buffer, which one block then adds in a fixed order.
    """
    launches = []
    for array, mask in pairs:
        if mask is None:
            flat = _flat(array)
            blocks, threads = _spread(flat.size, _REDUCE_THREADS)
            launches.append((_sum_squares_kernel, min(blocks, 4 * _sm_count()), threads, (flat,)))
        else:
            blocks, threads = _row_grid(*array.shape)
            launches.append((_masked_sum_squares_kernel, blocks, threads, (array, mask)))
    partials = _workspace("sums of squares", (sum(blocks for _, blocks, _, _ in launches),), np.float64)
    offset = 0
    for kernel, blocks, threads, args in launches:
        _launch(kernel, blocks, threads, *args, partials[offset : offset + blocks])
        offset += blocks
    _norm(partials, clip, clipping)


@cuda.jit
def _sgd_kernel(param, grad, lr, shrink, clipping):
    """param = shrink · param - lr · clipping[1] · grad over flat arrays (grid-stride)."""
    step = param.dtype.type(lr * clipping[1])
    k = cuda.grid(1)
    while k < param.shape[0]:
        param[k] = shrink * param[k] - step * grad[k]
        k += cuda.gridsize(1)


def sgd_update(param, grad, lr, shrink, clipping):
    """param = shrink · param - step · grad, any shape, with step = lr · clipping[1] in the param's dtype.

    SGD on the clipped gradient plus the L2 term: clipping (2,) float64 from ``grad_norm`` (the norm, the
    clipping factor), lr a float, shrink = 1 - lr · 2λ in the param's dtype. param and grad are laid out
    alike (C or F).
    """
    flat = _flat(param)
    blocks, threads = _elementwise_grid(flat.size)
    _launch(_sgd_kernel, blocks, threads, flat, _flat(grad), float(lr), shrink, clipping)


def sgd_updates(pairs, lr, shrink, clipping):
    """``sgd_update`` on every (param, grad) pair, lr and shrink given as Python floats."""
    for param, grad in pairs:
        sgd_update(param, grad, lr, param.dtype.type(shrink), clipping)


@cuda.jit
def _masked_sgd_kernel(param_rows, grad_rows, mask, lr, clipping):
    """param_rows[r] -= lr · clipping[1] · grad_rows[r], grad_rows[r] = 0, mask[r] = 0 for the marked rows.

    A block takes blockDim.y rows per sweep (grid-stride), x-threads along a row; every thread of the block
    runs every sweep, reads its row's mark before the sweep's barrier, and the mark is cleared after it:
    no thread clears a mark another has yet to read, and one launch suffices.
    """
    step = param_rows.dtype.type(lr * clipping[1])
    R, m = param_rows.shape
    r0 = cuda.blockIdx.x * cuda.blockDim.y
    while r0 < R:  # the same trip count for every thread of the block
        r = r0 + cuda.threadIdx.y
        marked = r < R and mask[r] != 0
        cuda.syncthreads()
        if marked:
            i = cuda.threadIdx.x
            while i < m:
                param_rows[r, i] -= step * grad_rows[r, i]
                grad_rows[r, i] = 0
                i += cuda.blockDim.x
            if cuda.threadIdx.x == 0:
                mask[r] = 0
        r0 += cuda.gridDim.x * cuda.blockDim.y


def masked_sgd_update(param_rows, grad_rows, mask, lr, clipping):
    """param_rows[r] -= step · grad_rows[r] for the rows marked in mask, then zero those gradient rows
    and the mask: the sparse update of W_x's columns (passed transposed) and the class softmax's W_o.
    step = lr · clipping[1] in the rows' dtype (lr = 0 only clears)."""
    blocks, threads = _row_grid(*param_rows.shape)
    _launch(_masked_sgd_kernel, blocks, threads, param_rows, grad_rows, mask, float(lr), clipping)


@cuda.jit(device=True)
def _adam_element(param, grad, moment1, moment2, k, lr_t, grad_scale, decay, beta1, rest1, beta2, rest2, eps):
    """The Adam step of element k of 1-D arrays (see ``adam_update``); rest1 = 1 - β1, rest2 = 1 - β2."""
    g = grad_scale * grad[k] + decay * param[k]
    moment1[k] = beta1 * moment1[k] + rest1 * g
    moment2[k] = beta2 * moment2[k] + rest2 * g * g
    param[k] -= lr_t * moment1[k] / (math.sqrt(moment2[k]) + eps)


@cuda.jit
def _masked_adam_kernel(param_rows, grad_rows, moment1, moment2, mask, lr_t, clipping, decay, beta1, rest1, beta2,
                        rest2, eps):
    """The lazy Adam step of ``masked_adam_update``: blockDim.y rows per block (grid-stride), x-threads
    along a row. The mask is only read, so no barrier is needed (compare ``_masked_sgd_kernel``)."""
    grad_scale = param_rows.dtype.type(clipping[1])
    R, m = param_rows.shape
    r = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
    while r < R:
        if mask[r] != 0:
            i = cuda.threadIdx.x
            while i < m:
                _adam_element(param_rows[r], grad_rows[r], moment1[r], moment2[r], i, lr_t, grad_scale, decay,
                              beta1, rest1, beta2, rest2, eps)
                i += cuda.blockDim.x
        r += cuda.gridDim.x * cuda.blockDim.y


def masked_adam_update(param_rows, grad_rows, moment1, moment2, mask, lr_t, clipping, decay, beta1, beta2, eps):
    """``adam_update`` on the rows marked in mask alone, their moments included: lazy Adam on a sparse
    gradient (``masked_sgd_update`` with step 0 then clears the gradient and the mask). param_rows,
    grad_rows (R, m) any layout (W_x's columns passed transposed); moment1, moment2 (R, m) C-contiguous;
    mask (R,) uint8."""
    one = param_rows.dtype.type(1)
    blocks, threads = _row_grid(*param_rows.shape)
    _launch(_masked_adam_kernel, blocks, threads, param_rows, grad_rows, moment1, moment2, mask, lr_t, clipping,
            decay, beta1, one - beta1, beta2, one - beta2, eps)


@cuda.jit
def _adam_kernel(param, grad, moment1, moment2, lr_t, clipping, decay, beta1, rest1, beta2, rest2, eps):
    """The Adam step of ``adam_update`` on flat arrays (grid-stride); rest1 = 1 - β1, rest2 = 1 - β2."""
    grad_scale = param.dtype.type(clipping[1])
    k = cuda.grid(1)
    while k < param.shape[0]:
        _adam_element(param, grad, moment1, moment2, k, lr_t, grad_scale, decay, beta1, rest1, beta2, rest2, eps)
        k += cuda.gridsize(1)


def adam_update(param, grad, moment1, moment2, lr_t, clipping, decay, beta1, beta2, eps):
    """One Adam step on arrays of one shape (C-contiguous): g = clipping[1] · grad + decay · param,
    moment1 = β1 moment1 + (1 - β1) g, moment2 = β2 moment2 + (1 - β2) g², param -= lr_t moment1 /
    (√moment2 + eps), lr_t carrying the bias correction. clipping (2,) float64 from ``grad_norm``; the
    other scalars have the arrays' dtype."""
    one = param.dtype.type(1)
    flat = _flat(param)
    blocks, threads = _elementwise_grid(flat.size)
    moments = _flat(moment1), _flat(moment2)
    _launch(_adam_kernel, blocks, threads, flat, _flat(grad), *moments, lr_t, clipping, decay, beta1, one - beta1,
            beta2, one - beta2, eps)
