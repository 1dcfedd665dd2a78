"""Training: B parallel streams, truncated BPTT over windows of T steps, SGD or Adam with a schedule.

The hidden state is carried from one window to the next (not through gradients) and reset at each
epoch. After every epoch the model is evaluated on the validation text; the best one is kept and
written to the model file. Schedules (objects in ``rnnlm.schedule``): ``mikolov`` (SGD's default) halves
the learning rate once the validation perplexity improves by less than 0.3%, rolls back an epoch that
made it worse, and stops when it stalls again; ``plateau`` (Adam's default) rolls back and halves the
rate on every such stall and stops after three; ``cosine`` lowers the rate after every window along half
a cosine, from lr to 0 at the end of the last epoch or of the time budget, whichever comes first (a run
with a time budget then depends on the clock, and so is not reproducible to the bit). Within an epoch
the rate is warmed up over the run's first ``warmup`` windows and cut for a while after a divergence.

Checkpoints (at the run's start, every epoch end, every ``checkpoint_every`` minutes, and on SIGINT/SIGTERM)
hold everything the run needs to continue — weights, the best weights, optimizer state, schedule, data
cursor, carried state (``rnnlm.checkpoint`` writes and reads them; the schedule and cursor are a
``rnnlm.state.TrainState``) — so that ``resume`` ends with a model file byte-identical to an uninterrupted
run's (same thread count). The best weights and the epoch's start are kept there, not in memory
(``rnnlm.checkpointing``). A training log of JSON lines is written beside the model.
"""

import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnlm import adapt, distributed, runplan, schedule, step
from rnnlm._env import set_threads
from rnnlm.backends import get_backend
from rnnlm.checkpoint import check_cursor, read_checkpoint, saved_run
from rnnlm.checkpointing import Checkpoints
from rnnlm.corpus import Windows
from rnnlm.errors import RnnlmError
from rnnlm.evaluate import diverged, perplexity_of, stream_loss
from rnnlm.model import DEFAULT_DIRECT_ORDER, INITS, SOFTMAXES, check_output_layer, word_classes
from rnnlm.optim import MOMENTS, OPTIMIZERS, make_optimizer
from rnnlm.paths import atomic_output, naming_errors
from rnnlm.state import TrainState
from rnnlm.stored import in_memory

MAX_DIVERGENCES = 3
LOGS_PER_EPOCH = 10
SCHEDULES = tuple(schedule.SCHEDULES)


@dataclass
class TrainConfig:
    """The settings that define a model and its training; stored in the model file's meta."""

    level: str = "word"
    min_count: int = 1
    max_vocab: int | None = None
    lowercase: bool = False
    hidden: int = 200
    layers: int = 1
    dropout: float = 0.0
    tied: bool = False
    bptt: int = 20
    batch: int = 20
    optimizer: str = "sgd"
    moments: str = "float32"
    schedule: str | None = None
    lr: float | None = None
    epochs: int = 20
    clip: float = 1.0
    l2: float = 0.0
    init: str = "fanin"
    softmax: str = "full"
    classes: int | None = None
    seed: int = 0
    warmup: int = 0
    direct: int = 0
    direct_order: int = DEFAULT_DIRECT_ORDER
    direct_lr: float = 1.0

    def __post_init__(self):
        if self.schedule is None:
            self.schedule = "mikolov" if self.optimizer == "sgd" else "plateau"
        if self.lr is None:
            self.lr = 1.0 if self.optimizer == "sgd" else 0.002

    def check(self):
        """RnnlmError naming the first setting out of range (NaN and infinities included)."""
        for name in ("hidden", "layers", "bptt", "batch", "epochs", "min_count", "seed", "max_vocab", "classes",
                     "warmup"):
            least = {"seed": 0, "max_vocab": 2, "warmup": 0}.get(name, 1)
            if getattr(self, name) is not None or name not in ("max_vocab", "classes"):
                _check_number(name, getattr(self, name), least, integer=True)
        for name, allowed in (("optimizer", OPTIMIZERS), ("moments", MOMENTS), ("schedule", SCHEDULES),
                              ("init", INITS), ("softmax", SOFTMAXES), ("level", ("word", "char"))):
            if getattr(self, name) not in allowed:
                raise RnnlmError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.moments != "float32" and self.optimizer == "sgd":
            raise RnnlmError(f"--moments {self.moments} is Adam's: sgd keeps no moments")
        _check_number("lr", self.lr, 0, above=True)
        _check_number("clip", self.clip, 0)
        _check_number("l2", self.l2, 0)
        _check_number("dropout", self.dropout, 0, below=1)
        _check_number("direct", self.direct, 0, integer=True)
        _check_number("direct_order", self.direct_order, 1, integer=True)
        _check_number("direct_lr", self.direct_lr, 0, above=True)
        check_output_layer(self.softmax, self.tied, self.direct, self.direct_order)


