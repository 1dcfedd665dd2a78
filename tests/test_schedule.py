"""Rates within an epoch (rnnlm.schedule): the linear warm-up, the divergence guard's cut that comes back,
and both carried through a checkpoint."""

import json
import math
import signal

import numpy as np
import pytest

import rnnlm
from rnnlm import schedule, step
from rnnlm.state import TrainState

LINE = "a b c d e f g h\n"
T, B = 10, 4
SMALL = {"hidden": 16, "bptt": T, "batch": B}


@pytest.fixture
def repetitive(tmp_path):
    path = tmp_path / "rep.txt"
    path.write_text(LINE * 300, encoding="utf-8")
    return path


def log_records(model):
    return [json.loads(line) for line in model.with_suffix(".log.jsonl").read_text(encoding="utf-8").splitlines()]


def window_of(record):
    """k, the window of the run that a log record's rate is for: the next one."""
    return record["tokens_seen"] // (T * B)


def test_warmup_factors():
    warmup = schedule.Warmup(4)
    assert [warmup.factor(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert schedule.Warmup(0).factor(0) == 1.0


def test_guard_halves_the_rate_then_brings_it_back():
    guard, state = schedule.Guard(10), TrainState()
    assert guard.factor(state, 0) == 1.0 and guard.factor(state, 10**6) == 1.0
    guard.diverged(state, 20)
    assert [guard.factor(state, k) for k in (20, 25, 30, 31, 500)] == [0.5, 0.75, 1.0, 1.0, 1.0]
    guard.diverged(state, 25)  # before it came back: half of the 0.75 it had reached
    assert guard.factor(state, 25) == 0.375 and guard.factor(state, 35) == 1.0
    guard.diverged(state, 100)  # after: half of the whole rate
    assert guard.factor(state, 100) == 0.5


def test_the_epoch_schedules_at_an_epoch_end():
    """mikolov halves the rate after its first stall and every epoch after, and stops at the second stall;
    plateau halves it at every stall and stops at the third; cosine changes nothing at an epoch's end and
    anneals within the epoch, by tokens or by the time budget, whichever is further."""
    mikolov, state = schedule.Mikolov(), TrainState(lr=1.0)
    assert [mikolov.end_epoch(state, improved) for improved in (True, False, True, False)] == [False] * 3 + [True]
    assert state.lr == 0.125 and mikolov.factor(state) == 1.0
    plateau, state = schedule.Plateau(), TrainState(lr=1.0)
    assert [plateau.end_epoch(state, improved) for improved in (False, True, False, False)] == [False] * 3 + [True]
    assert state.lr == 0.125 and state.stalls == 3
    state = TrainState(lr=1.0, tokens_seen=50)
    assert schedule.Cosine(100).factor(state) == pytest.approx(0.5)
    assert schedule.Cosine(100, lambda: 1.0).factor(state) == 0
    assert not schedule.Cosine(100).end_epoch(state, False) and state.lr == 1.0
    assert schedule.improved(None, 100.0) and not schedule.improved(100.0, 99.9) and schedule.improved(100.0, 99.5)


def test_training_warms_the_rate_up_linearly(tmp_path, repetitive):
    """Every rate the log shows (the next window's) is lr · (k + 1)/W for the run's window k < W, then lr."""
    config = rnnlm.TrainConfig(**SMALL, epochs=2, lr=0.5, warmup=100, schedule="cosine")
    rnnlm.train(repetitive, tmp_path / "m.npz", valid=repetitive, config=config)
    records = log_records(tmp_path / "m.npz")
    n_windows = (len(LINE.split()) + 1) * 300 // B // T
    assert any(window_of(r) < 100 for r in records) and any(window_of(r) >= 100 for r in records)
    for record in records:
        k = window_of(record)
        cosine = 0.5 * (1 + math.cos(math.pi * k / (2 * n_windows)))
        assert record["lr"] == pytest.approx(0.5 * min(1.0, (k + 1) / 100) * cosine, rel=1e-12)


def diverging_at(monkeypatch, call):
    """Make the ``call``-th forward-backward of the process (1-based) report a NaN loss: a divergence."""
    real, calls = step.forward_backward, []

    def forward_backward(*args):
        loss = real(*args)
        calls.append(1)
        return math.nan if len(calls) == call else loss

    monkeypatch.setattr(step, "forward_backward", forward_backward)


def test_the_guard_brings_the_rate_back_after_a_divergence(tmp_path, repetitive, monkeypatch):
    """A divergence at the run's window d = 3 halves the rate, which comes back linearly over an epoch's
    windows (fewer than RECOVERY_WINDOWS here) and is whole again in the second epoch."""
    diverging_at(monkeypatch, 4)
    config = rnnlm.TrainConfig(**SMALL, epochs=2, lr=0.5, optimizer="sgd", schedule="mikolov")
    rnnlm.train(repetitive, tmp_path / "m.npz", valid=repetitive, config=config)
    records = log_records(tmp_path / "m.npz")
    (event,) = [r for r in records if r.get("event") == "diverged"]
    assert window_of(event) == 3 and event["lr"] == 0.25
    n_windows = (len(LINE.split()) + 1) * 300 // B // T
    after = [r for r in records if r is not event and window_of(r) >= 3]
    for record in after:
        assert record["lr"] == pytest.approx(0.5 * (0.5 + 0.5 * min(1.0, (window_of(record) - 3) / n_windows)))
    second = [r["lr"] for r in after if r["epoch"] == 2]
    assert any(r["lr"] < 0.5 for r in after) and len(second) >= 10 and set(second) == {0.5}


def test_resume_through_a_divergence_gives_the_same_model(tmp_path, repetitive, monkeypatch):
    """The guard's state is in the checkpoint: a run stopped while its rate is coming back resumes to the
    bytes of the run that was not stopped."""
    config = dict(**SMALL, epochs=2, lr=0.5, optimizer="adam", warmup=30, dropout=0.1)
    diverging_at(monkeypatch, 6)
    rnnlm.train(repetitive, tmp_path / "whole.npz", config=rnnlm.TrainConfig(**config))

    def stop_at_window_20(done, total, stats):
        if done == 20:
            signal.raise_signal(signal.SIGINT)

    diverging_at(monkeypatch, 6)
    stopped = tmp_path / "stopped.npz"
    with pytest.raises(rnnlm.TrainingInterrupted):
        rnnlm.train(repetitive, stopped, config=rnnlm.TrainConfig(**config), on_window=stop_at_window_20)
    with np.load(stopped.with_suffix(".ckpt.npz")) as npz:
        state = json.loads(str(npz["meta"]))["state"]
    assert state["guard_scale"] == 0.5 and state["guard_since"] == 5 and state["window"] == 20
    monkeypatch.undo()
    rnnlm.resume(stopped.with_suffix(".ckpt.npz"))
    assert stopped.read_bytes() == (tmp_path / "whole.npz").read_bytes()
