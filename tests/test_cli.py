"""The ``rnnlm`` command end to end: tokenize, train, perplexity, sample, errors, Ctrl-C, --help."""

import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from rnnlm.cli import cli

import rnnlm
from rnnlm.corpus import load_corpus

from .conftest import reference_perplexity

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "16", "--bptt", "10", "--batch", "4"]
EPOCH_KEYS = {"epoch", "train_loss", "valid_perplexity", "lr", "tokens_per_s", "elapsed_s"}
WORDS = ["the", "a", "cat", "dog", "bird", "sees", "likes", "runs", "sleeps", "big", "small", "red",
         "and", "but", "here", "there", ".", "?"]
CHAR_TEXT = "café naïve über 日本語 😀 ñandú\nçà et là 東京 🎉 crème brûlée\n"

# Click >= 8.2 keeps stderr apart in CliRunner results; older versions need mix_stderr=False.
OLD_CLICK = "mix_stderr" in inspect.signature(CliRunner).parameters


def invoke(*args):
    runner = CliRunner(mix_stderr=False) if OLD_CLICK else CliRunner()
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def random_text(seed, lines):
    """Lines of 3 to 8 words from a Markov chain in which every word has 3 possible successors."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(lines):
        i = int(rng.integers(2))
        words = [WORDS[i]]
        for _ in range(int(rng.integers(2, 8))):
            i = (5 * i + 1 + int(rng.integers(3))) % len(WORDS)
            words.append(WORDS[i])
        out.append(" ".join(words) + "\n")
    return "".join(out)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A word text from a small Markov chain, a test text, and a model trained on the first with the CLI."""
    d = tmp_path_factory.mktemp("cli")
    (d / "train.txt").write_text(random_text(0, 400), encoding="utf-8")
    (d / "test.txt").write_text(random_text(1, 60) + "zebra the cat\n", encoding="utf-8")
    ok("train", d / "train.txt", "-o", d / "model.npz", *SMALL, "--epochs", "4", "--json")
    return d


def json_records(stdout, kind):
    """The JSON Lines records of ``stdout``, each of type ``kind``, without their "type" field."""
    records = [json.loads(line) for line in stdout.splitlines()]
    assert all(record.pop("type") == kind for record in records), stdout
    return records


def json_record(stdout, kind):
    (record,) = json_records(stdout, kind)
    return record


def epoch_records(stdout):
    records = json_records(stdout, "epoch")
    for i, record in enumerate(records, 1):
        assert set(record) >= EPOCH_KEYS
        assert record["epoch"] == i
        assert record["valid_perplexity"] > 0 and record["tokens_per_s"] > 0 and record["lr"] > 0
    return records


# --- the pipeline ---------------------------------------------------------------------------------


def test_tokenize_writes_vocab_and_tokens(work, tmp_path):
    result = ok("tokenize", work / "train.txt", "-o", tmp_path / "tok")
    ids, vocab = load_corpus(work / "train.txt")
    assert result.stdout.startswith(f"{len(ids):,} tokens, vocabulary {len(vocab):,}")
    assert str(tmp_path / "tok") in result.stdout
    tokens = np.load(tmp_path / "tok" / "tokens.npy")
    np.testing.assert_array_equal(tokens, ids)
    saved = json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))
    assert saved["tokens"] == vocab.tokens and saved["level"] == "word"

    summary = json_record(ok("tokenize", work / "train.txt", "-o", tmp_path / "tok2", "--json").stdout, "tokenize")
    assert summary == {"tokens": len(ids), "vocab_size": len(vocab), "unk": 0, "unk_share": 0.0}


