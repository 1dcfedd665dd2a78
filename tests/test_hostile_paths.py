"""Hostile paths, outputs, resumes and numbers: every case ends in its exit code and one ``Error:`` line that
names the culprit, without a traceback, and leaves every file but the intended outputs as it was.

A snapshot of the test's folder (names, kinds, sizes, mtimes) is taken before each command and compared
after it. Commands run in-process (Click's runner), on a tiny text, with --hidden 8 and one epoch.
"""

import errno
import inspect
import json
import os
import shutil
import stat

import numpy as np
import pytest
from click.testing import CliRunner
from rnnlm.cli import cli

import rnnlm
from rnnlm.corpus import load_corpus
from rnnlm.model import atomic_savez

from .conftest import demo_texts

TINY = ["--hidden", "8", "--bptt", "5", "--batch", "2", "--epochs", "1", "--threads", "1"]
OLD_CLICK = "mix_stderr" in inspect.signature(CliRunner).parameters


def invoke(*args):
    runner = CliRunner(mix_stderr=False) if OLD_CLICK else CliRunner()
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def snapshot(folder):
    """Every entry under ``folder`` (links not followed): its kind, and for files, size and mtime."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            kind = stat.S_IFMT(info.st_mode)
            entries[os.path.relpath(path, folder)] = (kind,) if stat.S_ISDIR(info.st_mode) else (
                kind, info.st_size, info.st_mtime_ns)
    return entries


def refused(folder, *args, code=1, names=(), outputs=()):
    """Run the command; assert it failed with ``code`` and one Error line naming ``names``, and that the
    folder is unchanged but for ``outputs`` (relative names). Returns the error line."""
    before = snapshot(folder)
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert outputs or result.stdout == ""  # a run that trained first has printed its epochs
    lines = [line for line in result.stderr.splitlines() if not line.startswith("training ")]  # progress
    if code == 1:
        assert len(lines) == 1, result.stderr
    assert lines[-1].startswith("Error: ")
    for name in names:
        assert str(name) in lines[-1], lines[-1]
    after = snapshot(folder)
    for name in outputs:
        before.pop(name, None)
        after.pop(name, None)
    assert after == before
    return lines[-1]


@pytest.fixture()
def d(tmp_path, monkeypatch):
    """A folder with a tiny text, a validation text, a token directory and some bystander files."""
    demo_texts(tmp_path, 120, 20, "text.txt")
    (tmp_path / "other.npz").write_bytes(b"someone's file")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep.txt").write_text("keep", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train(d, *args):
    return ("train", d / "text.txt", *args, *TINY)


# --- outputs that are inputs, or each other -------------------------------------------------------------

SAME_FILE = {
    "-o is TEXT": (["-o", "{d}/text.txt"], ["-o", "TEXT"]),
    "--log is TEXT": (["-o", "{d}/m.npz", "--log", "{d}/text.txt"], ["--log", "TEXT"]),
    "-o is --valid": (["-o", "{d}/valid.txt", "--valid", "{d}/valid.txt"], ["-o", "--valid"]),
    "--checkpoint is -o": (["-o", "{d}/m.npz", "--checkpoint", "{d}/m.npz"], ["--checkpoint", "-o"]),
    "--log is --checkpoint": (["-o", "{d}/m.npz", "--log", "{d}/c.npz", "--checkpoint", "{d}/c.npz"],
                              ["--log", "--checkpoint"]),
    "-o is TEXT by another name": (["-o", "{d}/adir/../text.txt"], ["-o", "TEXT"]),
}


@pytest.mark.parametrize("case", list(SAME_FILE))
def test_an_output_that_is_an_input_or_another_output_is_refused(d, case):
    args, names = SAME_FILE[case]
    refused(d, *train(d, *(a.format(d=d) for a in args)), names=names)


def test_an_output_that_is_a_hard_link_or_a_symlink_to_the_text_is_refused(d):
    os.link(d / "text.txt", d / "hard.npz")
    refused(d, *train(d, "-o", d / "hard.npz"), names=["-o", "TEXT"])
    os.symlink(d / "text.txt", d / "soft.txt")
    refused(d, "train", d / "soft.txt", "-o", d / "text.txt", *TINY, names=["-o", "TEXT"])


def test_an_output_inside_a_token_directory_input_is_refused(d):
    assert invoke("tokenize", d / "text.txt", "-o", d / "tok").exit_code == 0
    refused(d, "train", d / "tok", "-o", d / "tok" / "tokens.npy", *TINY, names=["-o", "tokens.npy", "TEXT"])


# --- outputs that are not files, or cannot be written -------------------------------------------------------


def special_file(d, kind):
    """A device node (a copy of /dev/null, made here), a FIFO, a symlink or a directory named ``kind``."""
    path = d / kind
    if kind == "device":
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        os.symlink(d / "other.npz", path)
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("option", ["-o", "--checkpoint", "--log"])
@pytest.mark.parametrize("kind", ["device", "fifo", "symlink", "directory"])
def test_an_output_that_is_not_a_regular_file_is_refused(d, option, kind):
    target = special_file(d, kind)
    args = ["-o", d / "m.npz", option, target] if option != "-o" else ["-o", target]
    line = refused(d, *train(d, *args), names=[option, target])
    assert {"device": "device node", "fifo": "FIFO", "symlink": "symbolic link", "directory": "directory"}[kind] \
        in line
    assert (d / "other.npz").read_bytes() == b"someone's file"


def test_dot_and_an_existing_directory_as_the_model_are_refused(d):
    refused(d, *train(d, "-o", "."), names=["-o", "directory"])
    refused(d, *train(d, "-o", d / "adir"), names=["-o", "adir", "directory"])


def test_a_read_only_checkpoint_or_folder_is_refused(d):
    (d / "ro.npz").write_bytes(b"x")
    (d / "ro.npz").chmod(0o444)
    refused(d, *train(d, "-o", d / "m.npz", "--checkpoint", d / "ro.npz"), names=["--checkpoint", "read-only"])
    (d / "locked").mkdir()
    (d / "locked").chmod(0o555)
    try:
        refused(d, *train(d, "-o", d / "m.npz", "--checkpoint", d / "locked" / "c.npz"),
                names=["--checkpoint", "locked", "not writable"])
    finally:
        (d / "locked").chmod(0o755)


def test_a_model_under_a_file_is_refused(d):
    refused(d, *train(d, "-o", d / "text.txt" / "m.npz"), names=["-o", "text.txt"])


def test_a_name_too_long_for_the_derived_checkpoint_is_refused(d):
    model = d / ("m" * 234 + ".npz")  # fits NAME_MAX, but MODEL.ckpt.npz and its temporary name do not
    refused(d, *train(d, "-o", model), names=["checkpoint", "too long"])
    refused(d, *train(d, "-o", d / ("m" * 300 + ".npz")), names=["-o", "too long"])


# --- a full disk and a killed write ----------------------------------------------------------------------------


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_is_one_error_and_keeps_the_old_model(d, monkeypatch):
    """The run's first write is its start checkpoint (which holds the epoch's start, ``rnnlm.checkpointing``)."""
    (d / "m.npz").write_bytes(b"the previous model")
    monkeypatch.setattr(np.lib.format, "write_array", no_space)
    line = refused(d, *train(d, "-o", d / "m.npz"), names=["m.ckpt.npz", "No space left on device"],
                   outputs=["m.log.jsonl"])
    assert line.startswith("Error: cannot write")
    assert (d / "m.npz").read_bytes() == b"the previous model"


def test_a_killed_writes_temporary_file_is_removed_by_the_next_write(d):
    stale = d / ".m.npz.abc_1234.tmp"
    stale.write_bytes(b"half a model")
    bystander = d / ".m.npz.notmine.txt"
    bystander.write_bytes(b"keep")
    result = invoke(*train(d, "-o", d / "m.npz"))
    assert result.exit_code == 0, result.output
    assert not stale.exists() and bystander.exists()
    rnnlm.load(d / "m.npz")


# --- tokenize: the output directory -----------------------------------------------------------------------------


def test_tokenize_refuses_a_directory_it_would_empty(d):
    refused(d, "tokenize", d / "text.txt", "-o", d / "adir", names=["-o", "adir", "keep.txt"])
    refused(d, "tokenize", d / "text.txt", "-o", ".", names=["-o", "working directory"])
    refused(d, "tokenize", d / "text.txt", "-o", d / "other.npz", names=["-o", "other.npz", "expected a directory"])


def test_tokenize_refuses_an_output_directory_that_holds_the_text(d):
    tok = d / "tok"
    assert invoke("tokenize", d / "text.txt", "-o", tok).exit_code == 0
    shutil.copy(d / "text.txt", tok / "tokens.npy")
    refused(d, "tokenize", tok / "tokens.npy", "-o", tok, names=["-o", "TEXT"])


@pytest.mark.parametrize("kind", ["device", "fifo", "symlink"])
def test_tokenize_refuses_an_output_that_is_not_a_directory(d, kind):
    target = special_file(d, kind)
    refused(d, "tokenize", d / "text.txt", "-o", target, names=["-o", target])


def test_tokenize_on_a_full_disk_leaves_the_old_directory(d, monkeypatch):
    tok = d / "tok"
    assert invoke("tokenize", d / "valid.txt", "-o", tok).exit_code == 0
    monkeypatch.setattr(np, "save", no_space)
    refused(d, "tokenize", d / "text.txt", "-o", tok, names=["tok", "No space left on device"])
    ids, _ = load_corpus(tok)
    assert len(ids) == len(load_corpus(d / "valid.txt")[0])
    monkeypatch.undo()
    (d / ".tok.abcd1234.tmp").mkdir()  # what a killed tokenize leaves
    (d / ".tok.abcd1234.tmp" / "tokens.npy").write_bytes(b"half")
    assert invoke("tokenize", d / "text.txt", "-o", tok).exit_code == 0  # replaced as a whole
    assert sorted(os.listdir(tok)) == ["manifest.json", "tokens.npy", "vocab.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(tok.stat().st_mode) == 0o777 & ~umask  # not the temporary directory's 0700
    assert sorted(os.listdir(d)) == sorted(["adir", "other.npz", "text.txt", "tok", "valid.txt"])


# --- plot --------------------------------------------------------------------------------------------------------


def test_plot_refuses_an_image_that_is_the_log_or_a_device(d):
    log = d / "m.log.jsonl"
    log.write_text(json.dumps({"epoch": 1, "tokens_seen": 10, "train_loss": 2.0, "valid_perplexity": 7.0}) + "\n")
    os.link(log, d / "log.png")
    refused(d, "plot", log, "-o", d / "log.png", names=["-o", "LOG"])
    refused(d, "plot", log, "-o", special_file(d, "device"), names=["-o", "device node"])
    refused(d, "plot", log, "-o", d / "curves.bmpx", names=["-o", ".png"])


# --- resume: a checkpoint's paths are data ------------------------------------------------------------------------


@pytest.fixture()
def run(d):
    """A finished one-epoch run in d/run/ on d/text.txt (outside the run's folder)."""
    result = invoke(*train(d, "-o", d / "run" / "m.npz"))
    assert result.exit_code == 0, result.output
    return d / "run"


def forge(checkpoint, **sources):
    """Rewrite the checkpoint with other stored paths (sources, or options' "log")."""
    arrays = dict(np.load(checkpoint, allow_pickle=False))
    meta = json.loads(str(arrays["meta"]))
    log = sources.pop("log", None)
    if log is not None:
        meta["options"]["log"] = log
    meta["sources"].update(sources)
    arrays["meta"] = np.array(json.dumps(meta))
    atomic_savez(checkpoint, arrays)


@pytest.mark.parametrize("where", ["absolute", "relative", "through a symlink"])
@pytest.mark.parametrize("what", ["model", "log"])
def test_a_checkpoint_cannot_send_the_outputs_elsewhere(d, run, where, what):
    victim = d / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    os.symlink(d, run / "up")
    stored = {"absolute": str(victim), "relative": "../victim.txt", "through a symlink": "up/victim.txt"}[where]
    forge(run / "m.ckpt.npz", **{what: stored})
    flag = {"model": "-o", "log": "--log"}[what]
    refused(d, "train", d / "text.txt", "--resume", run / "m.ckpt.npz", "--epochs", "2",
            names=["outside its folder", flag])
    assert victim.read_text(encoding="utf-8") == "precious"


def test_a_checkpoint_cannot_choose_the_text_it_reads(d, run):
    refused(d, "train", "--resume", run / "m.ckpt.npz", "--epochs", "2", names=["TEXT", "outside its folder"])
    forge(run / "m.ckpt.npz", text="/etc/passwd")
    refused(d, "train", "--resume", run / "m.ckpt.npz", "--epochs", "2", names=["TEXT", "/etc/passwd"])
    forge(run / "m.ckpt.npz", text="-")
    refused(d, "train", "--resume", run / "m.ckpt.npz", "--epochs", "2", names=["TEXT", "standard input"])


@pytest.mark.parametrize("option", [["--hidden", "9"], ["--seed", "2"], ["--lowercase"], ["--optimizer", "adam"]])
def test_resume_refuses_the_settings_it_would_ignore(d, run, option):
    refused(d, "train", d / "text.txt", "--resume", run / "m.ckpt.npz", *option, code=2,
            names=[option[0], "--resume"])


def test_resume_refuses_another_text_or_a_validation_text_than_the_runs(d, run):
    shutil.copy(d / "text.txt", run / "text.txt")
    forge(run / "m.ckpt.npz", text="text.txt")
    refused(d, "train", d / "valid.txt", "--resume", run / "m.ckpt.npz", code=2, names=["TEXT", "valid.txt"])
    refused(d, "train", "--resume", run / "m.ckpt.npz", "--valid", d / "valid.txt", code=2, names=["--valid"])


def test_resume_refuses_a_model_that_is_the_checkpoint(d, run):
    refused(d, "train", d / "text.txt", "--resume", run / "m.ckpt.npz", "-o", run / "m.ckpt.npz",
            names=["-o", "--resume"])


def test_resume_writes_where_the_command_line_says_and_says_so(d, run, monkeypatch):
    monkeypatch.chdir(d / "adir")  # another working directory
    result = invoke("train", "../text.txt", "--resume", "../run/m.ckpt.npz", "--epochs", "2", "-o", "../new.npz",
                    "--threads", "1", "--time-budget", "60", "--checkpoint-every", "30")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].endswith("model written to ../new.npz")
    rnnlm.load(d / "new.npz")
    log = [json.loads(line) for line in (d / "new.log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["epoch"] for r in log if r.get("valid_perplexity")] == [1, 2]  # --epochs applied
    meta = json.loads(str(np.load(run / "m.ckpt.npz", allow_pickle=False)["meta"]))
    assert meta["sources"] == {"text": "../text.txt", "valid": None, "model": "../new.npz"}


# --- numbers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", [["--lr", "nan"], ["--lr", "inf"], ["--clip", "nan"], ["--l2", "-inf"],
                                    ["--dropout", "nan"], ["--time-budget", "inf"], ["--checkpoint-every", "nan"],
                                    ["--seed", "-1"], ["--lr", "1e6"]])
