"""Scoring text: the log-probability of every token of a sentence, of many sentences at once.

**Independent** scoring (the default, Mikolov's ``-independent``, KenLM's ``query``): every sentence is
read from a zero state and the boundary token, and its tokens, the closing boundary token included, are
predicted. A batch of sentences runs as the B streams of the kernels: sorted by length, padded with the
boundary token to the longest of the batch, the padding's log-probabilities dropped. Each sentence's
numbers are those of scoring it alone (to float32 rounding: the same kernels on other rows).

**Stream** scoring carries the state from one sentence to the next, as ``rnnlm perplexity`` reads a text:
the same per-token numbers, so the same perplexity.

How a line becomes tokens (``read_sentence``): word models split it on whitespace; a leading ``<s>`` and a
trailing ``</s>`` (the n-gram tools' sentence markers) are dropped, and any other ``<s>`` or ``</s>`` is read
as the boundary token; character models read its code points. The boundary token closes every sentence,
so an empty line is scored as the boundary token alone.

``Decoder`` is the step interface for programs that decode (beam search, shallow fusion): states of B
hypotheses as numpy arrays, advanced by a batch of token ids, with the next token's log-probabilities.
"""

import copy
import itertools
import math
import queue
import threading
from dataclasses import dataclass

import numpy as np

from rnnlm import reference, step
from rnnlm.backends import get_backend
from rnnlm.direct import context_history, history_before
from rnnlm.errors import RnnlmError
from rnnlm.model import word_classes
from rnnlm.tokenizer import UNK

SENTENCE_MARKS = ("<s>", "</s>")
DEFAULT_BATCH = 64
CHUNK_LINES = 4096  # lines scored at a time, at most
READ_WAIT_S = 0.005  # a chunk ends when no line came for this long
VOCABULARY_CHECK = 20  # tokens: refuse a text whose first ones are all unknown to the model
MAX_SPAN = 256  # steps of one window
OUTPUT_BUDGET = 1 << 24  # elements of a window's logits (T·B·V, or T·B·C with the class softmax)


@dataclass
class Sentence:
    """One line: ``tokens`` as read (str, the boundary token last), their ``ids`` (list of int), ``oov`` the
    positions of the tokens outside the vocabulary (read as ``<unk>``); once scored, ``ln_probs`` (n,)
    float64, each token's log-probability, and ``ln_prob`` their sum."""

    line: int
    tokens: list
    ids: list
    oov: list
    ln_probs: np.ndarray | None = None
    ln_prob: float = math.nan


def read_sentence(vocab, text, line=0):
    """The ``Sentence`` of one line of text (without its newline) for ``vocab``, not yet scored."""
    if vocab.lowercase:
        text = text.lower()
    boundary = vocab.tokens[vocab.boundary_id]
    if vocab.level == "char":
        tokens = list(text)
    else:
        tokens = text.split()
        if tokens and tokens[0] == SENTENCE_MARKS[0]:
            del tokens[0]
        if tokens and tokens[-1] == SENTENCE_MARKS[1]:
            del tokens[-1]
        if SENTENCE_MARKS[0] in tokens or SENTENCE_MARKS[1] in tokens:
            tokens = [boundary if token in SENTENCE_MARKS else token for token in tokens]
    tokens.append(boundary)
    index, unk_id = vocab.index, vocab.unk_id
    ids = [index.get(token, unk_id) for token in tokens]
    oov = []
    if ids.count(unk_id) != tokens.count(UNK):  # some tokens became <unk>, besides the literal ones
        oov = [k for k, token in enumerate(tokens) if token not in index]
    return Sentence(line, tokens, ids, oov)


