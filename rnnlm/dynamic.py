"""Per-token log-probabilities of a text, with or without dynamic evaluation.

The text is one stream read as ``rnnlm perplexity`` reads it (zero state, the boundary token as the first
input, every token a target). It is cut into segments of ``segment`` tokens (B = 1), scored in order.

Dynamic evaluation (Mikolov 2010; Krause et al. 2018) adapts the model to the text as it is scored:
after segment i is scored, one optimizer step on segment i's mean loss changes the weights that score
segment i + 1, so a token's probability depends only on the tokens before it. The state is carried from
segment to segment as in static evaluation. Direct features' contexts run on across segments too. Rules:

    sgd   θ ← θ - η g                        (Mikolov's dynamic RNNLM)
    rms   θ ← θ - η g / (√v + ε),  v ← β₂ v + (1 - β₂) g²   (RMS-normalized steps, v bias-corrected and
          estimated on the scored text itself: Adam with β₁ = 0, stepping sparse rows lazily)

and with ``decay`` = d > 0, after each step θ ← θ + d (θ₀ - θ), pulling the weights back toward the
trained ones θ₀ (Krause et al.'s regularization toward the trained weights). g is the gradient of the
segment's mean loss, its global norm clipped at ``clip`` (0: off). Dropout is off. The direct features' table
W_d adapts by its unclipped sparse SGD step at η under either rule, as in training. The same command
gives the same numbers (with the same thread count on the CPU).
"""

from dataclasses import dataclass

import numpy as np

from rnnlm import step
from rnnlm.backends import get_backend
from rnnlm.direct import history_before
from rnnlm.errors import RnnlmError
from rnnlm.model import word_classes
from rnnlm.optim import SGD, LazyAdam

STATIC_SEGMENT = 256
RULES = ("sgd", "rms")


