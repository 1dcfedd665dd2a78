"""The ``rnnlm`` command: parse options, call the library, print. No logic of its own."""

import rnnlm  # noqa: I001  (first: sets the thread environment before numpy and numba load)

import json
import sys
from dataclasses import fields
from pathlib import Path

import click

from rnnlm.backends import DEVICES
from rnnlm.model import INITS
from rnnlm.optim import OPTIMIZERS
from rnnlm.plot import plot_log
from rnnlm.tokenizer import LEVELS, load_vocab_source
from rnnlm.train import SCHEDULES

DEFAULTS = rnnlm.TrainConfig()


def fail(error):
    """Turn a library error into Click's one-line error and exit code 1."""
    raise click.ClickException(str(error)) from None


def emit_json(record):
    click.echo(json.dumps(record))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(rnnlm.__version__, prog_name="rnnlm")
def cli():
    """Recurrent-neural-network language models: tokenize, train, perplexity, sample."""


@cli.command()
@click.argument("text", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for vocab.json and tokens.npy.")
@click.option("--level", type=click.Choice(LEVELS), default="word", help="Tokens: words or characters.")
@click.option("--min-count", default=1, help="Words seen fewer times become <unk>.")
@click.option("--max-vocab", type=int, default=None,
              help="Keep at most this many tokens (by frequency) [default: all].")
@click.option("--lowercase", is_flag=True, help="Lowercase the text first.")
@click.option("--vocab", "vocab_file", type=click.Path(path_type=Path), default=None,
              help="Encode with this vocabulary (a vocab.json or a model file) [default: build one].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def tokenize(text, out_dir, level, min_count, max_vocab, lowercase, vocab_file, as_json):
    """Turn TEXT into token ids (DIR/tokens.npy) and a vocabulary (DIR/vocab.json)."""
    try:
        vocab = load_vocab_source(vocab_file) if vocab_file else None
        summary = rnnlm.tokenize(text, out_dir, level=level, min_count=min_count, max_vocab=max_vocab,
                                 lowercase=lowercase, vocab=vocab)
    except rnnlm.RnnlmError as error:
        fail(error)
    if as_json:
        emit_json(summary)
    else:
        click.echo(f"{summary['tokens']:,} tokens, vocabulary {summary['vocab_size']:,}, "
                   f"{summary['unk_share']:.2%} <unk> -> {out_dir}")


@cli.command()
@click.argument("text", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", "model_path", type=click.Path(path_type=Path),
              help="Model file to write (.npz): the best model by validation perplexity.  [required unless --resume]")
@click.option("--valid", type=click.Path(path_type=Path), default=None,
              help="Validation text or token directory [default: the last 5% of TEXT, held out].")
@click.option("--level", type=click.Choice(LEVELS), default=DEFAULTS.level,
              help="Tokens of a raw TEXT: words or characters.")
@click.option("--min-count", default=DEFAULTS.min_count, help="Words seen fewer times become <unk>.")
@click.option("--max-vocab", type=int, default=DEFAULTS.max_vocab,
              help="Keep at most this many tokens [default: all].")
@click.option("--lowercase", is_flag=True, help="Lowercase a raw TEXT first.")
@click.option("--hidden", default=DEFAULTS.hidden, help="State size m.")
@click.option("--layers", default=DEFAULTS.layers, help="Number of stacked recurrent layers.")
@click.option("--dropout", default=DEFAULTS.dropout,
              help="Dropout on the recurrent layers' input and output (not the recurrent connection).")
@click.option("--tied", is_flag=True, help="Tie the output weights to the input weights (W_o = W_xᵀ).")
@click.option("--bptt", default=DEFAULTS.bptt, help="Window length T of truncated backpropagation.")
@click.option("--batch", default=DEFAULTS.batch, help="Number B of parallel streams.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=DEFAULTS.optimizer,
              help="SGD on the mean loss plus the L2 term, Adam, or lazy Adam (Adam that steps only the "
                   "rows of W_x and of the class softmax's W_o that a window touched: much faster with "
                   "--softmax class).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="Learning-rate schedule: mikolov (halve after a stall, stop at the next), plateau "
                   "(halve at every stall, stop after three) or cosine (anneal to 0 by the last epoch or the "
                   "--time-budget) [default: mikolov for sgd, plateau for adam and lazyadam].")
@click.option("--lr", type=float, default=None,
              help="Initial learning rate η [default: 1.0 for sgd, 0.002 for adam and lazyadam].")
@click.option("--epochs", default=DEFAULTS.epochs, help="At most this many passes over TEXT.")
@click.option("--clip", default=DEFAULTS.clip, help="Clip the gradient's global norm to this (0: off).")
@click.option("--l2", default=DEFAULTS.l2, help="Weight λ of the penalty λ‖θ‖².")
@click.option("--init", type=click.Choice(INITS), default=DEFAULTS.init,
              help="Initialization: fanin N(0, 1/fan-in), orthogonal or identity W_s, or zero (to see why not).")
@click.option("--softmax", type=click.Choice(["full", "class"]), default=DEFAULTS.softmax,
              help="Output layer: full softmax, or Mikolov's class-based factorization (much faster).")
@click.option("--classes", type=int, default=DEFAULTS.classes,
              help="Number of word classes of --softmax class [default: √V].")
@click.option("--seed", default=DEFAULTS.seed, help="Random seed of the initialization.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu",
              help="Where the kernels run (auto: CUDA when a GPU is available).")
@click.option("--threads", type=int, default=None, help="CPU threads [default: all cores].")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint file, written at every epoch end and on Ctrl-C/SIGTERM [default: MODEL.ckpt.npz].")
@click.option("--checkpoint-every", type=float, default=None,
              help="Also write the checkpoint every this many minutes [default: only at epoch ends].")
@click.option("--time-budget", type=float, default=None,
              help="Stop training after this many minutes (then validate and keep the best) [default: none].")
@click.option("--log", type=click.Path(path_type=Path), default=None,
              help="Training log, JSON lines [default: MODEL.log.jsonl].")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue the run that wrote this checkpoint (TEXT and settings come from it) [default: none].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per epoch instead of text.")
def train(text, model_path, resume, as_json, valid, device, threads, checkpoint, checkpoint_every, time_budget, log,
          **settings):
    """Train a model on TEXT (a text file or a directory from `rnnlm tokenize`)."""
    options = rnnlm.RunOptions(device=device, threads=threads, checkpoint=checkpoint and str(checkpoint),
                               checkpoint_every=checkpoint_every, time_budget=time_budget, log=log and str(log))
    if resume is None and (text is None or model_path is None):
        fail("train needs TEXT and -o MODEL (or --resume CHECKPOINT)")
    with click.progressbar(length=1, file=sys.stderr, show_pos=True, hidden=not sys.stderr.isatty()) as bar:

        def on_window(done, total, stats):
            if bar.hidden:  # not a terminal: no progress lines in a log
                return
            bar.length = total
            bar.label = (f"{stats['tokens_per_s']:,.0f} tok/s  loss {stats['loss']:.3f}  "
                         f"ppl {stats['perplexity']:.1f}")
            bar.update(done - bar.pos)

        def on_epoch(record):
            bar.pos = 0
            if as_json:
                emit_json(record)
            else:
                click.echo(f"{'' if bar.hidden else chr(10)}epoch {record['epoch']}: train loss "
                           f"{record['train_loss']:.4f}, valid perplexity {record['valid_perplexity']:.2f}, "
                           f"lr {record['lr']:g}, {record['tokens_per_s']:,.0f} tokens/s, {record['elapsed_s']:.1f} s")

        try:
            if resume is not None:
                records = rnnlm.resume(resume, options=options, on_window=on_window, on_epoch=on_epoch)
            else:
                config = rnnlm.TrainConfig(**{f.name: settings[f.name] for f in fields(rnnlm.TrainConfig)})
                records = rnnlm.train(text, model_path, valid=valid, config=config, options=options,
                                      on_window=on_window, on_epoch=on_epoch)
        except rnnlm.TrainingInterrupted as stop:
            click.echo(f"\ninterrupted in epoch {stop.epoch}; checkpoint written to {stop.checkpoint}; "
                       f"resume with: rnnlm train --resume {stop.checkpoint}\n"
                       f"the best model so far is in {stop.model_path}", err=True)
            sys.exit(130)
        except rnnlm.RnnlmError as error:
            fail(error)
    if not as_json and records:
        best = min(r["valid_perplexity"] for r in records)
        click.echo(f"best valid perplexity {best:.2f}; model written to {model_path or 'the checkpoint model path'}")


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("text", type=click.Path(path_type=Path))
@click.option("--device", type=click.Choice(DEVICES), default="cpu", help="Where the kernels run.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"perplexity", "bits_per_token", "tokens", "unk"}.')
def perplexity(model_path, text, device, as_json):
    """Perplexity of MODEL on TEXT: one stream from the boundary token, every token counted."""
    try:
        result = rnnlm.perplexity(rnnlm.load(model_path), text, device=device)
    except rnnlm.RnnlmError as error:
        fail(error)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"perplexity {result['perplexity']:.2f} ({result['bits_per_token']:.3f} bits/token, "
                   f"{result['tokens']:,} tokens, {result['unk']:,} <unk>)")


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--prompt", default="", help="Text to continue (unknown tokens are read as <unk>).")
@click.option("--length", type=int, default=None,
              help="Tokens to draw [default: words until <eos>, or 500 characters].")
@click.option("--temperature", default=1.0, help="Divide the logits by this.")
@click.option("--top-k", type=int, default=None, help="Draw only from the k likeliest tokens [default: all].")
@click.option("--top-p", type=float, default=None,
              help="Draw only from the likeliest tokens holding mass p [default: all].")
@click.option("--num", default=1, help="Number of samples.")
@click.option("--seed", default=0, help="Random seed: the same seed gives the same text.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", help="Where the kernels run.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list of the samples.")
def sample(model_path, prompt, length, temperature, top_k, top_p, num, seed, device, as_json):
    """Sample text from MODEL."""
    try:
        texts, unk = rnnlm.sample(rnnlm.load(model_path), prompt=prompt, length=length,
                                  temperature=temperature, top_k=top_k, top_p=top_p, num=num, seed=seed,
                                  device=device)
    except rnnlm.RnnlmError as error:
        fail(error)
    if unk:
        click.echo(f"warning: {unk} token(s) of the prompt are not in the model's vocabulary and were read "
                   "as <unk>", err=True)
    if as_json:
        emit_json(texts)
    else:
        click.echo("\n\n".join(texts) if num > 1 else texts[0])


@cli.command()
@click.argument("log_path", metavar="LOG", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_path", required=True, type=click.Path(path_type=Path),
              help="Image to write (.png, .svg or .pdf).")
def plot(log_path, out_path):
    """Draw the learning curves of a training LOG (MODEL.log.jsonl); needs matplotlib."""
    try:
        result = plot_log(log_path, out_path)
    except rnnlm.RnnlmError as error:
        fail(error)
    click.echo(f"{result['validations']} validation points -> {result['output']}")


def main():
    cli(prog_name="rnnlm")