class Scorer:
    """A model on a backend, scoring sentences ``batch`` at a time (independent) or as one stream.

    Windows of at most MAX_SPAN steps over the B streams are cut from one set of buffers, sized so that the
    logits stay under OUTPUT_BUDGET elements; a sentence longer than a window continues in the next one with
    its state carried.
    """

    def __init__(self, model, device="cpu", batch=DEFAULT_BATCH):
        if batch < 1:
            raise RnnlmError(f"--batch must be at least 1, got {batch}")
        ops = self.ops = get_backend(device)
        self.model, self.batch = model, batch
        self.params = step.to_device(ops, model.params, model.tied)
        bounds = model.class_bounds
        self.classes = None if bounds is None else word_classes(bounds)
        n_out = model.vocab_size if bounds is None else len(bounds) - 1
        self.span = int(np.clip(OUTPUT_BUDGET // (n_out * batch), 1, MAX_SPAN))
        dtype = model.params["W_s"].dtype
        self.full = step.Window(ops, self.span, batch, model.hidden, model.vocab_size, dtype, **model.structure)
        self.out = ops.zeros(self.span * batch, np.float64)
        self.views = {self.span: self.full}
        self.last_step = None  # where the states to carry into the next window are: full.S[k][last_step]
        self.last_token = model.vocab.boundary_id  # stream scoring: the input of the next token

    def view(self, T):
        """A window of the first T ≤ span steps of the buffers (views, so states are shared)."""
        window = self.views.get(T)
        if window is None:
            full = self.full
            window = copy.copy(full)
            window.T = T
            window.S = [S[: T + 1] for S in full.S]
            window.U = [U[:T] for U in full.U]
            window.Z = full.Z[: T * full.B]
            window.direct = full.direct and full.direct.narrow(T, full.B)
            self.views[T] = window
        return window

    def run(self, inputs, targets, carry):
        """log p(targets[t, b]) (T, B) float64 for inputs and targets (T, B), from the carried states when
        ``carry``, else from zero states."""
        T = len(inputs)
        log_p = np.empty(inputs.shape)
        for start in range(0, T, self.span):
            window = self.view(min(self.span, T - start))
            if carry and self.last_step is not None:
                for S in self.full.S:
                    self.ops.copy_into(S[self.last_step], S[0])
            else:
                window.reset_state()
            if window.direct:
                window.direct.set_history(history_before(inputs, start, window.direct.before))
            span = slice(start, start + window.T)
            log_p[span] = self.window_log_probs(window, inputs[span], targets[span]).reshape(window.T, -1)
            self.last_step, carry = window.T, True
        return log_p

    def window_log_probs(self, window, inputs, targets):
        """log p of the window's targets (T·B,) float64 on the host: full, or class times word in class."""
        ops, params = self.ops, self.params
        N = window.T * window.B
        s = step.forward(ops, params, window, ops.asarray(inputs), training=False)
        targets = targets.reshape(N)
        device_targets = ops.asarray(targets)
        out = self.out[:N]
        if self.classes is None:
            step.output_logits(ops, params, window, s)
            ops.softmax_log_probs(window.Z, params["b_o"], device_targets, out)
            return ops.to_numpy(out)
        classes = ops.asarray(self.classes[targets])
        words = step.output_logits(ops, params, window, s, classes)
        ops.softmax_log_probs(window.Z, params["b_c"], classes, out)
        log_p_class = ops.to_numpy(out)
        ops.class_log_probs(s, params["W_o"], params["b_o"], device_targets, classes, window.class_bounds, out, words)
        return log_p_class + ops.to_numpy(out)

    def score_independent(self, sentences):
        """Fill every sentence's ln_probs and ln_prob, each read alone from the boundary token."""
        boundary = self.model.vocab.boundary_id
        lengths = np.fromiter((len(s.ids) for s in sentences), np.int64, len(sentences))
        order = np.argsort(lengths, kind="stable")
        for first in range(0, len(order), self.batch):
            members = order[first : first + self.batch]
            n, T = len(members), int(lengths[members].max())
            tokens = np.full((self.batch, T), boundary, np.int32)  # sentence by sentence, padded
            present = np.arange(T) < lengths[members][:, None]
            tokens[:n][present] = np.fromiter(itertools.chain.from_iterable(sentences[k].ids for k in members),
                                              np.int32, int(present.sum()))
            targets = np.ascontiguousarray(tokens.T)
            inputs = np.empty_like(targets)
            inputs[0] = boundary
            inputs[1:] = targets[:-1]
            log_p = self.run(inputs, targets, carry=False).T[:n]
            totals = np.where(present, log_p, 0.0).sum(axis=1).tolist()
            for k, row, total in zip(members.tolist(), log_p, totals, strict=True):
                sentence = sentences[k]
                sentence.ln_probs, sentence.ln_prob = row[: len(sentence.ids)], total

    def score_stream(self, sentences):
        """Fill every sentence's ln_probs and ln_prob reading them, and the sentences of earlier calls, as
        one stream (needs batch 1)."""
        if self.batch != 1:
            raise RnnlmError("stream scoring runs one stream: make the Scorer with batch=1")
        if not sentences:
            return
        targets = np.fromiter(itertools.chain.from_iterable(s.ids for s in sentences), np.int32).reshape(-1, 1)
        inputs = np.empty_like(targets)
        inputs[0] = self.last_token
        inputs[1:] = targets[:-1]
        log_p = self.run(inputs, targets, carry=True).reshape(-1)
        self.last_token = int(targets[-1, 0])
        ends = np.cumsum([len(s.ids) for s in sentences])
        for sentence, part in zip(sentences, np.split(log_p, ends[:-1]), strict=True):
            sentence.ln_probs, sentence.ln_prob = part, float(part.sum())


def score(model, sentences, per_token=False, device="cpu", batch=DEFAULT_BATCH):
    """Natural-log probabilities of ``sentences`` (an iterable of str, one sentence each), each scored
    independently from the boundary token, its closing boundary token included (see the module's notes
    on how a line becomes tokens).

    Returns a float64 array (n_sentences,); with ``per_token`` also a list of float64 arrays, one per
    sentence, holding the log-probability of each of its tokens (the boundary token last).
    """
    if isinstance(sentences, str):
        raise RnnlmError("score() takes a list of sentences, not one string: score(model, [sentence])")
    read = [read_sentence(model.vocab, text, k) for k, text in enumerate(sentences)]
    Scorer(model, device, batch).score_independent(read)
    totals = np.array([s.ln_prob for s in read], np.float64)
    if per_token:
        return totals, [s.ln_probs for s in read]
    return totals


class Summary:
    """Running totals over scored sentences, for the perplexity including and excluding OOV tokens."""

    def __init__(self):
        self.sentences = self.tokens = self.oov = 0
        self.ln_prob = self.ln_prob_known = 0.0

    def add(self, sentence):
        self.sentences += 1
        self.tokens += len(sentence.ids)
        self.oov += len(sentence.oov)
        self.ln_prob += sentence.ln_prob
        self.ln_prob_known += sentence.ln_prob - sum(float(sentence.ln_probs[k]) for k in sentence.oov)

    def perplexity(self, include_oov=True):
        n = self.tokens if include_oov else self.tokens - self.oov
        total = self.ln_prob if include_oov else self.ln_prob_known
        return math.exp(-total / n) if n else math.nan


def _read_ahead(lines, out):
    """Put (number, line) pairs from ``lines`` into the queue ``out``, then None (or the error raised)."""
    try:
        for item in enumerate(lines):
            out.put(item)
        out.put(None)
    except BaseException as error:  # handed to the reading thread, which raises it in order
        out.put(error)


def chunks(lines, limit=CHUNK_LINES):
    """Lists of (0-based number, line) from ``lines``: as many as have been read, up to ``limit``.

    A thread reads ahead (at most 2 · limit lines) and a chunk ends when no line has come for READ_WAIT_S:
    lines are scored as they arrive, and a file in large chunks. An error while reading (a non-UTF-8 line,
    say) is raised after the chunks of the lines before it.
    """
    ahead = queue.Queue(maxsize=2 * limit)
    threading.Thread(target=_read_ahead, args=(lines, ahead), daemon=True).start()
    done = False
    while not done:
        chunk = []
        item = ahead.get()
        while True:
            if item is None or isinstance(item, BaseException):
                done = True
                break
            chunk.append(item)
            if len(chunk) == limit:
                break
            try:
                item = ahead.get(timeout=READ_WAIT_S)
            except queue.Empty:
                break
        if chunk:
            yield chunk
        if isinstance(item, BaseException):
            raise item


def check_vocabulary(sentences, vocab, name):
    """RnnlmError when the first VOCABULARY_CHECK tokens (boundaries aside) of ``name`` are all unknown to
    the model: a text of the other level (characters for a word model), or another language's model."""
    seen = 0
    for sentence in sentences:
        words = len(sentence.ids) - 1  # the boundary token is always known
        if len(sentence.oov) < words:
            return
        seen += words
        if seen >= VOCABULARY_CHECK:
            raise RnnlmError(f"none of the first {seen} tokens of {name} is in the {vocab.level}-level model's "
                             "vocabulary: is it a model for this text (level, language, tokenization)?")


class Decoder:
    """Step by step through a model, for beam search and shallow fusion, on either backend.

    A state of B hypotheses is a numpy array (L, B, m) (layers, hypotheses, units): ``state[:, order]``
    reorders or duplicates hypotheses, ``np.concatenate(..., axis=1)`` joins them. ``initial(B)`` is the
    state after the boundary token, ``advance(state, tokens)`` reads one token (B,) per hypothesis, and
    ``log_probs(state)`` gives log p(next token) (B, V) float64, computed on the host in float64.
    """

    def __init__(self, model, device="cpu"):
        self.model, self.ops = model, get_backend(device)
        self.params = step.to_device(self.ops, model.params, model.tied)
        self.host_params = {name: array.astype(np.float64) for name, array in model.params.items()}
        self.windows = {}

    def initial(self, n):
        """The state of n hypotheses that have read the boundary token (from zero states)."""
        zero = np.zeros((self.model.layers, n, self.model.hidden), self.model.params["W_s"].dtype)
        return self.advance(zero, np.full(n, self.model.vocab.boundary_id))

    def advance(self, state, tokens):
        """The state after each hypothesis reads its token: state (L, B, m), tokens (B,) ids; a new array."""
        tokens = np.asarray(tokens)
        B = len(tokens)
        if state.shape[1] != B:
            raise RnnlmError(f"advance: {state.shape[1]} hypotheses but {B} tokens")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.model.vocab_size):
            raise RnnlmError(f"advance: token ids must be in [0, {self.model.vocab_size})")
        window = self.windows.get(B)
        if window is None:
            model = self.model
            window = self.windows[B] = step.Window(self.ops, 1, B, model.hidden, model.vocab_size,
                                                   model.params["W_s"].dtype, **model.structure)
        for S, s in zip(window.S, state, strict=True):
            self.ops.copy_into(np.ascontiguousarray(s), S[0])
        inputs = self.ops.asarray(tokens.reshape(1, B).astype(np.int32))
        step.forward(self.ops, self.params, window, inputs, training=False)
        return np.stack([self.ops.to_numpy(S[1]) for S in window.S])

    def log_probs(self, state, context=None):
        """log p(next token | each hypothesis) (B, V) float64. context (B, k): the tokens each hypothesis has
        read, most recent last (the boundary token first), for a model with direct features."""
        s = state[-1].astype(np.float64)
        order = self.model.direct_order
        keys = None
        if order:
            if context is None or len(context) != len(s):
                raise RnnlmError("log_probs: a model with direct features needs each hypothesis's tokens read so "
                                 "far (context, one row per hypothesis)")
            keys = reference.direct_keys(context_history(context, order), self.model.vocab.boundary_id, order)
        return reference.log_probs(self.host_params, s, self.model.class_bounds, keys)
