"""Hierarchical softmax (``rnnlm.huffman``): each row walks its target's path up the tree's parent pointers.

In training the rows are split over threads for the node logits, the loss and dL/ds (each row writes only
its own); the node rows' gradients are then summed in row order, every thread taking the same band of
columns of every node row, so that no two threads write one value and the sums do not depend on the
threads.
"""

import math

import numpy as np
from numba import njit, prange

COLUMNS = 64  # columns of dW_o a thread takes at once in the node rows' gradient sums


def hs_xent_grad(S_next, W_o, b_o, targets, tree_parent, tree_sign, scale, dW_o, db_o, dL_ds, touched, dW_o_norm):
    """Three passes: the rows (parallel), each path's nodes in row order (one thread: db_o, the touched rows),
    the node rows' gradients (parallel over bands of COLUMNS columns, with their sums of squares)."""
    first = _path_starts(targets, tree_parent)
    G = np.empty(first[-1], S_next.dtype)
    K = np.empty(first[-1], np.int32)
    losses = np.empty(S_next.shape[0])
    _hs_rows(S_next, W_o, b_o, targets, tree_parent, tree_sign, scale, first, G, K, dL_ds, losses)
    used = _node_biases(G, K, db_o, touched)
    squares = np.zeros(-(-S_next.shape[1] // COLUMNS))
    _node_weight_grads(S_next, first, G, K, dW_o, used, squares)
    dW_o_norm[0] = math.sqrt(squares.sum())
    return losses.sum()


@njit(parallel=True, cache=True)
def _path_starts(targets, parent):
    """first (N + 1,) int64: row r's path nodes are entries first[r] .. first[r + 1] - 1 of the flat lists."""
    N = targets.shape[0]
    first = np.zeros(N + 1, np.int64)
    for r in prange(N):
        node, n = targets[r], 0
        while parent[node] >= 0:
            node = parent[node]
            n += 1
        first[r + 1] = n
    return np.cumsum(first)


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
def _hs_rows(S_next, W_o, b_o, targets, parent, sign, scale, first, G, K, dL_ds, losses):
    """losses[r] = -log p(targets[r] | S_next[r]); G[j] = scale · dL/dz and K[j] = the W_o row of row r's path
    entry j; dL_ds[r] = Σ_j G[j] W_o[K[j]] (overwritten)."""
    V = (parent.shape[0] + 1) // 2
    for r in prange(S_next.shape[0]):
        s, d = S_next[r], dL_ds[r]
        d[:] = 0
        node, j, loss = targets[r], first[r], 0.0
        while parent[node] >= 0:
            k = parent[node] - V
            z = _node_logit(W_o, b_o, k, s)
            term, complement = _node_terms(np.float64(sign[node]) * z)
            loss += term
            g = S_next.dtype.type(-scale * sign[node] * complement)
            G[j], K[j] = g, k
            w = W_o[k]
            for i in range(s.shape[0]):
                d[i] += g * w[i]
            node, j = parent[node], j + 1
        losses[r] = loss


@njit(cache=True)
def _node_biases(G, K, db_o, touched):
    """db_o = Σ G over each node's entries (overwritten, in entry order); touched[k] = 1 for the nodes used;
    returns those nodes, each once, in the order of their first entry."""
    db_o[:] = 0
    seen = np.zeros(db_o.shape[0], np.uint8)
    used = np.empty(K.shape[0], np.int32)
    n = 0
    for j in range(K.shape[0]):
        k = K[j]
        db_o[k] += G[j]
        if not seen[k]:
            seen[k] = 1
            touched[k] = 1
            used[n] = k
            n += 1
    return used[:n]


@njit(parallel=True, fastmath=True, cache=True)
def _node_weight_grads(S_next, first, G, K, dW_o, used, squares):
    """dW_o[K[j]] += G[j] S_next[r] over the rows r and their entries j, in that order; squares[b] = the sum of
    squares of band b's columns of the used rows of dW_o (zero on entry in those rows)."""
    m = S_next.shape[1]
    for band in prange(squares.shape[0]):
        lo, hi = band * COLUMNS, min(m, (band + 1) * COLUMNS)
        for r in range(S_next.shape[0]):
            s = S_next[r]
            for j in range(first[r], first[r + 1]):
                g, row = G[j], dW_o[K[j]]
                for i in range(lo, hi):
                    row[i] += g * s[i]
        total = 0.0
        for k in used:
            for i in range(lo, hi):
                total += dW_o[k, i] * dW_o[k, i]
        squares[band] = total


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