def _check_number(name, value, least, below=math.inf, integer=False, above=False):
    """RnnlmError unless ``value`` is a number (an int if ``integer``) from ``least`` (or above it) to below
    ``below``: written ``not`` of a comparison, so that NaN fails too."""
    kind = int if integer else int | float
    if not (isinstance(value, kind) and not isinstance(value, bool) and (value > least if above else value >= least)
            and value < below):
        bound = f"above {least}" if above else f"at least {least}"
        limit = f" and below {below}" if below < math.inf else ""
        raise RnnlmError(f"--{name.replace('_', '-')} must be {'an integer' if integer else 'a finite number'} "
                         f"{bound}{limit}, got {value!r}")


@dataclass
class RunOptions:
    """How a run is carried out, without effect on the model it produces (given the same threads)."""

    device: str = "cpu"
    threads: int | None = None
    checkpoint: str | None = None
    checkpoint_every: float | None = None
    time_budget: float | None = None
    log: str | None = None

    def check(self):
        if self.threads is not None:
            _check_number("threads", self.threads, 1, integer=True)
        for name in ("checkpoint_every", "time_budget"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), 0, above=True)


class TrainingInterrupted(Exception):  # noqa: N818  (an outcome, not an error)
    """SIGINT or SIGTERM during training: a checkpoint was written to ``checkpoint``.

    needs: the paths a resume must be given on its command line, by option ("TEXT", "--valid", "-o",
    "--log"): those outside the checkpoint's folder, which ``resume`` does not take from the checkpoint.
    """

    def __init__(self, paths, epoch):
        super().__init__(f"training interrupted in epoch {epoch}")
        self.model_path, self.checkpoint, self.epoch = paths["model"], paths["checkpoint"], epoch
        self.needs = runplan.resume_needs(paths)


def train(text, model_path, valid=None, config=None, options=None, on_window=None, on_epoch=None, init_from=None,
          on_init=None):
    """Train a model on ``text`` (a text file or token directory) and write the best one to model_path.

    valid: validation text or token directory; without it the last 5% of ``text`` is held out.
    on_window(done, total, stats) is called after every window with stats {"loss", "perplexity",
    "tokens_per_s"} of the epoch so far; on_epoch(record) after every epoch with {"epoch",
    "tokens_seen", "train_loss", "valid_perplexity", "lr", "tokens_per_s", "elapsed_s"}.
    Every path is checked before any work (see ``rnnlm.paths``). Returns the list of epoch records.
    init_from: a model file to adapt (``rnnlm.adapt``: its vocabulary, architecture and weights replace
    config's; config.level None means the model's); on_init(record) is then called with the log's
    opening record {"event": "init_from", "model", "tokens", "oov"}.
    Raises TrainingInterrupted on SIGINT/SIGTERM.
    """
    source, config = adapt.load_source(init_from, config or TrainConfig())
    options = options or RunOptions()
    config.check()
    options.check()
    checkpoint, log = runplan.default_paths(model_path, options)
    paths = {"text": text, "valid": valid, "model": Path(model_path), "checkpoint": checkpoint, "log": log,
             "init_from": init_from}
    runplan.check_run_paths(paths, options)
    set_threads(options.threads)
    ops = get_backend(options.device)
    train_ids, valid_ids, vocab, unknown = runplan.load_data(text, valid, config, source and source.vocab)
    runplan.check_memory(config, len(vocab))
    model = runplan.initial_model(config, vocab, train_ids, source)
    trainer = Trainer(ops, model, config, options, train_ids, valid_ids, paths, distributed.world())
    trainer.start_log()
    if source is not None:
        adapt.announce(trainer.log, init_from, len(train_ids) + (valid is None) * len(valid_ids), unknown, on_init)
    return trainer.run(on_window, on_epoch)


