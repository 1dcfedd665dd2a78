"""The hierarchical softmax (``--softmax hs``): the Huffman tree, both backends' kernels against a plain float64
numpy reference written here, a window's gradients against central differences, and hs models through
training, the model file, perplexity, score, sample and dynamic evaluation."""

import heapq
import json
import math

import numba
import numpy as np
import pytest
from click.testing import CliRunner
from rnnlm.cli import cli

import rnnlm
from rnnlm import reference, step
from rnnlm.backends import cpu
from rnnlm.dynamic import DynamicConfig, token_log_probs
from rnnlm.errors import RnnlmError
from rnnlm.huffman import MAX_DEPTH, huffman_tree
from rnnlm.model import init_params, write_npz
from rnnlm.score import Decoder, score
from tests.conftest import demo_texts, reference_perplexity, train_whole_and_interrupted

V, m, T, B = 11, 5, 4, 3
COUNTS = np.array([40, 3, 3, 17, 0, 9, 1, 1, 25, 6, 2])  # ties, a zero, the first word the most frequent


def paths(tree):
    """Every word's path as a list of (W_o row, sign), from the word up: written here from the parent pointers."""
    V = tree.vocab_size
    out = []
    for w in range(V):
        path, node = [], w
        while tree.parent[node] >= 0:
            path.append((int(tree.parent[node]) - V, int(tree.sign[node])))
            node = tree.parent[node]
        out.append(path)
    return out


def numpy_log_probs(W_o, b_o, S, targets, tree):
    """log p(targets[r] | S[r]) (N,) float64, node by node: log σ(u) = -log(1 + e^-u)."""
    out = np.zeros(len(targets))
    all_paths = paths(tree)
    for r, w in enumerate(targets):
        for k, sign in all_paths[w]:
            out[r] -= np.log1p(np.exp(-sign * (W_o[k] @ S[r] + b_o[k])))
    return out


def numpy_grads(W_o, b_o, S, targets, tree, scale):
    """(loss, dW_o, db_o, dL_ds) of scale · Σ -log p: dL/dz = -sign · σ(-sign · z) per node."""
    dW_o, db_o, dL_ds = np.zeros_like(W_o), np.zeros_like(b_o), np.zeros_like(S)
    all_paths = paths(tree)
    for r, w in enumerate(targets):
        for k, sign in all_paths[w]:
            u = sign * (W_o[k] @ S[r] + b_o[k])
            g = -scale * sign / (1 + np.exp(u))
            dW_o[k] += g * S[r]
            db_o[k] += g
            dL_ds[r] += g * W_o[k]
    return -numpy_log_probs(W_o, b_o, S, targets, tree).sum(), dW_o, db_o, dL_ds


# ------------------------------------------------------------------------------------------------ tree


def huffman_cost(counts):
    """Σ count · depth of an optimal prefix code (heapq's Huffman), to compare with the tree's."""
    heap = [int(c) for c in counts]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


@pytest.mark.parametrize("n", [2, 3, 11, 200])
def test_the_tree_is_an_optimal_binary_code_with_v_minus_1_nodes(n):
    counts = COUNTS if n == 11 else np.random.default_rng(n).integers(0, 50, n)
    tree = huffman_tree(counts)
    assert (tree.counts * tree.depth[:n]).sum() == huffman_cost(counts)
    internal = tree.parent[: 2 * n - 2]
    assert sorted(np.bincount(internal - n, minlength=n - 1)) == [2] * (n - 1)  # V - 1 nodes of two children
    assert tree.parent[2 * n - 2] == -1 and (internal > np.arange(2 * n - 2)).all()  # parents after children
    signs = {(int(p), int(s)) for p, s in zip(internal, tree.sign[: 2 * n - 2], strict=True)}
    assert len(signs) == 2 * n - 2  # each node's two children take the two signs
    codes = {tuple(sign for _, sign in path) for path in paths(tree)}
    assert len(codes) == n  # every word its own code


