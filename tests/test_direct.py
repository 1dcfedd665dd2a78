"""Direct features (Mikolov's RNNME): hash keys, scores and the sparse step of both backends against the numpy
reference, the float64 finite-difference check of a window's gradients, and direct models through training,
the model file, perplexity, score, sample and dynamic evaluation."""

import importlib
import json

import numba
import numpy as np
import pytest
from click.testing import CliRunner
from rnnlm.cli import cli

import rnnlm
from rnnlm import reference, runplan, step
from rnnlm.backends import cpu
from rnnlm.direct import context_history, history_before
from rnnlm.dynamic import DynamicConfig, token_log_probs
from rnnlm.errors import RnnlmError
from rnnlm.model import init_params, word_classes, write_npz
from rnnlm.score import Decoder, score
from tests.conftest import reference_perplexity

V, m, T, B, ORDER, BOUNDARY = 11, 5, 4, 3, 4, 0
CLASS_BOUNDS = np.array([0, 2, 6, 11], np.int32)


def history(rng, rows):
    """(rows, B) tokens with a cut (-1) at the top, boundary tokens and a repeated context."""
    tokens = rng.integers(0, V, (rows, B)).astype(np.int32)
    tokens[0, 0] = -1
    tokens[3, 1] = tokens[2, 2] = BOUNDARY
    tokens[rows - 2 :, 0] = tokens[rows - 2 :, 2]  # the same two tokens: the same contexts, the same entries
    return tokens


def test_direct_keys_equal_the_reference(ops):
    rng = np.random.default_rng(0)
    tokens = history(rng, ORDER - 2 + T)
    keys = ops.zeros((T * B, ORDER), np.int64)
    ops.direct_keys(ops.asarray(tokens), BOUNDARY, keys)
    expected = reference.direct_keys(tokens, BOUNDARY, ORDER)
    np.testing.assert_array_equal(ops.to_numpy(keys), expected)
    assert (expected[:, 0] >= 0).all() and (expected == -1).any()  # order 0 always, some contexts cut


def test_a_context_is_cut_at_the_boundary_token_but_may_end_with_it():
    tokens = np.array([[5], [BOUNDARY], [7]], np.int32)  # x_{t-3} = 5, x_{t-2} = <eos>, x_{t-1} = 7
    keys = reference.direct_keys(tokens, BOUNDARY, 4)
    assert (keys[0, :3] >= 0).all() and (keys[0, 3:] == -1).all()


@pytest.mark.parametrize("size, width", [(37, 6), (5, 11)], ids=["table-wider-than-rows", "rows-wrap-the-table"])
def test_direct_scores_and_scatter_equal_the_reference(ops, size, width):
    rng = np.random.default_rng(1)
    keys = reference.direct_keys(history(rng, ORDER - 2 + T), BOUNDARY, ORDER)
    W_d = rng.standard_normal(size + 3)
    region = (3, size)
    bounds = np.array([0, 2, width], np.int32)
    row_classes = rng.integers(0, 2, T * B).astype(np.int32)
    G = rng.standard_normal((T * B, width))
    out = rng.standard_normal((T * B, width))
    expected_out, expected_W = out.copy(), W_d.copy()
    for r, c in enumerate(row_classes):
        lo, hi = bounds[c], bounds[c + 1]
        row_keys = np.where(keys[r : r + 1] >= 0, keys[r : r + 1] + lo, -1)
        expected_out[r, : hi - lo] += reference.direct_term(W_d, row_keys, region, hi - lo)[0]
        expected_W += 0.5 * reference.direct_grad(W_d, row_keys, region, G[r : r + 1, : hi - lo])
    device_out, device_W = ops.asarray(out), ops.asarray(W_d)
    args = (ops.asarray(keys), *region, ops.asarray(row_classes), ops.asarray(bounds))
    ops.direct_scores(device_W, *args, device_out)
    ops.direct_scatter(device_W, *args, ops.asarray(G), 0.5)
    np.testing.assert_allclose(ops.to_numpy(device_out), expected_out, rtol=1e-13)
    np.testing.assert_allclose(ops.to_numpy(device_W), expected_W, rtol=1e-12, atol=1e-14)


