"""CUDA backend: ``numba.cuda`` kernels on device arrays, the twin of ``cpu.py`` function for function.

Arrays are C-contiguous numba device arrays, float32 in training (float64 works too, for the gradient
checks); token ids are int32. Everything runs on the default stream, so kernels follow each other in
launch order; only the scalars a caller asks for (a loss, a sum of squares) come back to the host.

Kernels whose shared or local arrays need a compile-time element type are built by small factories
cached per dtype (and per tile constant), so each exists once per float type. Every reduction sums in a
fixed order (no floating-point atomics): results do not change from run to run.

- GEMMs: one shared-memory kernel, 128 x 128 output tile per block of 256 threads, each thread an
  8 x 8 register micro-tile, k staged 8 at a time with the next slice prefetched into registers;
  the transpose cases differ only in how a tile is read from global memory. Products with few output
  tiles and a long k split k over blocks (partial products in a workspace, then summed in order).
- Recurrence: one persistent launch for the whole window, forward and backward alike; a block owns a
  few streams for all T steps, a thread one state unit, the block's states staged in shared memory.
- Softmax: one block per row, an online max/sum in one pass, the gradient in a second.
"""

import functools
import math

import numpy as np
from numba import config, cuda, float64, from_dtype

name = "cuda"

_REDUCE_THREADS = 256  # threads of a block that reduces (a power of two)
_ELEMENTWISE_THREADS = 256


# ---------------------------------------------------------------------------------------- launch helpers


def _blocks(n, threads):
    return (n + threads - 1) // threads


def _threads(n, cap):
    """The smallest power of two ≥ n, at most ``cap``: small problems (the simulator's) get small blocks."""
    return min(cap, 1 << max(0, int(n) - 1).bit_length())


@functools.cache
def _sm_count():
    """Streaming multiprocessors of the GPU; the simulator has no such attribute and counts as one."""
    return getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1)


def _launch_bounds(max_threads, min_blocks=1):
    """jit options that cap a kernel's registers so that min_blocks blocks of max_threads fit on an SM.

    Empty under the simulator, which takes no launch bounds (and has no registers).
    """
    return {} if config.ENABLE_CUDASIM else {"launch_bounds": (max_threads, min_blocks)}


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
        array = _workspaces[key] = cuda.device_array(shape, dtype)
    return array


# ---------------------------------------------------------------------------------------- arrays


def asarray(array, dtype=None):
    """A C-contiguous device array holding a copy of the host array ``array``."""
    return cuda.to_device(np.ascontiguousarray(array, dtype=dtype))


def to_numpy(array):
    """A numpy copy of a device array."""
    return array.copy_to_host()


def zeros(shape, dtype=np.float32):
    array = cuda.device_array(shape, dtype)
    _fill_zero(array)
    return array


def copy_into(src, dst):
    """dst[...] = src; src is a host array or a device array of dst's shape, dst a contiguous device array."""
    if isinstance(src, np.ndarray):
        src = np.ascontiguousarray(src, dtype=dst.dtype)
    dst.copy_to_device(src)


def synchronize():
    """Wait until the device finished all work launched so far."""
    cuda.synchronize()


@cuda.jit
def _fill_zero_kernel(flat):
    """flat[:] = 0 (grid-stride)."""
    for k in range(cuda.grid(1), flat.shape[0], cuda.gridsize(1)):
        flat[k] = 0


def _elementwise_grid(n):
    """(blocks, threads) for a grid-stride loop over n elements: a few waves of blocks at most."""
    threads = _threads(n, _ELEMENTWISE_THREADS)
    return min(_blocks(n, threads), 32 * _sm_count()), threads


def _fill_zero(array):
    flat = array.reshape(array.size)
    blocks, threads = _elementwise_grid(flat.size)
    _fill_zero_kernel[blocks, threads](flat)


# ---------------------------------------------------------------------------------------- GEMMs

_BM = 128  # rows of the output (and of op(A)) per block; op(B)'s tile has as many columns (_BN = _BM)
_BK = 16  # k-slice staged in shared memory per iteration
_TM = 8  # output rows per thread (and as many columns)
_GRID_M = _BM // _TM  # threads along each side of the block's 16 x 16 thread grid
_GEMM_THREADS = _GRID_M * _GRID_M
_TILE_LOADS = _BM * _BK // _GEMM_THREADS  # elements of each operand's tile a thread stages
_TILE_WIDTH = _BM + 2  # padded rows: a warp's transposing stores of a k-contiguous tile hit 32 banks
_TILE_SIZE = _BK * _TILE_WIDTH  # elements of a flat shared tile: index kk * _TILE_WIDTH + row
_BM_SHIFT, _BK_SHIFT, _GRID_SHIFT = (n.bit_length() - 1 for n in (_BM, _BK, _GRID_M))  # powers of 2
_MIN_K_PER_SPLIT = 256  # shortest k-range worth a block of its own when k is split


