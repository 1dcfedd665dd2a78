"""``rnnlm score``."""

import contextlib
import io
import itertools
import math
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import click

import rnnlm
from rnnlm import nbest
from rnnlm import ngram as ngram_lm
from rnnlm._env import set_threads
from rnnlm.dynamic import StreamScorer
from rnnlm.score import DEFAULT_BATCH, Scorer, Summary, check_vocabulary, chunks, read_sentences
from rnnlm.textio import display_name, iter_lines

from .common import Command, FiniteFloat, device_option, emit_json, json_option, threads_option, warn_restarts
from .perplexity import mixing_options, read_mixing

UNITS = {"ln": 1.0, "log10": 1 / math.log(10), "bits": 1 / math.log(2)}
JSON_SCHEMA = (
    'per line {"type": "sentence", "line", "ln_prob", "tokens", "oov"} (+ "words", "ln_probs" with --per-word; '
    'with --nbest "hypothesis" records that add "id", "score", "output", or with --best one "best" record per id: '
    '"id", "line", "total", "output"), then {"type": "summary", "sentences", "tokens", "oov", "ln_prob", '
    '"perplexity", "perplexity_excluding_oov"}; ln = natural log'
)


def shown(token):
    """A token as printed: whitespace and control characters escaped (\\n, \\t, \\x20, \\x1b)."""
    if token.isprintable() and not token.isspace():
        return token
    return "\\x20" if token == " " else token.encode("unicode_escape").decode("ascii")


@click.command(cls=Command)
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("texts", metavar="[TEXT]...", nargs=-1)
@click.option("--stream", is_flag=True,
              help="Carry the state from line to line, as perplexity does [default: each line alone].")
@click.option("--per-word", is_flag=True, help="Add every token with its log-probability: TOKEN=LOGPROB ...")
@click.option("--units", type=click.Choice(list(UNITS)), default="log10",
              help="Logarithm of the printed scores (log10 as the n-gram tools print; bits = log2).")
@click.option("--nbest", "nbest_format", type=click.Choice(nbest.FORMATS), default=None,
              help="Read n-best lists (mikolov: ID words; kaldi: UTT-N words; moses: ID ||| words ||| features "
                   "||| score) and write them back with the LM score added [default: plain sentences].")
@click.option("--best", type=FiniteFloat(min=0), default=None, metavar="WEIGHT",
              help="With --nbest: write only each id's hypothesis with the highest score + WEIGHT × LM score "
                   "[default: write every hypothesis].")
@click.option("--batch", type=click.IntRange(min=1, max=4096), default=DEFAULT_BATCH,
              help="Sentences scored side by side.")
@mixing_options
@device_option
@threads_option
@json_option(JSON_SCHEMA)
@click.pass_context
def score(ctx, model_path, texts, stream, per_word, units, nbest_format, best, batch, device, threads, as_json,
          **mixing):
    """Log-probability of every line of TEXT under MODEL, one output line per input line, in input order.

    TEXT: files (plain, gzip, bzip2, xz or zstd), - or nothing for standard input. Each line is one sentence
    scored alone from the boundary token (Mikolov's -independent, KenLM's query), its <eos> included; an
    empty line is <eos> alone. A leading <s> and a trailing </s> are dropped, any other <s> or </s> is read
    as <eos>. Output: LOGPROB TOKENS OOV, tab-separated (--per-word adds TOKEN=LOGPROB ...); at the end, on
    stderr, the perplexity including and excluding OOV tokens (tokens outside the vocabulary, read as <unk>).
    """
    if best is not None and nbest_format is None:
        raise click.UsageError("--best WEIGHT needs --nbest FORMAT")
    if stream and nbest_format:
        raise click.UsageError("--stream and --nbest do not go together: hypotheses are scored each alone")
    ngram, lam, lambda_text, dynamic = read_mixing(ctx, **mixing)
    if dynamic is not None and not stream:
        raise click.UsageError("--dynamic needs --stream: the model adapts to the lines in their order")
    set_threads(threads)
    sources = texts or ("-",)
    lines = itertools.chain.from_iterable([iter_lines(source) for source in sources])
    model = rnnlm.load(model_path)
    if dynamic is not None:
        dynamic = dynamic.prepared(model, device)
    scorer = Scorer(model, device, 1 if stream else batch)
    adapting = StreamScorer(model, device, dynamic) if dynamic else None
    score_chunk = adapting.score_sentences if adapting else (
        scorer.score_stream if stream else scorer.score_independent)
    if ngram is not None:
        ngram, lam = mixed_ngram(model, ngram, lam, lambda_text, device, dynamic)
    output = Output(model, nbest_format, best, units, per_word, as_json)
    with private_stdin():
        for k, chunk in enumerate(chunks(lines)):
            hypotheses = [None] * len(chunk)
            if nbest_format:
                hypotheses = [nbest.read(text, nbest_format, number) for number, text in chunk]
                chunk = [(number, hypothesis.text) for (number, _), hypothesis in zip(chunk, hypotheses, strict=True)]
            sentences = read_sentences(model.vocab, chunk)
            if k == 0:
                check_vocabulary(sentences, model.vocab, display_name(sources[0]))
            score_chunk(sentences)
            if ngram is not None:
                ngram_lm.mix_sentences(ngram, model.vocab, sentences, lam)
            output.chunk(sentences, hypotheses)
    output.finish()
    if adapting:
        warn_restarts(adapting.restarts)


