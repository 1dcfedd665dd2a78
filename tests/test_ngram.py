"""Interpolation with an ARPA n-gram model (rnnlm.ngram, ``rnnlm perplexity --ngram``).

tests/data/tiny.arpa is a hand-written bigram model over <unk> <s> </s> the cat sat on a mat.
"""

import gzip
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from rnnlm.cli import cli

import rnnlm
from rnnlm import ngram
from rnnlm.corpus import load_corpus
from rnnlm.model import Model

kenlm = pytest.importorskip("kenlm")

ARPA = Path(__file__).parent / "data" / "tiny.arpa"
TEXT = "the cat sat on a mat\na cat sat on the dog\n\nthe dog sat\non a mat the cat\n"
L = math.log(10)


def invoke(*args):
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in inspect.signature(CliRunner).parameters else CliRunner()
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def work(tmp_path):
    """A text, and a random 8-unit model whose vocabulary is the text's (dog: unknown to the n-gram)."""
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "valid.txt").write_text("the cat sat on a mat\nthe dog\n", encoding="utf-8")
    _, vocab = load_corpus(tmp_path / "text.txt")
    Model.create(vocab, 8, seed=3).save(tmp_path / "model.npz")
    return tmp_path


def kenlm_perplexity(path):
    """exp(-mean ln p) over every word and </s>, from kenlm's own full_scores."""
    model = kenlm.Model(str(ARPA))
    scores = [s[0] for line in Path(path).read_text().splitlines() for s in model.full_scores(line)]
    return math.exp(-sum(scores) * L / len(scores))


def test_boundary_is_scored_as_end_of_sentence_after_start_of_sentence(work):
    model = rnnlm.load(work / "model.npz")
    ids = np.array([model.vocab.index[w] for w in ["the", "cat"]] + [model.vocab.boundary_id] +
                   [model.vocab.index["mat"]])
    ln_p, oov = ngram.stream_log_probs(ngram.NgramModel(ARPA), model.vocab, ids)
    # p(the | <s>), p(cat | the), p(</s> | cat), then a last line without its end: p(mat | <s>) backs off
    expected = np.array([-0.3010, -0.4771, -0.6990, -0.4771 - 1.3979]) * L
    np.testing.assert_allclose(ln_p, expected, rtol=1e-6)
    assert not oov.any()


def test_lambda_0_is_the_rnn_and_lambda_1_the_ngram(work):
    text, model = work / "text.txt", rnnlm.load(work / "model.npz")
    rnn_only = ngram.perplexity(model, text, ngram=ARPA, lam=0.0)
    assert rnn_only["perplexity"] == pytest.approx(rnnlm.perplexity(model, text)["perplexity"], rel=1e-5)
    ngram_only = ngram.perplexity(model, text, ngram=ARPA, lam=1.0)
    assert ngram_only["perplexity"] == pytest.approx(kenlm_perplexity(text), rel=1e-9)
    assert ngram_only["ngram_perplexity"] == ngram_only["perplexity"]
    half = ngram.perplexity(model, text, ngram=ARPA, lam=0.5)["perplexity"]
    assert half < max(rnn_only["perplexity"], ngram_only["perplexity"])  # a mixture beats its worse part
    assert rnn_only["ngram_oov_tokens"] == 2  # the two "dog"s
    assert (rnn_only["rnn_words_unknown_to_ngram"], rnn_only["ngram_words_unknown_to_rnn"]) == (1, 0)


def test_gzip_arpa_scores_as_the_plain_one(work):
    packed = work / "tiny.arpa.gz"
    packed.write_bytes(gzip.compress(ARPA.read_bytes()))
    model = rnnlm.load(work / "model.npz")
    plain = ngram.perplexity(model, work / "text.txt", ngram=ARPA, lam=0.3)
    assert ngram.perplexity(model, work / "text.txt", ngram=packed, lam=0.3) == plain


def test_em_never_lowers_the_likelihood_and_finds_the_maximum():
    rng = np.random.default_rng(0)
    ln_rnn, ln_ngram = -rng.gamma(2.0, 2.0, 500), -rng.gamma(2.0, 2.0, 500)
    lam, history = ngram.fit_lambda(ln_rnn, ln_ngram, start=0.05)
    assert len(history) > 3 and all(b >= a - 1e-9 for a, b in zip(history, history[1:], strict=False))
    grid = np.linspace(0.001, 0.999, 999)
    best = grid[np.argmax([ngram.mix(ln_rnn, ln_ngram, g).sum() for g in grid])]
    assert abs(lam - best) < 2e-3


