"""Hierarchical softmax (``rnnlm.huffman``): each row walks its target's path up the tree's parent pointers.

In training the rows are split over threads for the node logits, the loss and dL/ds (each row writes only
its own); the node rows' gradients are then summed in the rows' order, each thread taking one band of the columns
of every node row, so that no two threads write one value and the sums do not depend on the threads. Inner
loops run over 1-D slices from index 0, the form Numba vectorizes.
"""

import math

import numba
import numpy as np
from numba import njit, prange

from rnnlm.backends.cpu.recurrence import claim
from rnnlm.huffman import subtree_spans


def hs_xent_grad(S_next, W_o, b_o, targets, tree_parent, tree_sign, scale, dW_o, db_o, dL_ds, slot, claimed,
                 dW_o_norm):
    """The rows are taken in the depth-first order of their targets among the leaves (stable), so that rows that
    follow each other share most of their paths and the node rows they read and write stay in cache; then
    five passes: the paths written out (parallel over rows: the walk up the parents first, so that the rows'
    W_o reads do not wait on it), the rows (parallel), the path entries in that order (one thread: db_o, the
    slots claimed in the order of the nodes' first entries, so that rows written together lie near), the node
    rows' gradients (parallel over bands of columns), their norm (parallel over the slots)."""
    order = np.argsort(_leaf_ranks(tree_parent, tree_sign)[targets], kind="stable")
    first = _path_starts(targets, tree_parent, order)
    K = np.empty(first[-1], np.int32)
    signs = np.empty(first[-1], np.int8)
    _paths(targets, tree_parent, tree_sign, order, first, K, signs)
    G = np.empty(first[-1], S_next.dtype)
    losses = np.empty(S_next.shape[0])
    _hs_rows(S_next, W_o, b_o, order, first, K, signs, scale, G, dL_ds, losses)
    used = _node_biases(G, K, db_o, slot, claimed)
    _node_weight_grads(S_next, order, first, G, K, dW_o, slot, min(numba.get_num_threads(), S_next.shape[1]))
    squares = np.empty(used)
    _row_squares(dW_o, squares)
    dW_o_norm[0] = math.sqrt(squares.sum())
    return losses.sum()


_ranks = {}  # id(tree_parent) -> (that array, its words' depth-first ranks); the array stays referenced


