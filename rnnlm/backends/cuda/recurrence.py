"""Recurrence: the window's forward and backward passes in one persistent launch each, and the first layer's
input term and the gradients that end there.

Up to m = 900 (and beyond 32 streams) a block owns a few streams for all T steps, a thread one state unit,
the block's states staged in shared memory: each block reads all of W_s at every step. From m = 900 with
few streams the blocks split the state units instead and meet at a grid-wide barrier after each step (a
cooperative launch), so that W_s is read once per step over the whole GPU.

Both kernel families are written once for both directions: a pass over the steps (``reverse`` for
backpropagation) whose per-unit result is ``finish(total, i, b, t, X, Y, out)``, with total the (W_s or
W_sᵀ) matrix-vector product's element: forward (X, Y, out) = (U, b_s, S), S[t + 1, b, i] = tanh(total +
U[t, b, i] + b_s[i]); backward (dL_ds_out, S, dL_da), dL_da[t, b, i] = (1 - S[t + 1, b, i]²)(dL_ds_out[t,
b, i] + total). The vectors multiplied at step t are out[t] (forward) or out[t + 1] (backward; none at the
last step).
"""

import functools
import math

import numpy as np
from numba import cuda, from_dtype

from rnnlm.backends.cuda import device
from rnnlm.backends.cuda.arrays import flat
from rnnlm.backends.cuda.gemm import matmul_nt
from rnnlm.backends.cuda.reductions import column_sums, link

MAX_STREAMS_PER_BLOCK = 8
MAX_RECURRENCE_THREADS = 1024
STAGE_BYTES = 4096  # bytes of one stream's state staged in shared memory at a time
SPLIT_WARPS = 8  # state units a block of the unit-split recurrence takes at a time: one per warp
SPLIT_STREAMS = 8  # streams a lane of the unit-split recurrence accumulates at once
SPLIT_STAGE_BYTES = 24576  # shared memory for the vectors a block of the unit-split recurrence stages
SPLIT_MIN_M = 900  # the recurrence splits the units, not the streams, over blocks from this state size
SPLIT_MAX_B = 32  # and up to this many streams


def _shift(n):
    return n.bit_length() - 1


@functools.cache
def _finishers(dtype):
    """(activate, backpropagate): the per-unit results of the forward and backward passes (module text)."""
    one = np.dtype(dtype).type(1)

    @device.inlined
    def activate(total, i, b, t, U, b_s, S):
        S[t + 1, b, i] = math.tanh(total + U[t, b, i] + b_s[i])

    @device.inlined
    def backpropagate(total, i, b, t, dL_ds_out, S, dL_da):
        s_t = S[t + 1, b, i]
        dL_da[t, b, i] = (one - s_t * s_t) * (dL_ds_out[t, b, i] + total)

    return activate, backpropagate


@functools.cache
def _stream_matvec(dtype, streams_per_block):
    """matvec_T(M, vecs, b0, i, staged, acc): acc[r] = Σ_j M[j, i] vecs[b0 + r, j] for r < BB streams per
    block (streams past the last one count as zero).

    M (m, m) row-major, so that thread i reads M[j, i] coalesced; vecs (B, m), staged in shared memory
    ``chunk`` values at a time, so every M[j, i] read serves BB streams. Every thread of the block calls
    it (those with i ≥ m get no result). Each chunk starts with a barrier: the block's earlier writes to
    vecs are complete and its earlier reads of ``staged`` are done, so the callers need none of their own.
    """
    BB = streams_per_block
    chunk = STAGE_BYTES // np.dtype(dtype).itemsize
    zero = np.dtype(dtype).type(0)

    @cuda.jit(device=True)
    def matvec_T(M, vecs, b0, i, staged, acc):
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

    return matvec_T, chunk


@functools.cache
def _stream_kernel(dtype, streams_per_block, reverse):
    """The stream-split pass: block x owns streams BB·x .. BB·x + BB - 1 for all T steps, thread i unit i
    (and i + blockDim, ... when m is larger than the block). kernel(M, X, Y, out) with M = W_sᵀ forward
    (read as Mᵀ v = W_s v), W_s backward; syncthreads() is only ever reached by all threads of a block."""
    dt = from_dtype(np.dtype(dtype))
    BB = streams_per_block
    matvec_T, chunk = _stream_matvec(dtype, BB)
    finish = _finishers(dtype)[reverse]

    @cuda.jit(**device.launch_bounds(MAX_RECURRENCE_THREADS))
    def kernel(M, X, Y, out):
        T, B, m = X.shape
        b0 = cuda.blockIdx.x * BB
        staged = cuda.shared.array((BB, chunk), dt)
        acc = cuda.local.array(BB, dt)
        for step in range(T):
            t = T - 1 - step if reverse else step
            source = t + 1 if reverse else t
            i = cuda.threadIdx.x
            while i - cuda.threadIdx.x < m:  # the same trip count for every thread of the block
                if source < out.shape[0]:  # the same branch for the whole block
                    matvec_T(M, out[source], b0, i, staged, acc)
                else:
                    for r in range(BB):
                        acc[r] = 0
                if i < m:
                    for r in range(BB):
                        if b0 + r < B:
                            finish(acc[r], i, b0 + r, t, X, Y, out)
                i += cuda.blockDim.x

    return kernel


