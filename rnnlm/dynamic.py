"""Per-token log-probabilities of a text, with or without dynamic evaluation.

The text is one stream read as ``rnnlm perplexity`` reads it (zero state, the boundary token as the first
input, every token a target). It is cut into segments of ``segment`` tokens (B = 1), scored in order.

Dynamic evaluation (Mikolov 2010; Krause et al. 2018) adapts the model to the text as it is scored:
after segment i is scored, one step on segment i's mean loss changes the weights that score segment i + 1, so a
token's probability depends only on the tokens before it. The state is carried from segment to segment as in
static evaluation. Direct features' contexts run on across segments too. With g the gradient of the segment's
mean loss (its global norm clipped at ``clip``; 0: off), the rules are

    sgd   θ ← θ - η g                               (Mikolov's dynamic RNNLM)
    rms   θ ← θ - η g / (√v + ε)                    (RMS-normalized steps)

where rms's v is either the running v ← β₂ v + (1 - β₂) g² on the scored text itself (bias-corrected: Adam
with β₁ = 0, stepping sparse rows lazily), or, with ``stats``, fixed before scoring: the mean g² over windows
of the training text at the trained weights, ε = STATS_EPS (Krause et al.'s "RMS with global prior").

With ``decay`` = d > 0, each step first pulls the weights toward the trained ones θ₀:
θ ← θ₀ + keep ⊙ (θ - θ₀), keep = 1 - d, or with ``stats`` 1 - d min(√v / r̄, 1 / d) (r̄ the parameters' mean
√v: Krause et al.'s per-weight decay rate). The pull is lazy on sparse rows (``Decay``), so it costs what the
step costs. Dropout is off. The direct features' table W_d adapts by its unclipped sparse SGD step at
``direct_lr`` (η when None) under every rule, as in training, and is not pulled back. The same command gives
the same numbers (with the same thread count on the CPU).

A guard, like training's: when the last GUARD_TOKENS scored tokens (or the last segment, if longer) average
more than ln V + 3 nats (``rnnlm.evaluate.diverged``), the adaptation has run away; the weights go back to the
trained ones, the rule's state with them, and the run counts a restart (``StreamScorer.restarts``).
"""

from dataclasses import dataclass, field, replace

import numpy as np

from rnnlm import step
from rnnlm.backends import get_backend
from rnnlm.corpus import Windows, load_corpus
from rnnlm.direct import history_before
from rnnlm.errors import RnnlmError
from rnnlm.evaluate import diverged
from rnnlm.model import word_classes
from rnnlm.optim import SGD, LazyAdam

STATIC_SEGMENT = 256
RULES = ("sgd", "rms")
STATS_STREAMS = 100  # the training text's streams in gradient_rms (Krause et al.'s batch)
STATS_TOKENS = 300_000  # the first tokens of the --dynamic-stats text that gradient_rms reads
STATS_EPS = 2e-5
GUARD_TOKENS = 200  # the scored tokens whose mean loss the guard watches


@dataclass(frozen=True)
class DynamicConfig:
    """Dynamic evaluation's settings: learning rate η, segment length, decay d toward θ₀, rule, clip, β₂ of the
    running RMS, the direct table's rate (None: η), the text whose gradients give a fixed RMS (``stats``; its
    ``rms`` once computed, see ``prepared``) and that RMS's ε."""

    lr: float
    segment: int = 20
    decay: float = 0.0
    rule: str = "rms"
    clip: float = 0.0
    beta2: float = 0.9999
    direct_lr: float | None = None
    stats: str | None = None
    eps: float = STATS_EPS
    rms: dict | None = field(default=None, compare=False, repr=False)

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
        if not (0 <= self.clip < float("inf")) or not (0 <= self.beta2 < 1) or not (0 < self.eps < float("inf")):
            raise RnnlmError("the dynamic clip must be ≥ 0, β₂ in [0, 1) and ε > 0")
        if self.direct_lr is not None and not (0 <= self.direct_lr < float("inf")):
            raise RnnlmError(f"--dynamic-direct-lr must be ≥ 0, got {self.direct_lr}")
        if self.stats is not None and self.rule != "rms":
            raise RnnlmError("--dynamic-stats needs --dynamic-rule rms (it fixes the RMS that rule divides by)")

    def prepared(self, model, device="cpu"):
        """This config with ``rms`` computed from ``stats`` for ``model`` (itself without stats, or with ``rms``
        already there): call it once before scoring several texts with one model."""
        self.check()
        if self.stats is None or self.rms is not None:
            return self
        ids, _ = load_corpus(self.stats, vocab=model.vocab)
        return replace(self, rms=gradient_rms(model, ids[:STATS_TOKENS], self.segment, device))