@dataclass(frozen=True)
class DynamicConfig:
    """Dynamic evaluation's settings: learning rate η, segment length, decay d toward θ₀, rule, clip."""

    lr: float
    segment: int = 20
    decay: float = 0.0
    rule: str = "rms"
    clip: float = 0.0
    beta2: float = 0.9999

    def check(self):
        """Raise RnnlmError for a setting out of range."""
        if not (0 < self.lr < float("inf")):
            raise RnnlmError(f"--dynamic must be a positive learning rate, got {self.lr}")
        if not (isinstance(self.segment, int) and self.segment >= 1):
            raise RnnlmError(f"--dynamic-segment must be a positive number of tokens, got {self.segment}")
        if not (0 <= self.decay < 1):
            raise RnnlmError(f"--dynamic-decay must be in [0, 1), got {self.decay}")
        if self.rule not in RULES:
            raise RnnlmError(f"--dynamic-rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not (0 <= self.clip < float("inf")) or not (0 <= self.beta2 < 1):
            raise RnnlmError("the dynamic clip must be ≥ 0 and β₂ in [0, 1)")


def window_log_probs(ops, params, window, s, targets, classes, out):
    """ln p_t(x̂_t) of a window's T·B rows as a float64 numpy (T·B,), from the top layer's outputs s
    (T·B, m) that ``step.forward`` left. targets, classes: device int32 (T·B,) (classes None with the full
    softmax); out: a device float64 (T·B,) scratch."""
    if window.hs:
        ops.hs_log_probs(s, params["W_o"], params["b_o"], targets, window.tree_parent, window.tree_sign, out)
        return ops.to_numpy(out)
    if window.class_bounds is None:
        step.output_logits(ops, params, window, s)
        ops.softmax_log_probs(window.Z, params["b_o"], targets, out)
        return ops.to_numpy(out)
    words = step.output_logits(ops, params, window, s, classes)
    ops.softmax_log_probs(window.Z, params["b_c"], classes, out)
    ln_p_class = ops.to_numpy(out)
    ops.class_log_probs(s, params["W_o"], params["b_o"], targets, classes, window.class_bounds, out, words)
    return ln_p_class + ops.to_numpy(out)


class Adapter:
    """The weight update of dynamic evaluation (see the module docstring) on backend parameters."""

    def __init__(self, ops, params, window, config):
        self.ops, self.params, self.config = ops, params, config
        self.trainable = step.trainable(params, window)
        self.grads = step.zero_grads(ops, params, window.tied)
        if config.rule == "sgd":
            self.optimizer = SGD(ops, self.trainable, clip=config.clip)
        else:
            self.optimizer = LazyAdam(ops, self.trainable, clip=config.clip, beta1=0.0, beta2=config.beta2)
        self.start = {}
        if config.decay:
            self.start = {name: ops.asarray(ops.to_numpy(step.rows(name, p))) for name, p in self.trainable.items()}
            self.unclipped = ops.asarray(np.array([0.0, 1.0]))

    def update(self, window, inputs, targets, classes=None):
        """One step on the window's mean loss (device arrays (T, B) int32), then the decay toward θ₀."""
        step.forward_backward(self.ops, self.params, self.grads, window, inputs, targets, classes)
        self.optimizer.update(self.params, self.grads, window, self.config.lr)
        d = self.config.decay
        for name, start in self.start.items():
            param = step.rows(name, self.trainable[name])
            self.ops.sgd_update(param, start, -d, param.dtype.type(1 - d), self.unclipped)  # (1-d) θ + d θ₀


class StreamScorer:
    """Per-token ln p of one stream handed over piece by piece (``log_probs``), with dynamic evaluation
    when ``dynamic`` (a DynamicConfig) is given. Segments are cut at multiples of ``dynamic.segment`` from the
    stream's start and a step is taken once a segment is whole, so the numbers do not depend on how the
    stream is cut into pieces. The model's own arrays are not changed."""

    def __init__(self, model, device="cpu", dynamic=None):
        if dynamic is not None:
            dynamic.check()
        self.model, self.dynamic, self.ops = model, dynamic, get_backend(device)
        self.params = step.to_device(self.ops, model.params, model.tied)
        self.classes = None if model.class_bounds is None else word_classes(model.class_bounds)
        self.T = STATIC_SEGMENT if dynamic is None else dynamic.segment
        self.windows, self.adapter = {}, None
        self.states = [np.zeros((1, model.hidden), model.params["W_s"].dtype)] * model.layers
        self.segment_states, self.pending = self.states, []  # the unfinished segment: its first state, tokens
        self.last_token, self.done = model.vocab.boundary_id, 0
        self.before = max(model.direct_order - 2, 0)  # the direct features' inputs before the next token's
        self.recent = self.segment_history = np.full((self.before, 1), -1, np.int32)

    def window(self, n):
        """Buffers for n steps of one stream and a float64 (n,) output, made once per size."""
        if n not in self.windows:
            model, ops = self.model, self.ops
            self.windows[n] = (step.Window(ops, n, 1, model.hidden, model.vocab_size, model.params["W_s"].dtype,
                                           **model.structure), ops.zeros(n, np.float64))
        return self.windows[n]

    def device_tokens(self, inputs, targets):
        """(inputs, targets, classes or None) as device int32 (n, 1)."""
        classes = None if self.classes is None else self.classes[targets]
        return [None if t is None else self.ops.asarray(np.asarray(t, np.int32).reshape(-1, 1))
                for t in (inputs, targets, classes)]

    def log_probs(self, ids, progress=None):
        """ln p of each token of ``ids`` (N,), the stream's next tokens: float64 (N,). progress: called as
        progress(tokens done, N) after each segment, or None."""
        ops = self.ops
        ids = np.asarray(ids, np.int32)
        inputs = np.concatenate([[self.last_token], ids[:-1]]).astype(np.int32)
        history = np.concatenate([self.recent, inputs.reshape(-1, 1)])  # the inputs with the P before them
        ln_p = np.empty(len(ids))
        start = 0
        while start < len(ids):
            n = min(self.T - self.done % self.T, len(ids) - start)
            span = slice(start, start + n)
            window, out = self.window(n)
            for state, S in zip(self.states, window.S, strict=True):
                ops.copy_into(state, S[0])
            x, y, c = self.device_tokens(inputs[span], ids[span])
            if window.direct:
                window.direct.set_history(history_before(history, self.before + start, self.before))
            s = step.forward(ops, self.params, window, x, training=False)
            ln_p[span] = window_log_probs(ops, self.params, window, s, y.reshape(n), None if c is None else
                                          c.reshape(n), out)
            self.states = [ops.to_numpy(S[n]) for S in window.S]
            self.done, start = self.done + n, start + n
            if self.dynamic is not None:
                self.pending.append((inputs[span], ids[span]))
                if self.done % self.T == 0:
                    self.adapt()
                    self.segment_history = history_before(history, self.before + start, self.before)
            if progress is not None:
                progress(start, len(ids))
        self.last_token = ids[-1] if len(ids) else self.last_token
        self.recent = history_before(history, len(history), self.before)
        return ln_p

    def score_sentences(self, sentences):
        """Fill the ``ln_probs`` and ``ln_prob`` of ``rnnlm.score.Sentence`` objects, the stream's next lines."""
        ln_p = self.log_probs(np.concatenate([s.ids for s in sentences]))
        ends = np.cumsum([len(s.ids) for s in sentences])[:-1]
        for sentence, part in zip(sentences, np.split(ln_p, ends), strict=True):
            sentence.ln_probs, sentence.ln_prob = part, float(part.sum())

    def adapt(self):
        """The step on the segment just completed, from the state it started with."""
        window, _ = self.window(self.T)
        if self.adapter is None:
            self.adapter = Adapter(self.ops, self.params, window, self.dynamic)
        for state, S in zip(self.segment_states, window.S, strict=True):
            self.ops.copy_into(state, S[0])
        inputs, targets = (np.concatenate(part) for part in zip(*self.pending, strict=True))
        if window.direct:
            window.direct.set_history(self.segment_history)
        self.adapter.update(window, *self.device_tokens(inputs, targets))
        self.segment_states, self.pending = self.states, []


def token_log_probs(model, ids, device="cpu", dynamic=None, progress=None):
    """ln p(token) of every token of ``ids`` (N,) read as one stream: float64 (N,), statically or with
    dynamic evaluation (``dynamic``: a DynamicConfig). progress: progress(tokens done, N) or None."""
    return StreamScorer(model, device, dynamic).log_probs(ids, progress)

