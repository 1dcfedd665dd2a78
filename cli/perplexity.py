"""``rnnlm perplexity``."""

from pathlib import Path

import click

import rnnlm
from rnnlm._env import set_threads

from .common import Command, device_option, emit_json, json_option, threads_option


@click.command(cls=Command)
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("text")
@device_option
@threads_option
@json_option('one {"type": "perplexity", "perplexity", "bits_per_token", "tokens", "unk"} record')
def perplexity(model_path, text, device, threads, as_json):
    """Perplexity of MODEL on TEXT: one stream from the boundary token, every token counted.

    TEXT is a file, a token directory, - for standard input, or a gzip, bzip2 or xz file.
    """
    set_threads(threads)
    result = rnnlm.perplexity(rnnlm.load(model_path), text, device=device)
    if as_json:
        emit_json("perplexity", **result)
    else:
        click.echo(f"perplexity {result['perplexity']:.2f} ({result['bits_per_token']:.3f} bits/token, "
                   f"{result['tokens']:,} tokens, {result['unk']:,} <unk>)")
