"""Training: B parallel streams, truncated BPTT over windows of T steps, SGD with Mikolov's schedule.

The hidden state is carried from one window to the next (not through gradients) and reset at each
epoch. After every epoch the model is evaluated on the validation text; the best one is kept and
written to the model file, and the learning rate is halved once the validation perplexity improves by
less than 0.3% (training stops when that happens again).
"""

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from rnnlm import step
from rnnlm._env import set_threads
from rnnlm.backends import get_backend
from rnnlm.corpus import batchify, load_corpus
from rnnlm.errors import RnnlmError
from rnnlm.evaluate import stream_loss
from rnnlm.model import Model, frequency_classes, word_classes

MIN_IMPROVEMENT = 0.003
HELD_OUT_SHARE = 0.05


@dataclass
class TrainConfig:
    """Every setting of a training run; stored in the model file's meta."""

    level: str = "word"
    min_count: int = 1
    max_vocab: int | None = None
    lowercase: bool = False
    hidden: int = 200
    bptt: int = 20
    batch: int = 20
    lr: float = 1.0
    epochs: int = 20
    clip: float = 1.0
    l2: float = 0.0
    seed: int = 0
    softmax: str = "full"
    classes: int | None = None
    device: str = "cpu"
    threads: int | None = None

    def check(self):
        """RnnlmError naming the first setting out of range."""
        for name in ("hidden", "bptt", "batch", "epochs", "min_count"):
            if getattr(self, name) < 1:
                raise RnnlmError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise RnnlmError(f"--lr must be positive, got {self.lr}")
        if self.clip < 0 or self.l2 < 0:
            raise RnnlmError("--clip and --l2 must not be negative")
        if self.threads is not None and self.threads < 1:
            raise RnnlmError(f"--threads must be at least 1, got {self.threads}")
        if self.softmax not in ("full", "class"):
            raise RnnlmError(f"--softmax must be full or class, got {self.softmax!r}")
        if self.classes is not None and self.classes < 1:
            raise RnnlmError(f"--classes must be at least 1, got {self.classes}")


class TrainingInterrupted(Exception):  # noqa: N818  (an outcome, not an error)
    """Ctrl-C during training; ``saved`` says whether a model file was written, ``epoch`` how far it got."""

    def __init__(self, path, saved, epoch):
        super().__init__(f"training interrupted in epoch {epoch}")
        self.path, self.saved, self.epoch = path, saved, epoch


def train(text, model_path, valid=None, config=None, on_window=None, on_epoch=None):
    """Train a model on ``text`` (a text file or token directory) and write the best one to model_path.

    valid: validation text or token directory; without it the last 5% of ``text`` is held out.
    on_window(done, total, stats) is called after every window with stats {"loss", "perplexity",
    "tokens_per_s"} of the epoch so far; on_epoch(record) after every epoch with {"epoch",
    "train_loss", "valid_perplexity", "lr", "tokens_per_s", "elapsed_s"}.
    Returns the list of epoch records. Raises TrainingInterrupted on KeyboardInterrupt.
    """
    config = config or TrainConfig()
    config.check()
    set_threads(config.threads)
    ops = get_backend(config.device)
    ids, vocab, _ = load_corpus(
        text, level=config.level, min_count=config.min_count, max_vocab=config.max_vocab,
        lowercase=config.lowercase,
    )
    if valid is not None:
        valid_ids, _, _ = load_corpus(valid, vocab=vocab)
    else:
        n_valid = max(1, int(len(ids) * HELD_OUT_SHARE))
        ids, valid_ids = ids[:-n_valid], ids[-n_valid:]
    if len(valid_ids) == 0:
        raise RnnlmError(f"{valid} has no tokens")
    windows = batchify(ids, vocab.boundary_id, config.batch, config.bptt)
    if windows is None:
        raise RnnlmError(
            f"{text} is too short for --batch {config.batch} x --bptt {config.bptt} "
            f"({len(ids)} training tokens)"
        )
    class_bounds = None
    if config.softmax == "class":
        n_classes = config.classes or round(np.sqrt(len(vocab)))
        class_bounds = frequency_classes(np.bincount(ids, minlength=len(vocab)), n_classes)
    model = Model.create(vocab, config.hidden, seed=config.seed, hparams=asdict(config), class_bounds=class_bounds)
    trainer = _Trainer(ops, model, config, windows)
    return trainer.run(model_path, valid_ids, on_window, on_epoch)


