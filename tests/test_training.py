"""Library-level training, evaluation and model-file tests on tiny texts (fast; the CPU backend, and the
CUDA one under the simulator where a test says so)."""

import importlib
import json
import math
import os
import stat
import time

import numpy as np
import pytest

import rnnlm
from rnnlm import distributed
from rnnlm.corpus import batchify, stream_pairs
from rnnlm.model import Model, param_shapes
from rnnlm.optim import OPTIMIZERS
from rnnlm.tokenizer import build_vocab

from .conftest import reference_perplexity

LINE = "a b c d e f g h\n"
SMALL = {"hidden": 16, "bptt": 10, "batch": 4}
PARAM_NAMES = ("W_x", "W_s", "b_s", "W_o", "b_o")  # the one-layer model with a full softmax


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def repetitive(tmp_path):
    return write(tmp_path / "rep.txt", LINE * 300)


def test_zero_weights_give_perplexity_v(tmp_path):
    text = write(tmp_path / "t.txt", "the cat sat on the mat\nthe dog ran\n" * 5 + "a new line\n")
    vocab = build_vocab(text)
    V = len(vocab)
    params = {name: np.zeros(shape, np.float32) for name, shape in param_shapes(V, 8).items()}
    result = rnnlm.perplexity(Model(params, vocab), text)
    assert result["perplexity"] == pytest.approx(V, rel=1e-6)
    assert result["bits_per_token"] == pytest.approx(math.log2(V), rel=1e-6)
    assert result["tokens"] == 5 * (6 + 1 + 3 + 1) + 4
    assert result["unk"] == 0


def test_training_on_a_repetitive_text_reaches_perplexity_near_one(tmp_path, repetitive):
    records = []
    returned = rnnlm.train(repetitive, tmp_path / "m.npz", config=rnnlm.TrainConfig(**SMALL, epochs=4),
                           on_epoch=records.append)
    assert returned == records
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
    assert {"epoch", "train_loss", "valid_perplexity", "lr", "tokens_per_s", "elapsed_s"} <= set(records[0])
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert math.exp(records[-1]["train_loss"]) < 1.1
    assert min(r["valid_perplexity"] for r in records) < 1.1
    model = rnnlm.load(tmp_path / "m.npz")
    assert rnnlm.perplexity(model, repetitive)["perplexity"] < 1.1
    assert model.hparams["hidden"] == 16 and model.hparams["bptt"] == 10


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_learns_a_repetitive_text_with_the_class_softmax(tmp_path, repetitive, optimizer):
    lr = {"sgd": 1.0}.get(optimizer, 0.01)
    config = rnnlm.TrainConfig(**SMALL, epochs=4, optimizer=optimizer, lr=lr, softmax="class", classes=3)
    records = rnnlm.train(repetitive, tmp_path / "m.npz", config=config)
    assert min(r["valid_perplexity"] for r in records) < 1.1


def test_untrained_model_is_far_from_one(tmp_path, repetitive):
    """The counterpart of the test above: a fresh model does not already know the text."""
    model = Model.create(build_vocab(repetitive), 16, seed=0)
    assert rnnlm.perplexity(model, repetitive)["perplexity"] > 3


@pytest.mark.parametrize("level", ["word", "char"])
def test_perplexity_matches_the_numpy_reference(tmp_path, level):
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "日本"]
    lines = [" ".join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(60)]
    text = write(tmp_path / "t.txt", "\n".join(lines) + "\n")
    # 60 lines of up to 8 words: more than one evaluation window (256) at both levels
    model = Model.create(build_vocab(text, level=level), 12, seed=3)
    model.params["b_s"][:] = rng.normal(0, 0.5, model.params["b_s"].shape)
    model.params["b_o"][:] = rng.normal(0, 0.5, model.params["b_o"].shape)
    got = rnnlm.perplexity(model, text)
    assert got["tokens"] > 256
    assert got["perplexity"] == pytest.approx(reference_perplexity(model, text), rel=1e-5)