def gradient_rms(model, ids, segment, device="cpu", streams=STATS_STREAMS):
    """√(mean g²) of each parameter but W_d at the trained weights, g the gradient of a window's mean loss, over
    the windows (``segment`` steps, ``streams`` streams, states carried) of ``ids`` (the training text, as
    Krause et al. collect it): {name: array shaped as ``step.rows`` of the parameter, in its dtype}."""
    ops = get_backend(device)
    params = step.to_device(ops, model.params, model.tied)
    grads = step.zero_grads(ops, params, model.tied)
    classes = None if model.class_bounds is None else word_classes(model.class_bounds)
    windows = Windows(ids, model.vocab.boundary_id, streams, segment, classes)
    if windows.n_windows == 0:
        raise RnnlmError(f"--dynamic-stats needs a text of at least {streams * segment:,} tokens, got {len(ids):,}")
    dtype = model.params["W_s"].dtype.type
    window = step.Window(ops, segment, streams, model.hidden, model.vocab_size, dtype, **model.structure)
    names, sparse = [name for name in step.trainable(params, window) if name != "W_d"], step.sparse_names(window)
    mean_square = {name: ops.zeros(step.rows(name, params[name]).shape, dtype) for name in names}
    scratch = {name: ops.zeros(square.shape, dtype) for name, square in mean_square.items()}
    unclipped = ops.asarray(np.array([0.0, 1.0]))
    for w in range(windows.n_windows):
        tokens = map(ops.asarray, windows.window(w))
        if window.direct:
            window.direct.set_history(windows.history(w, window.direct.before))
        step.forward_backward(ops, params, grads, window, *tokens)
        for name in names:  # the running mean: Adam's second moment at β₂ = 1 - 1/(w + 1), its step at rate 0
            param, grad = step.rows(name, params[name]), step.rows(name, grads[name])
            scalars = dtype(0), unclipped, dtype(0), dtype(0), dtype(1 - 1 / (w + 1)), dtype(1)
            if name in sparse:  # every row, a row without a slot with gradient zero
                ops.sparse_adam_update(param, grad, scratch[name], mean_square[name], *sparse[name], True, *scalars)
            else:
                ops.adam_update(param, grad, scratch[name], mean_square[name], *scalars)
        window.carry_state()
    return {name: np.sqrt(ops.to_numpy(square)) for name, square in mean_square.items()}


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


class FixedRMS(LazyAdam):
    """θ ← θ - η g / (rms + ε) with a fixed ``rms`` from ``gradient_rms`` (Krause et al.): lazy Adam's kernels
    with β₁ = 0, β₂ = 1 (the second moment held at rms²) and no bias correction. With ``decay`` (a ``Decay``),
    the dense parameters' pull toward θ₀ and their step are one pass over each (``pulled_rms_update``): at the
    full softmax's W_o both are passes over memory that bound the time of a step."""

    def __init__(self, ops, params, rms, clip, eps, direct_scale, decay=None):
        super().__init__(ops, params, clip=clip, beta1=0.0, beta2=1.0, eps=eps, direct_scale=direct_scale)
        for name, moment in self.moment2.items():
            ops.copy_into(np.square(rms[name]).astype(moment.dtype), moment)
        self.decay = decay

    def corrected(self, lr):
        return lr, self.eps

    def dense_step(self, name, param_rows, grad_rows, lr_t, eps_t):
        if self.decay is None:
            return super().dense_step(name, param_rows, grad_rows, lr_t, eps_t)
        dtype = param_rows.dtype.type
        start, keep = self.decay.start[name], self.decay.keep[name]
        self.ops.pulled_rms_update(param_rows, grad_rows, start.reshape(param_rows.shape),
                                   keep.reshape(param_rows.shape), self.moment2[name], dtype(lr_t), self.clipping,
                                   dtype(eps_t))