def test_the_tree_is_deterministic_and_breaks_ties_by_id():
    tree = huffman_tree(np.ones(6, np.int64))
    again = huffman_tree(np.ones(6, np.int32))
    for a, b in ((tree.parent, again.parent), (tree.sign, again.sign)):
        np.testing.assert_array_equal(a, b)
    assert tree.parent[0] == tree.parent[1] == 6 and tree.sign[0] == 1 and tree.sign[1] == -1  # first merge


def test_frequent_words_get_short_paths():
    tree = huffman_tree(COUNTS)
    assert tree.depth[0] < tree.depth[4]
    assert tree.mean_depth() < math.log2(V)


@pytest.mark.parametrize("counts, message", [([5], "at least two"), ([3, -1, 2], "non-negative"),
                                             ([2**61, 2**61, 1], "below 2"), ([1.5, 2.0], "integer")])
def test_bad_counts_are_one_line_errors(counts, message):
    with pytest.raises(RnnlmError, match=message):
        huffman_tree(np.array(counts))


def test_a_tree_deeper_than_the_bound_is_refused():
    fibonacci = [1, 1]
    while len(fibonacci) < MAX_DEPTH + 3:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    with pytest.raises(RnnlmError, match="deep"):
        huffman_tree(np.array(fibonacci, np.int64))
    assert huffman_tree(np.array(fibonacci[: MAX_DEPTH + 1], np.int64)).max_depth == MAX_DEPTH


# ---------------------------------------------------------------------------------------------- kernels


def kernel_problem(rng, dtype=np.float64, n=7):
    tree = huffman_tree(COUNTS)
    W_o = rng.standard_normal((V - 1, m)).astype(dtype)
    b_o = rng.standard_normal(V - 1).astype(dtype)
    S = rng.standard_normal((n, m)).astype(dtype)
    targets = np.array([0, 4, 4, 10, 3, 0, 7][:n], np.int32)  # a repeated target, the deepest word
    return tree, W_o, b_o, S, targets


def test_hs_log_probs_equal_the_numpy_reference(ops):
    tree, W_o, b_o, S, targets = kernel_problem(np.random.default_rng(0))
    out = ops.zeros(len(targets), np.float64)
    args = [ops.asarray(a) for a in (S, W_o, b_o, targets, tree.parent, tree.sign)]
    ops.hs_log_probs(*args, out)
    expected = numpy_log_probs(W_o, b_o, S, targets, tree)
    np.testing.assert_allclose(ops.to_numpy(out), expected, rtol=1e-12)
    assert float(ops.hs_xent(*args)) == pytest.approx(-expected.sum(), rel=1e-12)
    every = reference.hs_log_probs({"W_o": W_o, "b_o": b_o}, S, tree)
    np.testing.assert_allclose(every[np.arange(len(targets)), targets], expected, rtol=1e-12)
    np.testing.assert_allclose(np.exp(every).sum(axis=1), 1.0, rtol=1e-12)  # a distribution over the V words


def test_hs_xent_grad_equals_the_numpy_reference(ops):
    tree, W_o, b_o, S, targets = kernel_problem(np.random.default_rng(1))
    dW_o, db_o = ops.zeros(W_o.shape, np.float64), ops.asarray(np.full(V - 1, 7.0))
    dL_ds, norm = ops.asarray(np.full(S.shape, 3.0)), ops.zeros(1, np.float64)
    slot, claimed = ops.asarray(np.full(V - 1, -1, np.int32)), ops.zeros(1, np.int32)
    loss = ops.hs_xent_grad(*(ops.asarray(a) for a in (S, W_o, b_o, targets, tree.parent, tree.sign)), 0.25, dW_o,
                            db_o, dL_ds, slot, claimed, norm)
    expected = numpy_grads(W_o, b_o, S, targets, tree, 0.25)
    assert float(loss) == pytest.approx(expected[0], rel=1e-12)
    slots = ops.to_numpy(slot)
    for got, want in zip((step.unslotted(ops.to_numpy(dW_o), slots), ops.to_numpy(db_o), ops.to_numpy(dL_ds)),
                         expected[1:], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)
    used = sorted({k for w in targets for k, _ in paths(tree)[w]})
    np.testing.assert_array_equal(np.flatnonzero(slots >= 0), used)
    assert sorted(slots[used]) == list(range(len(used))) == list(range(ops.to_numpy(claimed)[0]))
    assert ops.to_numpy(norm)[0] == pytest.approx(np.linalg.norm(expected[1]), rel=1e-12)