def mixed_ngram(model, path, lam, lambda_text, device, dynamic):
    """The n-gram model at ``path`` and λ (fitted on ``lambda_text`` when "auto"), said on stderr."""
    ngram = ngram_lm.NgramModel(path)
    mismatch = ngram_lm.vocab_mismatch(model.vocab, ngram)
    if lam == "auto":
        lam, restarts = ngram_lm.fit_lambda_on(model, ngram, lambda_text, device, dynamic)
        warn_restarts(restarts)
    click.echo(f"{ngram.order}-gram model mixed in with λ = {lam:.4f}; {mismatch['rnn_words_unknown_to_ngram']:,} "
               f"RNN words unknown to it, {mismatch['ngram_words_unknown_to_rnn']:,} of its words unknown to the RNN",
               err=True)
    return ngram, lam


@contextlib.contextmanager
def private_stdin():
    """Standard input read through a duplicate of its descriptor while the block runs.

    The thread that reads ahead may still wait on standard input when the command ends (Ctrl-C, an error),
    and the interpreter aborts at exit on the lock of a ``sys.stdin`` that such a thread holds; a private
    file object, which nothing closes at exit, avoids that.
    """
    saved = sys.stdin
    try:
        descriptor = os.dup(saved.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):  # no descriptor (a test's input)
        yield
        return
    sys.stdin = SimpleNamespace(buffer=open(descriptor, "rb"))  # noqa: SIM115  (see above)
    try:
        yield
    finally:
        sys.stdin = saved


@contextlib.contextmanager
def whole_lines():
    """Ctrl-C held back while the block writes, so that it never cuts a line in two, and raised after it."""
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class Output:
    """What ``score`` prints, chunk by chunk, and the summary at the end."""

    def __init__(self, model, nbest_format, best, units, per_word, as_json):
        self.nbest_format, self.units, self.per_word, self.as_json = nbest_format, units, per_word, as_json
        self.factor = UNITS[units]
        self.best = None if best is None else nbest.Best(best)
        self.summary = Summary()

    def record(self, sentence):
        fields = dict(line=sentence.line, ln_prob=sentence.ln_prob, tokens=len(sentence.ids), oov=len(sentence.oov))
        if self.per_word:
            fields.update(words=sentence.tokens, ln_probs=sentence.ln_probs.tolist())
        return fields

    def text(self, sentence):
        line = f"{sentence.ln_prob * self.factor:.4f}\t{len(sentence.ids)}\t{len(sentence.oov)}"
        if not self.per_word:
            return line
        return line + "\t" + " ".join(f"{shown(token)}={value * self.factor:.4f}"
                                      for token, value in zip(sentence.tokens, sentence.ln_probs.tolist(), strict=True))

    def chunk(self, sentences, hypotheses):
        """Print the lines of one scored chunk (with --best, keep the best so far) and flush."""
        with whole_lines():
            self.print_chunk(sentences, hypotheses)

    def print_chunk(self, sentences, hypotheses):
        printed = []
        for sentence, hypothesis in zip(sentences, hypotheses, strict=True):
            self.summary.add(sentence)
            if hypothesis is None:
                printed.append(self.text(sentence))
                if self.as_json:
                    emit_json("sentence", **self.record(sentence))
                continue
            lm = sentence.ln_prob * self.factor
            line = nbest.write(hypothesis, self.nbest_format, lm)
            if self.best is not None:
                self.best.add(hypothesis, lm, line)
            elif self.as_json:
                emit_json("hypothesis", id=hypothesis.id, score=hypothesis.score, output=line, **self.record(sentence))
            else:
                printed.append(line)
        if printed and not self.as_json:
            click.echo("\n".join(printed))
        sys.stdout.flush()

    def finish(self):
        if self.best is not None:
            for total, hypothesis, line in self.best.chosen():
                if self.as_json:
                    emit_json("best", id=hypothesis.id, line=hypothesis.line, total=total, output=line)
                else:
                    click.echo(line)
        summary = self.summary
        if self.as_json:
            emit_json("summary", sentences=summary.sentences, tokens=summary.tokens, oov=summary.oov,
                      ln_prob=summary.ln_prob, perplexity=summary.perplexity(),
                      perplexity_excluding_oov=summary.perplexity(include_oov=False))
            return
        click.echo(f"{summary.sentences:,} sentences, {summary.tokens:,} tokens, {summary.oov:,} OOV: "
                   f"total {summary.ln_prob * self.factor:.4f} ({self.units}), perplexity "
                   f"{summary.perplexity():.2f} including OOVs, {summary.perplexity(False):.2f} excluding",
                   err=True)
