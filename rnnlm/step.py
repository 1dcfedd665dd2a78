"""One training or evaluation step over a (T, B) window, written once for every backend.

``ops`` is a backend module (``rnnlm.backends.cpu`` or ``rnnlm.backends.cuda``): the kernels differ, the
composition below and so the model and the loss are shared.

Sparse gradients: a window touches only the W_x columns of its input tokens (and, with the class
softmax, only the W_o rows of its targets' classes, with the hierarchical softmax only the W_o rows of the
tree nodes on its targets' paths). Those gradients are slotted (``rnnlm.backends``): the rows a window
touches claim the first rows of the gradient array, whose other rows stay zero and, on the CPU, never become
resident; the optimizer visits the slotted rows alone. W_x lives on the device column-major
(as the transpose of a (V, m) array, one contiguous m-vector per token), which makes its reads and
updates contiguous, and makes tying (W_o = W_xᵀ) a matter of two views of one array.

Backend arrays must transpose as views (``.T`` shares memory): the column-major W_x, ``rows`` and tying
rely on it.

Dropout (training only) multiplies the first layer's input term W_x x_{t-1} and every layer's output
s_t by masks of 0 and 1/(1 - p) drawn on the host; the recurrent connection is never dropped.
"""

import numpy as np

from rnnlm.direct import DirectWindow
from rnnlm.model import layer_names


def to_device(ops, params, tied=False):
    """Backend copies of the parameters; W_x column-major, and a view of W_o when tied."""
    device = {name: ops.asarray(array) for name, array in params.items() if name != "W_x"}
    device["W_x"] = device["W_o"].T if tied else ops.asarray(params["W_x"].T).T
    return device


def zero_grads(ops, params, tied=False):
    """Zeroed gradient arrays laid out like ``to_device``'s parameters; tied, W_x's is a view of W_o's, so
    that the input term's gradient lands in the shared array's rows. None for the direct features' W_d,
    which ``rnnlm.direct`` updates where its gradient is computed. The sparse ones (``sparse_names``) are
    slotted by the window's slot arrays."""
    grads = {name: ops.zeros(p.shape, p.dtype) for name, p in params.items() if name not in ("W_x", "W_d")}
    grads["W_x"] = grads["W_o"].T if tied else ops.zeros(params["W_x"].shape[::-1], params["W_x"].dtype).T
    return grads


def rows(name, array):
    """The array as rows of one token each: W_x transposed (V, m), any other as it is."""
    return array.T if name == "W_x" else array