@functools.cache
def _transpose_kernel(dtype):
    """dst = srcᵀ for square (m, m) arrays through shared tiles: blocks of (side, rows) threads, a side x side
    tile per block (side ≤ 32, rows dividing it)."""
    dt = from_dtype(np.dtype(dtype))

    @cuda.jit
    def transpose(src, dst):
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

    return transpose


@functools.cache
def _split_lanes(dtype):
    """(lane_products, shares_total, chunk) of the unit-split recurrence: a warp computes unit i for every
    stream, its lanes along j (M[i, j] read coalesced, the vectors staged by the block in shared memory),
    each lane adding a share of the products; the block adds the 32 shares of each (unit, stream) in order."""
    dt = from_dtype(np.dtype(dtype))
    BG = SPLIT_STREAMS
    chunk = SPLIT_STAGE_BYTES // (BG * np.dtype(dtype).itemsize)
    stream_bits = _shift(BG)

    @cuda.jit(device=True)
    def lane_products(M, vecs, i, lane, b0, staged, partial):
        """partial[warp, r, lane] = Σ_{j ≡ lane (mod 32)} M[i, j] vecs[b0 + r, j] for r < BG (0 if i ≥ m;
        streams past the last repeat it, their sums unused). Every thread of the block calls this."""
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

    return lane_products, shares_total, chunk


@functools.cache
def _split_kernel(dtype, reverse):
    """The unit-split pass, kernel(M, X, Y, out) with M = W_s forward, W_sᵀ backward: blocks share the state
    units, all streams each, and meet at a grid-wide barrier after each step (a cooperative launch whose
    blocks all fit on the GPU at once)."""
    dt = from_dtype(np.dtype(dtype))
    NW, BG = SPLIT_WARPS, SPLIT_STREAMS
    lane_products, shares_total, chunk = _split_lanes(dtype)
    finish = _finishers(dtype)[reverse]
    stream_bits = _shift(BG)

    @cuda.jit
    def kernel(M, X, Y, out):
        T, B, m = X.shape
        grid = cuda.cg.this_grid()
        partial = cuda.shared.array((NW, BG, 33), dt)
        staged = cuda.shared.array((BG, chunk), dt)
        tid = cuda.threadIdx.x
        for step in range(T):
            t = T - 1 - step if reverse else step
            source = t + 1 if reverse else t
            vecs = out[min(source, out.shape[0] - 1)]
            u0 = cuda.blockIdx.x * NW
            while u0 < m:  # the same trip counts for every thread of the block
                b0 = 0
                while b0 < B:
                    # no vectors at the backward pass's last step: unit m, none, gives zero products
                    unit = u0 + (tid >> 5) if source < out.shape[0] else m
                    lane_products(M, vecs, unit, tid & 31, b0, staged, partial)
                    cuda.syncthreads()
                    i, b = u0 + (tid >> stream_bits), b0 + (tid & (BG - 1))  # the sum thread tid makes
                    if tid < NW * BG and i < m and b < B:
                        finish(shares_total(partial), i, b, t, X, Y, out)
                    cuda.syncthreads()
                    b0 += BG
                u0 += cuda.gridDim.x * NW
            grid.sync()

    return kernel