def test_trained_model_perplexity_matches_the_numpy_reference(tmp_path, repetitive):
    other = write(tmp_path / "other.txt", "h g f e d c b a\na b c\n" * 20)
    rnnlm.train(repetitive, tmp_path / "m.npz", config=rnnlm.TrainConfig(**SMALL, epochs=2))
    model = rnnlm.load(tmp_path / "m.npz")
    for path in (repetitive, other):
        assert rnnlm.perplexity(model, path)["perplexity"] == pytest.approx(
            reference_perplexity(model, path), rel=1e-5)


def test_stream_pairs():
    ids = np.array([5, 6, 7, 8], np.uint16)
    inputs, targets = stream_pairs(ids, boundary_id=1)
    assert inputs.dtype == np.int32 and targets.dtype == np.int32
    assert inputs.tolist() == [1, 5, 6, 7]
    assert targets.tolist() == [5, 6, 7, 8]


def test_batchify_shapes_and_content():
    ids = np.arange(10, 10 + 50, dtype=np.uint32)  # N = 50
    B, T = 3, 4
    inputs, targets = batchify(ids, 0, B, T)
    steps = (50 // B) // T * T  # 16 of the 16 per stream; 2 tokens of the tail left out
    assert steps == 16
    assert inputs.shape == targets.shape == (steps, B)
    assert inputs.dtype == targets.dtype == np.int32
    assert inputs.flags.c_contiguous and targets.flags.c_contiguous
    stream_in, stream_out = stream_pairs(ids, 0)
    for b in range(B):  # stream b is the b-th contiguous piece of the one stream
        assert inputs[:, b].tolist() == stream_in[b * steps:(b + 1) * steps].tolist()
        assert targets[:, b].tolist() == stream_out[b * steps:(b + 1) * steps].tolist()
    assert inputs[0, 0] == 0  # the first stream starts from the boundary token
    # within a stream the next input is the current target
    assert (inputs[1:] == targets[:-1]).all()
    # a stream continues where the previous one ends
    assert (inputs[0, 1:] == targets[-1, :-1]).all()


def test_batchify_too_short_is_none():
    assert batchify(np.arange(11, dtype=np.uint8), 0, 3, 4) is None
    assert batchify(np.arange(12, dtype=np.uint8), 0, 3, 4)[0].shape == (4, 3)


def test_too_short_text_is_an_error(tmp_path):
    text = write(tmp_path / "t.txt", "a b\n")
    with pytest.raises(rnnlm.RnnlmError, match="too short"):
        rnnlm.train(text, tmp_path / "m.npz", config=rnnlm.TrainConfig(**SMALL))
    assert not (tmp_path / "m.npz").exists()


def test_model_file_round_trip(tmp_path):
    text = write(tmp_path / "t.txt", "Ünïcode 日本 words\nand more words 😀\n")
    vocab = build_vocab(text, lowercase=True)
    model = Model.create(vocab, 7, seed=5, hparams={"hidden": 7, "lr": 0.5})
    path = tmp_path / "sub" / "model.npz"
    model.save(path)
    loaded = rnnlm.load(path)
    assert set(loaded.params) == set(PARAM_NAMES)
    for name in PARAM_NAMES:
        assert loaded.params[name].dtype == np.float32
        np.testing.assert_array_equal(loaded.params[name], model.params[name])
    assert loaded.vocab.tokens == vocab.tokens
    assert loaded.vocab.level == "word" and loaded.vocab.lowercase is True
    assert loaded.hparams == {"hidden": 7, "lr": 0.5}
    assert loaded.hidden == 7 and loaded.vocab_size == len(vocab)
    assert [p.name for p in path.parent.iterdir()] == ["model.npz"]  # no temporary file left

    # the meta entry is readable with numpy and json alone
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == set(PARAM_NAMES) | {"meta"}
        meta = json.loads(str(npz["meta"]))
    assert meta["format_version"] == 1
    assert meta["level"] == "word"
    assert meta["lowercase"] is True
    assert meta["vocab"] == vocab.tokens
    assert "日本" in meta["vocab"]


def test_model_file_has_ordinary_permissions(tmp_path):
    """The atomic write goes through a private temporary file; the model must still get the mode any
    new file gets (0o666 less the umask), not the temporary file's 0o600."""
    vocab = build_vocab(write(tmp_path / "t.txt", "a b\n"))
    umask = os.umask(0o022)
    try:
        Model.create(vocab, 2).save(tmp_path / "m.npz")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.npz").stat().st_mode) == 0o644


def test_char_model_round_trip(tmp_path):
    text = write(tmp_path / "t.txt", "café 日本 😀\n")
    vocab = build_vocab(text, level="char")
    model = Model.create(vocab, 4, seed=0)
    model.save(tmp_path / "m.npz")
    loaded = rnnlm.load(tmp_path / "m.npz")
    assert loaded.vocab.level == "char" and loaded.vocab.tokens == vocab.tokens
    assert "😀" in loaded.vocab.tokens


def test_without_valid_the_last_five_percent_is_held_out(tmp_path):
    # 300 lines of 9 tokens: N = 2700, 5% = 135 tokens = the last 15 lines exactly. They run backwards
    # and are never trained on, so the model predicts them badly.
    head, tail = LINE * 285, "h g f e d c b a\n" * 15
    text = write(tmp_path / "t.txt", head + tail)
    tail_file = write(tmp_path / "tail.txt", tail)
    windows, records = [], []
    config = rnnlm.TrainConfig(**SMALL, epochs=3)
    rnnlm.train(text, tmp_path / "m.npz", config=config, on_epoch=records.append,
                on_window=lambda done, total, stats: windows.append(total))
    assert set(windows) == {((2700 - 135) // 4) // 10}  # 64 windows; with the tail it would be 67
    model = rnnlm.load(tmp_path / "m.npz")
    best = min(r["valid_perplexity"] for r in records)
    assert rnnlm.perplexity(model, tail_file)["perplexity"] == pytest.approx(best, rel=1e-6)
    assert best > 5
    assert rnnlm.perplexity(model, write(tmp_path / "head.txt", LINE * 20))["perplexity"] < 1.5


def test_with_valid_the_whole_text_is_trained_on(tmp_path, repetitive):
    valid = write(tmp_path / "v.txt", "h g f e d c b a\n" * 15)
    windows, records = [], []
    rnnlm.train(repetitive, tmp_path / "m.npz", valid=valid, config=rnnlm.TrainConfig(**SMALL, epochs=2),
                on_epoch=records.append, on_window=lambda done, total, stats: windows.append(total))
    assert set(windows) == {(2700 // 4) // 10}
    model = rnnlm.load(tmp_path / "m.npz")
    best = min(r["valid_perplexity"] for r in records)
    assert rnnlm.perplexity(model, valid)["perplexity"] == pytest.approx(best, rel=1e-6)


def test_a_valid_text_of_unknown_words_alone_is_refused_before_training(tmp_path, repetitive):
    valid = write(tmp_path / "v.txt", "zebra yak\nquux\n")
    with pytest.raises(rnnlm.RnnlmError, match="every word of .* outside the training text's vocabulary"):
        rnnlm.train(repetitive, tmp_path / "m.npz", valid=valid, config=rnnlm.TrainConfig(**SMALL, epochs=1))
    assert not (tmp_path / "m.npz").exists()


def test_on_window_reports_progress(tmp_path, repetitive):
    """Every window once, in order; the running mean loss ends at the epoch's train loss, and the speed
    counts the tokens done over at most the run's wall time."""
    calls = []
    started = time.perf_counter()
    records = rnnlm.train(repetitive, tmp_path / "m.npz", config=rnnlm.TrainConfig(**SMALL, epochs=1),
                          on_window=lambda done, total, stats: calls.append((done, total, stats)))
    wall = time.perf_counter() - started
    assert [c[0] for c in calls] == list(range(1, calls[0][1] + 1))
    for done, _, stats in calls:
        assert set(stats) == {"loss", "perplexity", "tokens_per_s"}
        assert stats["perplexity"] == pytest.approx(math.exp(stats["loss"]))
        assert stats["tokens_per_s"] >= done * SMALL["bptt"] * SMALL["batch"] / wall
    assert calls[-1][2]["loss"] == pytest.approx(records[-1]["train_loss"], rel=1e-12)


def test_invalid_settings_raise_before_writing(tmp_path, repetitive):
    for bad in ({"hidden": 0}, {"bptt": 0}, {"batch": 0}, {"lr": 0.0}, {"clip": -1.0}, {"epochs": 0}):
        with pytest.raises(rnnlm.RnnlmError, match="--"):
            rnnlm.train(repetitive, tmp_path / "m.npz", config=rnnlm.TrainConfig(**{**SMALL, **bad}))
    assert not (tmp_path / "m.npz").exists()


def test_same_seed_same_model_file_byte_for_byte(tmp_path, repetitive):
    """Two runs with one seed (and one thread count) write the same bytes; another seed, another model."""
    config = dict(**SMALL, epochs=1, dropout=0.1)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        rnnlm.train(repetitive, tmp_path / f"{name}.npz", config=rnnlm.TrainConfig(**config, seed=seed))
    a, b, c = ((tmp_path / f"{x}.npz").read_bytes() for x in "abc")
    assert a == b
    assert not np.allclose(rnnlm.load(tmp_path / "a.npz").params["W_o"], rnnlm.load(tmp_path / "c.npz").params["W_o"])


@pytest.mark.parametrize("init", ["identity", "orthogonal"])
def test_init_sets_the_recurrent_weights_training_starts_from(tmp_path, repetitive, init):
    """At a learning rate too small to move them, the trained W_s is the initial one: 0.9 I, or orthogonal."""
    config = rnnlm.TrainConfig(**SMALL, epochs=1, lr=1e-9, init=init)
    rnnlm.train(repetitive, tmp_path / "m.npz", config=config)
    W_s = rnnlm.load(tmp_path / "m.npz").params["W_s"]
    if init == "identity":
        np.testing.assert_allclose(W_s, 0.9 * np.eye(16), atol=1e-6)
    else:
        np.testing.assert_allclose(W_s @ W_s.T, np.eye(16), atol=1e-5)


def test_zero_init_stays_a_unigram_model(tmp_path, repetitive):
    """With every weight zero the state is tanh(0) = 0 and no weight gets a gradient: only b_o learns (a
    unigram model), which predicts the repetitive text far worse than the fan-in init's model."""
    perplexities = {}
    for init in ("zero", "fanin"):
        rnnlm.train(repetitive, tmp_path / f"{init}.npz", config=rnnlm.TrainConfig(**SMALL, epochs=2, init=init))
        model = rnnlm.load(tmp_path / f"{init}.npz")
        perplexities[init] = rnnlm.perplexity(model, repetitive)["perplexity"]
        if init == "zero":
            assert not any(model.params[name].any() for name in ("W_x", "W_s", "W_o", "b_s"))
            assert model.params["b_o"].any()
    assert perplexities["zero"] > 5 > 1.5 > perplexities["fanin"]


def test_time_budget_stops_the_run_after_the_window_that_spends_it(tmp_path, repetitive):
    """A budget spent by the first window: one window, one (partial) epoch of five, and a model file."""
    windows = []
    records = rnnlm.train(repetitive, tmp_path / "m.npz", config=rnnlm.TrainConfig(**SMALL, epochs=5),
                          options=rnnlm.RunOptions(time_budget=1e-9),
                          on_window=lambda done, total, stats: windows.append(done))
    assert windows == [1]
    assert [r["epoch"] for r in records] == [1]
    assert rnnlm.load(tmp_path / "m.npz").hidden == SMALL["hidden"]


def test_divergence_rolls_back_halves_the_rate_and_gives_up_with_a_message(tmp_path, repetitive):
    config = rnnlm.TrainConfig(hidden=16, bptt=5, batch=4, lr=1e5, clip=0.0, epochs=2)
    model = tmp_path / "model.npz"
    with pytest.raises(rnnlm.RnnlmError, match="diverged 4 times") as error:
        rnnlm.train(repetitive, model, config=config)
    assert str(model) in str(error.value)
    events = [json.loads(line) for line in model.with_suffix(".log.jsonl").read_text().splitlines()]
    rates = [e["lr"] for e in events if e.get("event") == "diverged"]
    # each divergence halves the rate it finds (schedule.Guard), which was coming back toward 1e5 in between
    assert len(rates) == 3 and rates[0] == 1e5 / 2
    assert all(earlier / 2 <= later < earlier for earlier, later in zip(rates, rates[1:], strict=False))


def test_a_validation_that_diverges_once_the_budget_is_spent_ends_the_run_with_one_error(tmp_path, repetitive,
                                                                                       monkeypatch):
    """No time is left to train again from the epoch's start: the run stops and says what it keeps, instead of
    writing the epoch's start (the first epoch's: the initial weights) as its model."""
    train_module = importlib.import_module("rnnlm.train")
    monkeypatch.setattr(train_module, "stream_loss", lambda ops, params, ids, *rest: 1e3 * len(ids))
    config = rnnlm.TrainConfig(hidden=16, bptt=5, batch=4, epochs=2)
    model = tmp_path / "model.npz"
    with pytest.raises(rnnlm.RnnlmError, match="diverged at the end of its --time-budget") as error:
        rnnlm.train(repetitive, model, config=config, options=rnnlm.RunOptions(time_budget=1e-9))
    assert f"no model was written to {model}" in str(error.value) and not model.exists()


@pytest.mark.parametrize("schedule", ["mikolov", "plateau"])
def test_schedules_halve_the_rate_after_a_stall(tmp_path, repetitive, schedule):
    """Training text the model learns in one epoch: validation stalls, so the rate must go down."""
    config = rnnlm.TrainConfig(hidden=16, bptt=5, batch=4, lr=0.5, epochs=8, schedule=schedule)
    records = rnnlm.train(repetitive, tmp_path / "model.npz", valid=repetitive, config=config)
    rates = [r["lr"] for r in records]
    assert rates[0] == 0.5 and min(rates) < 0.5
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:], strict=False))
    assert len(records) < 8  # and it stopped on its own


def test_cosine_schedule_anneals_to_zero_over_the_epochs(tmp_path, repetitive):
    """No stall stops or halves it: the rate at the end of epoch e is lr · (1 + cos(π e / epochs)) / 2."""
    config = rnnlm.TrainConfig(hidden=16, bptt=5, batch=4, lr=0.5, epochs=4, schedule="cosine")
    records = rnnlm.train(repetitive, tmp_path / "model.npz", valid=repetitive, config=config)
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(1, 5)]
    assert [r["lr"] for r in records] == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("softmax", ["full", "class"])
def test_a_short_run_on_the_cuda_backend_gives_the_cpus_losses(tmp_path, softmax):
    """Two epochs through the whole training loop (Adam, dropout, two layers, validation, checkpoints) on
    the CUDA backend (the simulator in CI) and on the CPU: the same losses and the same model, to float32
    tolerance."""
    text = write(tmp_path / "t.txt", "the cat sat on the mat\nthe dog ran\na cat ran on\n" * 6)
    config = rnnlm.TrainConfig(hidden=8, layers=2, dropout=0.2, bptt=4, batch=3, epochs=2, optimizer="adam",
                               lr=0.01, softmax=softmax, classes=3)
    runs = {}
    for device in ("cpu", "cuda"):
        records = rnnlm.train(text, tmp_path / f"{device}.npz", config=config, options=rnnlm.RunOptions(device=device))
        runs[device] = records, rnnlm.load(tmp_path / f"{device}.npz")
    (cpu_records, cpu_model), (gpu_records, gpu_model) = runs["cpu"], runs["cuda"]
    for key in ("train_loss", "valid_perplexity"):
        np.testing.assert_allclose([r[key] for r in gpu_records], [r[key] for r in cpu_records], rtol=1e-5)
    for name, array in cpu_model.params.items():
        np.testing.assert_allclose(gpu_model.params[name], array, rtol=1e-4, atol=1e-6, err_msg=name)


class _KeepsCopies(distributed.Single):
    """One process that keeps the epoch's start in memory, as an MPI rank that writes no checkpoint does."""

    is_writer = False


def _spy_snapshots(monkeypatch):
    """Record, for every snapshot(copy=True) (an epoch's start in memory), whether its parameters are the best
    model's own arrays, and for every snapshot(copy=False) (a checkpoint), whether it holds the live arrays."""
    from rnnlm.train import Trainer

    starts, checkpoints = [], []
    snapshot = Trainer.snapshot

    def spy(self, copy=True):
        params, (moments, scalars) = result = snapshot(self, copy)
        if copy:
            starts.append(all(params[name] is self.model.params[name] for name in self.trainable))
        else:
            checkpoints.append(all(params[name] is self.params[name] for name in self.trainable)
                               and moments["moment1/W_o"] is self.optimizer.moment1["W_o"])
        return result

    monkeypatch.setattr(Trainer, "snapshot", spy)
    return starts, checkpoints


def test_the_epochs_start_is_kept_in_the_checkpoint_not_in_memory(tmp_path, repetitive, monkeypatch):
    """A process that writes the checkpoint keeps no copy of the parameters or moments: the best model and the
    epoch's start are the checkpoint's members; a checkpoint is written from the live arrays. A rank that writes
    none keeps the epoch's start in memory, where a parameter equal to the best model's is that array itself (at
    a fresh run's start and after an epoch that improved)."""
    from rnnlm import stored
    from rnnlm.train import Trainer

    config = rnnlm.TrainConfig(**SMALL, epochs=2, optimizer="lazyadam", softmax="class", classes=3, tied=True)
    starts, checkpoints = _spy_snapshots(monkeypatch)
    kept = []
    write = Trainer.write_checkpoint

    def spy(self):
        write(self)
        kept.extend(type(array) for group in (self.model.params, self.epoch_start[0], self.epoch_start[1][0])
                    for array in group.values())

    monkeypatch.setattr(Trainer, "write_checkpoint", spy)
    rnnlm.train(repetitive, tmp_path / "m.npz", config=config)
    assert starts == [] and checkpoints and all(checkpoints)
    assert kept and set(kept) == {stored.StoredArray}
    monkeypatch.setattr(distributed, "world", _KeepsCopies)
    rnnlm.train(repetitive, tmp_path / "copies.npz", config=config)
    assert starts == [True, True]


@pytest.mark.parametrize("tied", [False, True])
def test_a_rollback_from_the_checkpoint_is_bit_identical_to_one_from_memory(tmp_path, repetitive, monkeypatch,
                                                                            tied):
    """A divergence in the second epoch restores the epoch's start, weights and Adam's moments, and a worse
    validation at its end the best model: read back from the checkpoint on disk, or from copies in memory, the
    run ends with the same bytes."""
    from rnnlm import step, stored

    train_module = importlib.import_module("rnnlm.train")  # rnnlm.train is also the function
    stream_loss = train_module.stream_loss

    def worse_second(*args, calls=[]):  # noqa: B006  (the calls so far, over both runs)
        calls.append(1)
        return stream_loss(*args) + (len(args[2]) if len(calls) % 3 == 2 else 0)  # a nat a token more

    monkeypatch.setattr(train_module, "stream_loss", worse_second)

    n_windows = (len(LINE.split()) + 1) * 300 // SMALL["batch"] // SMALL["bptt"]
    config = rnnlm.TrainConfig(**SMALL, epochs=3, optimizer="lazyadam", softmax="class", classes=3, tied=tied)
    reads = []
    read = stored.StoredArray.read
    monkeypatch.setattr(stored.StoredArray, "read", lambda self, store: reads.append(self.name) or read(self, store))
    real = step.forward_backward
    for name in ("disk", "memory"):
        def forward_backward(*args, calls=[]):  # noqa: B006  (one list per run: the calls so far)
            loss = real(*args)
            calls.append(1)
            return math.nan if len(calls) == n_windows + 5 else loss

        monkeypatch.setattr(step, "forward_backward", forward_backward)
        if name == "memory":
            reads.clear()
            monkeypatch.setattr(distributed, "world", _KeepsCopies)
        records = rnnlm.train(repetitive, tmp_path / f"{name}.npz", config=config)
        assert len(records) == 3
        restored = [n for n in reads if "optimizer/moment1/" in n]
        assert bool(restored) == (name == "disk")
    assert (tmp_path / "disk.npz").read_bytes() == (tmp_path / "memory.npz").read_bytes()
    events = [json.loads(line) for line in (tmp_path / "disk.log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e.get("event") == "diverged"] == [2]
    perplexities = [e["valid_perplexity"] for e in events if e.get("valid_perplexity")]
    assert perplexities[1] > perplexities[0] > perplexities[2]  # epoch 2 rolled back, epoch 3 improved
