"""Interpolation with a back-off n-gram model read from an ARPA file (plain or gzip).

The n-gram model is read and queried by KenLM's own Python module (``pip install 'rnnlm-numba[ngram]'``, or
``pip install kenlm``: it compiles KenLM's C++ query code). Per token, the two models mix linearly:

    p(w | history) = λ p_ngram(w | history) + (1 - λ) p_rnn(w | history)

λ is the n-gram model's weight, as SRILM's ``ngram -lm NGRAM.arpa -mix-lm OTHER -lambda λ`` weights
its main (``-lm``) model; Mikolov's rnnlm ``-lm-prob FILE -lambda L`` weights the RNN, so his L is 1 - λ.
``fit_lambda`` finds λ by EM on a validation text (each step maximizes the likelihood's lower bound, so
the validation likelihood never goes down).

Token conventions: both models score the RNN's token stream. Each line of the text is a sentence; the
n-gram model reads it as ``<s> w_1 … w_n </s>`` (its state reset at every line, as ARPA models are
estimated), so the RNN's boundary token ``<eos>`` at the end of a line is scored as ``</s>``, and the
first word of a line is conditioned on ``<s>``. A word the RNN reads as ``<unk>`` is ``<unk>`` for the
n-gram model too; a word the RNN knows and the n-gram model does not gets the n-gram model's ``<unk>``
probability, and is counted (``ngram_oov_tokens``). The ARPA file must have ``<s>``, ``</s>`` and
``<unk>`` (``lmplz`` always writes ``<unk>``; SRILM's ``ngram-count`` does with ``-unk``). The
vocabularies' mismatch is reported both ways.
"""

import contextlib
import math
import os
from pathlib import Path

import numpy as np

from rnnlm.corpus import load_corpus
from rnnlm.dynamic import StreamScorer
from rnnlm.errors import RnnlmError
from rnnlm.evaluate import perplexity_of
from rnnlm.textio import iter_lines
from rnnlm.tokenizer import UNK

BOS, EOS = "<s>", "</s>"
LN10 = math.log(10.0)


def read_arpa_header(path):
    """(counts, unigrams) of an ARPA file: the n-gram counts of its \\data\\ section (list, order 1
    first) and the words of its 1-grams (set). Reads no further than the 1-grams; raises RnnlmError for
    a file that is not ARPA, is cut short before the end of its 1-grams, or lacks <s>, </s> or <unk>."""
    lines = iter_lines(path)
    first = next((line.strip() for line in lines if line.strip()), None)
    if first != "\\data\\":
        raise RnnlmError(f"{path} is not an ARPA file: its first line is not \\data\\")
    counts = []
    for line in lines:
        if not line.strip():
            continue
        if not line.startswith("ngram "):
            break
        order, _, count = line[6:].partition("=")
        if not (order.strip().isdigit() and count.strip().isdigit() and int(order) == len(counts) + 1):
            raise RnnlmError(f"{path} is not an ARPA file: bad count line {line.strip()!r} in \\data\\")
        counts.append(int(count))
    else:
        raise RnnlmError(f"{path} is truncated: it ends in its \\data\\ section")
    if not counts or line.strip() != "\\1-grams:":
        raise RnnlmError(f"{path} is not an ARPA file: no 'ngram 1=' count or no \\1-grams: section")
    unigrams = set()
    for line in lines:
        fields = line.split()
        if len(unigrams) == counts[0] or len(fields) < 2:
            break
        unigrams.add(fields[1])
    if len(unigrams) < counts[0]:
        raise RnnlmError(f"{path} is truncated or not ARPA: \\data\\ announces {counts[0]:,} 1-grams, "
                         f"its \\1-grams: section holds {len(unigrams):,}")
    missing = [word for word in (BOS, EOS, UNK) if word not in unigrams]
    if missing:
        raise RnnlmError(f"{path} has no {' or '.join(missing)}: an ARPA model for rnnlm needs <s>, </s> and "
                         "<unk> (lmplz writes them; SRILM's ngram-count writes <unk> with -unk)")
    return counts, unigrams


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 sent to /dev/null for the block: KenLM's C++ code writes its loading messages
    there (its errors come back as exceptions)."""
    saved = os.dup(2)
    with open(os.devnull, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class NgramModel:
    """An ARPA n-gram model queried through KenLM: ``order``, ``counts``, ``vocab`` (its 1-gram words)."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise RnnlmError(f"{path}: no such ARPA file (a regular file, plain or gzip, is needed)")
        try:
            import kenlm
        except ImportError:
            raise RnnlmError("--ngram needs KenLM's Python module: pip install 'rnnlm-numba[ngram]'") from None
        self.path = path
        self.counts, self.vocab = read_arpa_header(path)
        config = kenlm.Config()
        config.show_progress = False
        with _stderr_silenced():
            try:
                self.lm = kenlm.Model(str(path), config)
            except (OSError, RuntimeError) as error:
                reason = " ".join(str(error).split())
                raise RnnlmError(f"{path} could not be read as an ARPA model: {reason}") from None
        self.order = self.lm.order

    def sentence_log10(self, words, eos=True):
        """log10 p of each word of ``words`` (list of str) after <s>, and of </s> after them when ``eos``:
        (log10 probs, is-OOV flags), numpy arrays of len(words) + eos."""
        scores = list(self.lm.full_scores(" ".join(words), bos=True, eos=eos))
        return np.array([s[0] for s in scores]), np.array([s[2] for s in scores], bool)


