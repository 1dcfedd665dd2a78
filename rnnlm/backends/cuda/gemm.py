"""GEMMs: one shared-memory kernel for the three layouts.

A 128 x 128 output tile per block of 256 threads, each thread an 8 x 8 register micro-tile in runs of four
rows and columns that it reads from shared memory as 16-byte vectors (32 x 32 tiles of 64 threads for
products with ≤ 32 rows or columns), k staged 16 at a time with the next slice prefetched into registers;
the transpose cases differ only in how a tile is read from global memory. Products with few output tiles
and a long k split k over blocks (partial products in a workspace, then summed in order).

Tile offsets come from shifts and masks and hot loops are ``while`` loops: numba's ``range`` lowering and
signed floor division keep LLVM from proving indices non-negative, and every array access then carries
numba's negative-index wraparound.
"""

import functools

import numpy as np
from numba import cuda, from_dtype

from rnnlm.backends.cuda import device
from rnnlm.backends.cuda.arrays import fill


class Tile:
    """A GEMM blocking: block tile (BM x BM outputs), k-slice BK, micro-tile TM x TM per thread.

    All powers of two. Derived: the block's (BM/TM)² threads, the elements of each operand's tile a
    thread stages, and the padded shared row width (a multiple of VECTOR, so that rows stay aligned
    for vector loads, and not of 32, which spreads a warp's transposing stores of a k-contiguous tile
    over several banks).
    """

    def __init__(self, BM, BK, TM):
        self.BM, self.BK, self.TM = BM, BK, TM
        self.grid = BM // TM
        self.threads = self.grid * self.grid
        self.loads = BM * BK // self.threads
        self.width = BM + VECTOR
        self.size = BK * self.width


VECTOR = 4  # values a thread reads at once from a shared tile (one 16-byte load in float32)
LARGE_TILE = Tile(BM=128, BK=16, TM=8)  # 256 threads
SMALL_TILE = Tile(BM=32, BK=16, TM=4)  # 64 threads, for products with ≤ 32 rows or columns
MIN_K_PER_SPLIT = 64  # shortest k-range worth a block of its own when k is split (4 slices)


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
def _micro_tile(dtype, tile):
    """Device functions of a thread's TM x TM micro-tile: ``multiply`` adds the products of a staged k-slice,
    ``write`` stores the tile.

    Thread (tx, ty) of the (BM/TM)² grid owns TM rows and TM columns of the block's tile in runs of
    VECTOR: rows VECTOR·ty + (BM/TM)·VECTOR·g + v (g < TM/VECTOR, v < VECTOR), the columns likewise with
    tx. Each run is one aligned vector load from a shared tile, and a warp's loads are broadcasts (A) or
    contiguous (B).
    """
    dt = from_dtype(np.dtype(dtype))
    TM, width, size = tile.TM, tile.width, tile.size
    VEC, run_stride = VECTOR, tile.grid * VECTOR  # a run's length; from one of a thread's runs to the next
    vec_shift = _shift(VEC)
    RUNS = TM // VEC

    @device.inlined
    def multiply(tile_A, tile_B, acc, tx, ty):
        """acc[r, c] += Σ_kk A(row r, kk) B(kk, column c) over the staged slice."""
        frag_A = cuda.local.array(TM, dt)
        frag_B = cuda.local.array(TM, dt)
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

    @device.inlined
    def write(C, split, acc, row0, col0, tx, ty):
        """C[split, i, j] = acc[r, c] for the thread's outputs inside C."""
        n, p = C.shape[1], C.shape[2]
        for r in range(TM):
            i = row0 + (ty << vec_shift) + run_stride * (r >> vec_shift) + (r & (VEC - 1))
            for c in range(TM):
                j = col0 + (tx << vec_shift) + run_stride * (c >> vec_shift) + (c & (VEC - 1))
                if i < n and j < p:
                    C[split, i, j] = acc[r, c]

    return multiply, write


