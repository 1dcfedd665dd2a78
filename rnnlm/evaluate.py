"""Perplexity under the project's convention.

The text is one stream; the state starts at zero with the boundary token (``<eos>`` for words, the
newline for characters) as the first input, so every token of the text, the first included, is
predicted and counted, every ``<eos>`` too.
"""

import math
import sys

import numpy as np

from rnnlm import step
from rnnlm.backends import get_backend
from rnnlm.corpus import load_corpus, stream_pairs
from rnnlm.direct import history_before
from rnnlm.errors import RnnlmError
from rnnlm.model import word_classes

EVAL_WINDOW = 256
LOG_FLOAT_MAX = math.log(sys.float_info.max)  # a mean loss above this is an infinite perplexity


DIVERGED_NATS = 3.0  # a mean loss this far above ln V (far worse than guessing) means a run has diverged


def diverged(nats_per_token, vocab_size):
    """Whether a mean loss is NaN, infinite or above ln V + DIVERGED_NATS: training's and dynamic evaluation's
    guards."""
    return not nats_per_token < math.log(vocab_size) + DIVERGED_NATS


def perplexity_of(nats_per_token):
    """exp(mean loss in nats), infinite where it would overflow a float."""
    return math.inf if nats_per_token > LOG_FLOAT_MAX else math.exp(nats_per_token)


def stream_loss(ops, params, ids, boundary_id, structure, window=EVAL_WINDOW):
    """Σ -log p(token) over ``ids`` read as one stream from the boundary token (natural log, float).

    params: backend arrays from ``step.to_device``; ids (N,) integer token ids; structure: the model's
    ``Model.structure`` (class bounds, layers, tying).
    """
    inputs, targets = stream_pairs(ids, boundary_id)
    class_bounds = structure["class_bounds"]
    classes = None if class_bounds is None else word_classes(class_bounds)[targets]
    m, V = params["W_x"].shape
    dtype = params["W_s"].dtype
    total = 0.0
    buffers = {}
    states = [np.zeros((1, m), dtype)] * structure["layers"]
    for start in range(0, len(targets), window):
        T = min(window, len(targets) - start)
        if T not in buffers:
            buffers[T] = step.Window(ops, T, 1, m, V, dtype, **structure)
        buf = buffers[T]
        for state, S in zip(states, buf.S, strict=True):
            ops.copy_into(state, S[0])
        if buf.direct:
            buf.direct.set_history(history_before(inputs.reshape(-1, 1), start, buf.direct.before))
        span = slice(start, start + T)
        tokens = [inputs[span], targets[span]] + ([] if classes is None else [classes[span]])
        total += step.window_loss(ops, params, buf, *(ops.asarray(t.reshape(T, 1)) for t in tokens))
        states = [S[T] for S in buf.S]
    return total


def perplexity(model, text, device="cpu"):
    """Perplexity of ``model`` on ``text`` (a text file or a token directory), with its own vocabulary.

    Returns {"perplexity", "bits_per_token", "tokens", "unk"}: ``unk`` counts the tokens of the text
    that are ``<unk>`` for the model (out-of-vocabulary words and literal ``<unk>`` tokens).
    """
    ids, _ = load_corpus(text, vocab=model.vocab)
    if len(ids) == 0:
        raise RnnlmError(f"{text} has no tokens")
    ops = get_backend(device)
    params = step.to_device(ops, model.params, model.tied)
    nats = stream_loss(ops, params, ids, model.vocab.boundary_id, model.structure)
    per_token = nats / len(ids)
    return {
        "perplexity": perplexity_of(per_token),
        "bits_per_token": per_token / math.log(2),
        "tokens": int(len(ids)),
        "unk": int(np.count_nonzero(ids == model.vocab.unk_id)),
    }
