"""``rnnlm train``."""

import shlex
import sys
from dataclasses import fields
from pathlib import Path

import click
from click.core import ParameterSource

import rnnlm
from rnnlm import adapt, distributed
from rnnlm.model import INITS, MAX_DIRECT_ORDER, MAX_DIRECT_SIZE, SOFTMAXES
from rnnlm.optim import MOMENTS, OPTIMIZERS
from rnnlm.runplan import ResumeConflictError
from rnnlm.tokenizer import LEVELS
from rnnlm.train import SCHEDULES

from .common import (
    EXIT_INTERRUPTED,
    Command,
    FiniteFloat,
    Progress,
    device_option,
    emit_json,
    json_option,
    threads_option,
)

DEFAULTS = rnnlm.TrainConfig()
MINUTES = FiniteFloat(min=0, min_open=True)


class TableSize(click.ParamType):
    """A number of table entries: an integer, or one with a suffix k, M or G (10³, 10⁶, 10⁹), up to
    MAX_DIRECT_SIZE."""

    name = "SIZE"
    SUFFIXES = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            scale = self.SUFFIXES.get(text[-1:], 1)
            digits = text[:-1] if scale > 1 else text
            if not (digits.isascii() and digits.isdigit()):  # int() refuses '²', takes '٣'
                self.fail(f"{value!r} is not a number of entries such as 4000000, 4M or 500k", param, ctx)
            number = int(digits) * scale
        if not 0 <= number <= MAX_DIRECT_SIZE:
            self.fail(f"{value!r} is not from 0 to {MAX_DIRECT_SIZE:,}", param, ctx)
        return number


@click.command(cls=Command)
@click.argument("text", required=False)
@click.option("-o", "--output", "model_path", type=click.Path(path_type=Path),
              help="Model file to write (.npz): the best model by validation perplexity.  [required unless --resume]")
@click.option("--valid", default=None,
              help="Validation text or token directory [default: the last 5% of TEXT, held out].")
@click.option("--level", type=click.Choice(LEVELS), default=DEFAULTS.level,
              help="Tokens of a raw TEXT: words or characters [with --init-from: the model's].")
@click.option("--min-count", type=click.IntRange(min=1), default=DEFAULTS.min_count,
              help="Words seen fewer times become <unk>.")
@click.option("--max-vocab", type=click.IntRange(min=2), default=DEFAULTS.max_vocab,
              help="Keep at most this many tokens [default: all].")
@click.option("--lowercase", is_flag=True, help="Lowercase a raw TEXT first.")
@click.option("--hidden", type=click.IntRange(1, 16384), default=DEFAULTS.hidden, help="State size m.")
@click.option("--layers", type=click.IntRange(1, 64), default=DEFAULTS.layers,
              help="Number of stacked recurrent layers.")
@click.option("--dropout", type=FiniteFloat(0, 1, max_open=True), default=DEFAULTS.dropout,
              help="Dropout on the recurrent layers' input and output (not the recurrent connection).")
@click.option("--tied", is_flag=True, help="Tie the output weights to the input weights (W_o = W_xᵀ).")
@click.option("--bptt", type=click.IntRange(1, 100_000), default=DEFAULTS.bptt,
              help="Window length T of truncated backpropagation.")
@click.option("--batch", type=click.IntRange(1, 100_000), default=DEFAULTS.batch, help="Number B of parallel streams.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=DEFAULTS.optimizer,
              help="SGD on the mean loss plus the L2 term, Adam, or lazy Adam (Adam that steps only the "
                   "rows of W_x and of the class softmax's W_o that a window touched: much faster with "
                   "--softmax class).")
@click.option("--moments", type=click.Choice(MOMENTS), default=DEFAULTS.moments,
              help="Storage of Adam's two moments: float32, or bfloat16 (half their memory: stepped in float32 and "
                   "stored back by stochastic rounding with reproducible random bits).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="Learning-rate schedule: mikolov (halve after a stall, stop at the next), plateau "
                   "(halve at every stall, stop after three) or cosine (anneal to 0 by the last epoch or the "
                   "--time-budget) [default: mikolov for sgd, plateau for adam and lazyadam].")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True, max=1e4), default=None,
              help="Initial learning rate η [default: 1.0 for sgd, 0.002 for adam and lazyadam].")
