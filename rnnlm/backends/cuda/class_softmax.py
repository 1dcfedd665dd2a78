"""Class softmax: the word half, p(w | class(w)), one block per row for the logits, loss and dL/dz, then one
thread per class used claiming its words' slots of the slotted dW_o, then one thread per (word, unit) for dW_o
and db_o over the rows of the word's class, linked into a list in row order: deterministic. The class half
is a full softmax over the C classes (softmax.py); class_output_log_probs composes the two.
"""

import functools
import math

import numpy as np
from numba import cuda

from rnnlm.backends.cuda import device
from rnnlm.backends.cuda.arrays import flat
from rnnlm.backends.cuda.gemm import matmul_nt
from rnnlm.backends.cuda.reductions import link, norm, slotted_sum_squares_kernel
from rnnlm.backends.cuda.softmax import DeviceSum, row_functions, row_threads, softmax_log_probs


@functools.cache
def _class_row_kernels(dtype):
    """(class_grad, class_loss): one block per row r, whose class c = target_classes[r] holds the words
    class_bounds[c] ≤ w < class_bounds[c + 1].

    S_next, dL_ds (N, m); W_o (V, m); b_o (V,); targets, target_classes (N,) and class_bounds (C + 1,)
    int32; G (N, ≥ the largest class) scratch for the row's logits, then scale · dL/dz; losses (N,) float64;
    direct (N, ≥ the largest class) the rows' direct scores, or (1, 0) for none.
    """
    row_stats, write_grad = row_functions(dtype)
    zero = np.dtype(dtype).type(0)

    @device.inlined
    def row_loss(S_next, W_o, b_o, targets, target_classes, class_bounds, G, losses, direct):
        """G[r, w] = W_o[lo + w] · S_next[r] (+ direct[r, w]) for the n words of r's class (a thread per word),
        losses[r] = -log p(targets[r] | class); returns (lo, n, y, top, total), y the target's index in the class."""
        r = cuda.blockIdx.x
        c = target_classes[r]
        lo = class_bounds[c]
        n = class_bounds[c + 1] - lo
        w = cuda.threadIdx.x
        while w < n:
            acc = zero
            i = 0
            while i < S_next.shape[1]:
                acc += W_o[lo + w, i] * S_next[r, i]
                i += 1
            if direct.shape[1]:
                acc += direct[r, w]
            G[r, w] = acc
            w += cuda.blockDim.x
        cuda.syncthreads()
        y = targets[r] - lo
        z_y = G[r, y] + b_o[lo + y]  # read before any thread overwrites the row
        top, total = row_stats(G, r, b_o[lo : lo + n], n)
        if cuda.threadIdx.x == 0:
            losses[r] = top + math.log(total) - z_y
        return lo, n, y, top, total

    @cuda.jit
    def class_grad(S_next, W_o, b_o, targets, target_classes, class_bounds, scale, G, losses, dL_ds, direct):
        """row_loss, then G[r, :n] = scale · dL/dz (copied into direct[r, :n]) and dL_ds[r] += W_o[class]ᵀ
        G[r, :n]."""
        r = cuda.blockIdx.x
        lo, n, y, top, total = row_loss(S_next, W_o, b_o, targets, target_classes, class_bounds, G, losses, direct)
        write_grad(G, r, b_o[lo : lo + n], n, y, top, total, scale)
        cuda.syncthreads()
        w = cuda.threadIdx.x
        while direct.shape[1] and w < n:
            direct[r, w] = G[r, w]
            w += cuda.blockDim.x
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
    def class_loss(S_next, W_o, b_o, targets, target_classes, class_bounds, G, sign, out, direct):
        """out[r] = sign · -log p(targets[r] | class): the loss (sign 1) or the log-probability (sign -1)."""
        row_loss(S_next, W_o, b_o, targets, target_classes, class_bounds, G, out, direct)
        if cuda.threadIdx.x == 0:
            out[cuda.blockIdx.x] *= sign

    return class_grad, class_loss


@functools.cache
def _weight_grads_kernel(dtype):
    """dW_o[slot[v], i] += Σ_r G[r, v - lo] S_next[r, i] and db_o[v] = Σ_r G[r, v - lo] over the rows r of word
    v's class (in row order, through the class's row list); db_o[v] = 0 for the classes no row has. One thread
    per (unit i, word v)."""
    zero = np.dtype(dtype).type(0)

    @device.inlined
    def class_of(class_bounds, v):
        """c with class_bounds[c] ≤ v < class_bounds[c + 1], by bisection."""
        c, c_end = 0, class_bounds.shape[0] - 1
        while c_end - c > 1:
            mid = (c + c_end) // 2
            if class_bounds[mid] <= v:
                c = mid
            else:
                c_end = mid
        return c

    @cuda.jit
    def class_weight_grads(S_next, G, next_row, first_row, class_bounds, dW_o, db_o, slot):
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        v = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        V, m = dW_o.shape
        N = next_row.shape[0]
        if v >= V:
            return
        c = class_of(class_bounds, v)
        w = v - class_bounds[c]
        p = first_row[c]
        if i < m and p < N:
            acc = zero
            q = p
            while q < N:
                acc += G[q, w] * S_next[q, i]
                q = next_row[q]
            dW_o[slot[v], i] += acc
        if i == 0:
            total = zero
            q = p
            while q < N:
                total += G[q, w]
                q = next_row[q]
            db_o[v] = total

    return class_weight_grads


