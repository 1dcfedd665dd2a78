"""Class softmax: the word half, p(w | class(w)), rows grouped by class: in training a class's W_o rows are
read once per group of four positions; in evaluation a class's rows meet its W_o rows (and the class layer's
W_c) in GEMMs."""

import numpy as np
from numba import njit, prange

from rnnlm.backends.cpu.recurrence import _group_by, claim, in_threads
from rnnlm.backends.cpu.softmax import _biased_max, _exp_shifted_row, softmax_log_probs

GEMM_ROWS = 1 << 14  # rows from which class_log_probs computes the in-class logits by GEMMs
CLASS_LOGITS = 1 << 18  # in-class logits computed at once by those GEMMs (a block that stays in cache)
CLASS_ROWS = 1 << 11  # rows gathered at once for them (idem)


def class_xent_grad(S_next, W_o, b_o, targets, target_classes, class_bounds, scale, dW_o, db_o, dL_ds, slot, claimed,
                    dW_o_norm, direct=None):
    """Rows are grouped by class and each class is one thread's, so no two threads write the same rows (the
    classes used claim their slots first, in increasing order, on one thread).
    A class's rows are taken four at a time, so that each pass over W_o[class] and dW_o[class] serves
    four of them (a class of the rare words holds hundreds of words, more than the cache keeps). The norm
    of dW_o's rows is summed while they are in cache, so that the gradient norm needs no second pass.
    """
    return _class_xent_grad(S_next, W_o, b_o, targets, target_classes, class_bounds, scale, dW_o, db_o, dL_ds,
                            slot, claimed, dW_o_norm, _direct_or_none(direct, S_next))


def _direct_or_none(direct, S_next):
    """The direct scores, or an array without columns standing for none."""
    return np.empty((1, 0), S_next.dtype) if direct is None else direct


@njit(fastmath=True, cache=True, inline="always")
def _add_direct(z, direct, r):
    """z += the row's direct scores (its class's words), when there are direct scores."""
    if direct.shape[1]:
        for w in range(z.shape[0]):
            z[w] += direct[r, w]


@njit(parallel=True, fastmath=True, cache=True)
def _class_xent_grad(S_next, W_o, b_o, targets, target_classes, class_bounds, scale, dW_o, db_o, dL_ds, slot,
                     claimed, dW_o_norm, direct):
    m = S_next.shape[1]
    C = class_bounds.shape[0] - 1
    db_o[:] = 0
    start, order = _group_by(target_classes, C)
    for c in range(C):
        if start[c] < start[c + 1]:
            for w in range(class_bounds[c], class_bounds[c + 1]):
                claim(slot, claimed, w)
    losses = np.zeros(C)
    squares = np.zeros(C)
    for c in prange(C):
        if start[c] == start[c + 1]:
            continue
        lo, hi = class_bounds[c], class_bounds[c + 1]
        W_class, b_class, dW_class = W_o[lo:hi], b_o[lo:hi], dW_o[slot[lo]:slot[lo] + hi - lo]
        # four rows' states, their logits (then scale · dL/dz, zero for a missing fourth) and dL/ds
        S_four = np.zeros((4, m), S_next.dtype)
        Z_four = np.zeros((4, hi - lo), S_next.dtype)
        dS_four = np.empty((4, m), S_next.dtype)
        bits = np.empty(hi - lo, np.int32)
        for first in range(start[c], start[c + 1], 4):
            n_rows = min(4, start[c + 1] - first)
            for j in range(n_rows):
                S_four[j] = S_next[order[first + j]]
            _four_rows_logits(W_class, S_four, Z_four)
            for j in range(4):
                z = Z_four[j]
                if j >= n_rows:
                    z[:] = 0
                    continue
                _add_direct(z, direct, order[first + j])
                y = targets[order[first + j]] - lo
                z_y = z[y] + b_class[y]
                top = _biased_max(z, b_class, bits)
                total = _exp_shifted_row(z, b_class, top, bits)
                losses[c] += top + np.log(total) - z_y
                inv = S_next.dtype.type(scale / total)
                for w in range(hi - lo):
                    z[w] *= inv
                z[y] -= scale
                if direct.shape[1]:
                    direct[order[first + j], : hi - lo] = z
            _four_rows_backward(W_class, S_four, Z_four, dW_class, db_o[lo:hi], dS_four)
            for j in range(n_rows):
                dL_ds_r = dL_ds[order[first + j]]
                for i in range(m):
                    dL_ds_r[i] += dS_four[j, i]
        for w in range(hi - lo):
            for i in range(m):
                squares[c] += dW_class[w, i] * dW_class[w, i]
    dW_o_norm[0] = np.sqrt(squares.sum())
    return losses.sum()