def test_the_sparse_step_gives_the_same_bits_whatever_the_threads():
    rng = np.random.default_rng(2)
    keys = reference.direct_keys(history(rng, ORDER - 2 + T), BOUNDARY, ORDER)
    G = rng.standard_normal((T * B, V)).astype(np.float32)
    tables = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        W_d = rng.standard_normal(53).astype(np.float32) if not tables else tables[0][1].copy()
        start = W_d.copy()
        cpu.direct_scatter(W_d, keys, 0, 53, np.zeros(T * B, np.int32), np.array([0, V], np.int32), G, -0.7)
        tables.append((W_d, start))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert tables[0][0].tobytes() == tables[1][0].tobytes()


class Problem:
    """A float64 window of a model with direct features: nonzero weights, carried states and table, the
    contexts reaching into the inputs before the window, a boundary token and a repeated context."""

    def __init__(self, class_bounds, size=29):
        rng = np.random.default_rng(3)
        n_classes = None if class_bounds is None else len(class_bounds) - 1
        params = init_params(V, m, rng, np.float64, n_classes=n_classes, direct=size)
        self.params = {name: p + 0.3 * rng.standard_normal(p.shape) for name, p in params.items()}
        tokens = history(rng, ORDER - 2 + T + 1)
        tokens[tokens < 0] = 4
        self.before, self.inputs, self.targets = tokens[: ORDER - 2], tokens[ORDER - 2 : -1], tokens[ORDER - 1 :]
        self.before[0, 1] = -1
        self.keys = reference.direct_keys(np.concatenate([self.before, self.inputs]), BOUNDARY, ORDER)
        self.s0 = 0.5 * rng.standard_normal((1, B, m))
        self.class_bounds = class_bounds

    def window(self, ops):
        window = step.Window(ops, T, B, m, V, np.float64, class_bounds=self.class_bounds, direct_order=ORDER,
                             boundary_id=BOUNDARY)
        ops.copy_into(self.s0[0], window.S[0][0])
        window.direct.set_history(self.before)
        classes = None if self.class_bounds is None else word_classes(self.class_bounds)[self.targets]
        tokens = [ops.asarray(t) for t in (self.inputs, self.targets)] + ([] if classes is None else
                                                                           [ops.asarray(classes)])
        return window, tokens

    def reference_loss(self, params):
        return reference.loss(params, self.inputs, self.targets, self.s0, self.class_bounds, keys=self.keys)[0]

    def kernel_grads(self, ops):
        """Loss and the gradients of the mean loss, W_d's as the sparse step adds it to a zero table."""
        window, tokens = self.window(ops)
        device, grads = step.to_device(ops, self.params), step.zero_grads(ops, self.params)
        loss = float(step.forward_backward(ops, device, grads, window, *tokens))
        out = step.host_grads(ops, grads, window)
        grad_W_d = ops.zeros(self.params["W_d"].shape, np.float64)
        window.direct.update(grad_W_d, window.Z, 1.0)
        out["W_d"] = ops.to_numpy(grad_W_d)
        return loss, out


