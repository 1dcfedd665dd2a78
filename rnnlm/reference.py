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


def log_probs(params, s, class_bounds=None):
    """log p(w | s) for every word: (N, V) from states s (N, m), full or class-based softmax."""
    z = s @ params["W_o"].T + params["b_o"]
    if class_bounds is None:
        return log_softmax(z)
    log_p_class = log_softmax(s @ params["W_c"].T + params["b_c"])
    out = np.empty_like(z)
    for c, (lo, hi) in enumerate(zip(class_bounds[:-1], class_bounds[1:], strict=True)):
        out[:, lo:hi] = log_p_class[:, c : c + 1] + log_softmax(z[:, lo:hi])
    return out


def loss(params, inputs, targets, s0, class_bounds=None):
    """Sum over the window of -log p_t(x̂_t), and the last state (B, m)."""
    S = forward(params, inputs, s0)
    T, B = inputs.shape
    logp = log_probs(params, S[1:].reshape(T * B, -1), class_bounds)
    return -logp[np.arange(T * B), targets.reshape(-1)].sum(), S[T]


def output_grads(params, s, targets, class_bounds=None):
    """Loss sum over rows, gradients of the mean loss for the output parameters, and dL/ds (N, m).

    Full softmax: dL/dz = p_t - onehot(x̂_t). Class softmax: the same for the class logits (against the
    target's class) and for the logits of the target class's words (against the target).
    """
    N = len(targets)
    rows = np.arange(N)
    grads = {}
    if class_bounds is None:
        logp = log_softmax(s @ params["W_o"].T + params["b_o"])
        dL_dz = np.exp(logp)
        dL_dz[rows, targets] -= 1
        dL_dz /= N
        grads["W_o"], grads["b_o"] = dL_dz.T @ s, dL_dz.sum(axis=0)
        return -logp[rows, targets].sum(), grads, dL_dz @ params["W_o"]
    classes = np.searchsorted(class_bounds, targets, side="right") - 1
    logp_class = log_softmax(s @ params["W_c"].T + params["b_c"])
    dL_dzc = np.exp(logp_class)
    dL_dzc[rows, classes] -= 1
    dL_dzc /= N
    grads["W_c"], grads["b_c"] = dL_dzc.T @ s, dL_dzc.sum(axis=0)
    dL_ds = dL_dzc @ params["W_c"]
    total = -logp_class[rows, classes].sum()
    grads["W_o"], grads["b_o"] = np.zeros_like(params["W_o"]), np.zeros_like(params["b_o"])
    for r, (c, y) in enumerate(zip(classes, targets, strict=True)):
        lo, hi = class_bounds[c], class_bounds[c + 1]
        logp = log_softmax((params["W_o"][lo:hi] @ s[r] + params["b_o"][lo:hi])[None])[0]
        total -= logp[y - lo]
        dL_dz = np.exp(logp)
        dL_dz[y - lo] -= 1
        dL_dz /= N
        grads["W_o"][lo:hi] += np.outer(dL_dz, s[r])
        grads["b_o"][lo:hi] += dL_dz
        dL_ds[r] += dL_dz @ params["W_o"][lo:hi]
    return total, grads, dL_ds


def loss_and_grads(params, inputs, targets, s0, class_bounds=None):
    """Sum of the window's losses, the gradients of the *mean* loss, and the last state.

    Backpropagation through time with the lecture's names: dL/dz = p_t - onehot(x̂_t),
    dL/ds_t = W_oᵀ dL/dz + dL/ds_t (from t+1), dL/da_t = (1 - s_t²) ⊙ dL/ds_t, dL/ds_{t-1} = W_sᵀ dL/da_t.
    """
    W_s = params["W_s"]
    T, B = inputs.shape
    S = forward(params, inputs, s0)
    total, out_grads, dL_ds_out = output_grads(params, S[1:].reshape(T * B, -1), targets.reshape(-1), class_bounds)
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    grads.update(out_grads)
    dL_ds_out = dL_ds_out.reshape(T, B, -1)
    dL_ds_next = np.zeros_like(S[0])
    for t in range(T - 1, -1, -1):
        dL_ds = dL_ds_out[t] + dL_ds_next
        dL_da = (1 - S[t + 1] ** 2) * dL_ds
        grads["W_s"] += dL_da.T @ S[t]
        np.add.at(grads["W_x"].T, inputs[t], dL_da)
        grads["b_s"] += dL_da.sum(axis=0)
        dL_ds_next = dL_da @ W_s
    return total, grads, S[T]