class Window:
    """Device buffers for windows of T steps over B streams of a model with V tokens, state m, L layers.

    Per layer: S (T + 1, B, m) states, S[0] the state carried in; U (T, B, m) the input term; D (T, B, m)
    the dropped-out output (dropout only); dL_ds_out (T, B, m) the gradient reaching s_t from above and
    dL_da (T, B, m): U's arrays themselves. Z (T·B, V), or (T·B, C) with the class softmax: logits, then
    dL/dz; (T·B, 0) with the hierarchical softmax, which reads no logits. slot_W_x (V,), slot_W_o (W_o's
    rows,) int32 and claimed_W_x, claimed_W_o (1,) int32: the slots of the sparse gradients (tied, W_o's serve
    both); with the full softmax, whose dW_o is dense, slot_W_o is 0, 1, …, V - 1 (where a tied input term's
    gradient lands). dW_o_norm (1,) float64, class and hierarchical softmax only: the norm of the window's dW_o
    rows as class_xent_grad or hs_xent_grad leaves them. tree_parent, tree_sign: the hierarchical softmax's
    tree (``rnnlm.huffman``) on the device, else None. Dropout masks: mask_in (T, B, m) and one mask_out per
    layer, refilled by ``draw_masks``. direct: the direct features' buffers (``rnnlm.direct.DirectWindow``) of
    a model with direct_order > 0, else None.
    """

    def __init__(self, ops, T, B, m, V, dtype=np.float32, class_bounds=None, layers=1, tied=False, dropout=0.0,
                 direct_order=0, boundary_id=0, hs_tree=None):
        self.ops, self.T, self.B, self.layers, self.tied, self.dropout = ops, T, B, layers, tied, dropout
        self.dtype = np.dtype(dtype)
        shape = (T, B, m)
        self.S = [ops.zeros((T + 1, B, m), dtype) for _ in range(layers)]
        self.U = [ops.zeros(shape, dtype) for _ in range(layers)]
        self.D = [ops.zeros(shape, dtype) for _ in range(layers)] if dropout else None
        self.mask_in = ops.zeros(shape, dtype) if dropout else None
        self.mask_out = [ops.zeros(shape, dtype) for _ in range(layers)] if dropout else None
        self.hs = hs_tree is not None
        n_out = 0 if self.hs else V if class_bounds is None else len(class_bounds) - 1
        self.Z = ops.zeros((T * B, n_out), dtype)
        self.sparse_W_o = class_bounds is not None or self.hs
        self.slot_W_x = ops.asarray(np.full(V, -1, np.int32))
        W_o_rows = V - 1 if self.hs else V
        dense_slots = np.arange(V, dtype=np.int32)  # the full softmax's dW_o: every row its own
        self.slot_W_o = ops.asarray(np.full(W_o_rows, -1, np.int32) if self.sparse_W_o else dense_slots)
        self.claimed_W_x, self.claimed_W_o = ops.zeros(1, np.int32), ops.zeros(1, np.int32)
        self.class_bounds = None if class_bounds is None else ops.asarray(class_bounds, np.int32)
        self.tree_parent = None if hs_tree is None else ops.asarray(hs_tree.parent)
        self.tree_sign = None if hs_tree is None else ops.asarray(hs_tree.sign)
        self.dW_o_norm = None if class_bounds is None and not self.hs else ops.zeros(1, np.float64)
        self.direct = None if not direct_order else DirectWindow(ops, T, B, direct_order, boundary_id, n_out, dtype,
                                                                 self.class_bounds)

    @property
    def dL_ds_out(self):
        """U's arrays: the input term is read by forward alone, so the output layer writes dL/ds over it."""
        return self.U

    @property
    def dL_da(self):
        """U's arrays: backward writes dL/da over dL/ds."""
        return self.U

    def clear_slots(self):
        """No row of a sparse gradient has a slot (``sparse_names``'s slot arrays all -1, claimed 0)."""
        for slot, claimed in sparse_names(self).values():
            self.ops.copy_into(np.full(slot.shape, -1, np.int32), slot)
            self.ops.copy_into(np.zeros(1, np.int32), claimed)

    def draw_masks(self, rng):
        """New dropout masks (0 or 1/(1 - p)) from the numpy Generator ``rng``."""
        keep = 1.0 - self.dropout
        for mask in [self.mask_in, *self.mask_out]:
            drawn = (rng.random(mask.shape) < keep).astype(self.dtype) / self.dtype.type(keep)
            self.ops.copy_into(drawn, mask)

    def reset_state(self):
        """Zero the states carried into the next window (and forget the direct features' history)."""
        zero = np.zeros(self.S[0].shape[1:], self.dtype)
        for S in self.S:
            self.ops.copy_into(zero, S[0])
        if self.direct:
            self.direct.set_history(np.full((self.direct.before, self.B), -1))

    def carry_state(self):
        """Make the window's last states the next window's first."""
        for S in self.S:
            self.ops.copy_into(S[self.T], S[0])

    def flat(self, array):
        """A (T, B, m) buffer as (T·B, m) rows."""
        return array.reshape(self.T * self.B, -1)

    def outputs(self, k, training):
        """Layer k's (0-based) output as the layer above or the output layer reads it: (T·B, m)."""
        if training and self.dropout:
            return self.flat(self.D[k])
        return self.flat(self.S[k][1:])