@functools.cache
def _gemm_kernel(dtype, tile, a_k_contiguous, b_k_contiguous):
    """C[s] = op(A)[:, ks] op(B)[ks, :] over the k-range ks of split s, for one float dtype and layout.

    op(A) (n, K) is A (n, K) when ``a_k_contiguous`` else Aᵀ with A (K, n); op(B) (K, p) is Bᵀ with
    B (p, K) when ``b_k_contiguous`` else B (K, p). C (splits, n, p). Grid (⌈p/BM⌉, ⌈n/BM⌉, splits),
    tile.threads threads (see ``_micro_tile``).
    """
    dt = from_dtype(np.dtype(dtype))
    BM, BK, TM, grid_m, size, loads = tile.BM, tile.BK, tile.TM, tile.grid, tile.size, tile.loads
    grid_shift = _shift(grid_m)
    vector_bytes = None if device.SIMULATOR else VECTOR * np.dtype(dtype).itemsize  # the simulator takes none
    origin_A, load_A, store_A = _tile_loader(tile, a_k_contiguous)
    origin_B, load_B, store_B = _tile_loader(tile, b_k_contiguous)
    multiply, write = _micro_tile(dtype, tile)

    # Two float32 blocks per SM: the large tile then fits in 128 registers; float64 (the gradient checks')
    # would spill.
    @cuda.jit(**device.launch_bounds(tile.threads, 2 if np.dtype(dtype).itemsize == 4 else 1))
    def gemm(A, B, C, K, k_chunk):
        n, p = C.shape[1], C.shape[2]
        tile_A = cuda.shared.array(size, dt, alignment=vector_bytes)
        tile_B = cuda.shared.array(size, dt, alignment=vector_bytes)
        regs_A = cuda.local.array(loads, dt)
        regs_B = cuda.local.array(loads, dt)
        acc = cuda.local.array((TM, TM), dt)
        for r in range(TM):
            for c in range(TM):
                acc[r, c] = 0
        tx = cuda.threadIdx.x & (grid_m - 1)
        ty = (cuda.threadIdx.x >> grid_shift) & (grid_m - 1)
        row0, col0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BM
        k_begin = cuda.blockIdx.z * k_chunk
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
            multiply(tile_A, tile_B, acc, tx, ty)
            cuda.syncthreads()
        write(C, cuda.blockIdx.z, acc, row0, col0, tx, ty)

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
    splits = max(1, min(device.blocks(2 * device.sm_count(), tiles), K // MIN_K_PER_SPLIT))
    k_chunk = device.blocks(device.blocks(K, splits), BK) * BK
    return device.blocks(K, k_chunk), k_chunk


def _gemm(A, B, out, K, a_k_contiguous, b_k_contiguous):
    """out (n, p) = op(A) op(B) over K, out C-contiguous."""
    n, p = out.shape
    if K == 0:
        fill(out, 0)
        return
    tile = SMALL_TILE if min(n, p) <= SMALL_TILE.BM else LARGE_TILE
    tiles = device.blocks(n, tile.BM) * device.blocks(p, tile.BM)
    splits, k_chunk = _k_splits(tiles, K, tile.BK)
    kernel = _gemm_kernel(out.dtype, tile, a_k_contiguous, b_k_contiguous)
    grid = (device.blocks(p, tile.BM), device.blocks(n, tile.BM), splits)
    if splits == 1:
        device.launch(kernel, grid, tile.threads, A, B, out.reshape(1, n, p), K, k_chunk)
        return
    partials = device.workspace("gemm splits", (splits, n, p), out.dtype)
    device.launch(kernel, grid, tile.threads, A, B, partials, K, k_chunk)
    blocks, threads = device.elementwise_grid(n * p)
    device.launch(_sum_splits_kernel, blocks, threads, partials.reshape(splits, n * p), out.reshape(n * p))


def matmul_nt(A, B, out):
    """The tiled kernel, A and B both read along k."""
    _gemm(A, B, out, A.shape[1], True, True)


def matmul_nn(A, B, out):
    """The tiled kernel, A read along k, B across it."""
    _gemm(A, B, out, A.shape[1], True, False)


def matmul_tn(A, B, out):
    """The tiled kernel, A and B both read across k."""
    _gemm(A, B, out, A.shape[0], False, False)
