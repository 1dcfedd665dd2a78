"""The ``rnnlm`` command, installed as ``rnnlm.cli``: one module per command, each a thin layer that parses
options, calls the library and prints. Exit codes: 0 done, 1 an error (one line on stderr), 2 a usage
error, 130 interrupted."""

import rnnlm  # noqa: I001  (first: sets the thread environment before numpy and numba load)

import click

from .common import Group
from .fetch import fetch
from .perplexity import perplexity
from .plot import plot
from .sample import sample
from .score import score
from .tokenize import tokenize
from .train import train


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(rnnlm.__version__, prog_name="rnnlm")
def cli():
    """Recurrent-neural-network language models: tokenize, train, score, sample."""


for command in (fetch, tokenize, train, perplexity, score, sample, plot):
    cli.add_command(command)


def main():
    cli(prog_name="rnnlm")