def forward(ops, params, window, inputs, training):
    """Run every layer over the window; returns the top layer's output rows (T·B, m)."""
    if window.direct:
        window.direct.read(inputs)
    U = window.U[0]
    ops.embed(params["W_x"], inputs, U)
    if training and window.dropout:
        ops.multiply(U, window.mask_in, U)
    for k in range(window.layers):
        W_in, W_s, b_s = layer_names(k + 1)
        if k > 0:
            ops.matmul_nt(window.outputs(k - 1, training), params[W_in], window.flat(window.U[k]))
        ops.forward(params[W_s], params[b_s], window.U[k], window.S[k])
        if training and window.dropout:
            ops.multiply(window.S[k][1:], window.mask_out[k], window.D[k])
    return window.outputs(window.layers - 1, training)


def forward_backward(ops, params, grads, window, inputs, targets, target_classes=None):
    """Loss of a window and the gradients of its mean loss.

    params, grads: dicts of backend arrays from ``to_device`` and ``zero_grads``; inputs, targets:
    (T, B) int32 backend arrays (targets[t] = inputs[t + 1] in a stream); target_classes (T, B) int32,
    the targets' classes, with the class softmax only. Returns Σ -log p_t(x̂_t): a float, or (CUDA) a
    number that ``float()`` brings from the device, waiting for it; read it before the next window. Dense
    gradients are overwritten; sparse ones accumulate into their marked rows (see ``rnnlm.optim``);
    window.S[k][T] holds the last states.
    """
    N = window.T * window.B
    scale = 1.0 / N
    top = forward(ops, params, window, inputs, training=True)
    L = window.layers
    dL_ds_top = window.flat(window.dL_ds_out[L - 1])
    loss = output_backward(ops, params, grads, window, top, targets.reshape(N), target_classes, scale, dL_ds_top)
    for k in range(L - 1, -1, -1):
        W_in, W_s, b_s = layer_names(k + 1)
        if window.dropout:
            ops.multiply(window.dL_ds_out[k], window.mask_out[k], window.dL_ds_out[k])
        ops.backward(params[W_s], window.S[k], window.dL_ds_out[k], window.dL_da[k])
        dL_da = window.flat(window.dL_da[k])
        ops.matmul_tn(dL_da, window.flat(window.S[k][:-1]), grads[W_s])  # dW_s = Σ_t dL/da_t s_{t-1}ᵀ
        ops.bias_grad(dL_da, grads[b_s])
        if k > 0:
            below = window.outputs(k - 1, training=True)
            ops.matmul_tn(dL_da, below, grads[W_in])  # dW_in = Σ_t dL/da_t s^{below}_tᵀ
            ops.matmul_nn(dL_da, params[W_in], window.flat(window.dL_ds_out[k - 1]))
    dL_dU = window.dL_da[0]
    if window.dropout:
        ops.multiply(dL_dU, window.mask_in, dL_dU)
    # dW_x[:, x_{t-1}] += dL/dU_t; tied, into W_o's rows (the output layer's gradient is already there)
    slots = (window.slot_W_o, window.claimed_W_o) if window.tied else (window.slot_W_x, window.claimed_W_x)
    ops.input_grads(inputs, dL_dU, grads["W_x"], *slots)
    return loss


def output_logits(ops, params, window, s, classes=None):
    """window.Z = the logits without bias of rows s (N, m): the words' (W_o s), or the classes' (W_c s) with
    the class softmax, plus the direct features' scores. Returns what the class softmax's word half takes as
    ``direct``: the rows' direct scores of their class's words (classes (N,): the targets' classes), or None
    (no direct features, or the full softmax)."""
    ops.matmul_nt(s, params["W_o" if window.class_bounds is None else "W_c"], window.Z)
    if not window.direct:
        return None
    return window.direct.add_scores(params["W_d"], window.Z, classes)


