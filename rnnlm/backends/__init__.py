"""The kernels behind one interface: ``cpu`` (Numba ``@njit``) and ``cuda`` (``numba.cuda``).

Both backends define every op of ``OPS`` with the same parameters; ``rnnlm.step`` composes them. ``OPS`` is
the contract, written once: each op's shapes, what it overwrites or accumulates, what it returns. The
backends' own docstrings say how each side computes it. tests/test_backend_contract.py checks that both
export every op with these parameters and agree on small random inputs.

Arrays are backend arrays (numpy arrays on the CPU, device arrays on CUDA), C-contiguous unless an op says
"any layout"; W_x (m, V) and its gradient are column-major (``rnnlm.step`` keeps them as transposed views
of (V, m) arrays). Floats are float32 in training and float64 in the gradient checks; token ids and class
bounds are int32. A "loss" is Σ_rows -log p(target) as
float64: a Python float on the CPU, a ``DeviceSum`` on CUDA (``float()`` reads it). Nothing returns unless
a loss is listed.

Sparse gradients are slotted: a gradient of a table of R rows (W_x's columns, the class and hierarchical
softmax's W_o rows) is grad_rows (R, m), slot (R,) int32 and claimed (1,) int32. slot[r] = -1 for a row
without a gradient this window, else the row u of grad_rows that holds row r's gradient; slots u <
claimed[0] belong to one row each, and grad_rows[u] is zero for u ≥ claimed[0]. A writer that reaches a row
without a slot claims the next one (slot[r] = claimed[0], claimed[0] += 1: on the CPU in a fixed order, on
CUDA in any); so the rows of grad_rows that a window writes are its first few, whatever rows of the table it
touches, and the memory of the others is never written. Readers visit the rows r in increasing order,
through slot, so that no result depends on the order of the slots.
"""

from typing import NamedTuple

import numpy as np

from rnnlm.errors import RnnlmError

DEVICES = ("cpu", "cuda", "auto")

# The direct features' n-gram hash, the same integers on both backends and in rnnlm.reference: the key of
# the context h_1..h_n (h_i = x_{t-i}) is DIRECT_BASE + Σ_i DIRECT_PRIMES[(n · DIRECT_PRIMES[i] + i) mod 16]
# · (h_i + 1), reduced mod DIRECT_MODULUS after every term (int64 products below 2⁶², sums below 2⁶³).
DIRECT_PRIMES = np.array([1000000007, 1061000011, 1122000013, 1183000057, 1244000101, 1305000031, 1366000033,
                          1427000059, 1488000047, 1549000039, 1610000057, 1671000047, 1732000079, 1793000051,
                          1854000061, 1915000117], np.int64)
DIRECT_BASE = 108641969 * 116049371  # the key of the empty context (order 0), Mikolov's PRIMES[0] · PRIMES[1]
DIRECT_MODULUS = (1 << 61) - 1

# Adam's bfloat16 moments: uint16 arrays of bfloat16 bit patterns (a float32's upper half), stepped in float32
# and written back by stochastic rounding: bf16(x, u) = (bits(x) + u) >> 16 for a finite x (rounds |x| up with
# probability (its lower 16 bits) / 2¹⁶: unbiased), bits(x) >> 16 for ±inf and a NaN (which keeps a mantissa
# bit). u comes from r(t, k), 32 random bits of element k (its flat index in C order) at step t, in unsigned
# integer arithmetic, the same on both backends:
#   mix(x) = murmur3's fmix32 on x < 2³²: x ^= x >> 16, x = x · MIX_MULTIPLIERS[0] mod 2³², x ^= x >> 13,
#            x = x · MIX_MULTIPLIERS[1] mod 2³², x ^= x >> 16
#   r(t, k) = mix((k mod 2³²) · MIX_GOLDEN mod 2³² XOR mix(t mod 2³²) XOR ⌊k / 2³²⌋)
# moment1 rounds with u = r mod 2¹⁶, moment2 with u = ⌊r / 2¹⁶⌋. (uint64 scalars: Numba types them as such.)
MIX_GOLDEN = np.uint64(0x9E3779B1)
MIX_MULTIPLIERS = (np.uint64(0x85EBCA6B), np.uint64(0xC2B2AE35))


