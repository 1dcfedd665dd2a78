"""One training or evaluation step over a (T, B) window, written once for every backend.

``ops`` is a backend module (``rnnlm.backends.cpu`` or ``rnnlm.backends.cuda``): the kernels differ, the
composition below and so the model and the loss are shared.

Sparse gradients: a window touches only the W_x columns of its input tokens (and, with the class
softmax, only the W_o rows of its targets' classes). Those gradients are kept zero elsewhere, marked
in a uint8 mask, and the update visits the marked rows alone. W_x lives on the device column-major
(as Wᵀ_x, one contiguous m-vector per token), which makes both its reads and its updates contiguous.
"""

import numpy as np

SPARSE = {"W_x": "touched_W_x", "W_o": "touched_W_o"}


def to_device(ops, params):
    """Backend copies of the parameters; W_x column-major (a transposed view of a (V, m) array)."""
    return {name: ops.asarray(array.T).T if name == "W_x" else ops.asarray(array) for name, array in params.items()}


def zero_grads(ops, params):
    """Zeroed gradient arrays laid out like ``to_device``'s parameters."""
    return {
        name: ops.zeros(p.shape[::-1], p.dtype).T if name == "W_x" else ops.zeros(p.shape, p.dtype)
        for name, p in params.items()
    }


class Window:
    """Device buffers for windows of T steps over B streams of a model with V tokens and state m.

    S (T + 1, B, m): states, S[0] the state carried in; Z (T·B, V), or (T·B, C) with the class softmax:
    logits, then dL/dz; dL_ds_out (T, B, m): the output layer's dL/ds_t; dL_da (T, B, m);
    touched_W_x, touched_W_o (V,) uint8: the sparse gradients' masks; class_bounds (C + 1,) int32.
    """

    def __init__(self, ops, T, B, m, V, dtype=np.float32, class_bounds=None):
        self.ops, self.T, self.B = ops, T, B
        self.S = ops.zeros((T + 1, B, m), dtype)
        n_out = V if class_bounds is None else len(class_bounds) - 1
        self.Z = ops.zeros((T * B, n_out), dtype)
        self.dL_ds_out = ops.zeros((T, B, m), dtype)
        self.dL_da = ops.zeros((T, B, m), dtype)
        self.touched_W_x = ops.zeros(V, np.uint8)
        self.touched_W_o = ops.zeros(V, np.uint8)
        self.class_bounds = None if class_bounds is None else ops.asarray(class_bounds, np.int32)

    def reset_state(self):
        """Zero the state carried into the next window."""
        self.ops.copy_into(np.zeros(self.S.shape[1:], self.S.dtype), self.S[0])

    def carry_state(self):
        """Make the window's last state the next window's first."""
        self.ops.copy_into(self.S[self.T], self.S[0])

    def states(self):
        """(S_prev, S_next), each (T·B, m): the states feeding each step and the states it produced."""
        T, B, m = self.T, self.B, self.S.shape[2]
        return self.S[:T].reshape(T * B, m), self.S[1:].reshape(T * B, m)


def forward_backward(ops, params, grads, window, inputs, targets, target_classes=None):
    """Loss of a window and the gradients of its mean loss.

    params, grads: dicts of backend arrays from ``to_device`` and ``zero_grads``; inputs, targets:
    (T, B) int32 backend arrays (targets[t] = inputs[t + 1] in a stream); target_classes (T, B) int32,
    the targets' classes, with the class softmax only. Returns Σ -log p_t(x̂_t) as a float. Dense
    gradients are overwritten; sparse ones accumulate into their marked rows (see ``rnnlm.optim``);
    window.S[T] holds the last state.
    """
    T, B = window.T, window.B
    N = T * B
    S_prev, S_next = window.states()
    Z, scale = window.Z, 1.0 / N
    dL_ds_out = window.dL_ds_out.reshape(N, -1)
    ops.forward(params["W_x"], params["W_s"], params["b_s"], inputs, window.S)
    if window.class_bounds is None:
        ops.matmul_nt(S_next, params["W_o"], Z)
        loss = ops.softmax_xent_grad(Z, params["b_o"], targets.reshape(N), scale, grads["b_o"])
        ops.matmul_tn(Z, S_next, grads["W_o"])  # dW_o = Σ_t dL/dz s_tᵀ
        ops.matmul_nn(Z, params["W_o"], dL_ds_out)  # W_oᵀ dL/dz, row by row
    else:
        ops.matmul_nt(S_next, params["W_c"], Z)
        loss = ops.softmax_xent_grad(Z, params["b_c"], target_classes.reshape(N), scale, grads["b_c"])
        ops.matmul_tn(Z, S_next, grads["W_c"])
        ops.matmul_nn(Z, params["W_c"], dL_ds_out)
        loss += ops.class_xent_grad(S_next, params["W_o"], params["b_o"], targets.reshape(N),
                                    target_classes.reshape(N), window.class_bounds, scale, grads["W_o"],
                                    grads["b_o"], dL_ds_out, window.touched_W_o)
    ops.backward(params["W_s"], window.S, window.dL_ds_out, window.dL_da)
    ops.matmul_tn(window.dL_da.reshape(N, -1), S_prev, grads["W_s"])  # dW_s = Σ_t dL/da_t s_{t-1}ᵀ
    ops.input_grads(inputs, window.dL_da, grads["W_x"], grads["b_s"], window.touched_W_x)
    return float(loss)


def window_loss(ops, params, window, inputs, targets, target_classes=None):
    """Σ -log p_t(x̂_t) over a window, without gradients; window.S[T] holds the last state."""
    N = window.T * window.B
    _, S_next = window.states()
    ops.forward(params["W_x"], params["W_s"], params["b_s"], inputs, window.S)
    if window.class_bounds is None:
        ops.matmul_nt(S_next, params["W_o"], window.Z)
        return float(ops.softmax_xent(window.Z, params["b_o"], targets.reshape(N)))
    ops.matmul_nt(S_next, params["W_c"], window.Z)
    loss = ops.softmax_xent(window.Z, params["b_c"], target_classes.reshape(N))
    return float(loss + ops.class_xent(S_next, params["W_o"], params["b_o"], targets.reshape(N),
                                       target_classes.reshape(N), window.class_bounds))


def sparse_names(window):
    """The parameters whose gradients are sparse for this window's model, with their masks."""
    names = {"W_x": window.touched_W_x}
    if window.class_bounds is not None:
        names["W_o"] = window.touched_W_o
    return names


def rows(name, array):
    """The array as rows of one token each: W_x transposed (V, m), W_o as it is."""
    return array.T if name == "W_x" else array