def keep_factors(config, params):
    """{name: keep (shaped as ``step.rows``)} of the decay θ ← θ₀ + keep ⊙ (θ - θ₀) for each parameter of
    ``params`` but W_d: 1 - d, or with a fixed RMS (Krause et al.) 1 - d · min(rms / r̄, 1 / d), r̄ the mean over
    the parameters of each one's mean rms, so that the weights whose gradients are larger are pulled harder."""
    params = {name: step.rows(name, p) for name, p in params.items() if name != "W_d"}
    d = config.decay
    if config.rms is None:
        return {name: np.full(p.shape, 1 - d, p.dtype) for name, p in params.items()}
    mean_rms = np.mean([config.rms[name].mean() for name in params])
    return {name: (1 - d * np.minimum(config.rms[name] / mean_rms, 1 / d)).astype(p.dtype)
            for name, p in params.items()}


class Decay:
    """The pull toward θ₀ at each step (see ``keep_factors``) of every parameter but W_d. The sparse ones' rows
    (W_x's columns, the class softmax's W_o rows: ``step.sparse_names``) are pulled lazily: a row's pending steps
    are applied at once (keepⁿ) when a segment reads it (``catch_up``), so that a step costs the rows it touches,
    not the whole table."""

    def __init__(self, ops, params, window, keep, class_bounds):
        self.ops, self.class_bounds, self.tied = ops, class_bounds, window.tied
        self.rows = {name: _as_rows(step.rows(name, params[name])) for name in keep}
        self.start = {name: ops.asarray(ops.to_numpy(rows)) for name, rows in self.rows.items()}
        self.keep = {name: ops.asarray(_as_rows(k)) for name, k in keep.items()}
        self.stamps = {name: np.zeros(len(self.rows[name]), np.int64) for name in step.sparse_names(window)}
        self.every_row = {name: (ops.asarray(np.arange(len(rows), dtype=np.int32)), ops.asarray(np.ones(len(rows),
                          np.int32))) for name, rows in self.rows.items() if name not in self.stamps}
        self.steps = 0

    def rows_read(self, inputs, targets):
        """{sparse name: int32 rows} that scoring or a step on these tokens (host ints) reads."""
        read = {}
        if "W_x" in self.stamps:
            read["W_x"] = np.unique(inputs)
        if "W_o" in self.stamps:  # the class softmax: the words of the targets' classes, and tied, the inputs
            bounds = self.class_bounds
            classes = np.unique(np.searchsorted(bounds, targets, side="right") - 1)
            words = np.concatenate([np.arange(bounds[c], bounds[c + 1]) for c in classes])
            read["W_o"] = np.union1d(words, inputs) if self.tied else words
        return {name: rows.astype(np.int32) for name, rows in read.items()}

    def catch_up(self, read):
        """Bring the rows of ``read`` (from ``rows_read``) up to the steps taken so far."""
        for name, rows in read.items():
            powers = self.steps - self.stamps[name][rows]
            stale = powers > 0
            if stale.any():
                self.ops.decay_rows(self.rows[name], self.start[name], self.keep[name],
                                    self.ops.asarray(rows[stale]), self.ops.asarray(powers[stale].astype(np.int32)))
            self.stamps[name][rows] = self.steps

    def step(self, read, dense=True):
        """One step's pull: the sparse parameters' rows of ``read`` (the step's own), and every dense parameter
        now unless ``dense`` is False (the optimizer pulls them with its step: ``FixedRMS``)."""
        self.steps += 1
        for name, (every, once) in self.every_row.items() if dense else ():
            self.ops.decay_rows(self.rows[name], self.start[name], self.keep[name], every, once)
        self.catch_up(read)


def _as_rows(array):
    return array.reshape(1, -1) if array.ndim == 1 else array