@functools.cache
def _tile_loader(k_contiguous):
    """Device functions staging a (_BM rows × _BK) slice of an operand into a flat shared tile (k-major).

    The operand X is op(A) (rows i) or op(B)ᵀ (rows j): with ``k_contiguous`` element (row, k) is
    X[row, k], else X[k, row]. Consecutive threads read consecutive addresses in both layouts: in a
    k-contiguous operand a thread stages one k of rows row, row + 16, ...; in the other one row at
    k, k + 2, ... (its ``origin``, the first element's (row, k) in the tile).
    """
    row_step = _GEMM_THREADS // _BK if k_contiguous else 0
    k_step = 0 if k_contiguous else _GEMM_THREADS // _BM

    @cuda.jit(device=True)
    def origin():
        tid = cuda.threadIdx.x
        if k_contiguous:
            return tid >> _BK_SHIFT, tid & (_BK - 1)
        return tid & (_BM - 1), tid >> _BM_SHIFT

    @cuda.jit(device=True)
    def load(X, regs, i, k, n_rows, k_end):
        """regs[e] = X(i + e · row_step, k + e · k_step), 0 outside the operand or the k-range."""
        for e in range(_TILE_LOADS):
            i_e, k_e = i + e * row_step, k + e * k_step
            if i_e < n_rows and k_e < k_end:
                regs[e] = X[i_e, k_e] if k_contiguous else X[k_e, i_e]
            else:
                regs[e] = 0

    @cuda.jit(device=True)
    def store(regs, tile, row, kk):
        for e in range(_TILE_LOADS):
            tile[(kk + e * k_step) * _TILE_WIDTH + row + e * row_step] = regs[e]

    return origin, load, store


@functools.cache
def _gemm_kernel(dtype, a_k_contiguous, b_k_contiguous):
    """C[s] = op(A)[:, ks] op(B)[ks, :] over the k-range ks of split s, for one float dtype and layout.

    op(A) (n, K) is A (n, K) when ``a_k_contiguous`` else Aᵀ with A (K, n); op(B) (K, p) is Bᵀ with
    B (p, K) when ``b_k_contiguous`` else B (K, p). C (splits, n, p). Grid (⌈p/128⌉, ⌈n/128⌉, splits),
    256 threads; thread (tx, ty) owns rows ty + 16 r and columns tx + 16 c (r, c < 8) of the block's
    tile, so that its shared-memory reads are broadcasts or conflict-free.
    """
    dt = from_dtype(np.dtype(dtype))
    origin_A, load_A, store_A = _tile_loader(a_k_contiguous)
    origin_B, load_B, store_B = _tile_loader(b_k_contiguous)

    @cuda.jit(**_launch_bounds(_GEMM_THREADS, 2))  # ≤ 128 registers (ptxas would take ~135)
    def gemm(A, B, C, K, k_chunk):
        n, p = C.shape[1], C.shape[2]
        tile_A = cuda.shared.array(_TILE_SIZE, dt)
        tile_B = cuda.shared.array(_TILE_SIZE, dt)
        regs_A = cuda.local.array(_TILE_LOADS, dt)
        regs_B = cuda.local.array(_TILE_LOADS, dt)
        frag_A = cuda.local.array(_TM, dt)
        frag_B = cuda.local.array(_TM, dt)
        acc = cuda.local.array((_TM, _TM), dt)
        for r in range(_TM):
            for c in range(_TM):
                acc[r, c] = 0
        # Shifts and masks (not // and %) let LLVM prove the tile offsets non-negative, which removes
        # numba's negative-index wraparound from the inner loop; so does a while loop in place of a range.
        tx = cuda.threadIdx.x & (_GRID_M - 1)
        ty = (cuda.threadIdx.x >> _GRID_SHIFT) & (_GRID_M - 1)
        row0 = cuda.blockIdx.y * _BM
        col0 = cuda.blockIdx.x * _BM
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
            k0 += _BK
            if k0 < k_end:  # prefetch the next slice while this one is multiplied
                load_A(A, regs_A, row0 + row_A, k0 + kk_A, n, k_end)
                load_B(B, regs_B, col0 + row_B, k0 + kk_B, p, k_end)
            a, b = ty, tx  # this thread's first A and B values of slice kk in the flat tiles
            while a < _TILE_SIZE:
                for r in range(_TM):
                    frag_A[r] = tile_A[a + _GRID_M * r]
                for c in range(_TM):
                    frag_B[c] = tile_B[b + _GRID_M * c]
                for r in range(_TM):
                    for c in range(_TM):
                        acc[r, c] += frag_A[r] * frag_B[c]
                a += _TILE_WIDTH
                b += _TILE_WIDTH
            cuda.syncthreads()
        for r in range(_TM):
            i = row0 + ty + _GRID_M * r
            for c in range(_TM):
                j = col0 + tx + _GRID_M * c
                if i < n and j < p:
                    C[split, i, j] = acc[r, c]

    return gemm


