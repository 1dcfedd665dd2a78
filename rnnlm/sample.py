"""Sampling text from a model: the prompt is fed after the boundary token, then tokens are drawn.

The recurrence runs on the chosen backend, ``num`` samples side by side as B streams; the next-token
distribution (full or class softmax, ``reference.log_probs``), temperature, top-k and top-p are
computed on the host in float64.
"""

import numpy as np

from rnnlm import reference, step
from rnnlm.backends import get_backend
from rnnlm.errors import RnnlmError

DEFAULT_LENGTH = {"word": 100, "char": 500}


def check_sampling_options(temperature, top_k, top_p, length, num):
    if not temperature > 0:
        raise RnnlmError(f"--temperature must be positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise RnnlmError(f"--top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise RnnlmError(f"--top-p must be in (0, 1], got {top_p}")
    if length is not None and length < 1:
        raise RnnlmError(f"--length must be at least 1, got {length}")
    if num < 1:
        raise RnnlmError(f"--num must be at least 1, got {num}")


def filter_probabilities(log_p, temperature=1.0, top_k=None, top_p=None):
    """Row-wise sampling distribution from log-probabilities (N, V): softmax(log_p / τ) restricted to the
    top-k tokens and to the smallest set whose probability reaches top_p, renormalized. float64 (N, V)."""
    z = log_p / temperature
    if top_k is not None and top_k < z.shape[1]:
        kth = np.partition(z, -top_k, axis=1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, axis=1)
        sorted_p = np.take_along_axis(p, order, axis=1)
        before = np.cumsum(sorted_p, axis=1) - sorted_p  # mass of the strictly more likely tokens
        keep_sorted = before < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=1, keepdims=True)
    return p


def encode_prompt(vocab, prompt):
    """Ids of the prompt (no trailing boundary token) and how many of its tokens became <unk>."""
    if not prompt:
        return np.zeros(0, np.int64), 0
    ids, unk = vocab.encode_text(prompt)
    if vocab.level == "word" and not prompt.endswith("\n") and len(ids) and ids[-1] == vocab.boundary_id:
        ids = ids[:-1]
    return ids, unk


def sample(model, prompt="", length=None, temperature=1.0, top_k=None, top_p=None, num=1, seed=0,
           device="cpu"):
    """``num`` texts continuing ``prompt``, each the prompt followed by what the model drew.

    Word models stop a sample at ``<eos>`` unless ``length`` is given; otherwise ``length`` tokens
    (default 100 words or 500 characters) are drawn. The same seed gives the same texts.
    Returns (texts, unk count of the prompt).
    """
    check_sampling_options(temperature, top_k, top_p, length, num)
    vocab = model.vocab
    prompt_ids, unk = encode_prompt(vocab, prompt)
    ops = get_backend(device)
    params = step.to_device(ops, model.params, model.tied)
    host_params = {name: array.astype(np.float64) for name, array in model.params.items()}
    window = step.Window(ops, 1, num, model.hidden, model.vocab_size, **model.structure)
    rng = np.random.default_rng(seed)
    stop_at_eos = vocab.level == "word" and length is None
    n_draw = length or DEFAULT_LENGTH[vocab.level]

    def advance(tokens):
        """Feed tokens (num,) and return the next tokens' log-probabilities (num, V) on the host."""
        ops.copy_into(tokens.reshape(1, num).astype(np.int32), inputs)
        top = step.forward(ops, params, window, inputs, training=False)
        window.carry_state()
        return reference.log_probs(host_params, ops.to_numpy(top).astype(np.float64), model.class_bounds)

    inputs = ops.zeros((1, num), np.int32)
    log_p = advance(np.full(num, vocab.boundary_id))
    for token in prompt_ids:
        log_p = advance(np.full(num, token))
    drawn = np.zeros((num, n_draw), np.int64)
    finished = np.zeros(num, bool)
    for k in range(n_draw):
        p = filter_probabilities(log_p, temperature, top_k, top_p)
        cumulative = np.cumsum(p, axis=1)
        u = rng.random((num, 1)) * cumulative[:, -1:]
        tokens = np.minimum((cumulative < u).sum(axis=1), model.vocab_size - 1)
        drawn[:, k] = tokens
        if stop_at_eos:
            finished |= tokens == vocab.boundary_id
            if finished.all():
                drawn = drawn[:, : k + 1]
                break
        log_p = advance(tokens)
    texts = []
    for row in drawn:
        if stop_at_eos and (row == vocab.boundary_id).any():
            row = row[: int(np.argmax(row == vocab.boundary_id))]
        texts.append(vocab.decode(np.concatenate([prompt_ids, row])))
    return texts, unk
