"""Hierarchical softmax (``rnnlm.huffman``): one thread per row walks its target's path up the parent pointers
(node logits, loss, dL/dz into a scratch array indexed by the node's depth, dL/ds); then one thread per node
used claims its row of the slotted dW_o, and one thread per (node, unit) sums that row over the rows whose
targets lie below the node.

Those rows are contiguous once the rows are sorted by their target's rank among the leaves in depth-first
order (``huffman.subtree_spans``: a node's leaves are one run of ranks; the CPU takes the rows in the same
order): the node finds them by bisection and adds them in that order,
deterministically and without atomics. The sort is done on the host (the targets come from the host; reading
them back waits for the kernels queued before); the tree's layout (ranks, each node's run of ranks and its
depth) is computed on the host once per tree array.
"""

import functools
import math

import numpy as np
from numba import cuda

from rnnlm.backends.cuda import device
from rnnlm.backends.cuda.reductions import norm, slotted_sum_squares_kernel
from rnnlm.backends.cuda.softmax import DeviceSum
from rnnlm.huffman import subtree_spans


class _Layout:
    """A tree's layout: on the device first, end (V - 1,) int64 the run of leaf ranks below each internal node
    and node_depth (V - 1,) int32; on the host rank (V,) each word's depth-first rank and max_depth (the
    longest path)."""

    def __init__(self, parent, sign):
        V = (len(parent) + 1) // 2
        start, leaves, depth = subtree_spans(parent, sign)
        self.rank, self.max_depth = start[:V], int(depth[:V].max())
        self.first, self.end, self.node_depth = (device.to_device(np.ascontiguousarray(a))
                                                 for a in (start[V:], start[V:] + leaves[V:], depth[V:]))


_layouts = {}  # id(tree_parent) -> (that array, its _Layout); the array stays referenced so its id is not reused


def _layout(tree_parent, tree_sign):
    entry = _layouts.get(id(tree_parent))
    if entry is None:
        entry = _layouts[id(tree_parent)] = tree_parent, _Layout(tree_parent.copy_to_host(), tree_sign.copy_to_host())
    return entry[1]


@device.inlined
def _node_terms(u):
    """(-log σ(u), σ(-u)) in float64 without overflow."""
    e = math.exp(-abs(u))
    if u >= 0:
        return math.log1p(e), e / (1.0 + e)
    return -u + math.log1p(e), 1.0 / (1.0 + e)


@functools.cache
def _row_kernels(dtype):
    """(hs_rows, hs_loss): one thread per row r, walking from targets[r] up to the root."""
    to_dtype = np.dtype(dtype).type
    zero = to_dtype(0)

    @device.inlined
    def node_logit(W_o, b_o, k, S_next, r):
        z = b_o[k]
        i = 0
        while i < S_next.shape[1]:
            z += W_o[k, i] * S_next[r, i]
            i += 1
        return z

    @cuda.jit
    def hs_rows(S_next, W_o, b_o, targets, parent, sign, scale, G, losses, dL_ds):
        """losses[r] = -log p(targets[r]); G[r, d] = scale · dL/dz of the path's node at depth d; dL_ds[r] = Σ
        G[r, d] W_o[node] (overwritten)."""
        r = cuda.grid(1)
        if r >= S_next.shape[0]:
            return
        V = (parent.shape[0] + 1) // 2
        i = 0
        while i < S_next.shape[1]:
            dL_ds[r, i] = zero
            i += 1
        length, node = 0, targets[r]
        while parent[node] >= 0:
            length += 1
            node = parent[node]
        node, d, loss = targets[r], length - 1, 0.0
        while parent[node] >= 0:
            k = parent[node] - V
            term, complement = _node_terms(np.float64(sign[node]) * node_logit(W_o, b_o, k, S_next, r))
            loss += term
            g = to_dtype(-scale * sign[node] * complement)
            G[r, d] = g
            i = 0
            while i < S_next.shape[1]:
                dL_ds[r, i] += g * W_o[k, i]
                i += 1
            node, d = parent[node], d - 1
        losses[r] = loss

    @cuda.jit
    def hs_loss(S_next, W_o, b_o, targets, parent, sign, factor, out):
        """out[r] = factor · -log p(targets[r]): the loss (factor 1) or the log-probability (factor -1)."""
        r = cuda.grid(1)
        if r >= S_next.shape[0]:
            return
        V = (parent.shape[0] + 1) // 2
        node, loss = targets[r], 0.0
        while parent[node] >= 0:
            k = parent[node] - V
            term, _ = _node_terms(np.float64(sign[node]) * node_logit(W_o, b_o, k, S_next, r))
            loss += term
            node = parent[node]
        out[r] = factor * loss

    return hs_rows, hs_loss