def test_float32_kernels_follow_the_float64_ones(ops):
    """Training's dtype: the float32 loss, gradients and log-probabilities within float32 rounding."""
    results = []
    for dtype in (np.float64, np.float32):
        tree, W_o, b_o, S, targets = kernel_problem(np.random.default_rng(6), dtype)
        args = [ops.asarray(a) for a in (S, W_o, b_o, targets, tree.parent, tree.sign)]
        dW_o, db_o, dL_ds = ops.zeros(W_o.shape, dtype), ops.zeros(V - 1, dtype), ops.zeros(S.shape, dtype)
        norm, out = ops.zeros(1, np.float64), ops.zeros(len(targets), np.float64)
        slot = ops.asarray(np.full(V - 1, -1, np.int32))
        loss = float(ops.hs_xent_grad(*args, 0.5, dW_o, db_o, dL_ds, slot, ops.zeros(1, np.int32), norm))
        ops.hs_log_probs(*args, out)
        dense = step.unslotted(ops.to_numpy(dW_o), ops.to_numpy(slot))
        results.append([loss, dense, *(ops.to_numpy(a) for a in (db_o, dL_ds, norm, out))])
    for wide, narrow in zip(*results, strict=True):
        np.testing.assert_allclose(narrow, wide, rtol=1e-5, atol=1e-6)


def test_the_cpu_gradient_has_the_same_bits_on_any_number_of_threads():
    tree, W_o, b_o, S, targets = kernel_problem(np.random.default_rng(2), np.float32)
    S = np.random.default_rng(3).standard_normal((400, m)).astype(np.float32)
    targets = np.random.default_rng(4).integers(0, V, 400).astype(np.int32)
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        dW_o, db_o, dL_ds = np.zeros_like(W_o), np.zeros_like(b_o), np.zeros_like(S)
        norm = np.zeros(1)
        loss = cpu.hs_xent_grad(S, W_o, b_o, targets, tree.parent, tree.sign, 0.01, dW_o, db_o, dL_ds,
                                np.full(V - 1, -1, np.int32), np.zeros(1, np.int32), norm)
        results.append([loss, dW_o.tobytes(), db_o.tobytes(), dL_ds.tobytes(), norm.tobytes()])
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert results[0] == results[1]


# ------------------------------------------------------------------------------------- window gradients


class Problem:
    """A float64 window of an hs model: nonzero weights, biases and carried states, a repeated target."""

    def __init__(self):
        rng = np.random.default_rng(5)
        params = init_params(V, m, rng, np.float64, hs=True)
        self.params = {name: p + 0.3 * rng.standard_normal(p.shape) for name, p in params.items()}
        tokens = rng.integers(0, V, (T + 1, B)).astype(np.int32)
        tokens[2, 0] = tokens[3, 1] = 4  # a deep word, twice
        self.inputs, self.targets = tokens[:-1], tokens[1:]
        self.s0 = 0.5 * rng.standard_normal((1, B, m))
        self.tree = huffman_tree(COUNTS)

    def reference_loss(self, params):
        return reference.loss(params, self.inputs, self.targets, self.s0, tree=self.tree)[0]

    def kernel_grads(self, ops):
        window = step.Window(ops, T, B, m, V, np.float64, hs_tree=self.tree)
        ops.copy_into(self.s0[0], window.S[0][0])
        device, grads = step.to_device(ops, self.params), step.zero_grads(ops, self.params)
        tokens = [ops.asarray(t) for t in (self.inputs, self.targets)]
        loss = float(step.forward_backward(ops, device, grads, window, *tokens))
        return loss, step.host_grads(ops, grads, window)


