"""``rnnlm plot``: the training log read as untrusted (always tested), the drawing (with matplotlib only)."""

import importlib.util
import inspect
import json

import pytest
from click.testing import CliRunner
from rnnlm.cli import cli

import rnnlm
from rnnlm.plot import read_log

OLD_CLICK = "mix_stderr" in inspect.signature(CliRunner).parameters
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
GOOD = [{"epoch": 1, "tokens_seen": 100, "lr": 1.0, "train_loss": 4.0, "valid_perplexity": None, "elapsed_s": 0.1},
        {"epoch": 1, "tokens_seen": 200, "lr": 1.0, "event": "diverged", "loss": None, "elapsed_s": 0.2},
        {"epoch": 1, "tokens_seen": 200, "lr": 0.5, "train_loss": 3.5, "valid_perplexity": 30.0, "elapsed_s": 0.3}]


def invoke(*args):
    runner = CliRunner(mix_stderr=False) if OLD_CLICK else CliRunner()
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def write_log(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode()
                              for line in lines))
    return path


def test_a_training_log_reads_back_in_order(tmp_path):
    assert read_log(write_log(tmp_path / "m.log.jsonl", [*GOOD, b"\n"])) == GOOD


BAD_LOGS = {
    "a number": ([b"3\n"], "line 1 is not a JSON object"),
    "not UTF-8": ([GOOD[0], b'{"train_loss": "\xff"}\n'], "line 2 is not UTF-8"),
    "not JSON": ([b"{nope\n"], "line 1 is not JSON"),
    "missing tokens_seen": ([{"train_loss": 1.0}], "no 'tokens_seen' field"),
    "missing train_loss": ([{"tokens_seen": 5, "valid_perplexity": 3.0}], "no 'train_loss' field"),
    "a string loss": ([{"tokens_seen": 5, "train_loss": "low"}], "train_loss must be a number"),
    "a boolean count": ([{"tokens_seen": True, "train_loss": 1.0}], "tokens_seen must be a number"),
    "a huge loss": ([{"tokens_seen": 5, "train_loss": 1e300}], "train_loss must be a number"),
    "a negative perplexity": ([{"tokens_seen": 5, "train_loss": 1.0, "valid_perplexity": -2}], "valid_perplexity"),
    "deeply nested": ([b"[" * 30_000 + b"]" * 30_000 + b"\n"], "line 1 is nested too deeply"),
    "a line too long": ([b'{"x": "' + b"a" * 70_000 + b'"}\n'], "line 1 is longer than"),
    "no training records": ([{"event": "diverged"}], "has no training records"),
}


@pytest.mark.parametrize("case", list(BAD_LOGS))
def test_a_hostile_log_is_one_error_naming_the_line(tmp_path, case):
    lines, message = BAD_LOGS[case]
    log = write_log(tmp_path / "m.log.jsonl", lines)
    with pytest.raises(rnnlm.RnnlmError, match=message):
        read_log(log)
    result = invoke("plot", log, "-o", tmp_path / "curves.png")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: ") and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.log.jsonl"]


def test_a_missing_log_or_a_directory_is_one_error(tmp_path):
    for log, message in ((tmp_path / "nope.jsonl", "no such log file"), (tmp_path, "not a regular file")):
        result = invoke("plot", log, "-o", tmp_path / "curves.png")
        assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="drawing needs matplotlib")
@pytest.mark.parametrize("suffix", ["png", "svg", "pdf"])
def test_plot_draws_the_curves_atomically(tmp_path, suffix):
    log = write_log(tmp_path / "m.log.jsonl", GOOD)
    image = tmp_path / f"curves.{suffix}"
    image.write_bytes(b"old")
    result = invoke("plot", log, "-o", image)
    assert result.exit_code == 0, result.output
    assert "1 validation points" in result.stdout
    assert image.stat().st_size > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [image.name, "m.log.jsonl"]


@pytest.mark.skipif(HAS_MATPLOTLIB, reason="matplotlib is installed")
def test_plot_without_matplotlib_says_how_to_install_it(tmp_path):
    log = write_log(tmp_path / "m.log.jsonl", GOOD)
    result = invoke("plot", log, "-o", tmp_path / "curves.png")
    assert result.exit_code == 1 and "pip install 'rnnlm-numba[plot]'" in result.stderr
    assert not (tmp_path / "curves.png").exists()
