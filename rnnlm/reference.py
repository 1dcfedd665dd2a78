"""Plain-numpy reference of one training window: what the kernels must reproduce.

Written for clarity, not speed, straight from the model's equations (README, The model); the tests and
benchmarks compare the Numba kernels against it, and sampling uses ``log_probs`` for its next-token
distribution. Works in whatever float dtype the parameters have (float64 for the gradient checks). Stacked layers, tied
weights (params["W_x"] a view of params["W_o"].T) and fixed dropout masks are covered.
"""

import numpy as np

from rnnlm.backends import DIRECT_BASE, DIRECT_MODULUS, DIRECT_PRIMES
from rnnlm.model import direct_regions, layer_names


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


def direct_keys(history, boundary_id, order):
    """The hash keys (T·B, order) int64 of every position's contexts, -1 where cut (``OPS["direct_keys"]``):
    history (P + T, B), history[P + t] = x_{t-1} of stream b, earlier rows the tokens before (-1: none)."""
    T = history.shape[0] - max(order - 2, 0)
    B = history.shape[1]
    keys = np.full((T * B, order), -1, np.int64)
    for t in range(T):
        for b in range(B):
            context = [int(history[len(history) - T + t - i, b]) for i in range(order - 1)]  # h_1, h_2, ...
            for n in range(order):
                h = context[:n]
                if any(token < 0 for token in h) or boundary_id in h[:-1]:
                    continue
                key = DIRECT_BASE
                for i, token in enumerate(h, start=1):
                    key = (key + int(DIRECT_PRIMES[(n * int(DIRECT_PRIMES[i]) + i) % len(DIRECT_PRIMES)]) *
                           (token + 1)) % DIRECT_MODULUS
                keys[t * B + b, n] = key
    return keys


def direct_indices(keys, region, n_columns):
    """The table entries (R, N, n_columns) of column w of every row and order: region[0] + (key + w) mod
    region[1] (valid where keys ≥ 0)."""
    offset, size = region
    return offset + (np.maximum(keys, 0)[:, :, None] + np.arange(n_columns)) % size


def direct_term(W_d, keys, region, n_columns):
    """d (R, n_columns): Σ over the valid orders of W_d at ``direct_indices``."""
    valid = (keys >= 0)[:, :, None]
    return (W_d[direct_indices(keys, region, n_columns)] * valid).sum(axis=1)


def direct_grad(W_d, keys, region, dL_dz):
    """The gradient of W_d (D,) through ``direct_term`` given dL/dd = dL_dz (R, n_columns)."""
    grad = np.zeros_like(W_d)
    valid = np.broadcast_to((keys >= 0)[:, :, None], keys.shape + (dL_dz.shape[1],))
    contributions = np.broadcast_to(dL_dz[:, None, :], valid.shape)
    np.add.at(grad, direct_indices(keys, region, dL_dz.shape[1])[valid], contributions[valid])
    return grad


def direct_logits(params, keys, n_rows, class_bounds=None):
    """(class term (N, C) or None, word term (N, V)): the direct features' scores of ``keys``, zeros without
    them (no W_d in params)."""
    V = params["b_o"].shape[0]
    if "W_d" not in params:
        dtype = params["b_o"].dtype
        return (None if class_bounds is None else np.zeros((n_rows, len(class_bounds) - 1), dtype),
                np.zeros((n_rows, V), dtype))
    class_region, word_region = direct_regions(params["W_d"].shape[0], class_bounds is not None)
    word_term = direct_term(params["W_d"], keys, word_region, V)
    if class_bounds is None:
        return None, word_term
    return direct_term(params["W_d"], keys, class_region, len(class_bounds) - 1), word_term


def log_softmax(z):
    """Row-wise log-softmax of z: (N, V)."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def log_sigmoid(u):
    return -np.logaddexp(0.0, -u)


def hs_log_probs(params, s, tree):
    """log p(w | s) for every word (N, V) under the hierarchical softmax of ``tree`` (``rnnlm.huffman``): each
    node's log-probability is its parent's plus log σ(sign · z_parent), computed a tree level at a time."""
    V = tree.vocab_size
    z = s @ params["W_o"].T + params["b_o"]
    out = np.zeros((len(s), 2 * V - 1), z.dtype)
    for nodes in tree.levels:
        parents = tree.parent[nodes]
        out[:, nodes] = out[:, parents] + log_sigmoid(tree.sign[nodes] * z[:, parents - V])
    return out[:, :V]


def hs_output_grads(params, s, targets, tree):
    """``output_grads`` of the hierarchical softmax: per row and node on the target's path, u = sign · z,
    -log σ(u) added to the loss and dL/dz = -sign · σ(-u)."""
    N, V = len(targets), tree.vocab_size
    W_o, b_o = params["W_o"], params["b_o"]
    grads = {"W_o": np.zeros_like(W_o), "b_o": np.zeros_like(b_o)}
    dL_ds = np.zeros_like(s)
    total = 0.0
    for r, node in enumerate(targets):
        while tree.parent[node] >= 0:
            k = tree.parent[node] - V
            u = tree.sign[node] * (W_o[k] @ s[r] + b_o[k])
            total -= log_sigmoid(u)
            g = -tree.sign[node] * np.exp(log_sigmoid(-u)) / N
            grads["W_o"][k] += g * s[r]
            grads["b_o"][k] += g
            dL_ds[r] += g * W_o[k]
            node = tree.parent[node]
    return total, grads, dL_ds


def log_probs(params, s, class_bounds=None, keys=None, tree=None):
    """log p(w | s) for every word: (N, V) from states s (N, m), full, class-based or (tree given) hierarchical
    softmax; keys (N, order): the rows' direct-feature keys (``direct_keys``), when params hold W_d."""
    if tree is not None:
        return hs_log_probs(params, s, tree)
    class_term, word_term = direct_logits(params, keys, len(s), class_bounds)
    z = s @ params["W_o"].T + params["b_o"] + word_term
    if class_bounds is None:
        return log_softmax(z)
    log_p_class = log_softmax(s @ params["W_c"].T + params["b_c"] + class_term)
    out = np.empty_like(z)
    for c, (lo, hi) in enumerate(zip(class_bounds[:-1], class_bounds[1:], strict=True)):
        out[:, lo:hi] = log_p_class[:, c : c + 1] + log_softmax(z[:, lo:hi])
    return out