def _streams_per_block(B):
    """Streams per block: 1 while the B blocks fit on half the SMs, else more (up to 8), so that each read of
    W_s serves several streams."""
    streams = 1
    while streams < MAX_STREAMS_PER_BLOCK and device.blocks(B, streams) > max(1, device.sm_count() // 2):
        streams *= 2
    return streams


def _transposed(W_s):
    """W_sᵀ (m, m) in a workspace."""
    m = W_s.shape[0]
    W_sT = device.workspace("W_s transposed", (m, m), W_s.dtype)
    side = device.threads(m, 32)
    grid = (device.blocks(m, side), device.blocks(m, side))
    device.launch(_transpose_kernel(W_s.dtype), grid, (side, device.threads(side, 8)), W_s, W_sT)
    return W_sT


def _pass(W_s, X, Y, out, reverse):
    """One launch of the recurrence over the window in either direction (see the module's text)."""
    T, B, m = X.shape
    if m >= SPLIT_MIN_M and B <= SPLIT_MAX_B:
        M = _transposed(W_s) if reverse else W_s
        kernel = _split_kernel(out.dtype, reverse)
        n_blocks = min(device.sm_count(), device.blocks(m, SPLIT_WARPS))  # all resident at once
        device.launch(kernel, n_blocks, 32 * SPLIT_WARPS, M, X, Y, out)
        return
    M = W_s if reverse else _transposed(W_s)
    streams = _streams_per_block(B)
    n_threads = min(MAX_RECURRENCE_THREADS, device.blocks(m, 32) * 32)
    device.launch(_stream_kernel(out.dtype, streams, reverse), device.blocks(B, streams), n_threads, M, X, Y, out)


def forward(W_s, b_s, U, S):
    """One launch for all T steps (after a transpose of W_s, so that the per-step products read it coalesced,
    or with the units split over blocks from m = 900)."""
    _pass(W_s, U, b_s, S, reverse=False)


def backward(W_s, S, dL_ds_out, dL_da):
    """One launch for all T steps."""
    _pass(W_s, dL_ds_out, S, dL_da, reverse=True)


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
    tx, ty = device.threads(m, 32), device.threads(N, 8)
    return (device.blocks(m, tx), device.blocks(N, ty)), (tx, ty)


def embed(W_x, inputs, U):
    """A thread per (state unit, position), the units of a warp contiguous in W_x's column."""
    T, B, m = U.shape
    grid, block = _unit_position_grid(m, T * B)
    device.launch(_embed_kernel, grid, block, W_x, inputs.reshape(T * B), U.reshape(T * B, m))


@cuda.jit
def _activate_rows_kernel(U, index, indexed, first, b_s, S, add):
    """S[r, i] = tanh(S[r, i] + U[u, i] + b_s[i]) when ``add`` (else without S[r, i]), u = index[first + r]
    when ``indexed``, else first + r: one thread per (state unit i, row r)."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    r = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
    n, m = S.shape
    if i < m and r < n:
        u = index[first + r] if indexed else first + r
        total = U[u, i] + b_s[i]
        if add:
            total += S[r, i]
        S[r, i] = math.tanh(total)


def forward_packed(W_s, b_s, U, index, S_carried, S, offsets):
    """Step by step: the tiled GEMM writes W_s s into the step's rows, then a thread per (state unit, row) adds
    the input term and the bias and takes the tanh."""
    m = S.shape[1]
    indexed = index is not None
    if not indexed:
        index = device.workspace("no index", (1,), np.int32)
    for t in range(len(offsets) - 1):
        first, last = int(offsets[t]), int(offsets[t + 1])
        if first == last:
            break
        rows = S[first:last]
        previous = S_carried if t == 0 else S[int(offsets[t - 1]) :]
        if previous is not None:
            matmul_nt(previous[: last - first], W_s, rows)
        grid, block = _unit_position_grid(m, last - first)
        device.launch(_activate_rows_kernel, grid, block, U, index, int(indexed), first, b_s, rows,
                      int(previous is not None))


@cuda.jit
def _claim_tokens_kernel(tokens, first, slot, claimed):
    """A slot for each token without one (``rnnlm.backends``), claimed at its first position: one thread per
    position."""
    p = cuda.grid(1)
    if p < tokens.shape[0] and first[tokens[p]] == p and slot[tokens[p]] < 0:
        slot[tokens[p]] = cuda.atomic.add(claimed, 0, 1)


@cuda.jit
def _scatter_columns_kernel(tokens, next_pos, first, dL_dU, dW_x, slot):
    """dW_x[i, slot[x]] += Σ over the positions p of token x of dL_dU[p, i], in position order.

    One thread per (state unit i, position p); only a token's first position walks its list, so each
    column is written by one thread for each i. dL_dU (N, m); dW_x (m, V) (column-major: the i of a
    warp are contiguous), slotted by slot (V,).
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
    dW_x[i, slot[x]] += total


def input_grads(inputs, dL_dU, dW_x, slot, claimed):
    """The positions of each token are linked into a list, each token without a slot claims one at its first
    position, and one thread per (row of dW_x, token) sums the list in order: deterministic sums, slots in
    any order."""
    T, B, m = dL_dU.shape
    N = T * B
    tokens = inputs.reshape(N)
    next_pos, first = link(tokens, dW_x.shape[1], absent=False)  # only the tokens' own entries are read
    n_threads = device.threads(N, device.ELEMENTWISE_THREADS)
    device.launch(_claim_tokens_kernel, device.blocks(N, n_threads), n_threads, tokens, first, slot, claimed)
    grid, block = _unit_position_grid(m, N)
    device.launch(_scatter_columns_kernel, grid, block, tokens, next_pos, first, dL_dU.reshape(N, m), dW_x, slot)


def bias_grad(dL_da, db):
    """Column sums, each column's phases added in order in shared memory."""
    column_sums(dL_da, db)


@cuda.jit
def _multiply_kernel(a, mask, out):
    k = cuda.grid(1)
    while k < out.shape[0]:
        out[k] = a[k] * mask[k]
        k += cuda.gridsize(1)


def multiply(a, mask, out):
    """A grid-stride kernel over the flat arrays."""
    out_flat = flat(out)
    blocks, threads = device.elementwise_grid(out_flat.size)
    device.launch(_multiply_kernel, blocks, threads, flat(a), flat(mask), out_flat)