class _Trainer:
    """The state of one run: device parameters and gradients, window buffers, schedule."""

    def __init__(self, ops, model, config, windows):
        self.ops, self.model, self.config = ops, model, config
        self.params = step.to_device(ops, model.params)
        self.grads = step.zero_grads(ops, model.params)
        inputs, targets = windows
        self.tokens = [ops.asarray(inputs), ops.asarray(targets)]
        if model.class_bounds is not None:
            self.tokens.append(ops.asarray(word_classes(model.class_bounds)[targets]))
        self.n_windows = inputs.shape[0] // config.bptt
        self.window = step.Window(ops, config.bptt, config.batch, model.hidden, model.vocab_size,
                                  class_bounds=model.class_bounds)

    def run(self, model_path, valid_ids, on_window, on_epoch):
        config, model = self.config, self.model
        lr, halving, best = config.lr, False, math.inf
        records, saved, epoch = [], False, 0
        start = time.perf_counter()
        try:
            for epoch in range(1, config.epochs + 1):
                train_loss, tokens_per_s = self.epoch(lr, on_window)
                valid_nats = stream_loss(self.ops, self.params, valid_ids, model.vocab.boundary_id,
                                         model.class_bounds)
                valid_ppl = math.exp(valid_nats / len(valid_ids))
                record = {
                    "epoch": epoch, "train_loss": train_loss, "valid_perplexity": valid_ppl, "lr": lr,
                    "tokens_per_s": tokens_per_s, "elapsed_s": time.perf_counter() - start,
                }
                records.append(record)
                if on_epoch:
                    on_epoch(record)
                if valid_ppl < best:
                    self.pull_params()
                    model.save(model_path)
                    saved = True
                else:  # an epoch that made validation worse is rolled back
                    self.push_params()
                improved = math.log(best) - math.log(valid_ppl) >= MIN_IMPROVEMENT if best < math.inf else True
                best = min(best, valid_ppl)
                if not improved:
                    if halving:
                        break
                    halving = True
                if halving:
                    lr /= 2
        except KeyboardInterrupt:
            if not saved:
                self.pull_params()
                model.save(model_path)
            raise TrainingInterrupted(model_path, True, epoch) from None
        return records

    def epoch(self, lr, on_window):
        """One pass over the training windows; returns (mean train loss, tokens/s)."""
        ops, config, window = self.ops, self.config, self.window
        T, B = config.bptt, config.batch
        window.reset_state()
        total, start = 0.0, time.perf_counter()
        for w in range(self.n_windows):
            rows = slice(w * T, (w + 1) * T)
            loss = step.forward_backward(ops, self.params, self.grads, window, *(t[rows] for t in self.tokens))
            if not math.isfinite(loss):
                raise RnnlmError(f"training diverged (loss {loss}); try a lower --lr or a --clip")
            step.sgd_step(ops, self.params, self.grads, window, lr, clip=config.clip, l2=config.l2)
            window.carry_state()
            total += loss
            if on_window:
                mean = total / ((w + 1) * T * B)
                elapsed = time.perf_counter() - start
                on_window(w + 1, self.n_windows, {
                    "loss": mean, "perplexity": math.exp(mean), "tokens_per_s": (w + 1) * T * B / elapsed,
                })
        ops.synchronize()
        elapsed = time.perf_counter() - start
        n_tokens = self.n_windows * T * B
        return total / n_tokens, n_tokens / elapsed

    def pull_params(self):
        """Copy the device parameters into the model (the best so far)."""
        for name, array in self.params.items():
            self.model.params[name] = np.ascontiguousarray(self.ops.to_numpy(array), np.float32)

    def push_params(self):
        """Restore the device parameters from the model (roll back to the best so far)."""
        for name, array in self.model.params.items():
            self.ops.copy_into(array, self.params[name])