@cuda.jit
def _claim_classes_kernel(next_row, first_row, class_bounds, slot, claimed):
    """Consecutive slots (``rnnlm.backends``) for the words of each class some row has (first_row[c] below the
    number of rows), one thread per class."""
    c = cuda.grid(1)
    if c < first_row.shape[0] and first_row[c] < next_row.shape[0]:
        lo, hi = class_bounds[c], class_bounds[c + 1]
        base = cuda.atomic.add(claimed, 0, hi - lo)
        for w in range(lo, hi):
            slot[w] = base + w - lo


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
    G = device.workspace("class logits", (N, width), S_next.dtype)
    return G, device.workspace("class row losses", (N,), np.float64), n_classes


def _direct_or_none(direct, S_next):
    """The direct scores, or an array without columns standing for none."""
    return device.workspace("no direct scores", (1, 0), S_next.dtype) if direct is None else direct


def class_xent_grad(S_next, W_o, b_o, targets, target_classes, class_bounds, scale, dW_o, db_o, dL_ds, slot, claimed,
                    dW_o_norm, direct=None):
    """One block per row (logits, loss, dL/dz into a scratch array, dL_ds), one thread per class used claiming
    its words' slots, then one thread per (word, unit) over the class's row list (dW_o, db_o), then the norm of
    the slotted rows by block sums; the loss is a DeviceSum."""
    N, m = S_next.shape
    V = W_o.shape[0]
    class_grad, _ = _class_row_kernels(S_next.dtype)
    G, losses, n_classes = _class_scratch(S_next, class_bounds)
    device.launch(class_grad, N, row_threads(max(G.shape[1], m)), S_next, W_o, b_o, targets, target_classes,
                  class_bounds, S_next.dtype.type(scale), G, losses, dL_ds, _direct_or_none(direct, S_next))
    next_row, first_row = link(target_classes, n_classes)
    n_threads = device.threads(n_classes, device.ELEMENTWISE_THREADS)
    device.launch(_claim_classes_kernel, device.blocks(n_classes, n_threads), n_threads, next_row, first_row,
                  class_bounds, slot, claimed)
    tx, ty = device.threads(m, 32), device.threads(V, 8)
    grid = (device.blocks(m, tx), device.blocks(V, ty))
    device.launch(_weight_grads_kernel(S_next.dtype), grid, (tx, ty), S_next, G, next_row, first_row, class_bounds,
                  dW_o, db_o, slot)
    blocks, threads = device.row_grid(V, m)
    partials = device.workspace("class gradient norm", (blocks,), np.float64)
    device.launch(slotted_sum_squares_kernel, blocks, threads, dW_o, slot, partials)
    norm(partials, 0.0, dW_o_norm)
    return DeviceSum(losses)


def class_xent(S_next, W_o, b_o, targets, target_classes, class_bounds, direct=None):
    """One block per row; the loss is a DeviceSum."""
    G, losses, _ = _class_scratch(S_next, class_bounds)
    _class_rows(S_next, W_o, b_o, targets, target_classes, class_bounds, G, 1.0, losses, direct)
    return DeviceSum(losses)


def class_log_probs(S_next, W_o, b_o, targets, target_classes, class_bounds, out, direct=None):
    """One block per row, the kernel of ``class_xent`` writing the rows' log-probabilities."""
    G, _, _ = _class_scratch(S_next, class_bounds)
    _class_rows(S_next, W_o, b_o, targets, target_classes, class_bounds, G, -1.0, out, direct)


def class_output_log_probs(S, W_c, b_c, W_o, b_o, targets, target_classes, class_bounds, out, class_scores=None,
                           direct=None):
    """The class layer's GEMM into a workspace (class_scores added) and softmax_log_probs, then the rows of
    class_log_probs added."""
    N = S.shape[0]
    Z = device.workspace("class layer logits", (N, W_c.shape[0]), S.dtype)
    matmul_nt(S, W_c, Z)
    if class_scores is not None:
        _add_into(Z, class_scores)
    softmax_log_probs(Z, b_c, target_classes, out)
    words = device.workspace("in-class log-probabilities", (N,), np.float64)
    class_log_probs(S, W_o, b_o, targets, target_classes, class_bounds, words, direct)
    _add_into(out, words)


def _add_into(out, a):
    """out += a, arrays of one shape: a grid-stride kernel over the flat arrays."""
    out_flat = flat(out)
    blocks, threads = device.elementwise_grid(out_flat.size)
    device.launch(_add_kernel, blocks, threads, out_flat, flat(a))


@cuda.jit
def _add_kernel(out, a):
    k = cuda.grid(1)
    while k < out.shape[0]:
        out[k] += a[k]
        k += cuda.gridsize(1)


def _class_rows(S_next, W_o, b_o, targets, target_classes, class_bounds, G, sign, out, direct):
    _, class_loss = _class_row_kernels(S_next.dtype)
    device.launch(class_loss, S_next.shape[0], row_threads(G.shape[1]), S_next, W_o, b_o, targets, target_classes,
                  class_bounds, G, np.float64(sign), out, _direct_or_none(direct, S_next))