def test_tokenize_options(work, tmp_path):
    summary = json_record(ok("tokenize", work / "train.txt", "-o", tmp_path / "t", "--max-vocab", "5",
                            "--json").stdout, "tokenize")
    assert summary["vocab_size"] == 5 and summary["unk"] > 0
    assert summary["unk_share"] == pytest.approx(summary["unk"] / summary["tokens"])
    chars = json_record(ok("tokenize", work / "train.txt", "-o", tmp_path / "c", "--level", "char",
                          "--json").stdout, "tokenize")
    assert chars["tokens"] == len((work / "train.txt").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_train_on_a_token_directory_and_on_raw_text(work, tmp_path):
    ok("tokenize", work / "train.txt", "-o", tmp_path / "tok")
    args = [*SMALL, "--epochs", "3", "--json"]
    from_dir = epoch_records(ok("train", tmp_path / "tok", "-o", tmp_path / "a.npz", *args).stdout)
    from_text = epoch_records(ok("train", work / "train.txt", "-o", tmp_path / "b.npz", *args).stdout)
    assert len(from_dir) == len(from_text) == 3
    assert from_dir[-1]["train_loss"] < from_dir[0]["train_loss"]
    # the same tokens, vocabulary and seed: the same training
    for a, b in zip(from_dir, from_text, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"], rel=1e-4)
    a, b = rnnlm.load(tmp_path / "a.npz"), rnnlm.load(tmp_path / "b.npz")
    assert a.vocab.tokens == b.vocab.tokens
    assert a.hidden == 16


def test_train_text_output(work, tmp_path):
    result = ok("train", work / "train.txt", "-o", tmp_path / "m.npz", *SMALL, "--epochs", "2")
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines[0].startswith("epoch 1: train loss ")
    assert lines[-1].startswith("best valid perplexity ")
    assert lines[-1].endswith(f"model written to {tmp_path / 'm.npz'}")
    assert (tmp_path / "m.npz").is_file()


def test_train_creates_the_output_directory(work, tmp_path):
    model_path = tmp_path / "runs" / "new" / "model.npz"
    records = epoch_records(ok("train", work / "train.txt", "-o", model_path, *SMALL, "--epochs", "1",
                               "--json").stdout)
    assert len(records) == 1
    assert rnnlm.load(model_path).hidden == 16


def test_train_with_valid(work, tmp_path):
    records = epoch_records(ok("train", work / "train.txt", "--valid", work / "test.txt", "-o",
                               tmp_path / "m.npz", *SMALL, "--epochs", "2", "--json").stdout)
    best = min(r["valid_perplexity"] for r in records)
    result = json_record(ok("perplexity", tmp_path / "m.npz", work / "test.txt", "--json").stdout, "perplexity")
    assert result["perplexity"] == pytest.approx(best, rel=1e-6)


def test_perplexity_json(work):
    result = json_record(ok("perplexity", work / "model.npz", work / "test.txt", "--json").stdout, "perplexity")
    assert set(result) == {"perplexity", "bits_per_token", "tokens", "unk"}
    ids, _ = load_corpus(work / "test.txt", vocab=rnnlm.load(work / "model.npz").vocab)
    assert result["tokens"] == len(ids)
    assert result["unk"] == 1  # "zebra"
    assert result["bits_per_token"] == pytest.approx(math.log2(result["perplexity"]))
    # trained: far better than uniform over the vocabulary
    assert 1 < result["perplexity"] < 0.8 * (len(WORDS) + 2)

    text = ok("perplexity", work / "model.npz", work / "test.txt").stdout
    assert text.startswith(f"perplexity {result['perplexity']:.2f} (")
    assert f"{result['tokens']:,} tokens, 1 <unk>" in text


def test_cli_perplexity_equals_the_numpy_reference(work):
    result = json_record(ok("perplexity", work / "model.npz", work / "test.txt", "--json").stdout, "perplexity")
    assert result["perplexity"] == pytest.approx(reference_perplexity(work / "model.npz", work / "test.txt"),
                                                 rel=1e-5)


def test_sample(work):
    model = work / "model.npz"
    first = ok("sample", model, "--seed", "7", "--length", "30").stdout
    again = ok("sample", model, "--seed", "7", "--length", "30").stdout
    other = ok("sample", model, "--seed", "8", "--length", "30").stdout
    assert first.strip()
    assert first == again
    assert first != other


def test_sample_json_prompt_and_options(work):
    texts = [r["text"] for r in json_records(ok("sample", work / "model.npz", "--num", "3", "--length", "12",
                                                "--json", "--prompt", "the cat", "--top-k", "3",
                                                "--temperature", "0.7").stdout, "sample")]
    assert len(texts) == 3
    for text in texts:
        assert text.startswith("the cat")
        assert len(text.split()) == 2 + 12 - text.count("\n")  # 12 tokens drawn; <eos> shows as a newline
    # without --length a word sample stops at the end of a sentence: one line
    one = [r["text"] for r in json_records(ok("sample", work / "model.npz", "--json", "--top-p", "0.9").stdout,
                                           "sample")]
    assert len(one) == 1 and "\n" not in one[0]


def test_tokenize_with_the_vocabulary_of_a_model(work, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("the cat sees a zebra\nunknown words here\n", encoding="utf-8")
    summary = json_record(ok("tokenize", other, "-o", tmp_path / "tok", "--vocab", work / "model.npz",
                            "--json").stdout, "tokenize")
    model = rnnlm.load(work / "model.npz")
    assert summary["vocab_size"] == len(model.vocab)
    assert summary["tokens"] == 5 + 1 + 3 + 1
    assert summary["unk"] == 3  # zebra, unknown, words
    saved = json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))
    assert saved["tokens"] == model.vocab.tokens
    ids = np.load(tmp_path / "tok" / "tokens.npy")
    assert ids[:3].tolist() == [model.vocab.index[w] for w in ("the", "cat", "sees")]
    assert ids[4] == model.vocab.unk_id
    # and the token directory is accepted by perplexity with that model
    result = json_record(ok("perplexity", work / "model.npz", tmp_path / "tok", "--json").stdout, "perplexity")
    assert result["tokens"] == 10 and result["unk"] == 3


# --- characters -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("char")
    (d / "text.txt").write_text(CHAR_TEXT * 40, encoding="utf-8")
    ok("train", d / "text.txt", "-o", d / "model.npz", "--level", "char", *SMALL, "--epochs", "3")
    return d / "model.npz"


def test_char_level_train_and_sample(char_model):
    model = rnnlm.load(char_model)
    assert model.vocab.level == "char"
    assert {"é", "日", "😀", "🎉"} <= set(model.vocab.tokens)
    out = ok("sample", char_model, "--length", "60", "--seed", "3", "--json").stdout
    text = json_record(out, "sample")["text"]
    assert len(text) == 60  # characters (code points), not bytes
    assert set(text) <= set(CHAR_TEXT) | {"\ufffd"}
    result = ok("sample", char_model, "--length", "20", "--prompt", "日本")
    assert result.stdout.startswith("日本")
    assert not result.stderr


def test_char_prompt_with_an_unseen_character_warns(char_model):
    result = ok("sample", char_model, "--prompt", "Ωcafé", "--length", "10", "--json")
    assert result.stderr.startswith("warning") and "<unk>" in result.stderr
    assert re.search(r"\b1\b", result.stderr)  # one token of the prompt
    text = json_record(result.stdout, "sample")["text"]
    assert text.startswith("\ufffdcafé")  # the unknown character is read (and shown) as <unk>
    assert len(text) == 5 + 10


# --- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def bad(work, tmp_path):
    """Files that must be refused."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(b"hello world\nab\0cd\n")
    (tmp_path / "latin1.txt").write_bytes(b"hello world\ncaf\xe9 au lait\n")
    (tmp_path / "adir").mkdir()
    model = (work / "model.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(model[: len(model) // 2])
    np.savez(tmp_path / "foreign.npz", weights=np.ones(3), other=np.zeros((2, 2)))
    return tmp_path


BAD_CALLS = {
    "train missing file": (["train", "{d}/nope.txt", "-o", "{d}/m.npz"], "no such file"),
    "tokenize missing file": (["tokenize", "{d}/nope.txt", "-o", "{d}/tok"], "no such file"),
    "perplexity missing model": (["perplexity", "{d}/nope.npz", "{w}/test.txt"], "no such file"),
    "perplexity missing text": (["perplexity", "{w}/model.npz", "{d}/nope.txt"], "no such file"),
    "sample missing model": (["sample", "{d}/nope.npz"], "no such file"),
    "train empty file": (["train", "{d}/empty.txt", "-o", "{d}/m.npz"], "empty"),
    "tokenize empty file": (["tokenize", "{d}/empty.txt", "-o", "{d}/tok"], "empty"),
    "perplexity empty file": (["perplexity", "{w}/model.npz", "{d}/empty.txt"], "empty"),
    "train binary file": (["train", "{d}/binary.txt", "-o", "{d}/m.npz"], "NUL byte at line 2, offset 14"),
    "tokenize binary file": (["tokenize", "{d}/binary.txt", "-o", "{d}/tok"], "NUL byte at line 2, offset 14"),
    "train non-UTF-8 file": (["train", "{d}/latin1.txt", "-o", "{d}/m.npz"], "byte offset 15"),
    "perplexity non-UTF-8 file": (["perplexity", "{w}/model.npz", "{d}/latin1.txt"], "byte offset 15"),
    "train directory as TEXT": (["train", "{d}/adir", "-o", "{d}/m.npz"], "adir"),
    "perplexity truncated model": (["perplexity", "{d}/truncated.npz", "{w}/test.txt"], "truncated.npz"),
    "sample truncated model": (["sample", "{d}/truncated.npz"], "truncated.npz"),
    "tokenize truncated model as vocab": (["tokenize", "{w}/test.txt", "-o", "{d}/tok", "--vocab",
                                           "{d}/truncated.npz"], "truncated.npz"),
    "perplexity foreign npz": (["perplexity", "{d}/foreign.npz", "{w}/test.txt"], "not a rnnlm model"),
    "sample foreign npz": (["sample", "{d}/foreign.npz"], "not a rnnlm model"),
    "tokenize foreign npz as vocab": (["tokenize", "{w}/test.txt", "-o", "{d}/tok", "--vocab",
                                       "{d}/foreign.npz"], "foreign.npz"),
    "perplexity directory as model": (["perplexity", "{d}/adir", "{w}/test.txt"], "directory"),
    "train output under a file": (["train", "{w}/train.txt", "-o", "{w}/train.txt/m.npz", *SMALL],
                                  "train.txt"),
    "too short for batch x bptt": (["train", "{w}/test.txt", "-o", "{d}/m.npz", "--batch", "400"],
                                   "too short"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_is_a_one_line_error(name, bad, work):
    args, needle = BAD_CALLS[name]
    result = invoke(*(a.format(d=bad, w=work) for a in args))
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert needle in lines[0]
    assert not (bad / "m.npz").exists()


BAD_NUMBERS = {
    "hidden 0": (["train", "{w}/train.txt", "-o", "{d}/m.npz", "--hidden", "0"], "--hidden"),
    "bptt 0": (["train", "{w}/train.txt", "-o", "{d}/m.npz", "--bptt", "0"], "--bptt"),
    "negative lr": (["train", "{w}/train.txt", "-o", "{d}/m.npz", "--lr", "-1"], "--lr"),
    "top-p 1.5": (["sample", "{w}/model.npz", "--top-p", "1.5"], "--top-p"),
    "top-k 0": (["sample", "{w}/model.npz", "--top-k", "0"], "--top-k"),
    "temperature 0": (["sample", "{w}/model.npz", "--temperature", "0"], "--temperature"),
    "length 0": (["sample", "{w}/model.npz", "--length", "0"], "--length"),
    "num 0": (["sample", "{w}/model.npz", "--num", "0"], "--num"),
    "nan clip": (["train", "{w}/train.txt", "-o", "{d}/m.npz", "--clip", "nan"], "--clip"),
    "inf l2": (["train", "{w}/train.txt", "-o", "{d}/m.npz", "--l2", "inf"], "--l2"),
    "inf lr": (["train", "{w}/train.txt", "-o", "{d}/m.npz", "--lr", "inf"], "--lr"),
    "negative seed": (["train", "{w}/train.txt", "-o", "{d}/m.npz", "--seed", "-1"], "--seed"),
    "huge hidden": (["train", "{w}/train.txt", "-o", "{d}/m.npz", "--hidden", "1000000"], "--hidden"),
    "huge length": (["sample", "{w}/model.npz", "--length", str(10**15)], "--length"),
    "huge num": (["sample", "{w}/model.npz", "--num", str(10**10)], "--num"),
    "tiny temperature": (["sample", "{w}/model.npz", "--temperature", "1e-320"], "--temperature"),
}


@pytest.mark.parametrize("name", list(BAD_NUMBERS))
def test_a_bad_number_is_a_usage_error_naming_the_option(name, bad, work):
    args, option = BAD_NUMBERS[name]
    result = invoke(*(a.format(d=bad, w=work) for a in args))
    assert result.exit_code == 2 and "Traceback" not in result.output and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith("Error: Invalid value for '" + option)
    assert not (bad / "m.npz").exists()


def test_usage_errors(work):
    result = invoke("train", work / "train.txt")  # no -o
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith("Error: ") and "-o" in result.stderr
    result = invoke("train", work / "train.txt", "-o", work / "x.npz", "--hidden", "many")
    assert result.exit_code == 2 and "'many' is not a valid integer" in result.stderr
    assert not (work / "x.npz").exists()


# --- Ctrl-C ---------------------------------------------------------------------------------------


def interrupt_training(model_path, started):
    """Run `rnnlm train` on the demo text in a subprocess, wait until started(model_path, first stdout
    line or None) is true, send SIGINT; returns (exit code, stdout, stderr)."""
    command = [sys.executable, "-m", "rnnlm", "train",
               str(REPO / "data" / "demo" / "train.txt"), "-o", str(model_path), *SMALL,
               "--epochs", "1000", "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)  # nothing below may wait forever if something hangs
    watchdog.start()
    try:
        while not started(proc):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, stderr


def check_interrupted(code, stdout, stderr, model_path):
    assert code == 130, stderr
    assert "Traceback" not in stderr + stdout
    assert "interrupted in epoch" in stderr
    assert str(model_path) in stderr
    for line in stdout.splitlines():  # only complete epoch records were printed
        assert set(json.loads(line)) >= EPOCH_KEYS
    model = rnnlm.load(model_path)  # the model the message points to exists and loads
    assert model.hidden == 16
    assert not [p.name for p in model_path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_ctrl_c_during_training_exits_130_and_keeps_the_best_model(tmp_path):
    model_path = tmp_path / "model.npz"

    def after_first_epoch(proc):
        line = proc.stdout.readline()  # blocks until the first epoch has ended
        if line:  # (else it died: the exit code check below shows why)
            assert set(json.loads(line)) >= EPOCH_KEYS, line
            time.sleep(0.2)  # well into the second epoch
        return True

    code, stdout, stderr = interrupt_training(model_path, after_first_epoch)
    check_interrupted(code, stdout, stderr, model_path)
    assert "interrupted in epoch 2" in stderr


@pytest.mark.slow
def test_ctrl_c_in_the_first_epoch_still_leaves_a_model(tmp_path):
    """Interrupted before any validation: the message must still point to a model file that loads."""
    model_path = tmp_path / "model.npz"
    log = model_path.with_suffix(".log.jsonl")

    def training_started(proc):  # the training log gets its first progress record within epoch 1
        return log.is_file() and log.read_text(encoding="utf-8").strip() != ""

    code, stdout, stderr = interrupt_training(model_path, training_started)
    assert stdout == ""  # no epoch had ended
    check_interrupted(code, stdout, stderr, model_path)
    assert "interrupted in epoch 1" in stderr


# --- help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_help_lists_every_option_with_its_default(command):
    text = ok(command, "--help").stdout
    assert text.startswith(f"Usage: cli {command} ") or text.startswith(f"Usage: rnnlm {command} ")
    entries = help_entries(text)
    for param in cli.commands[command].params:
        if not isinstance(param, click.Option):
            continue
        name = max(param.opts, key=len)
        assert name in entries, f"{name} missing from {command} --help"
        if param.is_flag or param.required or "[required" in (param.help or ""):
            continue
        assert "[default: " in entries[name], f"{command} {name}: no default shown: {entries[name]!r}"
        if param.default is not None and not isinstance(param.default, str):
            assert re.search(re.escape(f"[default: {param.default}") + "[];]", entries[name]), entries[name]


def help_entries(text):
    """{option name: its help entry, continuation lines joined} from a --help text (every name of an entry)."""
    entries, names = {}, []
    options = text.split("Options:", 1)[1]
    for line in options.splitlines():
        stripped = line.strip()
        if line.startswith("  ") and stripped.startswith("-") and not line.startswith("    "):
            names = [w.rstrip(",") for w in stripped.split("  ")[0].split() if w.startswith("-")]
            entries.update(dict.fromkeys(names, stripped))
        elif names and stripped:
            entries.update({name: entries[name] + " " + stripped for name in names})
    return entries


@pytest.mark.slow
def test_device_cuda_without_a_gpu_is_a_clear_error(work):
    """No simulator and no visible GPU: --device cuda says what is missing instead of failing deep inside."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "rnnlm", "perplexity", str(work / "model.npz"),
         str(work / "test.txt"), "--device", "cuda"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error: --device cuda needs an NVIDIA GPU")
    assert "pip install 'rnnlm-numba[cuda]'" in result.stderr and "Traceback" not in result.stderr
