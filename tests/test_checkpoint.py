"""Checkpoints: a run killed between checkpoints resumes to a byte-identical model; writes are atomic."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import rnnlm
from rnnlm.model import atomic_savez

from .conftest import demo_texts

# dropout and Adam: the resumed run must also restore the RNG and the optimizer's moments
SETTINGS = ["--hidden", "16", "--bptt", "8", "--batch", "4", "--epochs", "3", "--threads", "1", "--seed", "3",
            "--optimizer", "adam", "--dropout", "0.2", "--layers", "2"]


def cli(*args):
    return [sys.executable, "-m", "rnnlm", *map(str, args)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    demo_texts(folder, 6000, 150)
    return folder


def checkpoint_state(path):
    """The schedule and cursor stored in a checkpoint's meta."""
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(str(npz["meta"]))["state"]


def train_args(corpus, model):
    return ["train", corpus / "train.txt", "--valid", corpus / "valid.txt", "-o", model, *SETTINGS, "--json"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_a_byte_identical_model(corpus, tmp_path):
    whole = tmp_path / "whole" / "model.npz"
    subprocess.run(cli(*train_args(corpus, whole)), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed" / "model.npz"
    checkpoint = killed.with_suffix(".ckpt.npz")
    process = subprocess.Popen(cli(*train_args(corpus, killed), "--checkpoint-every", "0.0002"),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    process.stdout.readline()  # the first epoch has ended: kill it in the second, between checkpoints
    state = checkpoint_state(checkpoint)
    while not (state["epoch"] == 2 and state["window"] > 0):  # mid-epoch: the cursor and carried state matter
        assert process.poll() is None, "training ended before it could be killed"
        state = checkpoint_state(checkpoint)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    # the text lies outside the checkpoint's folder: a resume is told where it is
    resumed = subprocess.run(cli("train", corpus / "train.txt", "--valid", corpus / "valid.txt", "--resume",
                                 checkpoint, "--json"), check=True, capture_output=True, text=True, timeout=300)
    assert [json.loads(line)["epoch"] for line in resumed.stdout.splitlines()] == [2, 3]
    if killed.read_bytes() != whole.read_bytes():  # say which arrays differ before failing
        with np.load(killed, allow_pickle=False) as a, np.load(whole, allow_pickle=False) as b:
            differ = [name for name in b.files if not np.array_equal(a[name], b[name])]
        pytest.fail(f"resumed model differs from the uninterrupted one in {differ}; resumed log: {resumed.stdout}")


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(corpus, tmp_path):
    model = tmp_path / "model.npz"
    process = subprocess.Popen(cli(*train_args(corpus, model)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    process.stdout.readline()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    command = (f"rnnlm train {corpus / 'train.txt'} --resume {model.with_suffix('.ckpt.npz')} "
               f"--valid {corpus / 'valid.txt'}")
    assert f"resume with: {command}\n" in stderr
    assert "Traceback" not in stderr
    rnnlm.load(model)
    resumed = subprocess.run([sys.executable, "-m", *command.split(), "--json"], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path.parent)  # from another working directory
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["epoch"] == 3


def test_a_crash_while_writing_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.npz"
    atomic_savez(path, {"x": np.arange(3)})

    def crash(member, array, allow_pickle):
        member.write(b"half an array")
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", crash)
    with pytest.raises(rnnlm.RnnlmError, match=f"cannot write {path}: disk full"):
        atomic_savez(path, {"x": np.arange(5)})
    monkeypatch.undo()
    with np.load(path, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["x"], np.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["state.npz"]


def test_model_files_are_the_same_bytes_for_the_same_model(tmp_path):
    vocab = rnnlm.Vocab(["<eos>", "<unk>", "a"], "word", False)
    model = rnnlm.Model.create(vocab, hidden=4, seed=1)
    model.save(tmp_path / "one.npz")
    time.sleep(1.1)  # np.savez would stamp the time into the zip members
    model.save(tmp_path / "two.npz")
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    assert zipfile.is_zipfile(tmp_path / "one.npz")


def test_tied_weights_stay_one_shared_array(tmp_path):
    vocab = rnnlm.Vocab(["<eos>", "<unk>", "a", "b"], "word", False)
    model = rnnlm.Model.create(vocab, hidden=3, seed=1, tied=True)
    assert np.shares_memory(model.params["W_x"], model.params["W_o"])
    model.save(tmp_path / "tied.npz")
    loaded = rnnlm.load(tmp_path / "tied.npz")
    assert loaded.tied and np.shares_memory(loaded.params["W_x"], loaded.params["W_o"])
    np.testing.assert_array_equal(loaded.params["W_x"], model.params["W_o"].T)


def test_resuming_a_run_the_schedule_ended_trains_nothing(corpus, tmp_path):
    """Mikolov's schedule stops a run well before --epochs; its last checkpoint resumes to the same model."""
    model = tmp_path / "m.npz"
    settings = ["--hidden", "8", "--bptt", "8", "--batch", "4", "--epochs", "40", "--lr", "0.5", "--threads", "1"]
    first = subprocess.run(cli("train", corpus / "train.txt", "--valid", corpus / "valid.txt", "-o", model,
                               *settings, "--json"), capture_output=True, text=True, check=True)
    epochs = [json.loads(line)["epoch"] for line in first.stdout.splitlines()]
    assert len(epochs) < 40  # the schedule ended it
    trained = model.read_bytes()
    resumed = subprocess.run(cli("train", corpus / "train.txt", "--valid", corpus / "valid.txt", "--resume",
                                 model.with_suffix(".ckpt.npz"), "--json"), capture_output=True, text=True, check=True)
    assert resumed.stdout == ""
    assert model.read_bytes() == trained
