"""``rnnlm sample``."""

import sys
import unicodedata
from pathlib import Path

import click

import rnnlm
from rnnlm._env import set_threads
from rnnlm.sample import Texts, draw, encode_prompt

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
@json_option('one {"type": "sample", "text", "ln_prob"} record per sample (ln_prob: natural log of the drawn '
             "tokens' probability under the model, before --temperature, --top-k and --top-p)")
def sample(model_path, prompt, length, temperature, top_k, top_p, num, seed, device, threads, as_json):
    """Sample text from MODEL, written as it is drawn (several samples, drawn side by side, each once drawn).

    On a terminal, control characters of the model's tokens are shown escaped (\\x1b, \\u200b).
    """
    set_threads(threads)
    model = rnnlm.load(model_path)
    prompt_ids, unk = encode_prompt(model.vocab, prompt)
    if unk:
        click.echo(f"warning: {unk} token(s) of the prompt are not in the model's vocabulary and were read "
                   "as <unk>", err=True)
    texts = Texts(model.vocab, prompt_ids, num, stop_at_eos=model.vocab.level == "word" and length is None)
    show = escape_controls if sys.stdout.isatty() and not as_json else str
    streaming = num == 1 and not as_json
    if streaming:
        write(show(texts.texts()[0]))
    for tokens, log_p in draw(model, prompt_ids, length, temperature, top_k, top_p, num, seed, device):
        pieces = texts.add(tokens, log_p)
        if streaming:
            write(show(pieces[0]))
    if streaming:
        click.echo()
    elif as_json:
        for text, ln_prob in zip(texts.texts(), texts.ln_probs.tolist(), strict=True):
            emit_json("sample", text=text, ln_prob=ln_prob)
    else:
        click.echo("\n\n".join(show(text) for text in texts.texts()))


def write(text):
    click.echo(text, nl=False)
    sys.stdout.flush()


def escape_controls(text):
    """``text`` with its control and format characters (newlines and tabs aside) as escapes."""
    return "".join(char.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(char) in ("Cc", "Cf") and char not in "\n\t" else char
                   for char in text)