def loss(params, inputs, targets, s0, class_bounds=None, masks=None, keys=None, tree=None):
    """Sum over the window of -log p_t(x̂_t), and the last states (L, B, m)."""
    S, D = forward(params, inputs, s0, masks)
    T, B = inputs.shape
    logp = log_probs(params, D[-1].reshape(T * B, -1), class_bounds, keys, tree)
    return -logp[np.arange(T * B), targets.reshape(-1)].sum(), np.stack([states[T] for states in S])


def output_grads(params, s, targets, class_bounds=None, keys=None):
    """Loss sum over rows, gradients of the mean loss for the output parameters, and dL/ds (N, m).

    Full softmax: dL/dz = p_t - onehot(x̂_t). Class softmax: the same for the class logits (against the
    target's class) and for the logits of the target class's words (against the target). Direct features
    (keys given, params with W_d): dL/dW_d gathers dL/dz through the table entries each logit read.
    """
    N = len(targets)
    rows = np.arange(N)
    grads = {}
    class_term, word_term = direct_logits(params, keys, len(s), class_bounds)
    if class_bounds is None:
        logp = log_softmax(s @ params["W_o"].T + params["b_o"] + word_term)
        dL_dz = np.exp(logp)
        dL_dz[rows, targets] -= 1
        dL_dz /= N
        grads["W_o"], grads["b_o"] = dL_dz.T @ s, dL_dz.sum(axis=0)
        if "W_d" in params:
            _, word_region = direct_regions(params["W_d"].shape[0], False)
            grads["W_d"] = direct_grad(params["W_d"], keys, word_region, dL_dz)
        return -logp[rows, targets].sum(), grads, dL_dz @ params["W_o"]
    classes = np.searchsorted(class_bounds, targets, side="right") - 1
    logp_class = log_softmax(s @ params["W_c"].T + params["b_c"] + class_term)
    dL_dzc = np.exp(logp_class)
    dL_dzc[rows, classes] -= 1
    dL_dzc /= N
    grads["W_c"], grads["b_c"] = dL_dzc.T @ s, dL_dzc.sum(axis=0)
    dL_ds = dL_dzc @ params["W_c"]
    total = -logp_class[rows, classes].sum()
    grads["W_o"], grads["b_o"] = np.zeros_like(params["W_o"]), np.zeros_like(params["b_o"])
    dL_dz_words = np.zeros((N, len(params["b_o"])), s.dtype)  # dL/dz over every word, zero outside the class
    for r, (c, y) in enumerate(zip(classes, targets, strict=True)):
        lo, hi = class_bounds[c], class_bounds[c + 1]
        z = params["W_o"][lo:hi] @ s[r] + params["b_o"][lo:hi] + word_term[r, lo:hi]
        logp = log_softmax(z[None])[0]
        total -= logp[y - lo]
        dL_dz = np.exp(logp)
        dL_dz[y - lo] -= 1
        dL_dz /= N
        dL_dz_words[r, lo:hi] = dL_dz
        grads["W_o"][lo:hi] += np.outer(dL_dz, s[r])
        grads["b_o"][lo:hi] += dL_dz
        dL_ds[r] += dL_dz @ params["W_o"][lo:hi]
    if "W_d" in params:
        class_region, word_region = direct_regions(params["W_d"].shape[0], True)
        grads["W_d"] = (direct_grad(params["W_d"], keys, class_region, dL_dzc)
                        + direct_grad(params["W_d"], keys, word_region, dL_dz_words))
    return total, grads, dL_ds


def loss_and_grads(params, inputs, targets, s0, class_bounds=None, masks=None, tied=False, keys=None, tree=None):
    """Sum of the window's losses, the gradients of the *mean* loss, and the last states (L, B, m).

    Backpropagation through time with the model's names: dL/dz = p_t - onehot(x̂_t),
    dL/ds_t = W_oᵀ dL/dz + dL/ds_t (from t+1), dL/da_t = (1 - s_t²) ⊙ dL/ds_t, dL/ds_{t-1} = W_sᵀ dL/da_t.
    Tied: the gradient of the one shared array is reported as W_o's (W_x's is folded into it).
    """
    T, B = inputs.shape
    L = n_layers(params)
    S, D = forward(params, inputs, s0, masks)
    if tree is not None:
        total, out_grads, dL_ds_out = hs_output_grads(params, D[-1].reshape(T * B, -1), targets.reshape(-1), tree)
    else:
        total, out_grads, dL_ds_out = output_grads(params, D[-1].reshape(T * B, -1), targets.reshape(-1),
                                                   class_bounds, keys)
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
