"""Direct features (Mikolov's RNNME): a window's hash keys, their scores in the logits, and W_d's sparse step.

The model's equations are in ``rnnlm.model``; the kernels (``direct_keys``, ``direct_scores``,
``direct_scatter``) in the backends. A position's contexts reach back up to N - 1 tokens (N the order):
the first, x_{t-1}, is the window's input, the P = N - 2 before it come from the caller
(``DirectWindow.set_history``: the stream's earlier inputs, -1 where the stream starts), so that a text's
scores do not depend on how it is cut into windows.

W_d is trained by plain SGD applied where its gradient is computed, whatever the optimizer of the other
weights: ``update`` adds -rate · dL/dz (of the window's mean loss) through the very entries each logit read,
one sparse pass over the window's entries (T·B·N runs of V or C entries, of the target's class with the
class softmax) in a fixed order. A dense gradient, its norm and Adam's moments would each cost passes over a
table of 10⁶–10⁸ entries per window; Mikolov's toolkit updates the table the same way. The rate is the
run's ``--direct-lr`` scaled as the schedule scales ``--lr``; W_d takes no part in the gradient's norm and
clipping, and no L2 term.
"""

import copy

import numpy as np

from rnnlm.model import direct_regions


def history_before(inputs, start, before):
    """The ``before`` inputs (P, B) int32 of the streams' rows before row ``start`` of inputs (T, B), -1
    for rows before the first."""
    out = np.full((before, inputs.shape[1]), -1, np.int32)
    first = max(start - before, 0)
    out[before - (start - first):] = inputs[first:start]
    return out


def context_history(context, order):
    """The ``history`` (P + 1, B) of one step from context (B, k): each hypothesis's tokens read so far, most
    recent last; -1 where a hypothesis has read fewer."""
    rows = max(order - 2, 0) + 1
    context = np.asarray(context).reshape(len(context), -1)[:, -rows:]
    out = np.full((rows, len(context)), -1, np.int32)
    out[rows - context.shape[1]:] = context.T
    return out


def window_contexts(history, T):
    """Each row's context (P + 1, T·B) of a window, row t·B + b: the inputs x_{t-1-P} .. x_{t-1} of stream b,
    oldest first, from history (P + T, B) laid out as ``DirectWindow.history``."""
    P = history.shape[0] - T
    return np.stack([history[j : j + T].reshape(-1) for j in range(P + 1)])


class DirectWindow:
    """A window's direct-feature buffers: history (P + T, B) int32, keys (T·B, N) int64, and with the class
    softmax ``words`` (T·B, widest class): the rows' word scores within their class, then scale · dL/dz, and
    ``no_words``, zeros of its shape to clear it with on the device.

    T, B: the window's steps and streams; n_out: the output layer's width (V, or C with classes).
    """

    def __init__(self, ops, T, B, order, boundary_id, n_out, dtype, class_bounds=None):
        self.ops, self.boundary_id, self.class_bounds = ops, boundary_id, class_bounds
        self.before = max(order - 2, 0)
        self.history = ops.asarray(np.full((self.before + T, B), -1, np.int32))
        self.keys = ops.zeros((T * B, order), np.int64)
        self.first_row_class = ops.zeros(T * B, np.int32)  # every row's columns are the output layer's
        self.all_columns = ops.asarray(np.array([0, n_out], np.int32))
        self.words = self.no_words = self.target_classes = None
        if class_bounds is not None:
            widest = int(np.diff(ops.to_numpy(class_bounds)).max())
            self.no_words = ops.zeros((T * B, widest), dtype)
            self.words = ops.zeros((T * B, widest), dtype)

    def narrow(self, T, B):
        """The same buffers cut to the first T steps (views)."""
        narrowed = copy.copy(self)
        narrowed.history = self.history[: self.before + T]
        narrowed.keys = self.keys[: T * B]
        narrowed.first_row_class = self.first_row_class[: T * B]
        if self.words is not None:
            narrowed.words, narrowed.no_words = self.words[: T * B], self.no_words[: T * B]
        return narrowed

    def set_history(self, before):
        """The P inputs before the window's, (P, B) host ints, -1 where there are none."""
        if self.before:
            self.ops.copy_into(np.asarray(before, np.int32), self.history[: self.before])

    def read(self, inputs):
        """The keys of the window's positions from its inputs (T, B) backend array."""
        self.ops.copy_into(inputs, self.history[self.before :])
        self.ops.direct_keys(self.history, self.boundary_id, self.keys)

    def add_scores(self, W_d, Z, target_classes=None):
        """Add the direct scores to the logits Z (T·B, n_out) (without bias); with the class softmax, write
        the rows' word scores into ``words`` and return it (for class_xent_grad), else return None."""
        ops = self.ops
        class_region, word_region = direct_regions(W_d.shape[0], self.class_bounds is not None)
        ops.direct_scores(W_d, self.keys, *(class_region or word_region), self.first_row_class, self.all_columns, Z)
        if self.class_bounds is None:
            return None
        self.target_classes = target_classes
        ops.copy_into(self.no_words, self.words)
        ops.direct_scores(W_d, self.keys, *word_region, target_classes, self.class_bounds, self.words)
        return self.words

    def update(self, W_d, Z, factor):
        """W_d += factor · dL/dz through the entries ``add_scores`` read; Z (T·B, n_out) holding scale · dL/dz
        (and ``words`` too, with the class softmax, as class_xent_grad leaves it)."""
        ops = self.ops
        class_region, word_region = direct_regions(W_d.shape[0], self.class_bounds is not None)
        ops.direct_scatter(W_d, self.keys, *(class_region or word_region), self.first_row_class, self.all_columns,
                           Z, factor)
        if self.class_bounds is not None:
            ops.direct_scatter(W_d, self.keys, *word_region, self.target_classes, self.class_bounds, self.words,
                               factor)


class DirectRows:
    """Direct features of rows that each bring their own context (independent scoring's packed rows): a
    ``DirectWindow`` of one step over ``rows`` streams, whose rows beyond a block's n have no context."""

    def __init__(self, ops, rows, order, boundary_id, n_out, dtype, class_bounds=None):
        self.window = DirectWindow(ops, 1, rows, order, boundary_id, n_out, dtype, class_bounds)
        self.rows = rows
        self.no_scores = None  # zeros (rows, n_out) to clear logits with, made at the first use of ``scores``

    def add_scores(self, W_d, Z, contexts, target_classes=None):
        """``DirectWindow.add_scores`` for n ≤ rows rows of contexts (P + 1, n) host ints (oldest first, -1:
        none) into the logits Z (rows, n_out); with the class softmax target_classes (rows,) backend int32."""
        window = self.window
        history = np.full((contexts.shape[0], self.rows), -1, np.int32)
        history[:, : contexts.shape[1]] = contexts
        window.ops.copy_into(history, window.history)
        window.ops.direct_keys(window.history, window.boundary_id, window.keys)
        return window.add_scores(W_d, Z, target_classes)

    def scores(self, W_d, Z, contexts, target_classes):
        """The class softmax's direct scores of n ≤ rows rows (see ``add_scores``): their classes' written into Z
        (rows, C), overwritten, and their class's words' returned."""
        ops = self.window.ops
        if self.no_scores is None:
            self.no_scores = ops.zeros(Z.shape, Z.dtype)
        ops.copy_into(self.no_scores, Z)
        return self.add_scores(W_d, Z, contexts, target_classes)