@njit(fastmath=True, cache=True, inline="always")
def _four_rows_backward(W_class, S_four, G_four, dW_class, db_class, dS_four):
    """For four rows of scaled dL/dz G_four (4, n) over a class's n words: db_class += their sum,
    dW_class += G_fourᵀ S_four, and dS_four = G_four W_class (overwritten); one pass over the class's rows."""
    s0, s1, s2, s3 = S_four[0], S_four[1], S_four[2], S_four[3]
    d0, d1, d2, d3 = dS_four[0], dS_four[1], dS_four[2], dS_four[3]
    dS_four[:] = 0
    for w in range(W_class.shape[0]):
        g0, g1, g2, g3 = G_four[0, w], G_four[1, w], G_four[2, w], G_four[3, w]
        db_class[w] += g0 + g1 + g2 + g3
        for i in range(W_class.shape[1]):
            x = W_class[w, i]
            dW_class[w, i] += g0 * s0[i] + g1 * s1[i] + g2 * s2[i] + g3 * s3[i]
            d0[i] += g0 * x
            d1[i] += g1 * x
            d2[i] += g2 * x
            d3[i] += g3 * x


def class_xent(S_next, W_o, b_o, targets, target_classes, class_bounds, direct=None):
    """Σ_r -log p(targets[r] | its class) for evaluation (see ``class_xent_grad``), from ``class_log_probs``."""
    out = np.empty(S_next.shape[0])
    class_log_probs(S_next, W_o, b_o, targets, target_classes, class_bounds, out, direct)
    return -out.sum()


def class_log_probs(S_next, W_o, b_o, targets, target_classes, class_bounds, out, direct=None):
    """From GEMM_ROWS rows on, ``_grouped_log_probs``; fewer rows (an evaluation window) take one kernel,
    ``_class_log_probs_by_rows``, that spares the GEMMs' calls. direct: the rows' direct scores of their
    class's words, added to the logits, or None."""
    if S_next.shape[0] < GEMM_ROWS:
        _class_log_probs_by_rows(S_next, W_o, b_o, targets, target_classes, class_bounds, out,
                                 _direct_or_none(direct, S_next))
        return
    _grouped_log_probs(S_next, None, W_o, b_o, targets, target_classes, class_bounds, out, direct)


def class_output_log_probs(S, W_c, b_c, W_o, b_o, targets, target_classes, class_bounds, out, class_scores=None,
                           direct=None):
    """From GEMM_ROWS rows on, ``_grouped_log_probs`` with the class layer, so that the rows gathered for their
    class's words serve the class layer too; fewer rows take the class layer's GEMM and softmax_log_probs,
    then class_log_probs."""
    if S.shape[0] >= GEMM_ROWS:
        _grouped_log_probs(S, (W_c, b_c, class_scores), W_o, b_o, targets, target_classes, class_bounds, out, direct)
        return
    Z = np.matmul(S, W_c.T)
    if class_scores is not None:
        Z += class_scores
    softmax_log_probs(Z, b_c, target_classes, out)
    words = np.empty(S.shape[0])
    class_log_probs(S, W_o, b_o, targets, target_classes, class_bounds, words, direct)
    out += words


