"""Plain-numpy reference of one training window: what the kernels must reproduce.

Written for clarity, not speed, straight from the model's equations (README, The model); the tests and
benchmarks compare the Numba kernels against it, and sampling uses ``log_probs`` for its next-token
distribution. Works in whatever float dtype the parameters have (float64 for the gradient checks). Stacked layers, tied
weights (params["W_x"] a view of params["W_o"].T) and fixed dropout masks are covered.
"""

import numpy as np

from rnnlm.model import layer_names


def n_layers(params):
    """How many recurrent layers the parameters describe."""
    return 1 + sum(1 for name in params if name.startswith("W_in"))


def forward(params, inputs, s0, masks=None):
    """States and outputs of every layer over a (T, B) window.

    inputs: (T, B) integer ids x_{t-1}; s0: (L, B, m) carried states; masks: None, or (mask_in, mask_out)
    with mask_in (T, B, m) on the first layer's input term and mask_out a list of L (T, B, m) masks on
    the layers' outputs. Returns (S, D): S[k] (T + 1, B, m) with S[k][0] = s0[k] and
    S[k][t + 1] = tanh(W_s S[k][t] + U[k][t] + b_s); D[k] (T, B, m) the output as read from above.
    """
    T, B = inputs.shape
    S, D = [], []
    for k in range(n_layers(params)):
        W_in, W_s, b_s = (params[name] for name in layer_names(k + 1))
        if k == 0:
            U = W_in[:, inputs].transpose(1, 2, 0)  # W_x x_{t-1}: the token's column
            if masks is not None:
                U = U * masks[0]
        else:
            U = D[k - 1] @ W_in.T
        states = np.empty((T + 1, B, W_s.shape[0]), W_s.dtype)
        states[0] = s0[k]
        for t in range(T):
            a_t = states[t] @ W_s.T + U[t] + b_s
            states[t + 1] = np.tanh(a_t)
        S.append(states)
        D.append(states[1:] if masks is None else states[1:] * masks[1][k])
    return S, D


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


def loss(params, inputs, targets, s0, class_bounds=None, masks=None):
    """Sum over the window of -log p_t(x̂_t), and the last states (L, B, m)."""
    S, D = forward(params, inputs, s0, masks)
    T, B = inputs.shape
    logp = log_probs(params, D[-1].reshape(T * B, -1), class_bounds)
    return -logp[np.arange(T * B), targets.reshape(-1)].sum(), np.stack([states[T] for states in S])


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


def loss_and_grads(params, inputs, targets, s0, class_bounds=None, masks=None, tied=False):
    """Sum of the window's losses, the gradients of the *mean* loss, and the last states (L, B, m).

    Backpropagation through time with the model's names: dL/dz = p_t - onehot(x̂_t),
    dL/ds_t = W_oᵀ dL/dz + dL/ds_t (from t+1), dL/da_t = (1 - s_t²) ⊙ dL/ds_t, dL/ds_{t-1} = W_sᵀ dL/da_t.
    Tied: the gradient of the one shared array is reported as W_o's (W_x's is folded into it).
    """
    T, B = inputs.shape
    L = n_layers(params)
    S, D = forward(params, inputs, s0, masks)
    total, out_grads, dL_ds_out = output_grads(params, D[-1].reshape(T * B, -1), targets.reshape(-1), class_bounds)
    grads = {name: np.zeros(p.shape, p.dtype) for name, p in params.items()}
    grads.update(out_grads)
    dL_ds_out = dL_ds_out.reshape(T, B, -1)
    for k in range(L - 1, -1, -1):
        W_in, W_s, b_s = layer_names(k + 1)
        if masks is not None:
            dL_ds_out = dL_ds_out * masks[1][k]
        dL_ds_next = np.zeros_like(S[k][0])
        dL_da_all = np.empty_like(dL_ds_out)
        for t in range(T - 1, -1, -1):
            dL_ds = dL_ds_out[t] + dL_ds_next
            dL_da = (1 - S[k][t + 1] ** 2) * dL_ds
            grads[W_s] += dL_da.T @ S[k][t]
            grads[b_s] += dL_da.sum(axis=0)
            dL_ds_next = dL_da @ params[W_s]
            dL_da_all[t] = dL_da
        if k > 0:
            grads[W_in] = np.einsum("tbi,tbj->ij", dL_da_all, D[k - 1])
            dL_ds_out = dL_da_all @ params[W_in]
        else:
            dL_dU = dL_da_all if masks is None else dL_da_all * masks[0]
            np.add.at(grads["W_x"].T, inputs.reshape(-1), dL_dU.reshape(T * B, -1))
    if tied:
        grads["W_o"] = grads["W_o"] + grads.pop("W_x").T
    return total, grads, np.stack([states[T] for states in S])
