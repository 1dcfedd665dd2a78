"""The Huffman tree of the hierarchical softmax (Morin & Bengio 2005; Mikolov et al. 2013, word2vec;
faster-rnnlm's ``-hs``): a binary tree over the vocabulary's training counts, frequent words near the root.

Nodes are numbered in one space of 2V - 1: the V words (leaves) 0..V-1, then the V - 1 internal nodes
V..2V - 2 in the order the construction merges them, so that a parent's number is above its children's and
the root is 2V - 2. Internal node V + k owns row k of the output layer (W_o (V - 1, m), b_o (V - 1,)).

    log p(w | s) = Σ_{n on the path of w} log σ(sign(n) · (W_o[parent(n) - V] · s + b_o[parent(n) - V]))

over the nodes n from the word up to the root's child: the tree is kept as parent pointers, ``parent``
(2V - 1,) int32 (-1 at the root) and ``sign`` (2V - 1,) int8, +1 for the first child a merge took (the
lighter) and -1 for the second (0 at the root). A word's path is its walk up the parents: 5 bytes a node,
8 MB at V = 793,470, where the paths written out (CSR) would take about 12 times as much. The model file
stores the counts alone; the tree is rebuilt from them, deterministically, so that it needs no checking as
a structure.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from numba import njit

from rnnlm.errors import RnnlmError

MAX_DEPTH = 64  # the deepest path allowed: counts summing below 2⁶³ cannot reach it but by crafted counts
MAX_TOTAL_COUNT = 1 << 62  # the counts' sum, so that no internal weight overflows int64


@dataclass(frozen=True)
class HuffmanTree:
    """counts (V,) int64 ≥ 0; parent, sign (2V - 1,) as the module says; depth (2V - 1,) int32 each node's
    distance from the root (a word's: its path's length); max_depth the longest path."""

    counts: np.ndarray
    parent: np.ndarray
    sign: np.ndarray
    depth: np.ndarray

    @property
    def vocab_size(self):
        return len(self.counts)

    @property
    def max_depth(self):
        return int(self.depth[: self.vocab_size].max(initial=0))

    @cached_property
    def levels(self):
        """The nodes below the root grouped by depth, shallowest first: a list of int64 arrays."""
        order = np.argsort(self.depth, kind="stable")
        cuts = np.searchsorted(self.depth[order], np.arange(1, self.depth.max() + 1))
        return np.split(order, cuts)[1:]

    def mean_depth(self):
        """The mean path length of a training token (count-weighted)."""
        total = self.counts.sum()
        leaves = self.depth[: self.vocab_size]
        return float((self.counts * leaves).sum() / total) if total else float(leaves.mean())


def huffman_tree(counts, where="the counts"):
    """The HuffmanTree of ``counts`` (V,) non-negative integers, V ≥ 2; ties are broken by word id (the
    lighter of two equal weights is the word before an internal node, the lower id among words, the earlier
    merge among internal nodes). RnnlmError, naming ``where``, for counts out of range or a tree deeper than
    MAX_DEPTH."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or len(counts) < 2 or counts.dtype.kind not in "iu":
        raise RnnlmError(f"{where}: a hierarchical softmax needs at least two words' integer counts")
    if counts.min() < 0 or counts.astype(np.float64).sum() >= MAX_TOTAL_COUNT:
        raise RnnlmError(f"{where}: word counts must be non-negative and sum below 2^62")
    counts = counts.astype(np.int64)
    order = np.argsort(counts, kind="stable").astype(np.int64)
    parent, sign = _build(counts, order)
    tree = HuffmanTree(counts, parent, sign, subtree_spans(parent, sign)[2])
    if tree.max_depth > MAX_DEPTH:
        raise RnnlmError(f"{where}: the Huffman tree is {tree.max_depth} deep, more than {MAX_DEPTH}")
    return tree


@njit(cache=True)
def _build(counts, order):
    """Two-queue Huffman construction over the words sorted by count (``order``): O(V)."""
    V = counts.shape[0]
    weight = np.empty(V - 1, np.int64)
    parent = np.full(2 * V - 1, -1, np.int32)
    sign = np.zeros(2 * V - 1, np.int8)
    next_word = 0
    next_merged = 0
    for k in range(V - 1):
        total = 0
        for side in range(2):
            take_word = next_word < V and (next_merged >= k or counts[order[next_word]] <= weight[next_merged])
            if take_word:
                node = order[next_word]
                total += counts[node]
                next_word += 1
            else:
                node = V + next_merged
                total += weight[next_merged]
                next_merged += 1
            parent[node] = V + k
            sign[node] = 1 - 2 * side
        weight[k] = total
    return parent, sign


@njit(cache=True)
def subtree_spans(parent, sign):
    """(start, leaves, depth) (2V - 1,) of a tree's parent pointers and signs: the words below each node are
    the leaves of depth-first ranks start .. start + leaves - 1 (int64), the first child (sign +1) before the
    second, so that a word's rank is its start; depth (int32) each node's distance from the root. The backends
    order the rows of a window by the ranks, so that rows sharing a node follow each other."""
    n_nodes = parent.shape[0]
    V = (n_nodes + 1) // 2
    leaves = np.zeros(n_nodes, np.int64)
    leaves[:V] = 1
    first_leaves = np.zeros(n_nodes, np.int64)  # of each node's first child
    for node in range(n_nodes - 1):  # children before parents
        leaves[parent[node]] += leaves[node]
        if sign[node] == 1:
            first_leaves[parent[node]] = leaves[node]
    start = np.zeros(n_nodes, np.int64)
    depth = np.zeros(n_nodes, np.int32)
    for node in range(n_nodes - 2, -1, -1):  # parents before children
        start[node] = start[parent[node]] + (0 if sign[node] == 1 else first_leaves[parent[node]])
        depth[node] = depth[parent[node]] + 1
    return start, leaves, depth