def test_a_windows_gradients_pass_the_float64_finite_difference_check(ops):
    problem = Problem()
    loss, grads = problem.kernel_grads(ops)
    assert loss == pytest.approx(problem.reference_loss(problem.params), rel=1e-12)
    eps = 1e-5
    for name, param in problem.params.items():
        numeric = np.zeros_like(param)
        for index in np.ndindex(param.shape):
            shifted = dict(problem.params, **{name: param.copy()})
            shifted[name][index] += eps
            up = problem.reference_loss(shifted)
            shifted[name][index] -= 2 * eps
            numeric[index] = (up - problem.reference_loss(shifted)) / (2 * eps) / (T * B)
        assert np.abs(numeric).max() > 0, name
        assert np.abs(grads[name] - numeric).max() / np.abs(numeric).max() < 1e-7, name


# ------------------------------------------------------------------------------------------ every path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hs")
    lines = demo_texts(folder, 600, 60)
    (folder / "short.txt").write_text("\n".join(lines[-8:]) + "\n", encoding="utf-8")
    return folder


def train(corpus, name, **settings):
    config = rnnlm.TrainConfig(**{"hidden": 12, "bptt": 6, "batch": 4, "epochs": 2, "softmax": "hs",
                                  "optimizer": "lazyadam", "lr": 0.01, **settings})
    path = corpus / name
    records = rnnlm.train(corpus / "train.txt", path, valid=corpus / "valid.txt", config=config)
    return records, rnnlm.load(path)


@pytest.fixture(scope="module")
def hs_model(corpus):
    return train(corpus, "hs.npz")


def test_an_hs_model_learns_and_its_file_rebuilds_the_tree(hs_model, corpus):
    records, model = hs_model
    assert model.softmax == "hs" and model.params["W_o"].shape == (model.vocab_size - 1, 12)
    assert records[-1]["valid_perplexity"] < records[0]["valid_perplexity"] < model.vocab_size
    assert model.hs_tree.counts.sum() > 0 and model.hs_tree.max_depth <= MAX_DEPTH


def test_perplexity_is_the_references_on_both_backends(hs_model, corpus):
    _, model = hs_model
    expected = reference_perplexity(model, corpus / "short.txt")
    for device in ("cpu", "cuda"):
        assert rnnlm.perplexity(model, corpus / "short.txt", device)["perplexity"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("settings", [{"optimizer": "sgd", "lr": 0.5}, {"optimizer": "adam"},
                                      {"dropout": 0.3, "clip": 0.01, "layers": 2}],
                         ids=["sgd", "adam", "dropout-clip-layers"])
def test_every_optimizer_trains_an_hs_model(corpus, settings):
    records, _ = train(corpus, "variant.npz", epochs=1, **settings)
    assert np.isfinite(records[0]["valid_perplexity"])


def test_score_stream_dynamic_sample_and_decoder_agree(hs_model, corpus):
    """Independent scoring against the Decoder's distributions (which sum to one), the stream scorer on both
    backends, dynamic evaluation and sampling."""
    _, model = hs_model
    sentences = (corpus / "valid.txt").read_text(encoding="utf-8").splitlines()[:5]
    totals, per_token = score(model, sentences, per_token=True)
    decoder = Decoder(model)
    for sentence, result, total in zip(sentences, per_token, totals, strict=True):
        ids = list(model.vocab.encode_text(sentence + "\n")[0])
        state, expected = decoder.initial(1), []
        for token in ids:
            log_p = decoder.log_probs(state)[0]
            assert np.exp(log_p).sum() == pytest.approx(1.0, rel=1e-9)
            expected.append(log_p[token])
            state = decoder.advance(state, [token])
        np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-4)
        assert total == pytest.approx(sum(expected), rel=1e-4)
    ids = np.concatenate([model.vocab.encode_text(s + "\n")[0] for s in sentences])
    static = token_log_probs(model, ids)
    np.testing.assert_allclose(token_log_probs(model, ids[:60], device="cuda"), static[:60], atol=1e-5)
    assert -static.sum() / len(ids) == pytest.approx(math.log(rnnlm.perplexity(model, corpus / "valid.txt")[
        "perplexity"]), rel=0.5)  # another text: the same scale
    dynamic = token_log_probs(model, ids, dynamic=DynamicConfig(lr=0.1))
    assert np.isfinite(dynamic).all() and not np.array_equal(dynamic, static)
    texts, _ = rnnlm.sample(model, prompt="the", num=2, length=5, seed=1)
    assert len(texts) == 2 and all(t.startswith("the") for t in texts)


