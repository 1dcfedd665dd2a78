"""Per-token log-probabilities and dynamic evaluation (rnnlm.dynamic), on both backends at toy sizes."""

import inspect
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from rnnlm.cli import cli

import rnnlm
from rnnlm import reference, step
from rnnlm.backends import cpu
from rnnlm.corpus import batchify, load_corpus
from rnnlm.dynamic import Adapter, Decay, DynamicConfig, StreamScorer, gradient_rms, keep_factors, token_log_probs
from rnnlm.model import Model, frequency_classes

# a text that repeats itself, so that adapting to its first half helps on its second
TEXT = "the cat sat on the mat\nthe dog ran to a cat\n" * 4


def device_of(ops):
    return ops.__name__.rsplit(".", 1)[-1]


@pytest.fixture(params=["full", "class"])
def model_and_ids(request, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ids, vocab = load_corpus(tmp_path / "text.txt")
    bounds = None if request.param == "full" else frequency_classes(np.bincount(ids, minlength=len(vocab)), 3)
    return Model.create(vocab, 8, seed=1, class_bounds=bounds), ids, tmp_path / "text.txt"


def test_static_scores_sum_to_perplexity(ops, model_and_ids):
    model, ids, path = model_and_ids
    ln_p = token_log_probs(model, ids, device_of(ops))
    assert ln_p.shape == (len(ids),) and (ln_p < 0).all()
    assert math.exp(-ln_p.mean()) == pytest.approx(rnnlm.perplexity(model, path)["perplexity"], rel=1e-5)


def assert_no_leak(model, ids, device, config):
    """Changing token k changes no score before it (a step taken before scoring its segment would), the
    later ones do, the model's own weights stay, and a second run gives the same numbers."""
    ids = ids[:24]
    before = model.params["W_o"].copy()
    ln_p = token_log_probs(model, ids, device, config)
    np.testing.assert_array_equal(model.params["W_o"], before)
    k = 17  # inside the fourth segment of 5: a leak from that segment's own step would show on 15 and 16
    changed = ids.copy()
    changed[k] = (ids[k] + 1) % len(model.vocab)
    ln_q = token_log_probs(model, changed, device, config)
    np.testing.assert_array_equal(ln_p[:k], ln_q[:k])
    assert not np.allclose(ln_p[k + 1:], ln_q[k + 1:])
    np.testing.assert_array_equal(token_log_probs(model, ids, device, config), ln_p)


@pytest.mark.parametrize("config", [DynamicConfig(lr=0.05, segment=5, rule="rms", decay=0.1),
                                    DynamicConfig(lr=0.5, segment=5, rule="sgd", decay=0.1)])
@pytest.mark.slow
def test_a_later_token_never_changes_an_earlier_score(model_and_ids, config):
    model, ids, _ = model_and_ids
    assert_no_leak(model, ids, "cpu", config)


@pytest.mark.slow
def test_a_later_token_never_changes_an_earlier_score_on_cuda(model_and_ids):
    model, ids, _ = model_and_ids
    assert_no_leak(model, ids, "cuda", DynamicConfig(lr=0.05, segment=5, rule="rms", decay=0.1))


def test_adaptation_helps_on_a_repeated_text(model_and_ids):
    model, ids, _ = model_and_ids
    static = token_log_probs(model, ids)
    for config in (DynamicConfig(lr=1.0, segment=5, rule="sgd"), DynamicConfig(lr=0.05, segment=5, rule="rms")):
        adapted = token_log_probs(model, ids, dynamic=config)
        np.testing.assert_allclose(adapted[:5], static[:5], rtol=1e-6)  # the first segment is scored before any step
        assert adapted.mean() > static.mean() + 0.1


@pytest.mark.slow
def test_both_backends_adapt_alike(model_and_ids):
    model, ids, _ = model_and_ids
    config = DynamicConfig(lr=0.05, segment=6, rule="rms", decay=0.05)
    ids = ids[:24]
    np.testing.assert_allclose(token_log_probs(model, ids, "cuda", config),
                               token_log_probs(model, ids, "cpu", config), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings, message", [
    ({"lr": 0.0}, "--dynamic must be a positive"),
    ({"lr": -1.0}, "--dynamic must be a positive"),
    ({"lr": float("nan")}, "--dynamic must be a positive"),
    ({"lr": 0.1, "segment": 0}, "--dynamic-segment"),
    ({"lr": 0.1, "decay": 1.0}, "--dynamic-decay"),
    ({"lr": 0.1, "rule": "adam"}, "--dynamic-rule"),
    ({"lr": 0.1, "direct_lr": -1.0}, "--dynamic-direct-lr"),
    ({"lr": 0.1, "rule": "sgd", "stats": "train.txt"}, "--dynamic-stats needs --dynamic-rule rms"),
])
def test_bad_settings_are_refused(settings, message, model_and_ids):
    model, ids, _ = model_and_ids
    with pytest.raises(rnnlm.RnnlmError, match=message):
        token_log_probs(model, ids, dynamic=DynamicConfig(**settings))