@device.inlined
def _lower_bound(sorted_ranks, value):
    """The first position of sorted_ranks not below value."""
    lo, hi = 0, sorted_ranks.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if sorted_ranks[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit
def _claim_nodes_kernel(sorted_ranks, first, end, slot, claimed):
    """A slot (``rnnlm.backends``) for each node some row passes, one thread per node."""
    k = cuda.grid(1)
    if k >= slot.shape[0] or slot[k] >= 0:
        return
    if _lower_bound(sorted_ranks, first[k]) < _lower_bound(sorted_ranks, end[k]):
        slot[k] = cuda.atomic.add(claimed, 0, 1)


@functools.cache
def _weight_grads_kernel(dtype):
    """dW_o[slot[k], i] += Σ G[r, depth(k)] S_next[r, i] and db_o[k] = Σ G[r, depth(k)] over the rows r below
    node k, in sorted order; db_o[k] = 0 for the nodes no row passes. One thread per (unit i, node k)."""
    zero = np.dtype(dtype).type(0)

    @cuda.jit
    def hs_weight_grads(S_next, G, order, sorted_ranks, first, end, node_depth, dW_o, db_o, slot):
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        k = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        if k >= dW_o.shape[0]:
            return
        lo = _lower_bound(sorted_ranks, first[k])
        hi = _lower_bound(sorted_ranks, end[k])
        d = node_depth[k]
        if i < dW_o.shape[1] and lo < hi:
            acc = zero
            for q in range(lo, hi):
                acc += G[order[q], d] * S_next[order[q], i]
            dW_o[slot[k], i] += acc
        if i == 0:
            total = zero
            for q in range(lo, hi):
                total += G[order[q], d]
            db_o[k] = total

    return hs_weight_grads


def hs_xent_grad(S_next, W_o, b_o, targets, tree_parent, tree_sign, scale, dW_o, db_o, dL_ds, slot, claimed,
                 dW_o_norm):
    """A thread per row (loss, dL/dz by depth, dL_ds), the rows sorted on the host by their targets' leaf
    ranks, a thread per node claiming the slots of the nodes used, a thread per (node, unit) over its run of
    sorted rows (dW_o, db_o), then the norm of the slotted rows by block sums; the loss is a DeviceSum."""
    N, m = S_next.shape
    layout = _layout(tree_parent, tree_sign)
    hs_rows, _ = _row_kernels(S_next.dtype)
    G = device.workspace("hs node gradients", (N, layout.max_depth), S_next.dtype)
    losses = device.workspace("hs row losses", (N,), np.float64)
    n_threads = device.threads(N, 128)
    device.launch(hs_rows, device.blocks(N, n_threads), n_threads, S_next, W_o, b_o, targets, tree_parent, tree_sign,
                  np.float64(scale), G, losses, dL_ds)
    ranks = layout.rank[targets.copy_to_host()]
    order = np.argsort(ranks, kind="stable").astype(np.int32)
    n_nodes = W_o.shape[0]
    sorted_ranks = device.to_device(ranks[order])
    n_threads = device.threads(n_nodes, device.ELEMENTWISE_THREADS)
    device.launch(_claim_nodes_kernel, device.blocks(n_nodes, n_threads), n_threads, sorted_ranks, layout.first,
                  layout.end, slot, claimed)
    tx, ty = device.threads(m, 32), device.threads(n_nodes, 8)
    grid = (device.blocks(m, tx), device.blocks(n_nodes, ty))
    device.launch(_weight_grads_kernel(S_next.dtype), grid, (tx, ty), S_next, G, device.to_device(order),
                  sorted_ranks, layout.first, layout.end, layout.node_depth, dW_o, db_o, slot)
    blocks, threads = device.row_grid(n_nodes, m)
    partials = device.workspace("hs gradient norm", (blocks,), np.float64)
    device.launch(slotted_sum_squares_kernel, blocks, threads, dW_o, slot, partials)
    norm(partials, 0.0, dW_o_norm)
    return DeviceSum(losses)


def hs_xent(S_next, W_o, b_o, targets, tree_parent, tree_sign):
    """A thread per row; the loss is a DeviceSum."""
    losses = device.workspace("hs row losses", (S_next.shape[0],), np.float64)
    _hs_rows(S_next, W_o, b_o, targets, tree_parent, tree_sign, 1.0, losses)
    return DeviceSum(losses)


def hs_log_probs(S_next, W_o, b_o, targets, tree_parent, tree_sign, out):
    """A thread per row, the kernel of ``hs_xent`` writing the rows' log-probabilities."""
    _hs_rows(S_next, W_o, b_o, targets, tree_parent, tree_sign, -1.0, out)


def _hs_rows(S_next, W_o, b_o, targets, tree_parent, tree_sign, factor, out):
    _, hs_loss = _row_kernels(S_next.dtype)
    N = S_next.shape[0]
    n_threads = device.threads(N, 128)
    device.launch(hs_loss, device.blocks(N, n_threads), n_threads, S_next, W_o, b_o, targets, tree_parent, tree_sign,
                  np.float64(factor), out)