def resume(checkpoint, options=None, on_window=None, on_epoch=None, text=None, valid=None, model_path=None,
           epochs=None, on_start=None):
    """Continue the run that wrote ``checkpoint``; ends as the uninterrupted run would have.

    The checkpoint's paths are read relative to its folder and used only inside it; text, valid,
    model_path and options.log name the files explicitly (required for those the checkpoint places
    elsewhere). options: device, threads, cadence and time budget may change (another thread count can
    change the float sums, and so the bytes of the result); epochs: a new number of epochs.
    on_start(paths) is called with the paths the run reads and writes ({"text", "valid", "model",
    "checkpoint", "log"}) once they are checked.
    """
    arrays, meta = read_checkpoint(checkpoint, stored=("params/", "optimizer/", "epoch_start/", "best/"))
    config = TrainConfig(**meta["config"])
    if epochs is not None:
        config.epochs = epochs
    options = options or RunOptions()
    saved = RunOptions(**meta["options"])
    for name in ("device", "threads", "checkpoint_every", "time_budget"):
        if getattr(options, name) is None:
            setattr(options, name, getattr(saved, name))
    config.check()
    options.check()
    paths = runplan.resume_paths(checkpoint, meta, options, text, valid, model_path)
    runplan.check_run_paths(paths, options, resumed=checkpoint)
    runplan.check_memory(config, len(meta["vocab"]))
    if on_start:
        on_start(paths)
    set_threads(options.threads)
    ops = get_backend(options.device)
    fixed = runplan.resumed_vocab(meta, config, checkpoint)
    train_ids, valid_ids, vocab, _ = runplan.load_data(paths["text"], paths["valid"], config, fixed)
    if vocab.tokens != meta["vocab"]:
        raise RnnlmError(f"{paths['text']} is not the text of {checkpoint} (its vocabulary differs)")
    best = {name: in_memory(array) for name, array in arrays.items()  # tied, W_x is W_o's transpose
            if name.startswith("best/") and not (config.tied and name == "best/W_x")
            or name in ("class_bounds", "hs_counts")}
    model = runplan.resumed_model(best, vocab, config)
    del best  # its arrays are the model's, which the writing rank replaces by stored ones (rnnlm.checkpointing)
    trainer = Trainer(ops, model, config, options, train_ids, valid_ids, paths, distributed.world())
    check_cursor(meta, trainer.n_windows, checkpoint)
    trainer.restore(saved_run(arrays, meta))
    return trainer.run(on_window, on_epoch)