def test_init_from_an_hs_model_keeps_its_tree(hs_model, corpus):
    _, model = hs_model
    config = rnnlm.TrainConfig(epochs=1, lr=0.01, optimizer="lazyadam", bptt=6, batch=4, level=None)
    rnnlm.train(corpus / "valid.txt", corpus / "adapted.npz", config=config, init_from=corpus / "hs.npz")
    adapted = rnnlm.load(corpus / "adapted.npz")
    assert adapted.softmax == "hs"
    np.testing.assert_array_equal(adapted.hs_tree.parent, model.hs_tree.parent)


def test_an_interrupted_run_resumes_to_the_same_bytes(corpus, tmp_path):
    settings = {"hidden": 8, "bptt": 5, "batch": 3, "epochs": 2, "softmax": "hs", "optimizer": "lazyadam",
                "lr": 0.01, "dropout": 0.1}
    checkpoint = train_whole_and_interrupted(corpus, tmp_path, rnnlm.TrainConfig(**settings))
    rnnlm.resume(checkpoint, text=corpus / "train.txt", valid=corpus / "valid.txt")
    assert (tmp_path / "cut.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()


@pytest.mark.parametrize("flags, message", [(["--tied"], "cannot be tied"), (["--direct", "1000"], "direct")])
def test_hs_refuses_tied_weights_and_direct_features(corpus, flags, message):
    result = CliRunner().invoke(cli, ["train", str(corpus / "train.txt"), "-o", str(corpus / "refused.npz"),
                                      "--softmax", "hs", *flags])
    assert result.exit_code == 1 and result.output.startswith("Error:") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def rewrite(source, target, **changes):
    """The model file ``source`` written to ``target`` with members replaced (None: removed) and meta updated."""
    with np.load(source, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays["meta"]))
    meta.update(changes.pop("meta", {}))
    arrays["meta"] = np.array(json.dumps(meta))
    for name, array in changes.items():
        if array is None:
            arrays.pop(name)
        else:
            arrays[name] = array
    with open(target, "wb") as f:
        write_npz(f, arrays)
    return target


@pytest.mark.parametrize("change, message", [
    ({"hs_counts": None}, "hs_counts"),
    ({"hs_counts": np.full(3, 5)}, "shape"),
    ({"hs_counts": "negative"}, "non-negative"),
    ({"hs_counts": "deep"}, "deep"),
    ({"hs_counts": "float"}, "hs_counts"),
    ({"meta": {"tied": True}}, "cannot be tied"),
], ids=["missing", "shape", "negative", "deep", "float", "tied"])
def test_bad_hs_model_files_are_one_line_errors(hs_model, corpus, tmp_path, change, message):
    _, model = hs_model
    V = model.vocab_size
    counts = model.hs_tree.counts.copy()
    value = change.get("hs_counts", 0)
    if isinstance(value, str):
        if value == "negative":
            counts[3] = -1
        elif value == "deep":
            counts = np.zeros(V, np.int64)
            counts[:2] = 1
            for k in range(2, MAX_DEPTH + 3):
                counts[k] = counts[k - 1] + counts[k - 2]
        else:
            counts = counts.astype(np.float32)
        change = {"hs_counts": counts}
    path = rewrite(corpus / "hs.npz", tmp_path / "bad.npz", **change)
    with pytest.raises(RnnlmError, match=message) as error:
        rnnlm.load(path)
    assert "\n" not in str(error.value)