@cuda.jit
def _sum_splits_kernel(partials, out):
    """out[k] = Σ_s partials[s, k], s in order.  partials (splits, n), out (n,)."""
    for k in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        total = partials[0, k]
        for s in range(1, partials.shape[0]):
            total += partials[s, k]
        out[k] = total


def _k_splits(n, p, K):
    """(splits, k_chunk): split k until there are about two blocks per SM, k_chunk a multiple of _BK."""
    tiles = _blocks(n, _BM) * _blocks(p, _BM)
    splits = max(1, min(_blocks(2 * _sm_count(), tiles), K // _MIN_K_PER_SPLIT))
    k_chunk = _blocks(_blocks(K, splits), _BK) * _BK
    return _blocks(K, k_chunk), k_chunk


def _gemm(A, B, out, K, a_k_contiguous, b_k_contiguous):
    n, p = out.shape
    if K == 0:
        _fill_zero(out)
        return
    splits, k_chunk = _k_splits(n, p, K)
    kernel = _gemm_kernel(out.dtype, a_k_contiguous, b_k_contiguous)
    grid = (_blocks(p, _BM), _blocks(n, _BM), splits)
    if splits == 1:
        kernel[grid, _GEMM_THREADS](A, B, out.reshape(1, n, p), K, k_chunk)
        return
    partials = _workspace("gemm splits", (splits, n, p), out.dtype)
    kernel[grid, _GEMM_THREADS](A, B, partials, K, k_chunk)
    blocks, threads = _elementwise_grid(n * p)
    _sum_splits_kernel[blocks, threads](partials.reshape(splits, n * p), out.reshape(n * p))


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
    through W_s itself. syncthreads() is only ever reached by all threads of a block.
    """
    dt = from_dtype(np.dtype(dtype))
    BB = streams_per_block
    chunk = _STAGE_BYTES // np.dtype(dtype).itemsize
    zero, one = np.dtype(dtype).type(0), np.dtype(dtype).type(1)

    @cuda.jit(device=True)
    def matvec_T(M, vecs, b0, i, staged, acc):
        """acc[r] = Σ_j M[j, i] vecs[b0 + r, j] for r < BB (streams past the last one count as zero).

        M (m, m), vecs (B, m); every thread of the block calls this (those with i ≥ m get no result).
        The loops are while loops: numba's range() lowering keeps LLVM from simplifying the indexing.
        """
        m = M.shape[0]
        n_streams = vecs.shape[0]
        for r in range(BB):
            acc[r] = 0
        j0 = 0
        while j0 < m:
            width = min(chunk, m - j0)
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
            cuda.syncthreads()
            j0 += chunk

    @cuda.jit
    def transpose(src, dst):
        """dst = srcᵀ for square (m, m) arrays, through 32 x 33 shared tiles; blocks of (32, 8) threads."""
        tile = cuda.shared.array((32, 33), dt)
        m = src.shape[0]
        x0, y0 = cuda.blockIdx.x * 32, cuda.blockIdx.y * 32
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        for dy in range(0, 32, 8):
            if y0 + ty + dy < m and x0 + tx < m:
                tile[ty + dy, tx] = src[y0 + ty + dy, x0 + tx]
        cuda.syncthreads()
        for dy in range(0, 32, 8):
            if x0 + ty + dy < m and y0 + tx < m:
                dst[x0 + ty + dy, y0 + tx] = tile[tx, ty + dy]

    @cuda.jit(**_launch_bounds(_MAX_RECURRENCE_THREADS))
    def forward(W_sT, W_x, b_s, inputs, S):
        """S[t + 1, b] = tanh(W_s S[t, b] + W_x[:, inputs[t, b]] + b_s) for t < T, b in this block's streams.

        W_sT (m, m) = W_sᵀ; W_x (m, V); b_s (m,); inputs (T, B) int32; S (T + 1, B, m).
        """
        T, B = inputs.shape
        m = W_sT.shape[0]
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
                            a_t = acc[r] + W_x[i, inputs[t, b]] + b_s[i]
                            S[t + 1, b, i] = math.tanh(a_t)
                i += cuda.blockDim.x
            cuda.syncthreads()  # S[t + 1] complete before the next step stages it

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
            cuda.syncthreads()  # dL_da[t] complete before the next step stages it

    return transpose, forward, backward


def _streams_per_block(B):
    """Streams per block: one while that leaves half the SMs or more free, more to read W_s less often."""
    streams = 1
    while streams < _MAX_STREAMS_PER_BLOCK and _blocks(B, streams) > max(1, _sm_count() // 2):
        streams *= 2
    return streams


def _recurrence_launch(B, m, dtype):
    """(kernels, grid, threads) of a recurrence over B streams of state size m."""
    streams = _streams_per_block(B)
    threads = min(_MAX_RECURRENCE_THREADS, _blocks(m, 32) * 32)
    return _recurrence_kernels(dtype, streams), _blocks(B, streams), threads


def forward(W_x, W_s, b_s, inputs, S):
    """Run the recurrence over a window: S[t + 1] = tanh(W_s S[t] + W_x[:, inputs[t]] + b_s).

    W_x (m, V), W_s (m, m), b_s (m,); inputs (T, B) int32 ids x_{t-1};
    S (T + 1, B, m): S[0] holds the carried state on entry, S[1:] is written. One launch for all T steps
    (after a transpose of W_s, so that the per-step products read it coalesced).
    """
    T, B = inputs.shape
    m = W_s.shape[0]
    (transpose, forward_kernel, _), grid, threads = _recurrence_launch(B, m, S.dtype)
    W_sT = _workspace("W_s transposed", (m, m), W_s.dtype)
    transpose[(_blocks(m, 32), _blocks(m, 32)), (32, 8)](W_s, W_sT)
    forward_kernel[grid, threads](W_sT, W_x, b_s, inputs, S)


def backward(W_s, S, dL_ds_out, dL_da):
    """Backpropagation through time over a window, from the output layer's gradient.

    S (T + 1, B, m) from ``forward``; dL_ds_out (T, B, m) = W_oᵀ dL/dz per step.
    Writes dL_da (T, B, m): dL/ds_t = dL_ds_out[t] + W_sᵀ dL/da_{t+1}, dL/da_t = (1 - s_t²) ⊙ dL/ds_t.
    The state carried into the window gets no gradient (truncated BPTT). One launch for all T steps.
    """
    T, B, m = dL_da.shape
    (_, _, backward_kernel), grid, threads = _recurrence_launch(B, m, S.dtype)
    backward_kernel[grid, threads](W_s, S, dL_ds_out, dL_da)


# ---------------------------------------------------------------------------------------- input gradients


@cuda.jit
def _link_tokens_kernel(tokens, next_pos, is_head):
    """For each position p of tokens (N,) int32: next_pos[p] = the next position holding the same token (N
    when none), is_head[p] = 1 when no earlier position holds it. Positions of one token form a list."""
    p = cuda.grid(1)
    N = tokens.shape[0]
    if p >= N:
        return
    x = tokens[p]
    following = N
    for q in range(p + 1, N):
        if tokens[q] == x:
            following = q
            break
    next_pos[p] = following
    head = 1
    for q in range(p - 1, -1, -1):
        if tokens[q] == x:
            head = 0
            break
    is_head[p] = head


@cuda.jit
def _scatter_columns_kernel(tokens, next_pos, is_head, dL_da, dW_x):
    """dW_x[i, x] = Σ over the positions p of token x of dL_da[p, i], in position order.

    One thread per (state unit i, position p); only the first position of each token walks its list, so
    every column is written by one thread and without atomics. dL_da (N, m); dW_x (m, V), zero elsewhere.
    """
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    p = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    N, m = dL_da.shape
    if i >= m or p >= N or is_head[p] == 0:
        return
    total = dL_da[p, i]
    q = next_pos[p]
    while q < N:
        total += dL_da[q, i]
        q = next_pos[q]
    dW_x[i, tokens[p]] = total


@functools.cache
def _column_sums_kernel(dtype):
    """out[j] = Σ_r X[r, j] for X (N, V): blocks of (tx ≤ 32 columns, ty ≤ 32 row phases), the ty partial
    sums added in order in shared memory."""
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
            for r in range(ty, N, cuda.blockDim.y):
                total += X[r, j]
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
    _column_sums_kernel(X.dtype)[_blocks(V, tx), (tx, ty)](X, out)


def input_grads(inputs, dL_da, dW_x, db_s):
    """dW_x[:, x_{t-1}] += dL/da_t and db_s = Σ_t dL/da_t over the window (both overwritten).

    inputs (T, B) int32; dL_da (T, B, m); dW_x (m, V); db_s (m,). Positions holding the same token are
    linked into lists on the device, and each column of dW_x is summed by one thread: deterministic.
    """
    T, B, m = dL_da.shape
    N = T * B
    tokens = inputs.reshape(N)
    dL_da = dL_da.reshape(N, m)
    next_pos = _workspace("next position", (N,), np.int32)
    is_head = _workspace("first position", (N,), np.int32)
    threads = _threads(N, _ELEMENTWISE_THREADS)
    _link_tokens_kernel[_blocks(N, threads), threads](tokens, next_pos, is_head)
    _fill_zero(dW_x)
    tx, ty = _threads(m, 32), _threads(N, 8)
    grid = (_blocks(m, tx), _blocks(N, ty))
    _scatter_columns_kernel[grid, (tx, ty)](tokens, next_pos, is_head, dL_da, dW_x)
    _column_sums(dL_da, db_s)


# ---------------------------------------------------------------------------------------- softmax


@functools.cache
def _softmax_kernels(dtype):
    """(xent_grad, xent, softmax) kernels for one float dtype: one block per row of Z (N, V)."""
    dt = from_dtype(np.dtype(dtype))
    lowest = np.finfo(dtype).min  # a finite "-inf": merging two empty partial sums stays 0, not NaN
    zero, one = np.dtype(dtype).type(0), np.dtype(dtype).type(1)

    @cuda.jit(device=True)
    def row_stats(Z, r, b_o):
        """(max, Σ exp(z - max)) over the row z = Z[r] + b_o, for every thread of the block.

        Each thread keeps a running max and a sum rescaled whenever the max grows (one pass over the
        row), then a tree in shared memory merges the threads' pairs; blockDim.x is a power of two.
        """
        tops = cuda.shared.array(_REDUCE_THREADS, dt)
        totals = cuda.shared.array(_REDUCE_THREADS, dt)
        tid = cuda.threadIdx.x
        top, total = lowest, zero
        for j in range(tid, Z.shape[1], cuda.blockDim.x):
            z = Z[r, j] + b_o[j]
            if z > top:
                total = total * math.exp(top - z) + one
                top = z
            else:
                total += math.exp(z - top)
        tops[tid] = top
        totals[tid] = total
        cuda.syncthreads()
        half = cuda.blockDim.x // 2
        while half > 0:
            if tid < half:
                top_b, total_b = tops[tid + half], totals[tid + half]
                top = max(top, top_b)
                total = total * math.exp(tops[tid] - top) + total_b * math.exp(top_b - top)
                tops[tid] = top
                totals[tid] = total
            cuda.syncthreads()
            half //= 2
        return tops[0], totals[0]

    @cuda.jit
    def xent_grad(Z, b_o, targets, scale, losses):
        """losses[r] = -log p(targets[r]), Z[r] = scale · (p - onehot(targets[r])); p = softmax(Z[r] + b_o).

        Z (N, V); b_o (V,); targets (N,) int32; scale of Z's dtype; losses (N,) float64.
        """
        r = cuda.blockIdx.x
        y = targets[r]
        z_y = Z[r, y] + b_o[y]  # read before any thread overwrites the row
        top, total = row_stats(Z, r, b_o)
        if cuda.threadIdx.x == 0:
            losses[r] = top + math.log(total) - z_y
        inv = scale / total
        for j in range(cuda.threadIdx.x, Z.shape[1], cuda.blockDim.x):
            dL_dz = math.exp(Z[r, j] + b_o[j] - top) * inv
            if j == y:
                dL_dz -= scale
            Z[r, j] = dL_dz

    @cuda.jit
    def xent(Z, b_o, targets, losses):
        """losses[r] = -log softmax(Z[r] + b_o)[targets[r]]; Z is left as it is."""
        r = cuda.blockIdx.x
        y = targets[r]
        z_y = Z[r, y] + b_o[y]
        top, total = row_stats(Z, r, b_o)
        if cuda.threadIdx.x == 0:
            losses[r] = top + math.log(total) - z_y

    @cuda.jit
    def softmax(Z, b_o):
        """Z[r] = softmax(Z[r] + b_o)."""
        r = cuda.blockIdx.x
        top, total = row_stats(Z, r, b_o)
        inv = one / total
        for j in range(cuda.threadIdx.x, Z.shape[1], cuda.blockDim.x):
            Z[r, j] = math.exp(Z[r, j] + b_o[j] - top) * inv

    return xent_grad, xent, softmax


def _row_launch(Z):
    """(grid, threads) of the one-block-per-row kernels."""
    N, V = Z.shape
    return N, _threads(V, _REDUCE_THREADS)


def softmax_xent_grad(Z, b_o, targets, scale, db_o):
    """Fused softmax + cross-entropy + its gradient over all rows of a window.

    Z (N, V): logits W_o s_t without the bias on entry; on return Z = scale · dL/dz = scale · (p_t -
    onehot(x̂_t)). b_o (V,); targets (N,) int32; db_o (V,) is overwritten with Σ_rows of the new Z.
    Returns Σ_rows -log p_t(x̂_t) as a float (the rows' losses summed in float64 on the host).
    """
    xent_grad, _, _ = _softmax_kernels(Z.dtype)
    losses = _workspace("row losses", (Z.shape[0],), np.float64)
    grid, threads = _row_launch(Z)
    xent_grad[grid, threads](Z, b_o, targets, Z.dtype.type(scale), losses)
    _column_sums(Z, db_o)
    return float(losses.copy_to_host().sum())


def softmax_xent(Z, b_o, targets):
    """Σ_rows -log softmax(Z + b_o)[target] for evaluation; Z (N, V) is left unchanged."""
    _, xent, _ = _softmax_kernels(Z.dtype)
    losses = _workspace("row losses", (Z.shape[0],), np.float64)
    grid, threads = _row_launch(Z)
    xent[grid, threads](Z, b_o, targets, losses)
    return float(losses.copy_to_host().sum())


def softmax_rows(Z, b_o):
    """Z (N, V) := softmax(Z + b_o) row by row (used for sampling)."""
    _, _, softmax = _softmax_kernels(Z.dtype)
    grid, threads = _row_launch(Z)
    softmax[grid, threads](Z, b_o)


# ---------------------------------------------------------------------------------------- update


@cuda.jit
def _sum_squares_kernel(flat, partials):
    """partials[block] = Σ flat[k]² over the block's grid-stride share, in float64."""
    squares = cuda.shared.array(_REDUCE_THREADS, float64)
    tid = cuda.threadIdx.x
    total = 0.0
    for k in range(cuda.grid(1), flat.shape[0], cuda.gridsize(1)):
        v = float64(flat[k])
        total += v * v
    squares[tid] = total
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if tid < half:
            squares[tid] += squares[tid + half]
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        partials[cuda.blockIdx.x] = squares[0]


def sum_squares(array):
    """Σ array² as a float (for the gradient norm): per-block float64 sums, added on the host."""
    flat = array.reshape(array.size)
    threads = _threads(flat.size, _REDUCE_THREADS)
    blocks = min(_blocks(flat.size, threads), 4 * _sm_count())
    partials = _workspace("sum of squares", (blocks,), np.float64)
    _sum_squares_kernel[blocks, threads](flat, partials)
    return float(partials.copy_to_host().sum())


@cuda.jit
def _sgd_kernel(param, grad, step, shrink):
    for k in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
        param[k] = shrink * param[k] - step * grad[k]


def sgd_update(param, grad, step, shrink):
    """param = shrink · param - step · grad, any shape; step and shrink have the param's dtype.

    SGD on the clipped gradient plus the L2 term: step = lr · clip_scale, shrink = 1 - lr · 2λ.
    """
    flat = param.reshape(param.size)
    blocks, threads = _elementwise_grid(flat.size)
    _sgd_kernel[blocks, threads](flat, grad.reshape(grad.size), step, shrink)
