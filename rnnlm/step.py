"""One training or evaluation step over a (T, B) window, written once for every backend.

``ops`` is a backend module (``rnnlm.backends.cpu`` or ``rnnlm.backends.cuda``): the kernels differ, the
composition below and so the model and the loss are shared.
"""

import numpy as np

from rnnlm.model import PARAM_NAMES


class Window:
    """Device buffers for windows of T steps over B streams of a model with V tokens and state m.

    S (T + 1, B, m): states, S[0] the state carried in; Z (T·B, V): logits, then dL/dz;
    dL_ds_out (T, B, m): W_oᵀ dL/dz; dL_da (T, B, m).
    """

    def __init__(self, ops, T, B, m, V, dtype=np.float32):
        self.ops, self.T, self.B = ops, T, B
        self.S = ops.zeros((T + 1, B, m), dtype)
        self.Z = ops.zeros((T * B, V), dtype)
        self.dL_ds_out = ops.zeros((T, B, m), dtype)
        self.dL_da = ops.zeros((T, B, m), dtype)

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


def forward_backward(ops, params, grads, window, inputs, targets):
    """Loss of a window and the gradients of its mean loss.

    params, grads: dicts of backend arrays named as in rnnlm.model; inputs, targets: (T, B) int32 backend
    arrays (targets[t] = inputs[t + 1] in a stream). Returns Σ -log p_t(x̂_t) as a float; grads are
    overwritten; window.S[T] holds the last state.
    """
    T, B = window.T, window.B
    S_prev, S_next = window.states()
    Z = window.Z
    ops.forward(params["W_x"], params["W_s"], params["b_s"], inputs, window.S)
    ops.matmul_nt(S_next, params["W_o"], Z)
    loss = ops.softmax_xent_grad(Z, params["b_o"], targets.reshape(T * B), 1.0 / (T * B), grads["b_o"])
    ops.matmul_tn(Z, S_next, grads["W_o"])  # dW_o = Σ_t dL/dz s_tᵀ
    ops.matmul_nn(Z, params["W_o"], window.dL_ds_out.reshape(T * B, -1))  # W_oᵀ dL/dz, row by row
    ops.backward(params["W_s"], window.S, window.dL_ds_out, window.dL_da)
    dL_da = window.dL_da.reshape(T * B, -1)
    ops.matmul_tn(dL_da, S_prev, grads["W_s"])  # dW_s = Σ_t dL/da_t s_{t-1}ᵀ
    ops.input_grads(inputs, window.dL_da, grads["W_x"], grads["b_s"])
    return float(loss)


def window_loss(ops, params, window, inputs, targets):
    """Σ -log p_t(x̂_t) over a window, without gradients; window.S[T] holds the last state."""
    T, B = window.T, window.B
    _, S_next = window.states()
    ops.forward(params["W_x"], params["W_s"], params["b_s"], inputs, window.S)
    ops.matmul_nt(S_next, params["W_o"], window.Z)
    return float(ops.softmax_xent(window.Z, params["b_o"], targets.reshape(T * B)))


def sgd_step(ops, params, grads, lr, clip=0.0, l2=0.0):
    """θ ← θ - lr (g · min(1, clip / ‖g‖) + 2λ θ); ‖g‖ is the global norm over all parameters.

    clip = 0 turns clipping off. Returns ‖g‖ before clipping.
    """
    norm = float(np.sqrt(sum(ops.sum_squares(grads[name]) for name in PARAM_NAMES)))
    clip_scale = clip / norm if 0 < clip < norm else 1.0
    for name in PARAM_NAMES:
        dtype = params[name].dtype.type
        ops.sgd_update(params[name], grads[name], dtype(lr * clip_scale), dtype(1.0 - lr * 2.0 * l2))
    return norm
