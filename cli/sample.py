"""``rnnlm sample``."""

from pathlib import Path

import click

import rnnlm
from rnnlm._env import set_threads

from .common import Command, FiniteFloat, device_option, emit_json, json_option, threads_option


@click.command(cls=Command)
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--prompt", default="", help="Text to continue (unknown tokens are read as <unk>).")
@click.option("--length", type=click.IntRange(min=1, max=10**6), default=None,
              help="Tokens to draw [default: words until <eos>, or 500 characters].")
@click.option("--temperature", type=FiniteFloat(min=1e-6), default=1.0, help="Divide the logits by this.")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Draw only from the k likeliest tokens [default: all].")
@click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True), default=None,
              help="Draw only from the likeliest tokens holding mass p [default: all].")
@click.option("--num", type=click.IntRange(min=1, max=10**4), default=1, help="Number of samples.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Random seed: the same seed gives the same text.")
@device_option
@threads_option
@json_option('one {"type": "sample", "text"} record per sample')
def sample(model_path, prompt, length, temperature, top_k, top_p, num, seed, device, threads, as_json):
    """Sample text from MODEL."""
    set_threads(threads)
    texts, unk = rnnlm.sample(rnnlm.load(model_path), prompt=prompt, length=length, temperature=temperature,
                              top_k=top_k, top_p=top_p, num=num, seed=seed, device=device)
    if unk:
        click.echo(f"warning: {unk} token(s) of the prompt are not in the model's vocabulary and were read "
                   "as <unk>", err=True)
    if as_json:
        for text in texts:
            emit_json("sample", text=text)
    else:
        click.echo("\n\n".join(texts) if num > 1 else texts[0])
