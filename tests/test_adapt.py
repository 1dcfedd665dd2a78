"""``rnnlm train TEXT --init-from MODEL``: the model's vocabulary, architecture and weights carried over,
new words counted, settings that the model fixes refused, and a resume that does not read MODEL again."""

import inspect
import json
import signal

import numpy as np
import pytest
from click.testing import CliRunner
from rnnlm.cli import cli

import rnnlm

SMALL = ["--hidden", "12", "--bptt", "6", "--batch", "3", "--threads", "1"]
WORDS = ["the", "a", "cat", "dog", "bird", "sees", "likes", "runs", "big", "small", "and", "here"]
NEW = "zebra quokka"
OLD_CLICK = "mix_stderr" in inspect.signature(CliRunner).parameters


def invoke(*args):
    runner = CliRunner(mix_stderr=False) if OLD_CLICK else CliRunner()
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def words_text(seed, lines, extra=""):
    """Lines of 3 to 7 words, each the successor of the last one among three; ``extra`` ends every 10th."""
    rng = np.random.default_rng(seed)
    out = []
    for n in range(lines):
        i = int(rng.integers(len(WORDS)))
        line = [WORDS[i]]
        for _ in range(int(rng.integers(2, 7))):
            i = (5 * i + 1 + int(rng.integers(3))) % len(WORDS)
            line.append(WORDS[i])
        out.append(" ".join(line) + (f" {extra}" if extra and n % 10 == 0 else "") + "\n")
    return "".join(out)


@pytest.fixture(scope="module", params=["full", "class"])
def base(request, tmp_path_factory):
    """A folder with a model trained on old.txt (full or class softmax, two tied layers) and new.txt, whose
    every 10th line ends in two words the model has never seen."""
    d = tmp_path_factory.mktemp(f"adapt-{request.param}")
    (d / "old.txt").write_text(words_text(0, 300), encoding="utf-8")
    (d / "new.txt").write_text(words_text(1, 200, NEW), encoding="utf-8")
    softmax = ["--softmax", "class", "--classes", "3"] if request.param == "class" else []
    result = invoke("train", d / "old.txt", "-o", d / "model.npz", *SMALL, "--layers", "2", "--tied", *softmax,
                    "--epochs", "2", "--optimizer", "adam", "--lr", "0.01")
    assert result.exit_code == 0, result.output
    return d


def test_the_adapted_model_keeps_vocabulary_and_architecture_and_counts_new_words(base, tmp_path):
    result = invoke("train", base / "new.txt", "--init-from", base / "model.npz", "-o", tmp_path / "a.npz",
                    "--bptt", "5", "--batch", "2", "--epochs", "1", "--optimizer", "sgd", "--lr", "0.1", "--json")
    assert result.exit_code == 0, result.output
    start, epoch = map(json.loads, result.stdout.splitlines())
    tokens = len(base.joinpath("new.txt").read_text().split()) + 200
    assert {"type": "start", "event": "init_from", "model": str(base / "model.npz"), "tokens": tokens,
            "oov": 2 * 20}.items() <= start.items()
    assert epoch["type"] == "epoch" and epoch["valid_perplexity"] > 0
    assert "40 of them outside its vocabulary" in result.stderr
    source, adapted = rnnlm.load(base / "model.npz"), rnnlm.load(tmp_path / "a.npz")
    assert adapted.vocab.tokens == source.vocab.tokens and "zebra" not in adapted.vocab.index
    assert (adapted.hidden, adapted.layers, adapted.tied) == (12, 2, True)
    assert (adapted.class_bounds is None) == (source.class_bounds is None)
    if source.class_bounds is not None:
        np.testing.assert_array_equal(adapted.class_bounds, source.class_bounds)
    assert adapted.hparams["bptt"] == 5 and adapted.hparams["optimizer"] == "sgd"
    assert not np.array_equal(adapted.params["W_s"], source.params["W_s"])  # it trained


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_rate_too_small_to_move_a_weight_leaves_the_perplexity_unchanged(base, tmp_path, optimizer):
    """lr 0, in float32: every step is at most 1e-30 per weight (SGD on gradients clipped to norm 1; Adam's
    steps are at most about lr), far below half an ulp of any weight, so the adapted model is the model."""
    source = rnnlm.load(base / "model.npz")
    assert min(np.abs(p).min() for p in source.params.values()) > 1e-20
    config = rnnlm.TrainConfig(bptt=5, batch=2, epochs=1, optimizer=optimizer, lr=1e-30, clip=1.0)
    rnnlm.train(base / "old.txt", tmp_path / "a.npz", config=config, init_from=base / "model.npz")
    adapted = rnnlm.load(tmp_path / "a.npz")
    for name, array in source.params.items():
        np.testing.assert_array_equal(adapted.params[name], array, err_msg=name)
    for text in ("old.txt", "new.txt"):
        assert rnnlm.perplexity(adapted, base / text) == rnnlm.perplexity(source, base / text)