@click.option("--warmup", type=click.IntRange(0, 10**9), default=DEFAULTS.warmup,
              help="Raise the learning rate linearly over this many first windows of the run (0: start at it).")
@click.option("--epochs", type=click.IntRange(1, 1_000_000), default=DEFAULTS.epochs,
              help="At most this many passes over TEXT.")
@click.option("--clip", type=FiniteFloat(min=0), default=DEFAULTS.clip,
              help="Clip the gradient's global norm to this (0: off).")
@click.option("--l2", type=FiniteFloat(min=0), default=DEFAULTS.l2, help="Weight λ of the penalty λ‖θ‖².")
@click.option("--init", type=click.Choice(INITS), default=DEFAULTS.init,
              help="Initialization: fanin N(0, 1/fan-in), orthogonal or identity W_s, or zero (to see why not).")
@click.option("--softmax", type=click.Choice(SOFTMAXES), default=DEFAULTS.softmax,
              help="Output layer: full softmax, Mikolov's class-based factorization (much faster), or hs: a "
                   "hierarchical softmax over a Huffman tree of the words (fastest for large vocabularies).")
@click.option("--classes", type=click.IntRange(min=1), default=DEFAULTS.classes,
              help="Number of word classes of --softmax class [default: √V].")
@click.option("--direct", type=TableSize(), default=DEFAULTS.direct,
              help="Direct features (Mikolov's RNNME): hashed n-gram contexts straight into the output layer "
                   "through a table of this many weights, e.g. 10M (0: off).")
@click.option("--direct-order", type=click.IntRange(1, MAX_DIRECT_ORDER), default=DEFAULTS.direct_order,
              help="Longest n-gram of the direct features: contexts of 0 to N - 1 tokens.")
@click.option("--direct-lr", type=FiniteFloat(min=0, min_open=True, max=1e4), default=DEFAULTS.direct_lr,
              help="SGD rate of the direct features' table, whatever --optimizer; the schedule scales it as --lr.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=DEFAULTS.seed,
              help="Random seed of the initialization.")
@device_option
@threads_option
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint file, written at the start, at every epoch end and on Ctrl-C/SIGTERM; it holds the "
                   "best weights and the epoch's start, which are not kept in memory [default: MODEL.ckpt.npz].")
@click.option("--checkpoint-every", type=MINUTES, default=None,
              help="Also write the checkpoint every this many minutes [default: only at epoch ends].")
@click.option("--time-budget", type=MINUTES, default=None,
              help="Stop training after this many minutes (then validate and keep the best) [default: none].")
@click.option("--log", type=click.Path(path_type=Path), default=None,
              help="Training log, JSON lines [default: MODEL.log.jsonl].")
@click.option("--init-from", type=click.Path(path_type=Path), default=None,
              help="Adapt this trained model to TEXT: keep its vocabulary (other words read as <unk>, counted), "
                   "its architecture and level, and start from its weights, with a fresh optimizer "
                   "[default: a new model].")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue the run that wrote this checkpoint, with its settings (only --epochs, --threads, "
                   "--time-budget, --checkpoint-every and --device may change); its files are those inside the "
                   "checkpoint's folder, any other must be given (TEXT, --valid, -o, --log) [default: none].")