@pytest.mark.parametrize("class_bounds", [None, CLASS_BOUNDS], ids=["full", "class"])
def test_direct_features_pass_the_float64_finite_difference_check(ops, class_bounds):
    """The backend's loss and gradients against the reference's, and W_d's against central differences of the
    reference's loss (equal to the backend's), every entry; test_kernels checks the other parameters so."""
    problem = Problem(class_bounds)
    loss, grads = problem.kernel_grads(ops)
    window, tokens = problem.window(ops)
    assert step.window_loss(ops, step.to_device(ops, problem.params), window, *tokens) == pytest.approx(loss,
                                                                                                        rel=1e-12)
    ref_loss, ref_grads, _ = reference.loss_and_grads(problem.params, problem.inputs, problem.targets, problem.s0,
                                                      class_bounds, keys=problem.keys)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for name in ref_grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-10, atol=1e-14, err_msg=name)
    eps = 1e-5
    numeric = np.zeros_like(problem.params["W_d"])
    for k in range(len(numeric)):
        shifted = dict(problem.params, W_d=problem.params["W_d"].copy())
        shifted["W_d"][k] += eps
        up = problem.reference_loss(shifted)
        shifted["W_d"][k] -= 2 * eps
        numeric[k] = (up - problem.reference_loss(shifted)) / (2 * eps) / (T * B)
    assert np.abs(numeric).min() > 0  # every entry is read by the window (the table is small)
    assert np.abs(grads["W_d"] - numeric).max() / np.abs(numeric).max() < 1e-7


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text whose next word follows from the two before it, which an n-gram feature learns at once."""
    folder = tmp_path_factory.mktemp("direct")
    rng = np.random.default_rng(4)
    words = ["a", "b", "c", "d", "e", "f", "g", "h"]
    lines = []
    for _ in range(300):
        first, second = rng.choice(words, 2)
        line = [first, second]
        for _ in range(int(rng.integers(3, 8))):
            line.append(words[(words.index(line[-1]) * 3 + words.index(line[-2])) % len(words)])
        lines.append(" ".join(line))
    (folder / "train.txt").write_text("\n".join(lines[:250]) + "\n")
    (folder / "valid.txt").write_text("\n".join(lines[250:]) + "\n")
    return folder


def train(corpus, name, **settings):
    config = rnnlm.TrainConfig(hidden=8, bptt=6, batch=4, epochs=2, **settings)
    path = corpus / name
    rnnlm.train(corpus / "train.txt", path, valid=corpus / "valid.txt", config=config)
    return rnnlm.load(path)


@pytest.fixture(scope="module", params=["full", "class"])
def direct_model(request, corpus):
    softmax = {"softmax": request.param} if request.param == "full" else {"softmax": "class", "classes": 3}
    return train(corpus, f"{request.param}.npz", direct=5000, direct_order=3, **softmax)


def test_direct_features_lower_the_perplexity_of_an_ngram_text(corpus):
    plain = train(corpus, "plain.npz")
    direct = train(corpus, "direct.npz", direct=5000, direct_order=3)
    assert rnnlm.perplexity(direct, corpus / "valid.txt")["perplexity"] < 0.8 * rnnlm.perplexity(
        plain, corpus / "valid.txt")["perplexity"]


def test_a_direct_model_file_round_trips_and_its_perplexity_is_the_references(direct_model, corpus, tmp_path):
    direct_model.save(tmp_path / "again.npz")
    loaded = rnnlm.load(tmp_path / "again.npz")
    assert loaded.direct_order == 3 and loaded.direct_size == 5000
    assert np.array_equal(loaded.params["W_d"], direct_model.params["W_d"]) and loaded.params["W_d"].any()
    measured = rnnlm.perplexity(loaded, corpus / "valid.txt")["perplexity"]
    assert measured == pytest.approx(reference_perplexity(loaded, corpus / "valid.txt"), rel=1e-4)


def test_perplexity_score_stream_and_sampling_agree_on_a_direct_model(direct_model, corpus):
    """The direct features' contexts run across the windows of perplexity (any window length), the segments
    of the stream scorer and the steps of the sampler's decoder alike."""
    ids, _ = rnnlm.corpus.load_corpus(corpus / "valid.txt", vocab=direct_model.vocab)
    ids = ids[:60]
    ops = cpu
    params = step.to_device(ops, direct_model.params)
    structure = direct_model.structure
    boundary = direct_model.vocab.boundary_id
    long = rnnlm.evaluate.stream_loss(ops, params, ids, boundary, structure)
    short = rnnlm.evaluate.stream_loss(ops, params, ids, boundary, structure, window=7)
    assert short == pytest.approx(long, rel=1e-6)
    per_token = token_log_probs(direct_model, ids)
    assert -per_token.sum() == pytest.approx(long, rel=1e-6)
    decoder = Decoder(direct_model)
    state, read = decoder.initial(1), [boundary]
    for k in range(12):
        log_p = decoder.log_probs(state, np.array([read]))
        assert log_p[0, ids[k]] == pytest.approx(per_token[k], abs=1e-4)
        state = decoder.advance(state, ids[k : k + 1])
        read.append(int(ids[k]))


def test_dynamic_evaluation_of_a_direct_model_adapts_its_table(direct_model, corpus):
    ids, _ = rnnlm.corpus.load_corpus(corpus / "valid.txt", vocab=direct_model.vocab)
    static = token_log_probs(direct_model, ids)
    dynamic = token_log_probs(direct_model, ids, dynamic=DynamicConfig(lr=0.5, rule="sgd", segment=10))
    assert np.isfinite(dynamic).all() and not np.array_equal(dynamic, static)
    np.testing.assert_allclose(dynamic[:10], static[:10], rtol=1e-6)  # the first segment is scored before any step