def _grouped_log_probs(S, class_layer, W_o, b_o, targets, target_classes, class_bounds, out, direct):
    """out[r] = log p(targets[r] | its class) (class_log_probs), plus log p(its class) with class_layer = (W_c,
    b_c, class_scores) (class_output_log_probs). Rows are grouped by class and gathered CLASS_ROWS at a time;
    a block of a class's rows meets its W_o rows (and W_c) in GEMMs of at most CLASS_LOGITS logits (one row
    at least), each giving the logits transposed, a column per row, for ``_column_log_probs``. The grouped
    rows go in bands of about as many logits, one per thread (``in_threads``)."""
    start, order = _group_by(target_classes, class_bounds.shape[0] - 1)
    n_classes = 0 if class_layer is None else class_layer[0].shape[0]
    logits = np.cumsum(np.repeat(np.diff(class_bounds) + n_classes, np.diff(start)))  # up to each grouped row
    grouped_targets = targets[order]
    log_p = np.empty(order.shape[0])
    widest = max(int(np.diff(class_bounds).max()), n_classes)

    def band(first, end):
        scratch = np.empty(max(CLASS_LOGITS, widest), S.dtype)
        gathered = np.empty((CLASS_ROWS, S.shape[1]), S.dtype)
        for c in range(np.searchsorted(start, first, "right") - 1, np.searchsorted(start, end - 1, "right")):
            lo, hi = class_bounds[c], class_bounds[c + 1]
            at_once = max(1, min(CLASS_ROWS, CLASS_LOGITS // max(hi - lo, n_classes)))
            for a in range(max(start[c], first), min(start[c + 1], end), at_once):
                b = min(start[c + 1], end, a + at_once)
                rows, block = order[a:b], gathered[: b - a]
                _gather_rows(S, rows, block)
                words = None if direct is None else direct[rows, : hi - lo]
                log_p[a:b] = _block_log_probs(block, W_o[lo:hi], b_o[lo:hi], grouped_targets[a:b] - lo, words,
                                              scratch)
                if class_layer is not None:
                    W_c, b_c, class_scores = class_layer
                    scores = None if class_scores is None else class_scores[rows]
                    log_p[a:b] += _block_log_probs(block, W_c, b_c, np.full(b - a, c, np.int32), scores, scratch)

    in_threads(band, logits)
    out[order] = log_p


def _block_log_probs(G, W, b, targets, scores, scratch):
    """log softmax(W g + b + score)[target] (R,) float64 for each row g of G (R, m), its score (a row of
    scores (R, n), or none) and target: the logits (n, R) in scratch, transposed, a column per row."""
    Z_t = scratch[: W.shape[0] * G.shape[0]].reshape(W.shape[0], G.shape[0])
    np.matmul(W, G.T, out=Z_t)
    if scores is not None:
        Z_t += scores.T
    out = np.empty(G.shape[0])
    _column_log_probs(Z_t, b, targets, out)
    return out


@njit(parallel=True, fastmath=True, cache=True)
def _class_log_probs_by_rows(S_next, W_o, b_o, targets, target_classes, class_bounds, out, direct):
    """class_log_probs with each class one thread's, its rows taken four at a time as in ``class_xent_grad``,
    so that each pass over W_o[class] serves four of them."""
    m = S_next.shape[1]
    C = class_bounds.shape[0] - 1
    start, order = _group_by(target_classes, C)
    for c in prange(C):
        if start[c] == start[c + 1]:
            continue
        lo, hi = class_bounds[c], class_bounds[c + 1]
        b_class = b_o[lo:hi]
        S_four = np.zeros((4, m), S_next.dtype)
        Z_four = np.empty((4, hi - lo), S_next.dtype)
        bits = np.empty(hi - lo, np.int32)
        for first in range(start[c], start[c + 1], 4):
            n_rows = min(4, start[c + 1] - first)
            for j in range(n_rows):
                S_four[j] = S_next[order[first + j]]
            _four_rows_logits(W_o[lo:hi], S_four, Z_four)
            for j in range(n_rows):
                r = order[first + j]
                z = Z_four[j]
                _add_direct(z, direct, r)
                y = targets[r] - lo
                z_y = z[y] + b_class[y]
                top = _biased_max(z, b_class, bits)
                out[r] = z_y - top - np.log(_exp_shifted_row(z, b_class, top, bits))


@njit(cache=True, nogil=True)
def _gather_rows(S, rows, out):
    """out[k] = S[rows[k]] for every k < len(rows)."""
    for k in range(rows.shape[0]):
        row, r = out[k], rows[k]
        for i in range(S.shape[1]):
            row[i] = S[r, i]


@njit(fastmath=True, cache=True, nogil=True)
def _column_log_probs(Z_t, b_class, targets, out):
    """out[r] = log softmax(Z_t[:, r] + b_class)[targets[r]] for every column r of the logits Z_t (n, R) of R
    rows over n words (used as scratch); targets (R,) in [0, n). Each step runs along a word's row of Z_t, so
    that it vectorizes across the columns."""
    n, R = Z_t.shape
    top = Z_t[0] + b_class[0]
    z_y = np.empty(R, Z_t.dtype)
    for r in range(R):
        z_y[r] = Z_t[targets[r], r] + b_class[targets[r]]
    for j in range(1, n):
        b, row = b_class[j], Z_t[j]
        for r in range(R):
            top[r] = max(top[r], row[r] + b)
    neg_top = -top
    total = np.zeros(R, Z_t.dtype)
    bits = np.empty(R, np.int32)
    for j in range(n):
        _exp_shifted_row(Z_t[j], neg_top, -b_class[j], bits)  # Z_t[j] := exp(Z_t[j] + b_class[j] - top)
        row = Z_t[j]
        for r in range(R):
            total[r] += row[r]
    for r in range(R):
        out[r] = z_y[r] - top[r] - np.log(total[r])


@njit(fastmath=True, cache=True, inline="always")
def _four_rows_logits(W_class, S_four, Z_four):
    """Z_four[j, w] = W_class[w] · S_four[j] for the four rows of S_four (4, m): one pass over W_class."""
    zero = S_four.dtype.type(0)
    s0, s1, s2, s3 = S_four[0], S_four[1], S_four[2], S_four[3]
    for w in range(W_class.shape[0]):
        a0 = a1 = a2 = a3 = zero
        for i in range(W_class.shape[1]):
            x = W_class[w, i]
            a0 += x * s0[i]
            a1 += x * s1[i]
            a2 += x * s2[i]
            a3 += x * s3[i]
        Z_four[0, w], Z_four[1, w], Z_four[2, w], Z_four[3, w] = a0, a1, a2, a3