@json_option('one {"type": "epoch", ...} record per epoch')
@distributed.failing_together(passing=(click.ClickException,))  # under MPI: one rank's error ends every rank
def train(text, model_path, resume, as_json, valid, device, threads, checkpoint, checkpoint_every, time_budget, log,
          **settings):
    """Train a model on TEXT (a text file, - for standard input, a compressed file, or a token directory)."""
    options = rnnlm.RunOptions(device=device, threads=threads, checkpoint=checkpoint and str(checkpoint),
                               checkpoint_every=checkpoint_every, time_budget=time_budget, log=log and str(log))
    if resume is None and (text is None or model_path is None):
        raise click.UsageError("train needs TEXT and -o MODEL (or --resume CHECKPOINT)")
    progress = Progress("training")
    written = {"model": model_path}
    writer = distributed.world().is_writer  # under MPI, rank 0 alone prints

    def on_window(done, total, stats):
        progress.update(done, total, f"{stats['tokens_per_s']:,.0f} tok/s  loss {stats['loss']:.3f}  "
                                     f"ppl {stats['perplexity']:.1f}")

    def on_epoch(record):
        progress.close()
        if as_json:
            emit_json("epoch", **record)
        else:
            click.echo(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, valid perplexity "
                       f"{record['valid_perplexity']:.2f}, lr {record['lr']:g}, {record['tokens_per_s']:,.0f} "
                       f"tokens/s, {record['elapsed_s']:.1f} s")

    def on_init(record):
        click.echo(adapt.describe(record), err=True)
        if as_json:
            emit_json("start", **record)

    def on_start(paths):
        written.update(paths)
        click.echo(f"resuming {resume}: model -> {paths['model']}, log -> {paths['log']}, checkpoint -> "
                   f"{paths['checkpoint']}", err=True)

    if not writer:
        on_window = on_epoch = on_start = on_init = None
    try:
        if resume is not None:
            epochs = settings_for_resume(click.get_current_context(), settings, options)
            records = rnnlm.resume(resume, options=options, on_window=on_window, on_epoch=on_epoch, text=text,
                                   valid=valid, model_path=model_path, epochs=epochs, on_start=on_start)
        else:
            settings_for_init(click.get_current_context(), settings)
            config = rnnlm.TrainConfig(**{f.name: settings[f.name] for f in fields(rnnlm.TrainConfig)})
            records = rnnlm.train(text, model_path, valid=valid, config=config, options=options,
                                  on_window=on_window, on_epoch=on_epoch, init_from=settings["init_from"],
                                  on_init=on_init)
    except ResumeConflictError as conflict:
        raise click.UsageError(str(conflict)) from None
    except rnnlm.TrainingInterrupted as stop:
        progress.close()
        if writer:
            click.echo(f"\ninterrupted in epoch {stop.epoch}; checkpoint written to {stop.checkpoint}; resume "
                       f"with: {resume_command(stop)}\nthe best model so far is in {stop.model_path}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        progress.close()
    if writer and not as_json:
        echo_summary(records, written["model"])


def echo_summary(records, model_path):
    """The run's last line: its best validation perplexity and where the model is."""
    best = min((r["valid_perplexity"] for r in records), default=None)
    done = "the run had already ended" if best is None else f"best valid perplexity {best:.2f}"
    click.echo(f"{done}; model written to {model_path}")


SAFE_ON_RESUME = {"epochs"}


def settings_for_resume(ctx, settings, options):
    """The new --epochs of a resumed run, or None; a usage error for any other model setting given.
    Without --device the run goes on where the checkpoint's ran."""
    for name in settings:
        if name not in SAFE_ON_RESUME and ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
            raise click.UsageError(f"--{name.replace('_', '-')} cannot be used with --resume: the run goes on with "
                                   "the checkpoint's settings (only --epochs, --threads, --time-budget, "
                                   "--checkpoint-every and --device may change)")
    if ctx.get_parameter_source("device") is ParameterSource.DEFAULT:
        options.device = None
    given = ctx.get_parameter_source("epochs") is not ParameterSource.DEFAULT
    return settings["epochs"] if given else None


def settings_for_init(ctx, settings):
    """With --init-from: a usage error for a setting the model fixes; --level, when not given, is the model's."""
    if settings["init_from"] is None:
        return
    for name in adapt.ARCHITECTURE:
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
            raise click.UsageError(f"--{name.replace('_', '-')} cannot be used with --init-from: the adapted model "
                                   "keeps the vocabulary and architecture of the model it starts from")
    if ctx.get_parameter_source("level") is ParameterSource.DEFAULT:
        settings["level"] = None


def resume_command(stop):
    """The command that continues an interrupted run, with the paths a resume cannot take from the checkpoint."""
    words = ["rnnlm", "train"]
    if "TEXT" in stop.needs:
        words.append(stop.needs["TEXT"])
    words += ["--resume", str(stop.checkpoint)]
    for flag in ("--valid", "-o", "--log"):
        if flag in stop.needs:
            words += [flag, stop.needs[flag]]
    return shlex.join(words)