@pytest.mark.parametrize("blocks", ["whole", "small"])
def test_score_of_a_direct_model_is_the_per_token_stream_within_a_sentence(direct_model, corpus, blocks,
                                                                            monkeypatch):
    """Packed independent scoring adds each row's direct scores: in one block, and (small) with the logits
    in blocks of a few rows, states in windows that carry, and the class softmax's word half by GEMMs."""
    if blocks == "small":
        from rnnlm.backends.cpu import class_softmax

        scoring = importlib.import_module("rnnlm.score")  # the module, which rnnlm.score (the function) hides
        monkeypatch.setattr(scoring, "OUTPUT_BUDGET", 7 * direct_model.params["W_o"].shape[0])
        monkeypatch.setattr(scoring, "STATE_BUDGET", 5 * direct_model.hidden)
        monkeypatch.setattr(class_softmax, "GEMM_ROWS", 0)
    lines = (corpus / "valid.txt").read_text().splitlines()[:12]
    totals = score(direct_model, lines, batch=5)
    for line, total in zip(lines, totals, strict=True):
        ids = np.array([direct_model.vocab.index[w] for w in line.split()] + [direct_model.vocab.boundary_id])
        assert total == pytest.approx(token_log_probs(direct_model, ids).sum(), rel=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])  # Adam's checkpoint has no moments for W_d
def test_resuming_a_direct_run_writes_the_same_model_bytes(corpus, tmp_path, optimizer):
    config = rnnlm.TrainConfig(hidden=8, bptt=6, batch=4, epochs=2, direct=3000, direct_order=4, softmax="class",
                               classes=3, optimizer=optimizer)
    whole = tmp_path / "whole.npz"
    rnnlm.train(corpus / "train.txt", whole, valid=corpus / "valid.txt", config=config)
    interrupted = tmp_path / "part.npz"
    stop = {"at": 7}

    def on_window(done, total, stats):
        if done == stop["at"]:
            stop["at"] = None
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rnnlm.train(corpus / "train.txt", interrupted, valid=corpus / "valid.txt", config=config,
                    options=rnnlm.RunOptions(checkpoint=str(tmp_path / "part.ckpt.npz"), checkpoint_every=1e-9),
                    on_window=on_window)
    rnnlm.resume(tmp_path / "part.ckpt.npz", text=corpus / "train.txt", valid=corpus / "valid.txt")
    assert interrupted.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_memory_a_run_needs_counts_the_table_on_the_device_and_in_the_best_model(optimizer):
    """W_d has no gradient and no moments: two float32 copies of it, whatever the optimizer."""
    config = rnnlm.TrainConfig(optimizer=optimizer, direct=10**9)
    plain = rnnlm.TrainConfig(optimizer=optimizer)
    assert runplan.memory_needed(config, 1000) - runplan.memory_needed(plain, 1000) == 2 * 4 * 10**9


def test_a_run_too_large_for_the_memory_names_its_direct_table(corpus, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(corpus / "train.txt"), "-o", str(tmp_path / "m.npz"),
                                      "--direct", "2147483647", "--hidden", "16384", "--layers", "64"])
    assert result.exit_code == 1 and "--direct 2,147,483,647" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_run_diverging_through_its_table_points_at_direct_lr(corpus, tmp_path):
    config = rnnlm.TrainConfig(hidden=8, bptt=6, batch=4, epochs=1, direct=1000, direct_lr=1e4)
    with pytest.raises(RnnlmError, match="diverged .* a lower --direct-lr"):
        rnnlm.train(corpus / "train.txt", tmp_path / "m.npz", valid=corpus / "valid.txt", config=config)


def test_history_helpers_pad_with_minus_one():
    inputs = np.arange(10).reshape(5, 2)
    np.testing.assert_array_equal(history_before(inputs, 1, 2), [[-1, -1], [0, 1]])
    np.testing.assert_array_equal(context_history(np.array([[7, 8, 9]]), 3), [[8], [9]])
    np.testing.assert_array_equal(context_history(np.array([[9]]), 3), [[-1], [9]])


