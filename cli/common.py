"""What every command shares: the error policy, the JSON Lines output, option types and progress reports."""

import json
import math
import os
import sys
import time

import click

import rnnlm
from rnnlm.backends import DEVICES

EXIT_INTERRUPTED = 130


class Command(click.Command):
    """A command with the one error policy: a library error is a one-line ``Error:`` and exit 1 (with
    ``--json`` also an ``{"type": "error"}`` record on stdout), Ctrl-C exits 130, a closed pipe stops quietly."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except rnnlm.RnnlmError as error:
            if ctx.params.get("as_json"):
                emit_json("error", message=str(error))
            raise click.ClickException(str(error)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:  # the reader went away (`| head`): what was written stays whole
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)


class Group(click.Group):
    command_class = Command


def finite(value):
    """``value`` with every NaN or infinity (at any depth) replaced by None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def emit_json(kind, **fields):
    """One JSON Lines record on stdout: ``{"type": kind, ...fields}``, NaN and infinities as null."""
    click.echo(json.dumps({"type": kind, **finite(fields)}, ensure_ascii=False, allow_nan=False))


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: NaN and infinities are usage errors naming the option."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def device_option(command):
    return click.option("--device", type=click.Choice(DEVICES), default="cpu",
                        help="Where the kernels run (auto: CUDA when a GPU is available).")(command)


def threads_option(command):
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads [default: all cores].")(command)


def json_option(what):
    """``--json``: print JSON Lines records (``what`` says which) instead of text."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print JSON Lines: {what}.")


class Progress:
    """Progress of long work on stderr: a bar with an ETA on a terminal, otherwise a plain line at most
    every ``every_s`` seconds (so that a log stays readable)."""

    def __init__(self, label, every_s=30.0):
        self.label, self.every_s = label, every_s
        self.terminal = sys.stderr.isatty()
        self.bar = None
        self.last_line = time.monotonic()

    def update(self, done, total, status=""):
        if self.terminal:
            if self.bar is None or self.bar.length != total:
                self.close()
                self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_eta=True,
                                             show_pos=True)
                self.bar.__enter__()
            self.bar.label = f"{self.label} {status}".rstrip()
            self.bar.update(done - self.bar.pos)
        elif time.monotonic() - self.last_line >= self.every_s:
            self.last_line = time.monotonic()
            click.echo(f"{self.label} {done:,}/{total:,} {status}".rstrip(), err=True)

    def close(self):
        if self.bar is not None:
            self.bar.render_finish()
            self.bar = None


def warn_restarts(restarts):
    """Say on stderr how often dynamic evaluation's guard put the trained weights back, if ever."""
    if restarts:
        click.echo(f"warning: dynamic evaluation ran away and restarted from the trained weights {restarts:,} "
                   "time(s); a lower --dynamic rate may do better", err=True)