def test_a_bad_number_is_a_usage_error(d, option):
    refused(d, *train(d, "-o", d / "m.npz", *option), code=2, names=[option[0]])


@pytest.mark.parametrize("field", ["lr", "clip", "l2", "dropout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_library_refuses_nan_and_infinities(d, field, value):
    with pytest.raises(rnnlm.RnnlmError, match=f"--{field}"):
        rnnlm.train(d / "text.txt", d / "m.npz", config=rnnlm.TrainConfig(**{field: value}))
    for name in ("time_budget", "checkpoint_every"):
        with pytest.raises(rnnlm.RnnlmError, match=name.replace("_", "-")):
            rnnlm.train(d / "text.txt", d / "m.npz", options=rnnlm.RunOptions(**{name: value}))
    assert not (d / "m.npz").exists()


def test_a_diverging_run_is_one_error_that_names_no_missing_model(d):
    line = refused(d, *train(d, "-o", d / "m.npz", "--lr", "1e4", "--clip", "0"), names=["diverged"],
                   outputs=["m.log.jsonl", "m.ckpt.npz", "m.npz"])
    assert "no model was written" in line or (d / "m.npz").exists()
    for record in map(json.loads, (d / "m.log.jsonl").read_text(encoding="utf-8").splitlines()):
        assert all(v is None or not isinstance(v, float) or np.isfinite(v) for v in record.values())


def test_the_library_ends_a_huge_rate_in_an_error_not_an_overflow(d):
    config = rnnlm.TrainConfig(hidden=8, bptt=5, batch=2, epochs=1, lr=1e6, clip=0.0)
    with pytest.raises(rnnlm.RnnlmError, match="diverged"):
        rnnlm.train(d / "text.txt", d / "m.npz", config=config)


@pytest.mark.parametrize("sizes", [["--hidden", "16384", "--layers", "64"], ["--batch", "100000", "--bptt", "100000"]])
def test_a_run_that_cannot_fit_in_memory_is_refused_up_front(d, sizes):
    refused(d, "train", d / "text.txt", "-o", d / "m.npz", *sizes, names=["GiB", "needs at least"])