def vocab_mismatch(vocab, ngram):
    """{"rnn_words_unknown_to_ngram", "ngram_words_unknown_to_rnn"}: counts of each model's words that
    the other lacks, <unk> and the sentence boundaries left out. Raises RnnlmError when the mapping is
    impossible: a character-level model, a word-level vocabulary holding <s> or </s> as words, or two
    vocabularies without a word in common."""
    if vocab.level != "word":
        raise RnnlmError("--ngram needs a word-level model (the n-gram model's tokens are words)")
    clash = [word for word in (BOS, EOS) if word in vocab.index]
    if clash:
        raise RnnlmError(f"the model's vocabulary has {' and '.join(clash)} as a word, which the n-gram model "
                         "reads as a sentence boundary")
    boundary = vocab.tokens[vocab.boundary_id]
    rnn_words = set(vocab.tokens) - {UNK, boundary}
    ngram_words = ngram.vocab - {UNK, BOS, EOS}
    if not rnn_words & ngram_words:
        raise RnnlmError(f"{ngram.path} shares no word with the model's vocabulary: another vocabulary "
                         "convention (case, tokenization or language)?")
    return {"rnn_words_unknown_to_ngram": len(rnn_words - ngram_words),
            "ngram_words_unknown_to_rnn": len(ngram_words - rnn_words)}


def stream_log_probs(ngram, vocab, ids):
    """ln p_ngram of every token of the RNN's stream ``ids`` (N,), each line a sentence: (ln p (N,)
    float64, is-OOV flags (N,) bool). The boundary id is scored as </s>; a tail without one is a
    sentence without </s>."""
    ids = np.asarray(ids)
    tokens = vocab.tokens
    ends = np.flatnonzero(ids == vocab.boundary_id).tolist()
    if len(ids) and (not ends or ends[-1] != len(ids) - 1):
        ends.append(len(ids))
    ln_p = np.empty(len(ids))
    oov = np.zeros(len(ids), bool)
    start = 0
    for end in ends:
        eos = end < len(ids)
        words = [tokens[i] for i in ids[start:end].tolist()]
        log10_p, flags = ngram.sentence_log10(words, eos)
        stop = end + 1 if eos else end
        ln_p[start:stop], oov[start:stop] = log10_p * LN10, flags
        start = stop
    return ln_p, oov


def check_lambda(lam):
    """Raise RnnlmError unless λ is a number in [0, 1]."""
    if not (isinstance(lam, int | float) and 0 <= lam <= 1):
        raise RnnlmError(f"--lambda must be a number in [0, 1] or auto, got {lam!r}")


def mix(ln_p_rnn, ln_p_ngram, lam):
    """ln(λ p_ngram + (1 - λ) p_rnn) per token (float64 arrays in, out); exactly ln p_rnn at λ = 0
    and ln p_ngram at λ = 1."""
    check_lambda(lam)
    if lam == 0:
        return np.asarray(ln_p_rnn, np.float64)
    if lam == 1:
        return np.asarray(ln_p_ngram, np.float64)
    return np.logaddexp(math.log(lam) + ln_p_ngram, math.log1p(-lam) + ln_p_rnn)


def fit_lambda(ln_p_rnn, ln_p_ngram, start=0.5, tol=1e-7, max_iter=500):
    """λ maximizing Σ ln(λ p_ngram + (1 - λ) p_rnn) over the tokens, by EM from ``start`` in (0, 1).

    Each step sets λ to the mean posterior weight of the n-gram component, λ ← mean(λ p_ngram / p_mix).
    Returns (λ, the log-likelihood before each step and after the last: a non-decreasing list).
    """
    lam, history = start, []
    for _ in range(max_iter):
        ln_mix = mix(ln_p_rnn, ln_p_ngram, lam)
        history.append(float(ln_mix.sum()))
        new = float(np.exp(math.log(lam) + ln_p_ngram - ln_mix).mean())
        done = abs(new - lam) < tol
        lam = min(max(new, 0.0), 1.0)
        if done:
            break
    history.append(float(mix(ln_p_rnn, ln_p_ngram, lam).sum()))
    return lam, history


