"""Sampling text from a model: the prompt is fed after the boundary token, then tokens are drawn.

The recurrence runs on the chosen backend through ``rnnlm.score.Decoder``, ``num`` samples side by side as B
streams; the next-token distribution (full, class or hierarchical softmax), temperature, top-k and top-p are
computed on the host in float64. ``draw`` yields the tokens as they are drawn, ``Texts`` turns them into text as they
come, ``sample`` returns the whole texts.
"""

import numpy as np

from rnnlm.errors import RnnlmError
from rnnlm.model import MAX_DIRECT_ORDER
from rnnlm.score import Decoder

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


def draw(model, prompt_ids, length=None, temperature=1.0, top_k=None, top_p=None, num=1, seed=0, device="cpu"):
    """Draw ``num`` samples side by side after the boundary token and ``prompt_ids``, one token per step.

    Yields, step by step, (tokens, log_p): the drawn ids (num,) int64, -1 for a sample that has ended, and
    their log-probabilities under the model (num,) float64, before temperature, top-k and top-p. Word models
    end a sample at ``<eos>`` (yielded) unless ``length`` is given; otherwise ``length`` tokens are drawn
    (default 100 words or 500 characters). The same seed draws the same tokens.
    """
    check_sampling_options(temperature, top_k, top_p, length, num)
    vocab = model.vocab
    decoder = Decoder(model, device)
    rng = np.random.default_rng(seed)
    stop_at_eos = vocab.level == "word" and length is None
    state = decoder.initial(num)
    for token in prompt_ids:
        state = decoder.advance(state, np.full(num, token))
    context = np.tile(np.concatenate([[vocab.boundary_id], prompt_ids]).astype(np.int64), (num, 1))
    finished = np.zeros(num, bool)
    for _ in range(length or DEFAULT_LENGTH[vocab.level]):
        log_p = decoder.log_probs(state, context)
        p = filter_probabilities(log_p, temperature, top_k, top_p)
        cumulative = np.cumsum(p, axis=1)
        u = rng.random((num, 1)) * cumulative[:, -1:]
        tokens = np.minimum((cumulative < u).sum(axis=1), model.vocab_size - 1)
        yield np.where(finished, -1, tokens), np.where(finished, 0.0, log_p[np.arange(num), tokens])
        if stop_at_eos:
            finished |= tokens == vocab.boundary_id
            if finished.all():
                return
        state = decoder.advance(state, tokens)
        context = np.concatenate([context[:, -MAX_DIRECT_ORDER:], tokens[:, None]], axis=1)


class Texts:
    """The texts of ``num`` samples as their tokens come: ``add`` returns what each text grows by.

    Word level: words joined by single spaces, ``<eos>`` a newline, except the ``<eos>`` that ends a sample
    (``stop_at_eos``); char level: the characters, ``<unk>`` as U+FFFD (as ``Vocab.decode`` writes them).
    """

    def __init__(self, vocab, prompt_ids, num, stop_at_eos):
        self.vocab, self.stop_at_eos = vocab, stop_at_eos
        self.parts = [[vocab.decode(prompt_ids)] for _ in range(num)]
        self.open_line = [len(prompt_ids) > 0 and prompt_ids[-1] != vocab.boundary_id] * num
        self.ln_probs = np.zeros(num)

    def piece(self, k, token):
        vocab = self.vocab
        if vocab.level == "char":
            return vocab.decode([token])
        if token == vocab.boundary_id:
            self.open_line[k] = False
            return "" if self.stop_at_eos else "\n"
        separator = " " if self.open_line[k] else ""
        self.open_line[k] = True
        return separator + vocab.tokens[token]

    def add(self, tokens, log_p):
        """The pieces (one str per sample, "" for an ended one) that the drawn tokens add."""
        self.ln_probs += log_p
        pieces = [self.piece(k, token) if token >= 0 else "" for k, token in enumerate(tokens.tolist())]
        for part, piece in zip(self.parts, pieces, strict=True):
            part.append(piece)
        return pieces

    def texts(self):
        return ["".join(part) for part in self.parts]


def sample(model, prompt="", length=None, temperature=1.0, top_k=None, top_p=None, num=1, seed=0,
           device="cpu"):
    """``num`` texts continuing ``prompt``, each the prompt followed by what the model drew (see ``draw``).

    Returns (texts, unk count of the prompt).
    """
    prompt_ids, unk = encode_prompt(model.vocab, prompt)
    texts = Texts(model.vocab, prompt_ids, num, stop_at_eos=model.vocab.level == "word" and length is None)
    for tokens, log_p in draw(model, prompt_ids, length, temperature, top_k, top_p, num, seed, device):
        texts.add(tokens, log_p)
    return texts.texts(), unk