def test_lambda_auto_fits_on_the_validation_text(work):
    result = invoke("perplexity", work / "model.npz", work / "text.txt", "--ngram", ARPA, "--lambda", "auto",
                    "--lambda-text", work / "valid.txt", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    model = rnnlm.load(work / "model.npz")
    ids = {t: load_corpus(work / t, vocab=model.vocab)[0] for t in ("text.txt", "valid.txt")}
    ln_rnn = rnnlm.dynamic.token_log_probs(model, ids["valid.txt"])
    ln_ngram, _ = ngram.stream_log_probs(ngram.NgramModel(ARPA), model.vocab, ids["valid.txt"])
    assert record["lambda"] == pytest.approx(ngram.fit_lambda(ln_rnn, ln_ngram)[0])
    assert record["lambda_text"] == str(work / "valid.txt") and record["ngram_order"] == 2
    fixed = ngram.perplexity(model, work / "text.txt", ngram=ARPA, lam=record["lambda"])
    assert record["perplexity"] == pytest.approx(fixed["perplexity"])


def test_text_output_names_both_models_and_the_mismatch(work):
    result = invoke("perplexity", work / "model.npz", work / "text.txt", "--ngram", ARPA, "--lambda", "0.25")
    assert result.exit_code == 0, result.output
    assert "2-gram alone" in result.stdout and "λ = 0.2500" in result.stdout
    assert "1 RNN words unknown to the n-gram model" in result.stdout


def arpa_variants():
    text = ARPA.read_text()
    return {
        "truncated in the 1-grams": (text[: text.index("sat\t")], "truncated"),
        "truncated in the 2-grams": (text[: text.index("on a")], "could not be read as an ARPA model"),
        "cut before the end": (text[: text.index("\\end\\")], "could not be read as an ARPA model"),
        "not ARPA": ("the cat sat on the mat\n", "is not an ARPA file"),
        "empty": ("", "is empty"),
        "missing <unk>": (text.replace("ngram 1=9", "ngram 1=8").replace("-1.2041\t<unk>\t-0.3010\n", ""),
                          "has no <unk>"),
        "another convention": (text.replace("</s>", "<eos>"), "has no </s>"),
    }


@pytest.mark.parametrize("case", list(arpa_variants()))
def test_a_bad_arpa_is_one_error_line_and_nothing_written(case, work):
    content, message = arpa_variants()[case]
    (work / "bad.arpa").write_text(content)
    before = sorted(p.name for p in work.iterdir())
    result = invoke("perplexity", work / "model.npz", work / "text.txt", "--ngram", work / "bad.arpa")
    assert result.exit_code == 1 and result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert sorted(p.name for p in work.iterdir()) == before


@pytest.mark.parametrize("args, message", [
    (["--ngram", ARPA, "--lambda", "1.5"], "Invalid value for '--lambda'"),
    (["--ngram", ARPA, "--lambda", "-0.1"], "Invalid value for '--lambda'"),
    (["--ngram", ARPA, "--lambda", "nan"], "Invalid value for '--lambda'"),
    (["--ngram", ARPA, "--lambda", "auto"], "--lambda auto and --lambda-text"),
    (["--lambda", "0.5"], "need --ngram"),
    (["--dynamic", "0"], "Invalid value for '--dynamic'"),
    (["--dynamic", "-1"], "Invalid value for '--dynamic'"),
    (["--dynamic-segment", "5"], "need --dynamic"),
])
def test_bad_options_are_usage_errors(args, message, work):
    result = invoke("perplexity", work / "model.npz", work / "text.txt", *args)
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith("Error: ") and message in result.stderr


def test_a_character_model_is_refused(work):
    _, vocab = load_corpus(work / "text.txt", level="char")
    Model.create(vocab, 8).save(work / "char.npz")
    result = invoke("perplexity", work / "char.npz", work / "text.txt", "--ngram", ARPA)
    assert result.exit_code == 1 and result.stderr.startswith("Error: --ngram needs a word-level model")


def test_the_library_refuses_lambda_out_of_range(work):
    with pytest.raises(rnnlm.RnnlmError, match="--lambda must be"):
        ngram.perplexity(rnnlm.load(work / "model.npz"), work / "text.txt", ngram=ARPA, lam=1.01)


def score_records(*args):
    result = invoke("score", *args, "--json")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_score_mixes_per_sentence(work):
    text, model = work / "text.txt", work / "model.npz"
    ngram_only = score_records(model, text, "--ngram", ARPA, "--lambda", "1")
    lm = kenlm.Model(str(ARPA))
    expected = [lm.score(line) * L for line in TEXT.splitlines()]
    assert [r["ln_prob"] for r in ngram_only[:-1]] == pytest.approx(expected, rel=1e-6)  # kenlm sums float32
    rnn_only = score_records(model, text, "--ngram", ARPA, "--lambda", "0")
    assert rnn_only == score_records(model, text)


def test_score_stream_with_dynamic_and_ngram_is_perplexity(work):
    options = ["--ngram", ARPA, "--lambda", "auto", "--lambda-text", work / "valid.txt", "--dynamic", "0.01",
               "--dynamic-segment", "4"]
    summary = score_records(work / "model.npz", work / "text.txt", "--stream", *options)[-1]
    result = invoke("perplexity", work / "model.npz", work / "text.txt", *options, "--json")
    assert summary["perplexity"] == pytest.approx(json.loads(result.stdout)["perplexity"], rel=1e-9)
    result = invoke("score", work / "model.npz", work / "text.txt", "--dynamic", "0.01")
    assert result.exit_code == 2 and "--dynamic needs --stream" in result.stderr