class _Signals:
    """Turns SIGINT and SIGTERM into a flag checked between windows (main thread only)."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer(Checkpoints):
    """The state of one run: device parameters and gradients, optimizer, windows, schedule, cursor (its host
    side, the best model, the epoch's start and checkpoints: ``rnnlm.checkpointing``)."""

    def __init__(self, ops, model, config, options, train_ids, valid_ids, paths, reducer=distributed.SINGLE):
        self.ops, self.model, self.config, self.options = ops, model, config, options
        self.valid_ids, self.paths, self.reducer = valid_ids, paths, reducer  # reducer: see rnnlm.distributed
        self.checkpoint_path, self.log_path = paths["checkpoint"], paths["log"]
        classes = None if model.class_bounds is None else word_classes(model.class_bounds)
        streams = reducer.streams(np.arange(config.batch), axis=0)  # this rank's streams
        self.windows = Windows(train_ids, model.vocab.boundary_id, config.batch, config.bptt, classes, streams)
        if self.windows.n_windows == 0:
            raise RnnlmError(f"{paths['text']} is too short for --batch {config.batch} x --bptt {config.bptt} "
                             f"({len(train_ids)} training tokens)")
        self.n_windows = self.windows.n_windows
        if config.direct and reducer is not distributed.SINGLE:
            raise RnnlmError("--direct does not run under MPI: its table's sparse steps are not shared between "
                             "processes")
        self.params = step.to_device(ops, model.params, model.tied)
        self.window = step.Window(ops, config.bptt, len(streams), model.hidden, model.vocab_size,
                                  dropout=config.dropout, **model.structure)
        self.grads = step.zero_grads(ops, model.params, model.tied)
        trainable = step.trainable(self.params, self.window)
        self.trainable = list(trainable)
        self.optimizer = make_optimizer(config.optimizer, ops, trainable, clip=config.clip, l2=config.l2,
                                        direct_scale=config.direct_lr / config.lr, moments=config.moments)
        self.rng = reducer.mask_rng(np.random.default_rng(config.seed + 1), config.batch)  # dropout masks
        self.state = TrainState(lr=config.lr)
        self.schedule = self.epoch_schedule()
        self.warmup = schedule.Warmup(config.warmup)
        self.guard = schedule.Guard(min(self.n_windows, schedule.RECOVERY_WINDOWS))
        self.clock = time.perf_counter()  # the run's start (less its time before a resume: set by run)

    def epoch_schedule(self):
        """The config's epoch-level schedule (``rnnlm.schedule``)."""
        config, budget = self.config, self.options.time_budget
        if config.schedule != "cosine":
            return schedule.SCHEDULES[config.schedule]()
        budget_fraction = None if budget is None else (
            lambda: self.reducer.agree(time.perf_counter() - self.clock) / (budget * 60))
        return schedule.Cosine(config.epochs * self.n_windows * config.bptt * config.batch, budget_fraction)

    # ------------------------------------------------------------------ run

    def run(self, on_window, on_epoch):
        state, config = self.state, self.config
        self.clock = time.perf_counter() - state.elapsed_s
        self.last_checkpoint = time.perf_counter()
        with _Signals() as signals:
            self.signals = signals
            while state.epoch <= config.epochs:
                if state.window == 0:
                    self.window.reset_state()
                    self.mark_epoch_start()
                tokens_per_s = self.train_epoch(on_window)
                if tokens_per_s is None:  # a signal: checkpoint written
                    if state.best is None:  # no epoch has ended yet: keep what there is as the model
                        self.pull_params()
                        self.save_model()
                    raise TrainingInterrupted(self.paths, state.epoch)
                stop = self.end_epoch(on_epoch, tokens_per_s)
                self.write_checkpoint()
                if stop:
                    break
        return [r for r in state.records if r.get("valid_perplexity") is not None]

    def train_epoch(self, on_window):
        """Train from the cursor to the epoch's end (or the time budget); the tokens per second of this
        stretch, None if a signal stopped it."""
        ops, state, config, window = self.ops, self.state, self.config, self.window
        T, B = config.bptt, config.batch
        log_every = max(1, self.n_windows // LOGS_PER_EPOCH)
        start, first = time.perf_counter(), state.window
        while state.window < self.n_windows:
            if config.dropout:
                window.draw_masks(self.rng)
            tokens = map(ops.asarray, self.windows.window(state.window))  # inputs, targets (, classes)
            if window.direct:
                window.direct.set_history(self.windows.history(state.window, window.direct.before))
            loss = step.forward_backward(ops, self.params, self.grads, window, *tokens)
            loss = self.reducer.reduce(ops, self.grads, window, loss)
            self.optimizer.update(self.params, self.grads, window, self.current_lr())
            self.checkpoint_is_now = False
            loss = float(loss)  # the whole step is queued before the host waits for the device
            if diverged(loss / (T * B), self.model.vocab_size):  # the rollback undoes this step's update too
                self.recover_from_divergence(loss / (T * B))
                start, first = time.perf_counter(), 0
                continue
            window.carry_state()
            state.window += 1
            state.epoch_loss += loss
            state.tokens_seen += T * B
            done = state.window
            if on_window:
                mean = state.epoch_loss / (done * T * B)
                speed = (done - first) * T * B / (time.perf_counter() - start)
                on_window(done, self.n_windows,
                          {"loss": mean, "perplexity": perplexity_of(mean), "tokens_per_s": speed})
            if done % log_every == 0 and done < self.n_windows:
                self.log({"train_loss": state.epoch_loss / (done * T * B), "valid_perplexity": None})
            if self.reducer.any(self.signals.received is not None):
                self.write_checkpoint()
                return None
            every = self.options.checkpoint_every
            if every and self.reducer.agree(time.perf_counter() - self.last_checkpoint >= every * 60):
                self.write_checkpoint()
            if self.over_budget():
                break
        ops.synchronize()
        return (state.window - first) * T * B / max(time.perf_counter() - start, 1e-9)

    def current_lr(self):
        """The learning rate of the next window: the epoch's rate, warmed up, cut by the divergence guard
        and shaped by the schedule within the epoch (``rnnlm.schedule``)."""
        state = self.state
        k = state.tokens_seen // (self.config.bptt * self.config.batch)
        return state.lr * self.warmup.factor(k) * self.guard.factor(state, k) * self.schedule.factor(state)

    def over_budget(self):
        budget = self.options.time_budget
        return budget is not None and self.reducer.agree(time.perf_counter() - self.clock >= budget * 60)

    def end_epoch(self, on_epoch, tokens_per_s):
        """Validate, keep the best model, apply the schedule; True when training should stop."""
        state, model, config = self.state, self.model, self.config
        nats = stream_loss(self.ops, self.params, self.valid_ids, model.vocab.boundary_id, model.structure)
        valid_loss = self.reducer.agree(nats) / len(self.valid_ids)  # rank 0's: every rank takes the same path
        if diverged(valid_loss, model.vocab_size):
            if self.over_budget():  # no time left to train again from the epoch's start
                raise RnnlmError(f"training diverged at the end of its --time-budget (validation loss "
                                 f"{valid_loss:.3g} nats/token); {self.kept()}; try a longer --time-budget or a "
                                 f"lower --lr")
            self.recover_from_divergence(valid_loss)
            return False
        valid_ppl = perplexity_of(valid_loss)
        done = max(state.window, 1)
        record = self.log({"train_loss": state.epoch_loss / (done * config.bptt * config.batch),
                           "valid_perplexity": valid_ppl, "tokens_per_s": tokens_per_s})
        if on_epoch:
            on_epoch(record)
        improved = schedule.improved(state.best, valid_ppl)
        if state.best is None or valid_ppl < state.best:
            self.pull_params()
            self.save_model()
            state.best = valid_ppl
        elif self.schedule.rolls_back:  # an epoch that made validation worse
            self.push_params()
        ended = self.schedule.end_epoch(state, improved)
        stop = ended or self.over_budget() or state.epoch >= config.epochs
        state.epoch, state.window, state.epoch_loss = (config.epochs if ended else state.epoch) + 1, 0, 0.0
        return stop

    def recover_from_divergence(self, loss):
        """Roll back to the epoch's start with half the learning rate for a while (``schedule.Guard``); give up
        after a few times."""
        state = self.state
        state.divergences += 1
        if state.divergences > MAX_DIVERGENCES:
            raise RnnlmError(f"training diverged {MAX_DIVERGENCES + 1} times (loss {loss:.3g} nats/token); "
                             f"{self.kept()}; try {'a lower --direct-lr, ' if self.config.direct else ''}a lower --lr "
                             f"or a --clip above 0")
        self.restore_snapshot(self.epoch_start)
        self.guard.diverged(state, state.tokens_seen // (self.config.bptt * self.config.batch))
        state.window, state.epoch_loss = 0, 0.0
        self.window.reset_state()
        # the diverged window's sparse gradients were never applied: clear them and their slots
        self.grads = step.zero_grads(self.ops, self.params, self.model.tied)
        self.window.clear_slots()
        self.log({"event": "diverged", "loss": loss})  # with the rate of the next window

    def kept(self):
        """What a run that gives up leaves: the best model so far, or none."""
        model = self.paths["model"]
        if self.state.best is not None:
            return f"the best model so far is in {model}"
        return f"no model was written to {model}"

    def log(self, fields_):
        """Append a record to the training log (and the checkpointed history); returns it. A NaN or
        infinite number (a diverged loss) is written as null: JSON has no such numbers."""
        state = self.state
        record = {"epoch": state.epoch, "tokens_seen": state.tokens_seen, "lr": self.current_lr(), **fields_,
                  "elapsed_s": time.perf_counter() - self.clock}
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        state.records.append(record)
        if self.reducer.is_writer:
            with naming_errors(self.log_path), open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        return record

    def start_log(self):
        """Write the log afresh: the records of the run so far (none for a new run)."""
        if self.reducer.is_writer:
            with atomic_output(self.log_path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in self.state.records)

    def save_model(self):
        self.reducer.on_writer(self.model.save, self.paths["model"])