def _text_ids(model, text):
    ids, _ = load_corpus(text, vocab=model.vocab)
    if len(ids) == 0:
        raise RnnlmError(f"{text} has no tokens")
    return ids


def fit_lambda_on(model, ngram, text, device="cpu", dynamic=None, progress=None):
    """(λ fitted by EM (``fit_lambda``) on ``text`` read as one stream, the dynamic evaluation's restarts): the
    RNN side dynamically evaluated when ``dynamic`` (a DynamicConfig) is given."""
    ids = _text_ids(model, text)
    rnn = StreamScorer(model, device, dynamic)
    ln_rnn = rnn.log_probs(ids, progress)
    return fit_lambda(ln_rnn, stream_log_probs(ngram, model.vocab, ids)[0])[0], rnn.restarts


def mix_sentences(ngram, vocab, sentences, lam):
    """Mix the n-gram model into scored ``rnnlm.score.Sentence`` objects: each one's ``ln_probs``
    become ln(λ p_ngram + (1 - λ) p_rnn), the sentence read by the n-gram model from <s>, and ``ln_prob``
    their sum."""
    for sentence in sentences:
        sentence.ln_probs = mix(sentence.ln_probs, stream_log_probs(ngram, vocab, sentence.ids)[0], lam)
        sentence.ln_prob = float(sentence.ln_probs.sum())


def perplexity(model, text, device="cpu", ngram=None, lam=0.5, lambda_text=None, dynamic=None, progress=None):
    """Perplexity of ``model`` on ``text`` (as ``rnnlm.perplexity`` counts it), mixed per token with the
    ARPA model at path ``ngram`` (or an NgramModel) and/or dynamically evaluated.

    lam: the n-gram model's weight λ in [0, 1], or "auto" to fit it by EM on ``lambda_text`` (scored as
    ``text`` is: dynamic evaluation included). dynamic: a ``rnnlm.dynamic.DynamicConfig`` or None.
    progress: progress(tokens done, total) for each text scored, or None. Returns the keys of
    ``rnnlm.perplexity`` and ``rnn_perplexity`` (the RNN alone, dynamic when asked); with ``dynamic``,
    ``dynamic_restarts`` (the guard's, ``rnnlm.dynamic``, on the text and the λ text); with ``ngram``:
    ``ngram_perplexity``, ``lambda``, ``lambda_text``, ``ngram_order``, ``ngram_oov_tokens`` and
    ``vocab_mismatch``'s counts.
    """
    if lam != "auto":
        check_lambda(lam)
    elif lambda_text is None:
        raise RnnlmError("--lambda auto needs a validation text to fit λ on (--lambda-text)")
    if ngram is not None and not isinstance(ngram, NgramModel):
        ngram = NgramModel(ngram)
    result = {} if ngram is None else vocab_mismatch(model.vocab, ngram)
    ids = _text_ids(model, text)
    if dynamic is not None:
        dynamic = dynamic.prepared(model, device)  # the fixed RMS of --dynamic-stats, once for both texts
    fitted_on = str(lambda_text) if lam == "auto" else None
    restarts = 0
    if ngram is not None and lam == "auto":
        lam, restarts = fit_lambda_on(model, ngram, lambda_text, device, dynamic, progress)
    rnn = StreamScorer(model, device, dynamic)
    ln_p = rnn.log_probs(ids, progress)
    result.update(rnn_perplexity=perplexity_of(-ln_p.mean()), tokens=len(ids),
                  unk=int(np.count_nonzero(ids == model.vocab.unk_id)))
    if dynamic is not None:
        result.update(dynamic_restarts=restarts + rnn.restarts)
    if ngram is not None:
        ln_ngram, oov = stream_log_probs(ngram, model.vocab, ids)
        ln_p = mix(ln_p, ln_ngram, lam)
        result.update(ngram_perplexity=perplexity_of(-ln_ngram.mean()), ngram_order=ngram.order, ngram_oov_tokens=int(
            np.count_nonzero(oov & (ids != model.vocab.unk_id))), **{"lambda": lam},
            lambda_text=fitted_on)
    per_token = -ln_p.mean()
    result.update(perplexity=perplexity_of(per_token), bits_per_token=per_token / math.log(2))
    return result
