"""The demo corpus in data/demo is reproducible and its stated optimum is exact."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
GENERATOR = DEMO / "generate.py"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("demo_corpus_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def optimum():
    return json.loads((DEMO / "optimum.json").read_text(encoding="utf-8"))


def read(split):
    return (DEMO / f"{split}.txt").read_text(encoding="utf-8")


@pytest.mark.slow
def test_generator_check_mode_reproduces_committed_files():
    proc = subprocess.run([sys.executable, str(GENERATOR), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_check_mode_detects_a_difference(gen, tmp_path):
    for name in ("train.txt", "valid.txt", "test.txt", "optimum.json"):
        (tmp_path / name).write_bytes((DEMO / name).read_bytes())
    (tmp_path / "test.txt").write_text(read("test") + "the dog runs .\n", encoding="utf-8")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("split, prefix", [("test", ""), ("valid", "valid_")])
def test_optimum_matches_reparse(gen, optimum, split, prefix):
    auto = gen.Automaton()
    logps = gen.score_text(auto, read(split))
    x = -math.fsum(logps) / len(logps)
    assert optimum[f"{prefix}tokens" if prefix else "test_tokens"] == len(logps)
    assert optimum[f"{prefix}cross_entropy_nats"] == pytest.approx(x, abs=1e-9)
    assert optimum[f"{prefix}perplexity"] == pytest.approx(math.exp(x), rel=1e-9)
    assert optimum[f"{prefix}bits_per_token"] == pytest.approx(x / math.log(2), abs=1e-9)
    assert 8 < optimum[f"{prefix}perplexity"] < 25


def test_token_counts_and_format(gen, optimum):
    vocab = {}
    for split, (_, n_words) in gen.SPLITS.items():
        text = read(split)
        assert text.endswith("\n")
        lines = text.split("\n")[:-1]
        assert all(line and line == " ".join(line.split()) and line == line.lower()
                   for line in lines)
        words = text.split()
        # generation stops at the first sentence reaching the target
        longest = max(len(line.split()) for line in lines)
        assert n_words <= len(words) < n_words + longest
        n_tokens = len(words) + len(lines)  # one <eos> per line
        if split == "test":
            assert optimum["test_tokens"] == n_tokens
        elif split == "valid":
            assert optimum["valid_tokens"] == n_tokens
        vocab[split] = set(words)
    assert vocab["train"] == gen.lexicon()
    assert optimum["vocab_size"] == len(vocab["train"])
    assert vocab["valid"] <= vocab["train"] and vocab["test"] <= vocab["train"]


def test_committed_size_is_small():
    total = sum((DEMO / name).stat().st_size
                for name in ("train.txt", "valid.txt", "test.txt", "optimum.json"))
    assert total < 1_500_000
