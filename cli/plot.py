"""``rnnlm plot``."""

from pathlib import Path

import click

from rnnlm.plot import plot_log

from .common import Command


@click.command(cls=Command)
@click.argument("log_path", metavar="LOG", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_path", required=True, type=click.Path(path_type=Path),
              help="Image to write (.png, .svg or .pdf).")
def plot(log_path, out_path):
    """Draw the learning curves of a training LOG (MODEL.log.jsonl); needs matplotlib."""
    result = plot_log(log_path, out_path)
    click.echo(f"{result['validations']} validation points -> {result['output']}")
