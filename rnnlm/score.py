"""Scoring text: the log-probability of every token of a sentence, of many sentences at once.

**Independent** scoring (the default, Mikolov's ``-independent``, KenLM's ``query``): every sentence is
read from a zero state and the boundary token, and its tokens, the closing boundary token included, are
predicted. A batch of sentences is packed without padding, longest first (``Packing``): step t of the
recurrence runs the sentences longer than t as the rows of one GEMM, and the output layer takes every row
of every step at once. Each sentence's numbers are those of scoring it alone (to float32 rounding: the
same kernels on other rows).

**Stream** scoring carries the state from one sentence to the next, as ``rnnlm perplexity`` reads a text:
the same per-token numbers, so the same perplexity.

How a line becomes tokens (``read_sentences``): word models split it on whitespace; a leading ``<s>`` and a
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
from rnnlm.direct import DirectRows, context_history, history_before, window_contexts
from rnnlm.errors import RnnlmError
from rnnlm.evaluate import perplexity_of
from rnnlm.model import layer_names, word_classes

SENTENCE_MARKS = ("<s>", "</s>")
DEFAULT_BATCH = 4096
CHUNK_LINES = 4096  # lines scored at a time, at most
READ_WAIT_S = 0.005  # a chunk ends when no line came for this long
VOCABULARY_CHECK = 20  # tokens: refuse a text whose first ones are all unknown to the model
MAX_SPAN = 256  # steps of one window of stream scoring
OUTPUT_BUDGET = 1 << 24  # elements of the logits computed at once (rows times V, or C with the class softmax)
STATE_BUDGET = 1 << 24  # elements of the states of one window of independent scoring (rows · m · layers)


@dataclass(slots=True)
class Sentence:
    """One line: ``tokens`` as read (str, the boundary token last), their ``ids`` (n,) int32 (a view of its
    chunk's ids), ``oov`` the positions of the tokens outside the vocabulary (read as ``<unk>``); once
    scored, ``ln_probs`` (n,) float64, each token's log-probability, and ``ln_prob`` their sum."""

    line: int
    tokens: list
    ids: np.ndarray
    oov: list
    ln_probs: np.ndarray | None = None
    ln_prob: float = math.nan


def read_sentence(vocab, text, line=0):
    """The ``Sentence`` of one line of text (without its newline) for ``vocab``, not yet scored."""
    return read_sentences(vocab, [(line, text)])[0]


def read_sentences(vocab, numbered):
    """The ``Sentence``s of (line number, text) pairs for ``vocab``, not yet scored: the lines split one by one,
    their tokens looked up all at once."""
    numbered = list(numbered)
    texts = [text.lower() if vocab.lowercase else text for _, text in numbered]
    boundary = vocab.tokens[vocab.boundary_id]
    if vocab.level == "char":
        token_lists = [list(text) for text in texts]
    else:
        token_lists = [text.split() for text in texts]
        for k in [k for k, text in enumerate(texts) if SENTENCE_MARKS[0] in text or SENTENCE_MARKS[1] in text]:
            token_lists[k] = _unmarked(token_lists[k], boundary)
    for line_tokens in token_lists:
        line_tokens.append(boundary)
    ends = np.cumsum([len(line_tokens) for line_tokens in token_lists], dtype=np.int64)
    ids = np.fromiter(map(vocab.index.get, itertools.chain.from_iterable(token_lists), itertools.repeat(-1)),
                      np.int32, int(ends[-1]) if len(ends) else 0)
    unknown = np.flatnonzero(ids < 0)  # tokens outside the vocabulary, read as <unk> (a literal <unk> is known)
    ids[unknown] = vocab.unk_id
    oov = [[] for _ in token_lists]
    for line, k in zip(np.searchsorted(ends, unknown, side="right").tolist(), unknown.tolist(), strict=True):
        oov[line].append(k - int(ends[line]) + len(token_lists[line]))
    ends = ends.tolist()
    return [Sentence(number, line_tokens, ids[end - len(line_tokens) : end], line_oov)
            for (number, _), line_tokens, end, line_oov in zip(numbered, token_lists, ends, oov, strict=True)]


def _unmarked(tokens, boundary):
    """A line's tokens without a leading <s> and a trailing </s>, any other of them read as the boundary."""
    if tokens and tokens[0] == SENTENCE_MARKS[0]:
        del tokens[0]
    if tokens and tokens[-1] == SENTENCE_MARKS[1]:
        del tokens[-1]
    return [boundary if token in SENTENCE_MARKS else token for token in tokens]


class Scorer:
    """A model on a backend, scoring sentences independently ``batch`` at a time, or as one stream.

    Independent scoring packs a group of sentences (``Packing``) and runs the recurrence step by step over the
    rows of the sentences still running, in windows of at most ``self.rows`` rows (STATE_BUDGET elements of
    states); a window's last states are carried into the next. Stream scoring runs windows of at most MAX_SPAN
    steps over one stream, sized so that the logits stay under OUTPUT_BUDGET elements.
    """

    def __init__(self, model, device="cpu", batch=DEFAULT_BATCH):
        if batch < 1:
            raise RnnlmError(f"--batch must be at least 1, got {batch}")
        ops = self.ops = get_backend(device)
        self.model, self.batch = model, batch
        self.params = step.to_device(ops, model.params, model.tied)
        bounds = model.class_bounds
        self.classes = None if bounds is None else word_classes(bounds)
        self.class_bounds = None if bounds is None else ops.asarray(bounds, np.int32)
        tree = model.hs_tree
        self.tree = None if tree is None else (ops.asarray(tree.parent), ops.asarray(tree.sign))
        self.n_out = 0 if tree is not None else model.vocab_size if bounds is None else len(bounds) - 1
        # logits' width per row: the output layer's, or a direct class model's widest class if wider (1 for the
        # hierarchical softmax, which reads no logits: rows are then blocked by rows alone)
        widest = 0 if bounds is None or not model.direct_order else int(np.diff(bounds).max())
        self.width = max(self.n_out, widest, 1)
        self.direct_rows = {}  # direct features' buffers, by the rows of the logits they serve
        self.rows = max(batch, STATE_BUDGET // (model.hidden * model.layers))
        self.buffers = None  # independent scoring's, made at its first use
        self.full = self.views = None  # stream scoring's windows, made at its first use
        self.last_step = None  # where the states to carry into the next window are: full.S[k][last_step]
        self.last_token = model.vocab.boundary_id  # stream scoring: the input of the next token

    def output_log_probs(self, s, targets, Z, out, contexts=None):
        """log p(targets[r]) (N,) float64 on the host for the top layer's rows s (N, m) and host targets (N,),
        in blocks of Z's rows: full softmax, class times word in class, or the hierarchical softmax's path. out:
        a device float64 (≥ N,).
        contexts (P + 1, N) host ints: each row's inputs for the direct features (``DirectRows``), or None."""
        ops, params = self.ops, self.params
        log_p = np.empty(len(targets))
        for first in range(0, len(targets), Z.shape[0]):
            rows = slice(first, min(first + Z.shape[0], len(targets)))
            n = rows.stop - first
            s_rows, z, o, y = s[rows], Z[:n], out[:n], ops.asarray(targets[rows])
            if self.tree is not None:
                ops.hs_log_probs(s_rows, params["W_o"], params["b_o"], y, *self.tree, o)
                log_p[rows] = ops.to_numpy(o)
                continue
            if self.classes is None:
                ops.matmul_nt(s_rows, params["W_o"], z)
                if contexts is not None:
                    self.direct_for(Z).add_scores(params["W_d"], Z, contexts[:, rows])
                ops.softmax_log_probs(z, params["b_o"], y, o)
                log_p[rows] = ops.to_numpy(o)
                continue
            row_classes = np.zeros(Z.shape[0], np.int32)
            row_classes[:n] = self.classes[targets[rows]]
            classes = ops.asarray(row_classes)[:n]
            class_scores = words = None
            if contexts is not None:
                words = self.direct_for(Z).scores(params["W_d"], Z, contexts[:, rows], ops.asarray(row_classes))
                class_scores, words = z, words[:n]
            ops.class_output_log_probs(s_rows, params["W_c"], params["b_c"], params["W_o"], params["b_o"], y, classes,
                                       self.class_bounds, o, class_scores, words)
            log_p[rows] = ops.to_numpy(o)
        return log_p

    def direct_for(self, Z):
        """The direct features' buffers for logits Z's rows."""
        rows = Z.shape[0]
        if rows not in self.direct_rows:
            model = self.model
            self.direct_rows[rows] = DirectRows(self.ops, rows, model.direct_order, model.vocab.boundary_id, self.n_out,
                                                model.params["W_s"].dtype, self.class_bounds)
        return self.direct_rows[rows]

    # ------------------------------------------------------------------------------------ independent

    def score_independent(self, sentences):
        """Fill every sentence's ln_probs and ln_prob, each read alone from the boundary token."""
        if not sentences:
            return
        lengths = np.fromiter(map(len, (s.ids for s in sentences)), np.int64, len(sentences))
        ids = np.concatenate([s.ids for s in sentences])
        starts = np.cumsum(lengths) - lengths
        log_p = np.empty(len(ids))
        longest_first = np.argsort(-lengths, kind="stable")
        for first in range(0, len(sentences), self.batch):
            packing = Packing(longest_first[first : first + self.batch], lengths, starts, ids,
                              self.model.vocab.boundary_id, self.model.direct_order)
            log_p[packing.source] = self.packed_log_probs(packing)
        totals = np.add.reduceat(log_p, starts).tolist()
        for sentence, start, total in zip(sentences, starts.tolist(), totals, strict=True):
            sentence.ln_probs, sentence.ln_prob = log_p[start : start + len(sentence.ids)], total

    def packed_log_probs(self, packing):
        """log p of a packing's targets (N,) float64, in its row order."""
        if self.buffers is None:
            self.buffers = PackedBuffers(self.ops, self.rows, self.batch, self.model, self.n_out, self.width)
        offsets = packing.offsets
        inputs = self.ops.asarray(packing.inputs)
        log_p = np.empty(len(packing.targets))
        t0, T = 0, len(offsets) - 1
        while t0 < T:
            t1 = min(T, max(t0 + 1, int(np.searchsorted(offsets, offsets[t0] + self.rows, side="right")) - 1))
            top = self.packed_forward(offsets[t0 : t1 + 1], inputs, t0 > 0)
            rows = slice(offsets[t0], offsets[t1])
            contexts = None if packing.contexts is None else packing.contexts[:, rows]
            log_p[rows] = self.output_log_probs(top, packing.targets[rows], self.buffers.Z, self.buffers.out, contexts)
            t0 = t1
        return log_p

    def packed_forward(self, offsets, inputs, carried):
        """Every layer over the steps of a packing whose rows are offsets[0]:offsets[-1] (a window of its
        steps, held in the buffers from row 0), from the states carried from the step before when
        ``carried``, else from zero states; keeps the last step's states for the next window and returns
        the top layer's rows."""
        ops, params, buffers = self.ops, self.params, self.buffers
        base = int(offsets[0])
        window, inputs = offsets - base, inputs[base : int(offsets[-1])]
        n_rows, last = int(window[-1]), int(window[-2])
        for k in range(self.model.layers):
            W_in, W_s, b_s = (params[name] for name in layer_names(k + 1))
            S, carry = buffers.S[k][:n_rows], buffers.carry[k]
            if k == 0:  # the input term W_x x_{t-1}: W_x's columns, read as rows, at the input tokens
                ops.forward_packed(W_s, b_s, step.rows("W_x", params["W_x"]), inputs, carry if carried else None, S,
                                   window)
            else:
                ops.matmul_nt(buffers.S[k - 1][:n_rows], W_in, buffers.U[:n_rows])
                ops.forward_packed(W_s, b_s, buffers.U[:n_rows], None, carry if carried else None, S, window)
            ops.copy_into(S[last:], carry[: n_rows - last])
        return buffers.S[-1][:n_rows]

    # ------------------------------------------------------------------------------------ stream

    def view(self, T):
        """A window of the first T ≤ span steps of the stream's buffers (views, so states are shared)."""
        window = self.views.get(T)
        if window is None:
            full = self.full
            window = copy.copy(full)
            window.T = T
            window.S = [S[: T + 1] for S in full.S]
            window.U = [U[:T] for U in full.U]
            window.Z = full.Z[: T * full.B]
            self.views[T] = window
        return window

    def run(self, inputs, targets):
        """log p(targets[t, b]) (T, B) float64 for inputs and targets (T, B), from the carried states."""
        if self.full is None:
            model = self.model
            self.span = int(np.clip(OUTPUT_BUDGET // (self.width * self.batch), 1, MAX_SPAN))
            structure = {**model.structure, "direct_order": 0}  # output_log_probs adds the direct scores
            self.full = step.Window(self.ops, self.span, self.batch, model.hidden, model.vocab_size,
                                    model.params["W_s"].dtype, **structure)
            self.out = self.ops.zeros(self.span * self.batch, np.float64)
            self.views = {self.span: self.full}
        T = len(inputs)
        log_p = np.empty(inputs.shape)
        for start in range(0, T, self.span):
            window = self.view(min(self.span, T - start))
            if self.last_step is not None:
                for S in self.full.S:
                    self.ops.copy_into(S[self.last_step], S[0])
            else:
                window.reset_state()
            span = slice(start, start + window.T)
            s = step.forward(self.ops, self.params, window, self.ops.asarray(inputs[span]), training=False)
            contexts = None
            if self.model.direct_order:
                before = max(self.model.direct_order - 2, 0)
                history = np.concatenate([history_before(inputs, start, before), inputs[span]])
                contexts = window_contexts(history, window.T)
            log_p[span] = self.output_log_probs(s, targets[span].reshape(-1), window.Z, self.out,
                                                contexts).reshape(window.T, -1)
            self.last_step = window.T
        return log_p

    def score_stream(self, sentences):
        """Fill every sentence's ln_probs and ln_prob reading them, and the sentences of earlier calls, as
        one stream (needs batch 1)."""
        if self.batch != 1:
            raise RnnlmError("stream scoring runs one stream: make the Scorer with batch=1")
        if not sentences:
            return
        targets = np.concatenate([s.ids for s in sentences]).reshape(-1, 1)
        inputs = np.empty_like(targets)
        inputs[0] = self.last_token
        inputs[1:] = targets[:-1]
        log_p = self.run(inputs, targets).reshape(-1)
        self.last_token = int(targets[-1, 0])
        ends = np.cumsum([len(s.ids) for s in sentences])
        for sentence, part in zip(sentences, np.split(log_p, ends[:-1]), strict=True):
            sentence.ln_probs, sentence.ln_prob = part, float(part.sum())


class Packing:
    """A group of sentences laid out as rows for independent scoring, longest first: step t's rows are
    offsets[t]:offsets[t + 1], one per sentence longer than t, in the same order at every step, so that the
    streams of step t are the first ones of step t - 1. inputs, targets (N,) int32 in row order; source (N,)
    each row's position in the sentence-major concatenation ``ids``.

    members: the group's sentences, longest first; lengths, starts: every sentence's length and position in
    ``ids`` (its token ids, the boundary token last). contexts (P + 1, N) int32, for a model with direct
    features of order N > 0 (P = max(N - 2, 0)): each row's inputs of its last P + 1 steps, oldest first, -1
    before its sentence; else None.
    """

    def __init__(self, members, lengths, starts, ids, boundary, direct_order=0):
        member_lengths = lengths[members]
        T = int(member_lengths[0])
        running = np.bincount(member_lengths, minlength=T + 1)[::-1].cumsum()[::-1][1:]  # sentences longer than t
        self.offsets = np.zeros(T + 1, np.int64)
        np.cumsum(running, out=self.offsets[1:])
        steps = np.repeat(np.arange(T), running)
        ranks = np.arange(len(steps)) - self.offsets[steps]
        self.source = starts[members[ranks]] + steps
        self.targets = ids[self.source]
        self.inputs = np.where(steps == 0, boundary, ids[self.source - 1]).astype(np.int32)
        self.contexts = None
        if direct_order:
            before = max(direct_order - 2, 0)
            self.contexts = np.full((before + 1, len(steps)), -1, np.int32)
            for k in range(before + 1):  # the input k steps back
                back = steps - k
                earlier = ids[np.maximum(self.source - k - 1, 0)]
                self.contexts[before - k] = np.where(back > 0, earlier, np.where(back == 0, boundary, -1))


class PackedBuffers:
    """Independent scoring's device buffers: per layer, S (rows, m) the states of a window's rows and carry
    (batch, m) the states carried into the next window; U (rows, m) the input term of the layers above the
    first; Z (n, n_out) logits for n rows at a time (n · width ≤ OUTPUT_BUDGET elements, width ≥ n_out the
    widest logits a row needs); out (n,) float64."""

    def __init__(self, ops, rows, batch, model, n_out, width):
        dtype, m = model.params["W_s"].dtype, model.hidden
        self.S = [ops.zeros((rows, m), dtype) for _ in range(model.layers)]
        self.carry = [ops.zeros((batch, m), dtype) for _ in range(model.layers)]
        self.U = ops.zeros((rows, m), dtype) if model.layers > 1 else None
        n = min(rows, max(1, OUTPUT_BUDGET // width))
        self.Z = ops.zeros((n, n_out), dtype)
        self.out = ops.zeros(n, np.float64)


def score(model, sentences, per_token=False, device="cpu", batch=DEFAULT_BATCH):
    """Natural-log probabilities of ``sentences`` (an iterable of str, one sentence each), each scored
    independently from the boundary token, its closing boundary token included (see the module's notes
    on how a line becomes tokens).

    Returns a float64 array (n_sentences,); with ``per_token`` also a list of float64 arrays, one per
    sentence, holding the log-probability of each of its tokens (the boundary token last).
    """
    if isinstance(sentences, str):
        raise RnnlmError("score() takes a list of sentences, not one string: score(model, [sentence])")
    read = read_sentences(model.vocab, enumerate(sentences))
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
        return perplexity_of(-total / n) if n else math.nan


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
    ``log_probs(state)`` gives log p(next token) (B, V) float64, computed on the host: the logits by float32
    products with the model's own tables (no copies of them), biased and normalized in float64.
    """

    def __init__(self, model, device="cpu"):
        self.model, self.ops = model, get_backend(device)
        self.params = step.to_device(self.ops, model.params, model.tied)
        self.host_params = {name: array.astype(np.float64) if name in ("b_o", "b_c") else array
                            for name, array in model.params.items() if name in ("W_o", "b_o", "W_c", "b_c", "W_d")}
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
        s = np.asarray(state[-1], self.model.params["W_o"].dtype)
        order = self.model.direct_order
        keys = None
        if order:
            if context is None or len(context) != len(s):
                raise RnnlmError("log_probs: a model with direct features needs each hypothesis's tokens read so "
                                 "far (context, one row per hypothesis)")
            keys = reference.direct_keys(context_history(context, order), self.model.vocab.boundary_id, order)
        return reference.log_probs(self.host_params, s, self.model.class_bounds, keys, self.model.hs_tree)