@pytest.mark.parametrize("option", [["--hidden", "8"], ["--layers", "1"], ["--tied"], ["--softmax", "full"],
                                    ["--classes", "4"], ["--init", "zero"], ["--min-count", "2"],
                                    ["--max-vocab", "5"], ["--lowercase"]])
def test_a_setting_the_model_fixes_is_a_usage_error(base, tmp_path, option):
    result = invoke("train", base / "new.txt", "--init-from", base / "model.npz", "-o", tmp_path / "a.npz", *option)
    assert result.exit_code == 2 and f"{option[0]} cannot be used with --init-from" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_another_level_or_the_model_as_output_is_a_one_line_error(base, tmp_path):
    for args, names in ((["--level", "char", "-o", tmp_path / "a.npz"], ["word-level model", "--level char"]),
                        (["-o", base / "model.npz"], ["--init-from"])):
        before = base.joinpath("model.npz").read_bytes()
        result = invoke("train", base / "new.txt", "--init-from", base / "model.npz", *args)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1 and result.stderr.startswith("Error:")
        assert all(name in result.stderr for name in names), result.stderr
        assert list(tmp_path.iterdir()) == [] and base.joinpath("model.npz").read_bytes() == before
    result = invoke("train", base / "new.txt", "--init-from", base / "model.npz", "--level", "word",
                    "-o", tmp_path / "a.npz", "--epochs", "1", "--bptt", "5")
    assert result.exit_code == 0, result.output


def test_an_interrupted_adaptation_resumes_without_the_model_it_started_from(base, tmp_path):
    """The checkpoint holds what the run needs: the source model moved away, the resumed run ends with the
    bytes of the uninterrupted one."""
    source = tmp_path / "source.npz"
    source.write_bytes(base.joinpath("model.npz").read_bytes())
    config = dict(bptt=5, batch=2, epochs=2, optimizer="adam", lr=0.003, dropout=0.1, warmup=10)
    rnnlm.train(base / "new.txt", tmp_path / "whole.npz", config=rnnlm.TrainConfig(**config), init_from=source)

    def stop_at_window_7(done, total, stats):
        if done == 7:
            signal.raise_signal(signal.SIGINT)

    stopped = tmp_path / "stopped.npz"
    with pytest.raises(rnnlm.TrainingInterrupted):
        rnnlm.train(base / "new.txt", stopped, config=rnnlm.TrainConfig(**config), init_from=source,
                    on_window=stop_at_window_7)
    source.rename(tmp_path / "elsewhere.npz")
    rnnlm.resume(stopped.with_suffix(".ckpt.npz"), text=base / "new.txt")
    assert stopped.read_bytes() == (tmp_path / "whole.npz").read_bytes()
    (start,) = [r for r in map(json.loads, stopped.with_suffix(".log.jsonl").read_text().splitlines())
                if r.get("event") == "init_from"]
    assert start["oov"] == 40