class Adapter:
    """The weight update of dynamic evaluation (see the module docstring) on backend parameters: the gradient of
    the segment's mean loss, the decay toward θ₀, then the rule's step."""

    def __init__(self, ops, params, window, config, class_bounds):
        self.ops, self.params, self.config = ops, params, config
        self.grads = step.zero_grads(ops, params, window.tied)
        trainable = step.trainable(params, window)
        direct_scale = 1.0 if config.direct_lr is None else config.direct_lr / config.lr
        self.decay = Decay(ops, params, window, keep_factors(config, trainable), class_bounds) if config.decay else None
        if config.rule == "sgd":
            self.optimizer = SGD(ops, trainable, clip=config.clip, direct_scale=direct_scale)
        elif config.rms is not None:
            self.optimizer = FixedRMS(ops, trainable, config.rms, config.clip, config.eps, direct_scale, self.decay)
        else:
            self.optimizer = LazyAdam(ops, trainable, clip=config.clip, beta1=0.0, beta2=config.beta2,
                                      direct_scale=direct_scale)
        self.decay_dense = not isinstance(self.optimizer, FixedRMS)  # FixedRMS pulls them with its step

    def update(self, window, tokens, inputs, targets, classes=None):
        """One step on the window's mean loss: tokens (inputs, targets) on the host, the rest device arrays (T, B)
        int32."""
        step.forward_backward(self.ops, self.params, self.grads, window, inputs, targets, classes)
        if self.decay:
            self.decay.step(self.decay.rows_read(*tokens), dense=self.decay_dense)
        self.optimizer.update(self.params, self.grads, window, self.config.lr)


class StreamScorer:
    """Per-token ln p of one stream handed over piece by piece (``log_probs``), with dynamic evaluation
    when ``dynamic`` (a DynamicConfig) is given. Segments are cut at multiples of ``dynamic.segment`` from the
    stream's start and a step is taken once a segment is whole, so the numbers do not depend on how the
    stream is cut into pieces (beyond float32 rounding: a product over fewer rows may round differently). The
    model's own arrays are not changed. ``restarts``: how many times the guard (module docstring) put the
    trained weights back."""

    def __init__(self, model, device="cpu", dynamic=None):
        if dynamic is not None:
            dynamic = dynamic.prepared(model, device)
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
        self.watched = np.empty(0)  # the losses of the last scored tokens, for the guard
        self.restarts = 0

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
            if self.adapter is not None and self.adapter.decay:
                self.adapter.decay.catch_up(self.adapter.decay.rows_read(inputs[span], ids[span]))
            x, y, c = self.device_tokens(inputs[span], ids[span])
            if window.direct:
                window.direct.set_history(history_before(history, self.before + start, self.before))
            s = step.forward(ops, self.params, window, x, training=False)
            ln_p[span] = window_log_probs(ops, self.params, window, s, y.reshape(n), None if c is None else
                                          c.reshape(n), out)
            self.states = [ops.to_numpy(S[n]) for S in window.S]
            self.done, start = self.done + n, start + n
            if self.dynamic is not None:
                self.watched = np.concatenate([self.watched, -ln_p[span]])[-max(GUARD_TOKENS, self.T):]
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
        """The step on the segment just completed, from the state it started with; or, if the guard sees a
        run-away adaptation, the trained weights back instead."""
        if self.ran_away():
            self.params = step.to_device(self.ops, self.model.params, self.model.tied)
            self.adapter, self.watched, self.restarts = None, np.empty(0), self.restarts + 1
            self.segment_states, self.pending = self.states, []
            return
        window, _ = self.window(self.T)
        if self.adapter is None:
            self.adapter = Adapter(self.ops, self.params, window, self.dynamic, self.model.class_bounds)
        for state, S in zip(self.segment_states, window.S, strict=True):
            self.ops.copy_into(state, S[0])
        inputs, targets = (np.concatenate(part) for part in zip(*self.pending, strict=True))
        if window.direct:
            window.direct.set_history(self.segment_history)
        self.adapter.update(window, (inputs, targets), *self.device_tokens(inputs, targets))
        self.segment_states, self.pending = self.states, []

    def ran_away(self):
        """Whether the mean loss of the last max(GUARD_TOKENS, segment) scored tokens has ``diverged``."""
        watched_all = len(self.watched) >= max(GUARD_TOKENS, self.T)
        return watched_all and diverged(self.watched.mean(), self.model.vocab_size)


def token_log_probs(model, ids, device="cpu", dynamic=None, progress=None):
    """ln p(token) of every token of ``ids`` (N,) read as one stream: float64 (N,), statically or with
    dynamic evaluation (``dynamic``: a DynamicConfig). progress: progress(tokens done, N) or None."""
    return StreamScorer(model, device, dynamic).log_probs(ids, progress)

