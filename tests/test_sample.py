"""Sampling: the effect of top-k, top-p and temperature, tokens streamed as drawn, their log-probabilities."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from rnnlm.cli import cli
from rnnlm.cli.sample import escape_controls

import rnnlm
from rnnlm.sample import Texts, draw, encode_prompt, filter_probabilities

from .test_score import make_model


def greedy(model, prompt_ids, steps):
    """The argmax continuation, step by step through the Decoder."""
    decoder = rnnlm.Decoder(model)
    state = decoder.initial(1)
    for token in prompt_ids:
        state = decoder.advance(state, [token])
    out = []
    for _ in range(steps):
        token = int(np.argmax(decoder.log_probs(state)[0]))
        out.append(token)
        state = decoder.advance(state, [token])
    return out


@pytest.mark.parametrize("options", [dict(top_k=1), dict(temperature=1e-6)], ids=["top-k 1", "temperature 0"])
def test_top_k_1_and_a_temperature_near_0_draw_the_argmax(options):
    model = make_model("class")
    prompt_ids, _ = encode_prompt(model.vocab, "the cat")
    drawn = [int(tokens[0]) for tokens, _ in draw(model, prompt_ids, length=12, seed=5, **options)]
    assert drawn == greedy(model, prompt_ids, 12)


def test_filters_restrict_and_sharpen_the_distribution():
    log_p = np.log(np.array([[0.5, 0.25, 0.15, 0.1]]))
    np.testing.assert_allclose(filter_probabilities(log_p), np.exp(log_p))
    assert np.count_nonzero(filter_probabilities(log_p, top_k=2)) == 2
    # top-p: the smallest set of the likeliest tokens whose mass reaches p
    for top_p, support in ((0.5, 1), (0.6, 2), (0.75, 2), (0.8, 3), (1.0, 4)):
        p = filter_probabilities(log_p, top_p=top_p)
        assert np.count_nonzero(p) == support, top_p
        np.testing.assert_allclose(p[0, :support], np.exp(log_p[0, :support]) / np.exp(log_p[0, :support]).sum())
    cold, hot = filter_probabilities(log_p, temperature=0.5), filter_probabilities(log_p, temperature=2.0)
    assert cold[0, 0] > 0.5 > hot[0, 0]
    assert filter_probabilities(log_p, temperature=1e-3)[0, 0] == pytest.approx(1.0)


def test_the_streamed_pieces_make_the_text_and_its_log_probability_is_the_models():
    """A word sample stops at <eos>: its log-probability, <eos> included, is the sentence's score."""
    model = make_model("full")
    texts = Texts(model.vocab, np.zeros(0, np.int64), 3, stop_at_eos=True)
    streamed = ["", "", ""]
    for tokens, log_p in draw(model, [], num=3, seed=2):
        for k, piece in enumerate(texts.add(tokens, log_p)):
            streamed[k] += piece
    assert streamed == texts.texts() == rnnlm.sample(model, num=3, seed=2)[0]
    np.testing.assert_allclose(texts.ln_probs, rnnlm.score(model, streamed), rtol=1e-5)


def test_the_cuda_backend_draws_the_same_tokens():
    model = make_model("class")
    assert rnnlm.sample(model, prompt="a dog", length=6, seed=3, device="cuda") == \
        rnnlm.sample(model, prompt="a dog", length=6, seed=3)


def test_command_streams_one_sample_and_gives_log_probabilities(tmp_path):
    make_model("full").save(tmp_path / "model.npz")
    runner = CliRunner()
    plain = runner.invoke(cli, ["sample", str(tmp_path / "model.npz"), "--length", "8", "--prompt", "the cat"])
    assert plain.exit_code == 0, plain.output
    text = rnnlm.sample(make_model("full"), prompt="the cat", length=8)[0][0]
    assert plain.stdout == text + "\n"
    out = runner.invoke(cli, ["sample", str(tmp_path / "model.npz"), "--num", "2", "--json"]).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["type"] for r in records] == ["sample", "sample"]
    expected = rnnlm.score(make_model("full"), [r["text"] for r in records])
    np.testing.assert_allclose([r["ln_prob"] for r in records], expected, rtol=1e-5)


def test_control_characters_are_escaped_for_a_terminal():
    assert escape_controls("a\x1b[31mb\u200bc\n\td") == "a\\x1b[31mb\\u200bc\n\td"