class Op(NamedTuple):
    """One op of the contract: its parameters in order and what it computes."""

    params: tuple
    does: str


def _op(params, does):
    return Op(tuple(params.split()), does)


OPS = {
    # arrays
    "asarray": _op("array dtype", "a new C-contiguous backend array holding a copy of the host array (dtype: "
                   "None keeps the array's)"),
    "to_numpy": _op("array", "a new numpy array holding a copy of the backend array"),
    "zeros": _op("shape dtype", "a new backend array of zeros (dtype float32 by default)"),
    "copy_into": _op("src dst", "dst[...] = src; src a host array (any layout) or a backend array laid out "
                     "like dst"),
    "synchronize": _op("", "returns once every op launched so far has finished"),
    # GEMMs
    "matmul_nt": _op("A B out", "out = A Bᵀ: A (n, k), B (p, k), out (n, p) overwritten"),
    "matmul_nn": _op("A B out", "out = A B: A (n, k), B (k, p), out (n, p) overwritten"),
    "matmul_tn": _op("A B out", "out = Aᵀ B: A (k, n), B (k, p), out (n, p) overwritten"),
    # recurrence
    "embed": _op("W_x inputs U", "U[t, b] = W_x[:, inputs[t, b]], the input term W_x x_{t-1}: W_x (m, V) "
                 "column-major, inputs (T, B), U (T, B, m) overwritten"),
    "forward": _op("W_s b_s U S", "S[t + 1] = tanh(W_s S[t] + U[t] + b_s) for t < T: W_s (m, m), b_s (m,), U (T, "
                   "B, m) the input term (W_x x_{t-1} in the first layer, W_in times the layer below's output "
                   "above it); S (T + 1, B, m): S[0] the carried state is read, S[1:] overwritten"),
    "forward_packed": _op("W_s b_s U index S_carried S offsets", "the recurrence over the steps of a "
                          "packing, its streams as rows: step t's are S[offsets[t]:offsets[t + 1]], n_t of them, "
                          "non-increasing in t (the streams of step t are the first n_t of step t - 1's); "
                          "S[offsets[t] + j] = tanh(W_s s + U[index[offsets[t] + j]] + b_s) with s = S[offsets[t - 1] "
                          "+ j], or at t = 0 S_carried[j] (None for zero states); U (R, m) rows of input terms, index "
                          "(N,) the row of each (the first layer's: W_x's columns as rows, at the input tokens), None "
                          "for U[r]; S (N, m) overwritten; offsets (T + 1,) int64 on the host, offsets[0] = 0"),
    "backward": _op("W_s S dL_ds_out dL_da", "backpropagation through time over the window: dL/ds_t = "
                    "dL_ds_out[t] + W_sᵀ dL/da_{t+1} (no later term at t = T - 1), dL_da[t] = (1 - S[t + 1]²) ⊙ "
                    "dL/ds_t; S (T + 1, B, m) from forward, dL_ds_out (T, B, m), dL_da (T, B, m) overwritten, "
                    "which may be dL_ds_out itself. The carried state gets no gradient (truncated BPTT)"),
    "input_grads": _op("inputs dL_dU dW_x slot claimed", "dW_x[:, slot[x]] += dL_dU[t, b] over the window, x = "
                       "inputs[t, b], a slot claimed for each token without one (CPU: in increasing token order): "
                       "inputs (T, B), dL_dU (T, B, m), dW_x (m, V) column-major, slotted (tied weights pass W_o's "
                       "gradient transposed, and its slots; the full softmax's dense dW_o with slot = 0, 1, …, V - "
                       "1); each column's sum in position order, added to what the column held"),
    "bias_grad": _op("dL_da db", "db = Σ_rows dL_da: dL_da (N, m), db (m,) overwritten"),
    "multiply": _op("a mask out", "out = a ⊙ mask elementwise, arrays of one shape (out may be a)"),
    # softmax
    "softmax_xent_grad": _op("Z b_o targets scale db_o", "Z (N, V) holds the logits without the bias on entry "
                             "and scale · (softmax(Z + b_o) - onehot(targets)) on return; targets (N,); db_o (V,) "
                             "overwritten with Σ_rows of the new Z. Returns the loss"),
    "softmax_xent": _op("Z b_o targets", "returns the loss of softmax(Z + b_o) at targets; Z (N, V) is scratch "
                        "(it may be overwritten)"),
    "softmax_log_probs": _op("Z b_o targets out", "out[r] = log softmax(Z[r] + b_o)[targets[r]], each row's "
                             "log-probability of its target (the per-row form of softmax_xent, whose loss is -Σ out): "
                             "out (N,) float64 overwritten; Z (N, V) is scratch"),
    # class softmax
    "class_xent_grad": _op("S_next W_o b_o targets target_classes class_bounds scale dW_o db_o dL_ds slot "
                           "claimed dW_o_norm direct", "the word half of the class softmax, p(w | c) over the words "
                           "class_bounds[c] ≤ w < class_bounds[c + 1] of row r's class c = target_classes[r], "
                           "z = W_o[w] S_next[r] + b_o[w]: S_next, dL_ds (N, m); W_o (V, m); dW_o (V, m), slot (V,), "
                           "claimed: slotted, without a slot in any row on entry; b_o, db_o (V,); targets, "
                           "target_classes (N,); class_bounds (C + 1,). Claims the slots of every class used, a "
                           "class's words consecutive slots (CPU: classes in increasing order); adds scale · dL/dz "
                           "⊗ S_next[r] to dW_o's rows of the class and W_o[class]ᵀ (scale · dL/dz) to dL_ds[r]; "
                           "overwrites db_o (zero outside the classes used); dW_o_norm (1,) float64 overwritten "
                           "with the norm of dW_o. Returns the loss of p(w | c). "
                           "direct: None, or (N, ≥ the largest class) direct scores added to the logits, "
                           "direct[r, w - class_bounds[c]] for word w of row r's class, overwritten there with "
                           "scale · dL/dz"),
    "class_xent": _op("S_next W_o b_o targets target_classes class_bounds direct", "returns the loss of p(w | c) as "
                      "in class_xent_grad, nothing written"),
    "class_log_probs": _op("S_next W_o b_o targets target_classes class_bounds out direct", "out[r] = log "
                           "p(targets[r] | target_classes[r]) as in class_xent_grad, the per-row form of class_xent: "
                           "out (N,) float64 overwritten, nothing else written"),
    "class_output_log_probs": _op("S W_c b_c W_o b_o targets target_classes class_bounds out class_scores direct",
                                  "out[r] = log softmax(W_c S[r] + b_c + class_scores[r])[target_classes[r]] + log "
                                  "p(targets[r] | target_classes[r]) (class_log_probs): a row's log-probability "
                                  "under both halves of the class softmax; S (N, m), W_c (C, m), b_c (C,); "
                                  "class_scores None or (N, C) added to the class logits (the direct features'); "
                                  "direct as in class_log_probs; out (N,) float64 overwritten, nothing else written"),
    # hierarchical softmax (rnnlm.huffman: the tree as parent pointers, node V + k owning W_o's row k)
    "hs_xent_grad": _op("S_next W_o b_o targets tree_parent tree_sign scale dW_o db_o dL_ds slot claimed "
                        "dW_o_norm",
                        "log p(w | s) = Σ_n log σ(tree_sign[n] · z_n) over the nodes n of w's walk up tree_parent to "
                        "the root, z_n = W_o[k] s + b_o[k] with k = tree_parent[n] - V: S_next, dL_ds (N, m); W_o (V "
                        "- 1, m); dW_o (V - 1, m), slot (V - 1,), claimed: slotted, without a slot in any row on "
                        "entry; b_o, db_o (V - 1,); targets (N,); tree_parent (2V - 1,) int32 "
                        "(-1 at the root), tree_sign (2V - 1,) int8. Claims a slot for every "
                        "row k used (CPU: in the order below); adds scale · dL/dz_n ⊗ S_next[r] to dW_o[slot[k]], "
                        "summed in a fixed order (the rows sorted, stably, by "
                        "their targets' depth-first ranks among the leaves); overwrites dL_ds[r] with Σ_n scale · "
                        "dL/dz_n W_o[k] and db_o with Σ scale · dL/dz_n (zero outside the rows used); "
                        "dW_o_norm (1,) float64 overwritten with the norm of dW_o. Returns the loss"),
    "hs_xent": _op("S_next W_o b_o targets tree_parent tree_sign", "returns the loss of the hierarchical "
                   "softmax as in hs_xent_grad, nothing written"),
    "hs_log_probs": _op("S_next W_o b_o targets tree_parent tree_sign out", "out[r] = log p(targets[r] | "
                        "S_next[r]) as in hs_xent_grad, the per-row form of hs_xent: out (N,) float64 overwritten"),
    # direct features (n-gram hash features into the output layer)
    "direct_keys": _op("history boundary_id keys", "keys[t·B + b, n] = the hash key (DIRECT_PRIMES' hash, "
                       "above) of the n tokens before position t of stream b, or -1 where that context is cut: "
                       "history (P + T, B) int32, history[P + t] = inputs[t] = x_{t-1} and the P rows before it "
                       "the stream's earlier inputs (-1: none); keys (T·B, N) int64 overwritten, N the order. The "
                       "context of order n is cut when one of its tokens is -1 or one of its n - 1 most recent is "
                       "boundary_id"),
    "direct_scores": _op("W_d keys offset size row_classes bounds out", "out[r, j] += Σ_{n: keys[r, n] ≥ 0} "
                         "W_d[offset + (keys[r, n] + lo + j) mod size] for j < hi - lo, lo = bounds[c], hi = "
                         "bounds[c + 1], c = row_classes[r]: W_d (D,); keys (R, N) int64; row_classes (R,) and "
                         "bounds int32; out (R, ≥ hi - lo); offset, size ints"),
    "direct_scatter": _op("W_d keys offset size row_classes bounds G factor", "W_d[offset + (keys[r, n] + lo + j) "
                          "mod size] += factor · G[r, j] over the entries of direct_scores, each entry's terms added "
                          "in (r, n, j) order, whatever the threads: the same bits on every run"),
    # update
    "grad_norm": _op("pairs clip clipping", "clipping (2,) float64 overwritten with (‖g‖, min(1, clip / ‖g‖)) "
                     "(factor 1 when clip = 0) for the gradients of pairs (array, slot): slot None for a whole "
                     "array, else the slots (R,) of a slotted (R, m) array, any layout"),
    "sgd_update": _op("param grad lr shrink clipping", "param = shrink · param - step · grad, step = lr · "
                      "clipping[1] in param's dtype; any shape, C-contiguous (CUDA: C or F, param and grad "
                      "alike); shrink = 1 - lr · 2λ in param's dtype"),
    "sgd_updates": _op("pairs lr shrink clipping", "sgd_update on every (param, grad) of pairs, lr and shrink "
                       "Python floats"),
    "sparse_sgd_update": _op("param_rows grad_rows slot claimed lr clipping", "for the rows r with a slot: "
                             "param_rows[r] -= step · grad_rows[slot[r]], step = lr · clipping[1] in the rows' dtype; "
                             "then the gradient is cleared: its slotted rows zero, slot all -1, claimed[0] = 0 (lr = "
                             "0 only clears); param_rows (R, m) any layout, grad_rows, slot, claimed slotted"),
    "adam_update": _op("param grad moment1 moment2 lr_t clipping decay beta1 beta2 eps", "g = clipping[1] · grad "
                       "+ decay · param, moment1 = β1 moment1 + (1 - β1) g, moment2 = β2 moment2 + (1 - β2) g², "
                       "param -= lr_t moment1 / (√moment2 + eps), all overwritten in place; lr_t carries the bias "
                       "correction; the scalars in the arrays' dtype"),
    "sparse_adam_update": _op("param_rows grad_rows moment1 moment2 slot claimed every lr_t clipping decay beta1 "
                              "beta2 eps", "adam_update of row r with the gradient grad_rows[slot[r]] on the rows "
                              "with a slot alone, their moments included (lazy Adam), or with every = 1 on every "
                              "row, a row without a slot with gradient zero (Adam); then the gradient is cleared as "
                              "by sparse_sgd_update; param_rows (R, m) any layout, moments (R, m) C-contiguous, "
                              "grad_rows, slot, claimed slotted"),
    "adam_update_bf16": _op("param grad moment1 moment2 t lr_t clipping decay beta1 beta2 eps", "adam_update with "
                            "moments of bfloat16 bits, uint16 arrays of param's shape (C order): each read into "
                            "float32, stepped there (every product and sum rounded on its own, no fused "
                            "multiply-add), written back rounded by the stochastic rounding above with r(t, k), k "
                            "the element's flat index; the step uses the unrounded moments. param float32; t ≥ 1, "
                            "the step count"),
    "sparse_adam_update_bf16": _op("param_rows grad_rows moment1 moment2 slot claimed every t lr_t clipping "
                                   "decay beta1 beta2 eps", "sparse_adam_update with the bfloat16 moments of "
                                   "adam_update_bf16 (element (r, i) of (R, m) moments has flat index r · m + i)"),
    "pulled_rms_update": _op("param grad start keep moment2 lr clipping eps", "param = start + keep ⊙ (param - "
                             "start) - lr · clipping[1] · grad / (√moment2 + eps), elementwise: the pull toward start "
                             "of decay_rows and the step of adam_update at β1 = 0, β2 = 1 (a fixed second moment) in "
                             "one pass; all arrays of param's shape, C-contiguous; the scalars in param's dtype"),
    "decay_rows": _op("param_rows start_rows keep_rows rows powers", "for each j, r = rows[j], n = powers[j]: "
                      "param_rows[r] = start_rows[r] + keep_rows[r]ⁿ ⊙ (param_rows[r] - start_rows[r]), the pull "
                      "toward start of n steps at once: param_rows (R, m) any layout, start_rows and keep_rows (R, "
                      "m) C-contiguous; rows (k,) int32, distinct; powers (k,) int32 ≥ 1"),
}


def export_ops(namespace, sections):
    """Put every op of ``OPS`` that one of the ``sections`` (a backend's modules) defines into ``namespace``
    (the backend package's globals), so that the list of ops is written once, here; returns ``__all__``."""
    for module in sections:
        namespace.update({op: getattr(module, op) for op in OPS if hasattr(module, op)})
    return ["name", *OPS]


def cuda_available():
    """True when numba.cuda finds a usable GPU (or runs under NUMBA_ENABLE_CUDASIM=1)."""
    try:
        from numba import cuda
    except ImportError:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install reports itself here: treat it as no GPU
        return False


def get_backend(device="cpu"):
    """The kernel module for ``device``: 'cpu', 'cuda', or 'auto' (CUDA when available)."""
    if device not in DEVICES:
        raise RnnlmError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cpu":
        from rnnlm.backends import cpu

        return cpu
    if not cuda_available():
        raise RnnlmError(
            "--device cuda needs an NVIDIA GPU with a working driver and numba-cuda: "
            "pip install 'rnnlm-numba[cuda]' (none was found; use --device cpu)"
        )
    from rnnlm.backends import cuda

    return cuda