def output_backward(ops, params, grads, window, s, targets, target_classes, scale, dL_ds):
    """Output layer on rows s (N, m): loss sum, its parameters' gradients, and dL/ds into dL_ds (N, m)."""
    Z = window.Z
    if window.hs:
        return ops.hs_xent_grad(s, params["W_o"], params["b_o"], targets, window.tree_parent, window.tree_sign, scale,
                                grads["W_o"], grads["b_o"], dL_ds, window.slot_W_o, window.claimed_W_o,
                                window.dW_o_norm)
    if window.class_bounds is None:
        output_logits(ops, params, window, s)
        loss = ops.softmax_xent_grad(Z, params["b_o"], targets, scale, grads["b_o"])  # Z := dL/dz
        ops.matmul_tn(Z, s, grads["W_o"])  # dW_o = Σ_t dL/dz s_tᵀ
        ops.matmul_nn(Z, params["W_o"], dL_ds)  # W_oᵀ dL/dz, row by row
        return loss
    classes = target_classes.reshape(-1)
    words = output_logits(ops, params, window, s, classes)
    loss = ops.softmax_xent_grad(Z, params["b_c"], classes, scale, grads["b_c"])
    ops.matmul_tn(Z, s, grads["W_c"])
    ops.matmul_nn(Z, params["W_c"], dL_ds)
    return loss + ops.class_xent_grad(s, params["W_o"], params["b_o"], targets, classes, window.class_bounds,
                                      scale, grads["W_o"], grads["b_o"], dL_ds, window.slot_W_o, window.claimed_W_o,
                                      window.dW_o_norm, words)


def window_loss(ops, params, window, inputs, targets, target_classes=None):
    """Σ -log p_t(x̂_t) over a window, without gradients or dropout; window.S[k][T] holds the last states."""
    N = window.T * window.B
    s = forward(ops, params, window, inputs, training=False)
    if window.hs:
        return float(ops.hs_xent(s, params["W_o"], params["b_o"], targets.reshape(N), window.tree_parent,
                                 window.tree_sign))
    if window.class_bounds is None:
        output_logits(ops, params, window, s)
        return float(ops.softmax_xent(window.Z, params["b_o"], targets.reshape(N)))
    classes = target_classes.reshape(N)
    words = output_logits(ops, params, window, s, classes)
    loss = ops.softmax_xent(window.Z, params["b_c"], classes)
    return float(loss + ops.class_xent(s, params["W_o"], params["b_o"], targets.reshape(N), classes,
                                       window.class_bounds, words))


def sparse_names(window):
    """The trainable parameters whose gradients are sparse for this window's model, with their (slot, claimed)
    arrays."""
    names = {} if window.tied else {"W_x": (window.slot_W_x, window.claimed_W_x)}
    if window.sparse_W_o:
        names["W_o"] = (window.slot_W_o, window.claimed_W_o)
    return names


def unslotted(grad_rows, slot, table_rows=None):
    """A slotted gradient (``rnnlm.backends``) in table order: numpy grad_rows (R, m) and slot (R,) -> a new
    array whose row j is the gradient of table row table_rows[j] (default: every row, in order), that is
    grad_rows[slot[table_rows[j]]], zero where that slot is -1."""
    own = slot if table_rows is None else slot[table_rows]
    table = np.zeros((len(own), grad_rows.shape[1]), grad_rows.dtype)
    table[own >= 0] = grad_rows[own[own >= 0]]
    return table


def host_grads(ops, grads, window):
    """The trainable gradients after a step as numpy arrays shaped like the parameters, the sparse ones in table
    order (for checks against a reference, or one backend against another)."""
    host = {name: ops.to_numpy(grads[name]) for name in trainable(grads, window)}
    for name, (slot, _) in sparse_names(window).items():
        host[name] = rows(name, unslotted(rows(name, host[name]), ops.to_numpy(slot)))
    return host


def trainable(params, window):
    """The parameters a run trains (and checkpoints): all but W_x when it is a view of W_o. The optimizers
    leave W_d to ``direct_update``."""
    return {name: p for name, p in params.items() if not (window.tied and name == "W_x")}


def direct_update(ops, params, window, lr):
    """The direct features' SGD step on W_d (``rnnlm.direct``) after ``forward_backward``: θ ← θ - lr · g."""
    window.direct.update(params["W_d"], window.Z, -lr)
