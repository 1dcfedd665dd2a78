"""``rnnlm perplexity``."""

from pathlib import Path

import click
from click.core import ParameterSource

import rnnlm
from rnnlm import ngram as ngram_lm
from rnnlm._env import set_threads
from rnnlm.dynamic import RULES, DynamicConfig

from .common import Command, FiniteFloat, Progress, device_option, emit_json, json_option, threads_option, warn_restarts

DYNAMIC = DynamicConfig(lr=1.0)


class Lambda(FiniteFloat):
    """λ in [0, 1], or "auto"."""

    name = "lambda"

    def __init__(self):
        super().__init__(min=0, max=1)

    def convert(self, value, param, ctx):
        return "auto" if value == "auto" else super().convert(value, param, ctx)


def mixing_options(command):
    """The options that mix in an n-gram model and adapt the model as it scores, shared with ``score``;
    the command receives them as keyword arguments for ``read_mixing``."""
    options = [
        click.option("--ngram", type=click.Path(path_type=Path), default=None,
                     help="Mix in an ARPA n-gram model (plain or gzip; needs pip install "
                          "'rnnlm-numba[ngram]'), per token [default: none]."),
        click.option("--lambda", "lam", type=Lambda(), default=0.5, show_default=True,
                     help="The n-gram model's weight: p = λ p_ngram + (1 - λ) p_rnn (SRILM's -lambda with the "
                          "n-gram as -lm; Mikolov's -lambda is 1 - λ), or auto: fitted by EM on --lambda-text."),
        click.option("--lambda-text", default=None,
                     help="Validation text that --lambda auto is fitted on [default: none]."),
        click.option("--dynamic", type=FiniteFloat(min=0, min_open=True), default=None, metavar="LR",
                     help="Dynamic evaluation: adapt the model to the text as it is scored, at this learning rate "
                          "[default: off]."),
        click.option("--dynamic-segment", type=click.IntRange(min=1), default=DYNAMIC.segment, show_default=True,
                     help="Tokens scored between two adaptation steps."),
        click.option("--dynamic-decay", type=FiniteFloat(min=0, max=1, max_open=True), default=DYNAMIC.decay,
                     show_default=True,
                     help="Pull toward the trained weights at each step: θ += d (θ₀ - θ) (not the direct features' "
                          "table)."),
        click.option("--dynamic-rule", type=click.Choice(RULES), default=DYNAMIC.rule, show_default=True,
                     help="sgd: θ -= LR g (Mikolov); rms: steps over the gradient's running RMS (Krause et al.)."),
        click.option("--dynamic-stats", default=None, metavar="TEXT",
                     help="The rms rule divides by a fixed RMS of the gradients on TEXT (the training text: "
                          "segments of its first 300,000 tokens, computed at start) instead of the scored text's "
                          "running RMS, and pulls each weight back by --dynamic-decay times its RMS over the mean "
                          "(Krause et al.) [default: none]."),
        click.option("--dynamic-direct-lr", type=FiniteFloat(min=0), default=None, metavar="RATE",
                     help="The direct features' SGD rate in dynamic evaluation [default: LR]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def read_mixing(ctx, ngram, lam, lambda_text, dynamic, dynamic_segment, dynamic_decay, dynamic_rule, dynamic_stats,
                dynamic_direct_lr):
    """(ARPA path or None, λ or "auto", --lambda-text, DynamicConfig or None) from ``mixing_options``;
    a usage error for an option that needs another one."""
    given = {name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    if ngram is None and given & {"lam", "lambda_text"}:
        raise click.UsageError("--lambda and --lambda-text need --ngram ARPA")
    if (lam == "auto") != (lambda_text is not None):
        raise click.UsageError("--lambda auto and --lambda-text VALID go together")
    if dynamic is None and given & {"dynamic_segment", "dynamic_decay", "dynamic_rule", "dynamic_stats",
                                    "dynamic_direct_lr"}:
        raise click.UsageError("--dynamic-segment, --dynamic-decay, --dynamic-rule, --dynamic-stats and "
                               "--dynamic-direct-lr need --dynamic LR")
    if dynamic_stats is not None and dynamic_rule != "rms":
        raise click.UsageError("--dynamic-stats needs --dynamic-rule rms")
    config = None if dynamic is None else DynamicConfig(dynamic, dynamic_segment, dynamic_decay, dynamic_rule,
                                                        direct_lr=dynamic_direct_lr, stats=dynamic_stats)
    return ngram, lam, lambda_text, config


def _describe(result):
    """The lines after the perplexity: each model alone, λ, the vocabularies' mismatch."""
    rnn = f"RNN alone {result['rnn_perplexity']:.2f}"
    if "lambda" not in result:
        return rnn
    fitted = f" (EM on {result['lambda_text']})" if result["lambda_text"] else ""
    return (f"{rnn}, {result['ngram_order']}-gram alone {result['ngram_perplexity']:.2f}, "
            f"λ = {result['lambda']:.4f} on the n-gram{fitted}\n"
            f"vocabularies: {result['rnn_words_unknown_to_ngram']:,} RNN words unknown to the n-gram model, "
            f"{result['ngram_words_unknown_to_rnn']:,} n-gram words unknown to the RNN; "
            f"{result['ngram_oov_tokens']:,} tokens scored as the n-gram model's <unk>")


@click.command(cls=Command)
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("text")
@mixing_options
@device_option
@threads_option
@json_option('one {"type": "perplexity", "perplexity", "bits_per_token", "tokens", "unk"} record '
             '(with --ngram or --dynamic also "rnn_perplexity"; with --dynamic "dynamic_restarts": how often '
             'the guard restarted a run-away adaptation from the trained weights; with --ngram '
             '"ngram_perplexity", "lambda", '
             '"lambda_text", "ngram_order", "ngram_oov_tokens", "rnn_words_unknown_to_ngram", '
             '"ngram_words_unknown_to_rnn")')
@click.pass_context
def perplexity(ctx, model_path, text, device, threads, as_json, **mixing):
    """Perplexity of MODEL on TEXT: one stream from the boundary token, every token counted.

    TEXT is a file, a token directory, - for standard input, or a gzip, bzip2 or xz file. With --ngram,
    each line of TEXT is a sentence for the n-gram model (<s> before it, its end scored as </s>).
    """
    ngram, lam, lambda_text, config = read_mixing(ctx, **mixing)
    set_threads(threads)
    model = rnnlm.load(model_path)
    if ngram is None and config is None:
        result = rnnlm.perplexity(model, text, device=device)
    else:
        progress = Progress("scoring")
        try:
            result = ngram_lm.perplexity(model, text, device, ngram, lam, lambda_text, config, progress.update)
        finally:
            progress.close()
    warn_restarts(result.get("dynamic_restarts", 0))
    if as_json:
        emit_json("perplexity", **result)
        return
    click.echo(f"perplexity {result['perplexity']:.2f} ({result['bits_per_token']:.3f} bits/token, "
               f"{result['tokens']:,} tokens, {result['unk']:,} <unk>)")
    if "rnn_perplexity" in result:
        click.echo(_describe(result))