def test_the_stream_may_come_in_pieces(model_and_ids):
    model, ids, _ = model_and_ids
    config = DynamicConfig(lr=0.05, segment=5, rule="rms", decay=0.05)
    whole = token_log_probs(model, ids, dynamic=config)
    scorer = StreamScorer(model, dynamic=config)
    pieces = [scorer.log_probs(ids[a:b]) for a, b in [(0, 7), (7, 10), (10, 10), (10, 21), (21, len(ids))]]
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=1e-6)


def test_a_run_away_adaptation_restarts_from_the_trained_weights(tmp_path, monkeypatch):
    (tmp_path / "text.txt").write_text(TEXT * 5, encoding="utf-8")
    ids, vocab = load_corpus(tmp_path / "text.txt")
    model = Model.create(vocab, 8, seed=1)
    model.save(tmp_path / "model.npz")
    sane = StreamScorer(model, dynamic=DynamicConfig(lr=0.05, segment=5))
    sane.log_probs(ids)
    wild = StreamScorer(model, dynamic=DynamicConfig(lr=1e4, segment=5, rule="sgd"))
    guarded = wild.log_probs(ids)
    assert sane.restarts == 0 and wild.restarts >= 1
    monkeypatch.setattr(rnnlm.dynamic, "diverged", lambda mean, vocab_size: False)
    unguarded = token_log_probs(model, ids, dynamic=DynamicConfig(lr=1e4, segment=5, rule="sgd"))
    assert guarded.mean() > unguarded.mean() + 1
    monkeypatch.undo()
    result = run_cli("perplexity", tmp_path / "model.npz", tmp_path / "text.txt", "--dynamic", "1e4",
                     "--dynamic-rule", "sgd", "--dynamic-segment", "5", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["dynamic_restarts"] == wild.restarts
    assert "restarted from the trained weights" in result.stderr


def test_a_tied_stacked_model_adapts_without_a_leak(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ids, vocab = load_corpus(tmp_path / "text.txt")
    model = Model.create(vocab, 8, seed=1, layers=2, tied=True)
    static = token_log_probs(model, ids)
    assert math.exp(-static.mean()) == pytest.approx(rnnlm.perplexity(model, tmp_path / "text.txt")["perplexity"])
    config = DynamicConfig(lr=0.05, segment=5, rule="rms", decay=0.1)
    assert token_log_probs(model, ids, dynamic=config).mean() > static.mean()
    assert_no_leak(model, ids, "cpu", config)


def stats_config(model, ids, **settings):
    """A config with the fixed RMS of gradients on ids (two streams of 5-token windows)."""
    return DynamicConfig(lr=0.01, segment=5, rms=gradient_rms(model, ids, 5, streams=2), **settings)


def test_gradient_rms_is_the_root_mean_square_of_the_windows_gradients(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ids, vocab = load_corpus(tmp_path / "text.txt")
    model = Model.create(vocab, 8, seed=1)
    model.params.update({name: p.astype(np.float64) for name, p in model.params.items()})
    inputs, targets = batchify(ids, vocab.boundary_id, 2, 5)
    squares, state = [], np.zeros((1, 2, 8))
    for start in range(0, len(inputs), 5):
        _, grads, state = reference.loss_and_grads(model.params, inputs[start:start + 5], targets[start:start + 5],
                                                   state)
        squares.append({name: step.rows(name, g) ** 2 for name, g in grads.items()})
    assert len(squares) == 5
    rms = gradient_rms(model, ids, 5, streams=2)
    assert sorted(rms) == sorted(model.params)
    for name, value in rms.items():
        np.testing.assert_allclose(value, np.sqrt(np.mean([s[name] for s in squares], axis=0)), rtol=1e-6,
                                   atol=1e-12, err_msg=name)


def test_gradient_rms_needs_a_whole_window(model_and_ids):
    model, ids, _ = model_and_ids
    with pytest.raises(rnnlm.RnnlmError, match="--dynamic-stats needs a text of at least 500 tokens"):
        gradient_rms(model, ids, 5)


def test_the_lazy_decay_equals_pulling_every_row_at_every_step(model_and_ids, monkeypatch):
    model, ids, _ = model_and_ids
    for config in (DynamicConfig(lr=0.05, segment=4, decay=0.2), stats_config(model, ids, decay=0.2)):
        lazy = token_log_probs(model, ids, dynamic=config)
        with monkeypatch.context() as patched:
            patched.setattr(Decay, "rows_read", lambda self, inputs, targets: {
                name: np.arange(len(stamps), dtype=np.int32) for name, stamps in self.stamps.items()})
            every_row = token_log_probs(model, ids, dynamic=config)
        np.testing.assert_allclose(lazy, every_row, rtol=1e-5)
        assert not np.allclose(lazy, token_log_probs(model, ids, dynamic=replace(config, decay=0.0)), rtol=1e-3)


def test_the_fixed_rms_rule_and_the_direct_rate_adapt_without_a_leak(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ids, vocab = load_corpus(tmp_path / "text.txt")
    bounds = frequency_classes(np.bincount(ids, minlength=len(vocab)), 3)
    model = Model.create(vocab, 8, seed=1, class_bounds=bounds, direct=1 << 10, direct_order=3)
    static = token_log_probs(model, ids)
    config = stats_config(model, ids, decay=0.05, direct_lr=0.5)
    assert token_log_probs(model, ids, dynamic=config).mean() > static.mean() + 0.1
    assert_no_leak(model, ids, "cpu", config)
    assert not np.allclose(token_log_probs(model, ids, dynamic=replace(config, direct_lr=0.0)),
                           token_log_probs(model, ids, dynamic=config))


def test_the_stats_text_is_read_once_for_the_config(model_and_ids, tmp_path):
    model, ids, path = model_and_ids
    (tmp_path / "long.txt").write_text(TEXT * 20, encoding="utf-8")
    config = DynamicConfig(lr=0.01, segment=5, stats=str(tmp_path / "long.txt")).prepared(model)
    assert config.rms is not None and config.prepared(model) is config
    np.testing.assert_array_equal(token_log_probs(model, ids, dynamic=config),
                                  token_log_probs(model, ids, dynamic=replace(config, rms=None)))


def run_cli(*args):
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in inspect.signature(CliRunner).parameters else CliRunner()
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_the_cli_scores_with_the_training_texts_rms(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "train.txt").write_text(TEXT * 20, encoding="utf-8")
    ids, vocab = load_corpus(tmp_path / "text.txt")
    model = Model.create(vocab, 8, seed=1)
    model.save(tmp_path / "model.npz")
    options = ["--dynamic", "0.01", "--dynamic-segment", "5", "--dynamic-decay", "0.1", "--dynamic-stats",
               tmp_path / "train.txt", "--dynamic-direct-lr", "0.5"]
    result = run_cli("perplexity", tmp_path / "model.npz", tmp_path / "text.txt", *options, "--json")
    assert result.exit_code == 0, result.output
    config = DynamicConfig(lr=0.01, segment=5, decay=0.1, stats=str(tmp_path / "train.txt"), direct_lr=0.5)
    expected = math.exp(-token_log_probs(rnnlm.load(tmp_path / "model.npz"), ids, dynamic=config).mean())
    assert json.loads(result.stdout)["perplexity"] == pytest.approx(expected, rel=1e-9)
    assert expected != pytest.approx(math.exp(-token_log_probs(model, ids, dynamic=replace(config, stats=None)).mean()))
    scored = run_cli("score", tmp_path / "model.npz", tmp_path / "text.txt", "--stream", *options, "--json")
    assert json.loads(scored.stdout.splitlines()[-1])["perplexity"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--dynamic-stats", "train.txt"], "need --dynamic LR"),
    (["--dynamic-direct-lr", "1"], "need --dynamic LR"),
    (["--dynamic", "0.1", "--dynamic-rule", "sgd", "--dynamic-stats", "train.txt"], "needs --dynamic-rule rms"),
    (["--dynamic", "0.1", "--dynamic-direct-lr", "-1"], "Invalid value for '--dynamic-direct-lr'"),
])
def test_bad_dynamic_options_are_usage_errors(args, message, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    _, vocab = load_corpus(tmp_path / "text.txt")
    Model.create(vocab, 8, seed=1).save(tmp_path / "model.npz")
    result = run_cli("perplexity", tmp_path / "model.npz", tmp_path / "text.txt", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_a_fixed_rms_step_divides_the_gradient_by_rms_plus_eps(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    ids, vocab = load_corpus(tmp_path / "text.txt")
    model = Model.create(vocab, 8, seed=1)
    rng = np.random.default_rng(0)
    rms = {name: rng.random(step.rows(name, p).shape).astype(np.float32) * 1e-3 for name, p in model.params.items()}
    config = DynamicConfig(lr=1e-4, segment=5, rms=rms, eps=1e-4)
    ops = cpu
    inputs, targets = (np.asarray(a[:5], np.int32).reshape(5, 1) for a in (np.r_[vocab.boundary_id, ids[:-1]], ids))
    window = step.Window(ops, 5, 1, 8, len(vocab))
    params, reference_params = (step.to_device(ops, model.params) for _ in range(2))
    grads = step.zero_grads(ops, reference_params)
    step.forward_backward(ops, reference_params, grads, window, inputs, targets)
    grads = step.host_grads(ops, grads, window)
    window.clear_slots()  # as an update would leave them
    Adapter(ops, params, window, config, None).update(window, (inputs, targets), inputs, targets)
    for name, before in model.params.items():
        expected = step.rows(name, before) - 1e-4 * step.rows(name, grads[name]) / (rms[name] + 1e-4)
        np.testing.assert_allclose(step.rows(name, params[name]), expected, rtol=1e-5, atol=1e-9, err_msg=name)


def test_the_fused_pull_and_step_equals_the_pull_then_the_fixed_rms_step(ops):
    """pulled_rms_update, the one pass FixedRMS makes with a decay, against its two passes: decay_rows, then
    adam_update at β1 = 0, β2 = 1 (float32, as dynamic evaluation runs)."""
    rng = np.random.default_rng(3)
    shape = (7, 5)
    param, grad, start = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    keep, moment2 = (rng.random(shape).astype(np.float32) for _ in range(2))
    clipping = ops.asarray(np.array([2.0, 0.5]))
    lr, eps = np.float32(0.01), np.float32(1e-3)
    fused = ops.asarray(param)
    ops.pulled_rms_update(fused, ops.asarray(grad), ops.asarray(start), ops.asarray(keep), ops.asarray(moment2), lr,
                          clipping, eps)
    two_passes = ops.asarray(param)
    every_row, once = (ops.asarray(a.astype(np.int32)) for a in (np.arange(shape[0]), np.ones(shape[0])))
    ops.decay_rows(two_passes, ops.asarray(start), ops.asarray(keep), every_row, once)
    zero, one = np.float32(0), np.float32(1)
    ops.adam_update(two_passes, ops.asarray(grad), ops.zeros(shape, np.float32), ops.asarray(moment2), lr, clipping,
                    zero, zero, one, eps)
    np.testing.assert_allclose(ops.to_numpy(fused), ops.to_numpy(two_passes), rtol=1e-6, atol=1e-7)
    expected = start + keep * (param - start) - 0.01 * 0.5 * grad / (np.sqrt(moment2) + 1e-3)
    np.testing.assert_allclose(ops.to_numpy(fused), expected, rtol=1e-5, atol=1e-6)


def test_the_decay_pulls_each_weight_by_its_rms_over_the_mean():
    rms = {"W_s": np.array([[1.0, 3.0]]), "b_s": np.array([0.0] * 11 + [240.0])}  # means 2 and 20: r̄ = 11
    keep = keep_factors(DynamicConfig(lr=0.1, decay=0.1, rms=rms), {name: r.astype(np.float32)
                                                                      for name, r in rms.items()})
    np.testing.assert_allclose(keep["W_s"], [[1 - 0.1 / 11, 1 - 0.3 / 11]], rtol=1e-6)
    np.testing.assert_allclose(keep["b_s"], [1.0] * 11 + [0.0])  # 0.1 · 240 / 11 > 1: capped at a full pull
    assert keep["W_s"].dtype == np.float32
    uniform = keep_factors(DynamicConfig(lr=0.1, decay=0.1), {"W_s": np.zeros((2, 2), np.float64)})
    np.testing.assert_array_equal(uniform["W_s"], np.full((2, 2), 0.9))