def _leaf_ranks(tree_parent, tree_sign):
    """The words' depth-first ranks (``huffman.subtree_spans``), computed once per tree array: an O(V) pass
    that would otherwise cost every window about as much as a small window's rows."""
    entry = _ranks.get(id(tree_parent))
    if entry is None:
        start = subtree_spans(tree_parent, tree_sign)[0]
        entry = _ranks[id(tree_parent)] = tree_parent, start[: (len(tree_parent) + 1) // 2].copy()
    return entry[1]


@njit(parallel=True, cache=True)
def _path_starts(targets, parent, order):
    """first (N + 1,) int64: the path nodes of row order[q] are entries first[q] .. first[q + 1] - 1 of the flat
    lists."""
    N = targets.shape[0]
    first = np.zeros(N + 1, np.int64)
    for q in prange(N):
        node, n = targets[order[q]], 0
        while parent[node] >= 0:
            node = parent[node]
            n += 1
        first[q + 1] = n
    return np.cumsum(first)


@njit(parallel=True, cache=True)
def _paths(targets, parent, sign, order, first, K, signs):
    """K[j], signs[j] = the W_o row and the sign of entry j of the rows' paths, from the word up."""
    V = (parent.shape[0] + 1) // 2
    for q in prange(targets.shape[0]):
        node, j = targets[order[q]], first[q]
        while parent[node] >= 0:
            K[j], signs[j] = parent[node] - V, sign[node]
            node, j = parent[node], j + 1


@njit(fastmath=True, cache=True, inline="always")
def _node_terms(u):
    """(softplus(-u), σ(-u)) = (-log σ(u), 1 - σ(u)) in float64, without overflow for any u."""
    e = math.exp(-abs(u))
    if u >= 0:
        return math.log1p(e), e / (1.0 + e)
    return -u + math.log1p(e), 1.0 / (1.0 + e)


@njit(fastmath=True, cache=True, inline="always")
def _node_logit(W_o, b_o, k, s):
    z = b_o[k]
    w = W_o[k]
    for i in range(s.shape[0]):
        z += w[i] * s[i]
    return z


@njit(parallel=True, fastmath=True, cache=True)
def _hs_rows(S_next, W_o, b_o, order, first, K, signs, scale, G, dL_ds, losses):
    """For r = order[q]: losses[q] = -log p(row r's target | S_next[r]); G[j] = scale · dL/dz of the row's path
    entries j; dL_ds[r] = Σ_j G[j] W_o[K[j]] (overwritten)."""
    for q in prange(S_next.shape[0]):
        s, d = S_next[order[q]], dL_ds[order[q]]
        d[:] = 0
        loss = 0.0
        for j in range(first[q], first[q + 1]):
            k = K[j]
            term, complement = _node_terms(np.float64(signs[j]) * _node_logit(W_o, b_o, k, s))
            loss += term
            g = S_next.dtype.type(-scale * signs[j] * complement)
            G[j] = g
            w = W_o[k]
            for i in range(s.shape[0]):
                d[i] += g * w[i]
        losses[q] = loss


@njit(cache=True)
def _node_biases(G, K, db_o, slot, claimed):
    """db_o = Σ G over each node's entries (overwritten, in entry order); a slot claimed for each node used, in
    the order of their first entries; returns the number of slots claimed then (all of them)."""
    db_o[:] = 0
    for j in range(K.shape[0]):
        db_o[K[j]] += G[j]
        claim(slot, claimed, K[j])
    return claimed[0]


@njit(parallel=True, fastmath=True, cache=True)
def _node_weight_grads(S_next, order, first, G, K, dW_o, slot, n_bands):
    """dW_o[slot[K[j]]] += G[j] S_next[order[q]] over the positions q and their entries j, in that order, the columns
    in n_bands bands."""
    m = S_next.shape[1]
    width = -(-m // n_bands)
    for band in prange(n_bands):
        lo, hi = band * width, min(m, (band + 1) * width)
        for q in range(S_next.shape[0]):
            s = S_next[order[q], lo:hi]
            for j in range(first[q], first[q + 1]):
                g, row = G[j], dW_o[slot[K[j]], lo:hi]
                for i in range(row.shape[0]):
                    row[i] += g * s[i]


@njit(parallel=True, fastmath=True, cache=True)
def _row_squares(dW_o, out):
    """out[u] = ‖dW_o[u]‖² in float64 for the first len(out) rows."""
    for u in prange(out.shape[0]):
        row = dW_o[u]
        total = 0.0
        for i in range(row.shape[0]):
            total += row[i] * row[i]
        out[u] = total


def hs_xent(S_next, W_o, b_o, targets, tree_parent, tree_sign):
    """Σ_r -log p(targets[r]) for evaluation, from ``hs_log_probs``."""
    out = np.empty(S_next.shape[0])
    hs_log_probs(S_next, W_o, b_o, targets, tree_parent, tree_sign, out)
    return -out.sum()


@njit(parallel=True, fastmath=True, cache=True)
def hs_log_probs(S_next, W_o, b_o, targets, tree_parent, tree_sign, out):
    """Rows split over threads, each walking its target's path."""
    V = (tree_parent.shape[0] + 1) // 2
    for r in prange(S_next.shape[0]):
        node, total = targets[r], 0.0
        while tree_parent[node] >= 0:
            k = tree_parent[node] - V
            term, _ = _node_terms(np.float64(tree_sign[node]) * _node_logit(W_o, b_o, k, S_next[r]))
            total -= term
            node = tree_parent[node]
        out[r] = total