@pytest.mark.parametrize("args, code, message", [
    (["--direct", "5X"], 2, "is not a number of entries"),
    (["--direct", "²"], 2, "is not a number of entries"),
    (["--direct", "5²k"], 2, "is not a number of entries"),
    (["--direct", "٣M"], 2, "is not a number of entries"),
    (["--direct", "3G"], 2, "is not from 0 to"),
    (["--direct", "10k", "--direct-order", "9"], 2, "--direct-order"),
    (["--direct", "1", "--softmax", "class"], 1, "Error: --direct must be 0 or from 2"),
    (["--direct", "10k", "--direct-lr", "0"], 2, "--direct-lr"),
])
def test_direct_settings_out_of_range_are_refused_before_anything_is_written(corpus, tmp_path, args, code, message):
    result = CliRunner().invoke(cli, ["train", str(corpus / "train.txt"), "-o", str(tmp_path / "m.npz"), *args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


def tampered(model, path, meta_fields=None, arrays=None, drop=()):
    """The model's file at path with meta fields replaced, arrays replaced or added, members dropped."""
    members = {name: np.ascontiguousarray(a, np.float32) for name, a in model.params.items()}
    if model.class_bounds is not None:
        members["class_bounds"] = model.class_bounds
    members.update(arrays or {})
    meta = {**model.meta(), **(meta_fields or {})}
    members["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        write_npz(f, {name: a for name, a in members.items() if name not in drop})
    return path


@pytest.mark.parametrize("change", [
    {"meta_fields": {"direct_order": 9}},
    {"meta_fields": {"direct_order": 2.5}},
    {"meta_fields": {"direct_size": 4999}},
    {"meta_fields": {"direct_size": 2**31}},
    {"drop": ["W_d"]},
    {"arrays": {"W_d": np.full(5000, np.nan, np.float32)}},
    {"meta_fields": {"direct_order": 0}},
], ids=["order-above-8", "order-not-an-int", "size-not-the-tables", "size-too-large", "no-table", "nan-weights",
        "a-table-without-an-order"])
def test_a_hostile_direct_model_file_is_one_error_naming_it(direct_model, tmp_path, change):
    path = tampered(direct_model, tmp_path / "bad.npz", **change)
    with pytest.raises(RnnlmError, match="bad.npz"):
        rnnlm.load(path)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_a_training_windows_history_is_the_streams_inputs_before_it(n):
    ids = np.random.default_rng(5).integers(0, 50, 203)
    T, streams = 4, 3
    inputs, _ = rnnlm.corpus.batchify(ids, BOUNDARY, streams, T)
    windows = rnnlm.corpus.Windows(ids, BOUNDARY, streams, T)
    for w in range(windows.n_windows):
        rows = np.arange(w * T - n, w * T)
        expected = np.where(rows[:, None] >= 0, inputs[np.maximum(rows, 0)], -1) if w else np.full((n, streams), -1)
        np.testing.assert_array_equal(windows.history(w, n), expected, err_msg=f"window {w}")


@pytest.mark.slow
@pytest.mark.parametrize("softmax", ["full", "class"])
def test_a_short_direct_run_on_the_cuda_backend_gives_the_cpus_losses(tmp_path, softmax):
    """Two epochs of a direct model through the whole training loop on the CUDA backend (the simulator in CI)
    and on the CPU: the same losses and the same model, to float32 tolerance."""
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\nthe dog ran\na cat ran on\n" * 6)
    config = rnnlm.TrainConfig(hidden=8, bptt=4, batch=3, epochs=2, optimizer="adam", lr=0.01, softmax=softmax,
                               classes=3, direct=101, direct_order=4, direct_lr=2.0)
    runs = {}
    for device in ("cpu", "cuda"):
        records = rnnlm.train(text, tmp_path / f"{device}.npz", config=config, options=rnnlm.RunOptions(device=device))
        runs[device] = records, rnnlm.load(tmp_path / f"{device}.npz")
    (cpu_records, cpu_model), (gpu_records, gpu_model) = runs["cpu"], runs["cuda"]
    for key in ("train_loss", "valid_perplexity"):
        np.testing.assert_allclose([r[key] for r in gpu_records], [r[key] for r in cpu_records], rtol=1e-5)
    assert cpu_model.params["W_d"].any()
    for name, array in cpu_model.params.items():
        np.testing.assert_allclose(gpu_model.params[name], array, rtol=1e-4, atol=1e-6, err_msg=name)


def test_adapting_a_direct_model_keeps_and_trains_its_table(direct_model, corpus, tmp_path):
    source = tmp_path / "source.npz"
    direct_model.save(source)
    config = rnnlm.TrainConfig(hidden=8, bptt=6, batch=4, epochs=1, level=None)
    rnnlm.train(corpus / "valid.txt", tmp_path / "adapted.npz", config=config, init_from=source)
    adapted = rnnlm.load(tmp_path / "adapted.npz")
    assert (adapted.direct_order, adapted.direct_size) == (direct_model.direct_order, direct_model.direct_size)
    assert not np.array_equal(adapted.params["W_d"], direct_model.params["W_d"])
