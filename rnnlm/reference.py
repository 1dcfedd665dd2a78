"""Plain-numpy reference of one training window: what the kernels must reproduce.

Written for clarity, not speed, straight from the lecture's equations; the tests and benchmarks compare
the Numba kernels against it. Works in whatever float dtype the parameters have (float64 for the
gradient checks).
"""

import numpy as np


def forward(params, inputs, s0):
    """Hidden states of a (T, B) window.

    inputs: (T, B) integer ids x_{t-1}; s0: (B, m) carried state.
    Returns S: (T + 1, B, m) with S[0] = s0 and S[t + 1] = tanh(W_s S[t] + W_x x + b_s).
    """
    W_x, W_s, b_s = params["W_x"], params["W_s"], params["b_s"]
    T, B = inputs.shape
    S = np.empty((T + 1, B, W_s.shape[0]), W_s.dtype)
    S[0] = s0
    for t in range(T):
        a_t = S[t] @ W_s.T + W_x[:, inputs[t]].T + b_s
        S[t + 1] = np.tanh(a_t)
    return S


def log_softmax(z):
    """Row-wise log-softmax of z: (N, V)."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def loss(params, inputs, targets, s0):
    """Sum over the window of -log p_t(x̂_t), and the last state (B, m)."""
    S = forward(params, inputs, s0)
    T, B = inputs.shape
    z = S[1:].reshape(T * B, -1) @ params["W_o"].T + params["b_o"]
    logp = log_softmax(z)
    return -logp[np.arange(T * B), targets.reshape(-1)].sum(), S[T]


def loss_and_grads(params, inputs, targets, s0):
    """Sum of the window's losses, the gradients of the *mean* loss, and the last state.

    Backpropagation through time with the lecture's names: dL/dz = p_t - onehot(x̂_t),
    dL/ds_t = W_oᵀ dL/dz + dL/ds_t (from t+1), dL/da_t = (1 - s_t²) ⊙ dL/ds_t, dL/ds_{t-1} = W_sᵀ dL/da_t.
    """
    W_s, W_o = params["W_s"], params["W_o"]
    T, B = inputs.shape
    N = T * B
    S = forward(params, inputs, s0)
    s = S[1:].reshape(N, -1)
    z = s @ W_o.T + params["b_o"]
    logp = log_softmax(z)
    rows, y = np.arange(N), targets.reshape(-1)
    total = -logp[rows, y].sum()

    dL_dz = np.exp(logp)
    dL_dz[rows, y] -= 1
    dL_dz /= N
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    grads["W_o"] = dL_dz.T @ s
    grads["b_o"] = dL_dz.sum(axis=0)
    dL_ds_out = (dL_dz @ W_o).reshape(T, B, -1)
    dL_ds_next = np.zeros_like(S[0])
    for t in range(T - 1, -1, -1):
        dL_ds = dL_ds_out[t] + dL_ds_next
        dL_da = (1 - S[t + 1] ** 2) * dL_ds
        grads["W_s"] += dL_da.T @ S[t]
        np.add.at(grads["W_x"].T, inputs[t], dL_da)
        grads["b_s"] += dL_da.sum(axis=0)
        dL_ds_next = dL_da @ W_s
    return total, grads, S[T]
