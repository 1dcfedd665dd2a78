"""The kernels of every backend against the numpy reference and against central differences.

Every test runs for both backends (``ops``) and four model structures (``structure``): full softmax;
class softmax (3 classes); two stacked layers with tied weights and fixed dropout masks; class softmax
with tied weights. Toy sizes (V=11, m=6, T=4, B=3) so that the CUDA backend runs under the simulator.
"""

import numpy as np
import pytest

from rnnlm import optim, reference, step
from rnnlm.backends import cpu
from rnnlm.backends.cpu import recurrence
from rnnlm.backends.cpu.gemm import SKINNY_ROWS
from rnnlm.model import init_params, word_classes
from tests.conftest import assert_cleared

V, m, T, B = 11, 6, 4, 3
CLASS_BOUNDS = np.array([0, 2, 6, 11], np.int32)
STRUCTURES = {
    "full": dict(class_bounds=None, layers=1, tied=False, dropout=0.0),
    "class": dict(class_bounds=CLASS_BOUNDS, layers=1, tied=False, dropout=0.0),
    "stacked-tied-dropout": dict(class_bounds=None, layers=2, tied=True, dropout=0.3),
    "class-tied": dict(class_bounds=CLASS_BOUNDS, layers=1, tied=True, dropout=0.0),
}


@pytest.fixture(params=list(STRUCTURES))
def structure(request):
    return STRUCTURES[request.param]


class Problem:
    """Parameters with nonzero biases, nonzero carried states, a window with a repeated input and a
    repeated target, and fixed dropout masks (when the structure has dropout)."""

    def __init__(self, dtype, structure, seed=0):
        rng = np.random.default_rng(seed)
        self.structure = structure
        bounds, L = structure["class_bounds"], structure["layers"]
        n_classes = None if bounds is None else len(bounds) - 1
        params = init_params(V, m, rng, np.float64, n_classes=n_classes, layers=L)
        for name in params:
            params[name] = (params[name] + 0.3 * rng.standard_normal(params[name].shape)).astype(dtype)
        if structure["tied"]:
            params["W_x"] = params["W_o"].T
        self.params = params
        self.inputs = rng.integers(0, V, (T, B)).astype(np.int32)
        self.inputs[2, 1] = self.inputs[0, 0]  # the same token twice: its W_x column sums both gradients
        self.targets = rng.integers(0, V, (T, B)).astype(np.int32)
        self.targets[3, 2] = self.targets[1, 0]  # and a repeated target: rows of one class share W_o's rows
        self.s0 = (0.5 * rng.standard_normal((L, B, m))).astype(dtype)
        self.masks = None
        if structure["dropout"]:
            keep = 1 - structure["dropout"]
            def draw():
                return ((rng.random((T, B, m)) < keep) / keep).astype(dtype)
            self.masks = (draw(), [draw() for _ in range(L)])

    def reference(self, params=None, grads=True):
        args = (params or self.params, self.inputs, self.targets, self.s0, self.structure["class_bounds"], self.masks)
        if grads:
            return reference.loss_and_grads(*args, tied=self.structure["tied"])
        return reference.loss(*args)

    def as_float64(self):
        other = Problem.__new__(Problem)
        other.__dict__.update(self.__dict__)
        other.params = {k: v.astype(np.float64) for k, v in self.params.items()}
        if self.structure["tied"]:
            other.params["W_x"] = other.params["W_o"].T
        other.s0 = self.s0.astype(np.float64)
        return other

    def on_device(self, ops):
        """Backend parameters, a window holding s0 and the masks, and the token arrays of one step."""
        structure = self.structure
        window = step.Window(ops, T, B, m, V, self.s0.dtype, **structure)
        for S, s0 in zip(window.S, self.s0, strict=True):
            ops.copy_into(s0, S[0])
        if self.masks is not None:
            ops.copy_into(self.masks[0], window.mask_in)
            for device_mask, mask in zip(window.mask_out, self.masks[1], strict=True):
                ops.copy_into(mask, device_mask)
        bounds = structure["class_bounds"]
        classes = None if bounds is None else ops.asarray(word_classes(bounds)[self.targets])
        tokens = (ops.asarray(self.inputs), ops.asarray(self.targets), classes)
        return step.to_device(ops, self.params, structure["tied"]), window, tokens

    def run(self, ops):
        """Loss sum, trainable gradients (numpy, dense) and last states from the backend's fused step."""
        P, window, tokens = self.on_device(ops)
        G = step.zero_grads(ops, self.params, window.tied)
        loss = float(step.forward_backward(ops, P, G, window, *tokens))
        return loss, step.host_grads(ops, G, window), np.stack([ops.to_numpy(S[T]) for S in window.S])


def trainable_names(problem):
    return [name for name in problem.params if not (problem.structure["tied"] and name == "W_x")]


def test_float64_kernels_equal_reference(ops, structure):
    assert_step_equals_reference(ops, structure)


def test_float64_cpu_step_through_blas_products_equals_reference(monkeypatch, structure):
    """From GEMM_MIN_STREAMS streams of GEMM_MIN_STATE units the CPU recurrence steps through BLAS products: here
    from one of one."""
    monkeypatch.setattr(recurrence, "GEMM_MIN_STREAMS", 1)
    monkeypatch.setattr(recurrence, "GEMM_MIN_STATE", 1)
    assert_step_equals_reference(cpu, structure)


def assert_step_equals_reference(ops, structure):
    problem = Problem(np.float64, structure)
    loss, grads, s_last = problem.run(ops)
    ref_loss, ref_grads, ref_last = problem.reference()
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(s_last, ref_last, rtol=1e-12)
    assert sorted(grads) == sorted(ref_grads)
    for name in grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-10, atol=1e-14, err_msg=name)


def test_float32_kernels_equal_float64_reference(ops, structure):
    problem = Problem(np.float32, structure)
    loss, grads, _ = problem.run(ops)
    ref_loss, ref_grads, _ = problem.as_float64().reference()
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name in grads:
        scale = np.abs(ref_grads[name]).max()
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def test_gradients_equal_central_differences(ops, structure):
    """Every entry of every trainable array's gradient against (L(θ+ε) - L(θ-ε)) / 2ε of the mean loss
    (for tied weights the shared array, perturbed through both of its uses)."""
    problem = Problem(np.float64, structure, seed=1)
    _, grads, _ = problem.run(ops)
    eps = 1e-5
    for name in trainable_names(problem):
        numeric = np.zeros_like(problem.params[name])
        for idx in np.ndindex(numeric.shape):
            shifted = {k: v.copy() for k, v in problem.params.items()}
            if structure["tied"]:
                shifted["W_x"] = shifted["W_o"].T
            shifted[name][idx] += eps
            up = problem.reference(shifted, grads=False)[0]
            shifted[name][idx] -= 2 * eps
            down = problem.reference(shifted, grads=False)[0]
            numeric[idx] = (up - down) / (2 * eps) / (T * B)
        error = np.abs(grads[name] - numeric).max() / np.abs(numeric).max()
        assert error < 1e-7, (name, error)


@pytest.mark.parametrize("streams, units", [(9, 7), (1, 5), (6, 37)])
def test_recurrence_with_uneven_stream_bands_and_odd_state_size(ops, streams, units):
    """forward and backward against the formulas looped in numpy, where the streams do not split into
    the CPU kernel's blocks of four per thread, the state size is odd (its row pairs) and not a multiple
    of 16 (37: the CPU kernel's dot products over 32 columns, then 5 columns of the transpose); backward also
    in place, dL/da over dL_ds_out."""
    assert_recurrence_equals_loops(ops, streams, units)


@pytest.mark.parametrize("streams, units", [(9, 7), (1, 5)])
def test_cpu_recurrence_through_blas_products(monkeypatch, streams, units):
    monkeypatch.setattr(recurrence, "GEMM_MIN_STREAMS", 1)
    monkeypatch.setattr(recurrence, "GEMM_MIN_STATE", 1)
    assert_recurrence_equals_loops(cpu, streams, units)


def assert_recurrence_equals_loops(ops, streams, units):
    rng = np.random.default_rng(8)
    W_s, b_s = rng.standard_normal((units, units)) / 2, rng.standard_normal(units)
    U, dL_ds_out = rng.standard_normal((2, T, streams, units))
    S = np.zeros((T + 1, streams, units))
    S[0] = rng.standard_normal((streams, units))
    for t in range(T):
        S[t + 1] = np.tanh(S[t] @ W_s.T + U[t] + b_s)
    dL_da = np.zeros((T, streams, units))
    for t in range(T - 1, -1, -1):
        dL_ds = dL_ds_out[t] + (dL_da[t + 1] @ W_s if t + 1 < T else 0)
        dL_da[t] = (1 - S[t + 1] ** 2) * dL_ds
    S_dev, dL_da_dev = ops.asarray(S), ops.zeros(dL_da.shape, np.float64)
    ops.copy_into(np.zeros_like(S[1:]), S_dev[1:])
    ops.forward(ops.asarray(W_s), ops.asarray(b_s), ops.asarray(U), S_dev)
    ops.backward(ops.asarray(W_s), S_dev, ops.asarray(dL_ds_out), dL_da_dev)
    np.testing.assert_allclose(ops.to_numpy(S_dev), S, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ops.to_numpy(dL_da_dev), dL_da, rtol=1e-12, atol=1e-15)
    in_place = ops.asarray(dL_ds_out)
    ops.backward(ops.asarray(W_s), S_dev, in_place, in_place)  # dL/da over dL_ds_out, as rnnlm.step does
    np.testing.assert_allclose(ops.to_numpy(in_place), dL_da, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("offset", [-110.0, 110.0])
def test_softmax_of_logits_far_from_zero(ops, offset):
    """float32 logits around ±110, where exp overflows or underflows unless shifted by the exact row
    maximum (the CPU kernel finds it by comparing the floats' bits as integers, negatives included)."""
    rng = np.random.default_rng(9)
    Z = (offset + 5 * rng.standard_normal((5, 37))).astype(np.float32)
    Z[0, :3] = -0.0
    b = rng.standard_normal(37).astype(np.float32)
    targets = rng.integers(0, 37, 5).astype(np.int32)
    biased = Z.astype(np.float64) + b
    top = biased.max(axis=1, keepdims=True)
    log_p = biased - top - np.log(np.exp(biased - top).sum(axis=1, keepdims=True))
    expected = -log_p[np.arange(5), targets].sum()
    loss = ops.softmax_xent(ops.asarray(Z), ops.asarray(b), ops.asarray(targets))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    Z_dev, db = ops.asarray(Z), ops.zeros(37, np.float32)
    loss = ops.softmax_xent_grad(Z_dev, ops.asarray(b), ops.asarray(targets), 1.0, db)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    dL_dz = np.exp(log_p)
    dL_dz[np.arange(5), targets] -= 1
    np.testing.assert_allclose(ops.to_numpy(Z_dev), dL_dz, atol=1e-5)


def test_window_loss_equals_reference_without_dropout(ops, structure):
    problem = Problem(np.float32, structure, seed=2)
    P, window, tokens = problem.on_device(ops)
    loss = step.window_loss(ops, P, window, *tokens)
    ref = problem.as_float64()
    ref.masks = None  # evaluation never drops out
    ref_loss, ref_last = ref.reference(grads=False)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(np.stack([ops.to_numpy(S[T]) for S in window.S]), ref_last, rtol=1e-5, atol=1e-6)


def test_sgd_step_clips_the_global_norm_and_decays(ops, structure):
    """A real step's gradients, then the update: dense and sparse (W_x, class W_o) rows alike, and the
    sparse gradients are left zero for the next window."""
    problem = Problem(np.float64, structure, seed=3)
    _, ref_grads, _ = problem.reference()
    P, window, tokens = problem.on_device(ops)
    G = step.zero_grads(ops, problem.params, window.tied)
    step.forward_backward(ops, P, G, window, *tokens)
    norm = np.sqrt(sum((g**2).sum() for g in ref_grads.values()))
    lr, clip, l2 = 0.5, norm / 4, 0.01
    sgd = optim.SGD(ops, step.trainable(P, window), clip=clip, l2=l2)
    sgd.update(P, G, window, lr)
    assert sgd.last_norm() == pytest.approx(norm, rel=1e-10)
    for name in ref_grads:
        expected = problem.params[name] - lr * (ref_grads[name] / 4 + 2 * l2 * problem.params[name])
        np.testing.assert_allclose(ops.to_numpy(P[name]), expected, rtol=1e-10, atol=1e-14, err_msg=name)
    assert_cleared(ops, G, window)  # tied, W_x's gradient is W_o's rows
    if structure["tied"]:
        np.testing.assert_array_equal(ops.to_numpy(P["W_x"]), ops.to_numpy(P["W_o"]).T)


def test_class_probabilities_sum_to_one():
    problem = Problem(np.float64, STRUCTURES["class"])
    s = np.random.default_rng(6).standard_normal((5, m))
    p = np.exp(reference.log_probs(problem.params, s, CLASS_BOUNDS))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("optimizer", [optim.Adam, optim.LazyAdam], ids=["adam", "lazyadam"])
def test_adam_step_equals_a_hand_computed_step(ops, structure, optimizer):
    """Two Adam steps on a real window's gradients against the formulas written out in numpy; lazy Adam
    leaves the rows of a sparse gradient that the window did not touch as they were, moments included."""
    problem = Problem(np.float64, structure, seed=7)
    problem.inputs %= 6  # tokens 6-10, the last class, stay out of the window
    problem.targets %= 6
    P, window, tokens = problem.on_device(ops)
    G = step.zero_grads(ops, problem.params, window.tied)
    adam = optimizer(ops, step.trainable(P, window), clip=0.5, l2=0.01, beta1=0.8, beta2=0.9, eps=1e-6)
    lazy_names = step.sparse_names(window) if optimizer.lazy else {}
    expected = {k: v.copy() for k, v in problem.params.items()}
    if structure["tied"]:
        expected["W_x"] = expected["W_o"].T
    names = trainable_names(problem)
    m1 = {k: np.zeros_like(expected[k]) for k in names}
    m2 = {k: np.zeros_like(expected[k]) for k in names}
    lr = 0.05
    for t in (1, 2):
        for S, s0 in zip(window.S, problem.s0, strict=True):
            ops.copy_into(s0, S[0])
        step.forward_backward(ops, P, G, window, *tokens)
        _, grads, _ = problem.reference(expected)
        norm = np.sqrt(sum((g**2).sum() for g in grads.values()))
        adam.update(P, G, window, lr)
        assert adam.last_norm() == pytest.approx(norm, rel=1e-10)
        assert_cleared(ops, G, window)
        for name in names:
            g = grads[name] * min(1.0, 0.5 / norm) + 0.02 * expected[name]
            new_m1 = 0.8 * m1[name] + 0.2 * g
            new_m2 = 0.9 * m2[name] + 0.1 * g**2
            m_hat, v_hat = new_m1 / (1 - 0.8**t), new_m2 / (1 - 0.9**t)
            new_param = expected[name] - lr * m_hat / (np.sqrt(v_hat) + 1e-6)
            stepped = np.ones(len(step.rows(name, g)), bool)
            if name in lazy_names:
                stepped = step.rows(name, grads[name]).any(axis=1)
                assert 0 < stepped.sum() < len(stepped), name
            for ours, new in ((m1[name], new_m1), (m2[name], new_m2), (expected[name], new_param)):
                step.rows(name, ours)[stepped] = step.rows(name, new)[stepped]
    for name in names:
        np.testing.assert_allclose(ops.to_numpy(P[name]), expected[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("grouped", [False, True], ids=["by rows", "grouped"])
def test_class_output_log_probs_equal_reference(ops, grouped, monkeypatch):
    """Both halves of the class softmax at once, with scores added to the class and the word logits, equal
    the float64 reference: by rows, and (CPU) by grouped GEMMs in blocks that split classes and rows and are
    narrower than a class."""
    if grouped:
        from rnnlm.backends.cpu import class_softmax

        for name, value in (("GEMM_ROWS", 0), ("CLASS_LOGITS", 4), ("CLASS_ROWS", 2)):  # classes of 5 words
            monkeypatch.setattr(class_softmax, name, value)
    rng = np.random.default_rng(3)
    N, C, widest = 9, len(CLASS_BOUNDS) - 1, int(np.diff(CLASS_BOUNDS).max())
    S, W_c, b_c, W_o, b_o = (rng.standard_normal(shape) for shape in ((N, m), (C, m), C, (V, m), V))
    class_scores, words = rng.standard_normal((N, C)), rng.standard_normal((N, widest))
    targets = rng.integers(0, V, N).astype(np.int32)
    classes = word_classes(CLASS_BOUNDS)[targets].astype(np.int32)
    expected = reference.log_softmax(S @ W_c.T + b_c + class_scores)[np.arange(N), classes]
    for r, (y, c) in enumerate(zip(targets, classes, strict=True)):
        lo, hi = CLASS_BOUNDS[c], CLASS_BOUNDS[c + 1]
        expected[r] += reference.log_softmax((W_o[lo:hi] @ S[r] + b_o[lo:hi] + words[r, : hi - lo])[None])[0, y - lo]
    out = ops.zeros(N, np.float64)
    arrays = [ops.asarray(a) for a in (S, W_c, b_c, W_o, b_o, targets, classes, CLASS_BOUNDS)]
    ops.class_output_log_probs(*arrays, out, ops.asarray(class_scores), ops.asarray(words))
    np.testing.assert_allclose(ops.to_numpy(out), expected, rtol=1e-12)


@pytest.mark.parametrize("rows", [1, 5, SKINNY_ROWS, SKINNY_ROWS + 1, 40])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_cpu_a_bt_product_of_few_or_many_rows_is_numpys(rows, dtype):
    """matmul_nt takes its own loop up to SKINNY_ROWS rows of A and BLAS above: both give A Bᵀ, A a view that
    starts one row in (a window's states)."""
    rng = np.random.default_rng(rows)
    states = rng.standard_normal((rows + 1, 37)).astype(dtype)
    A, B = states[1:], rng.standard_normal((301, 37)).astype(dtype)
    out = np.empty((rows, 301), dtype)
    cpu.matmul_nt(A, B, out)
    np.testing.assert_allclose(out, A.astype(np.float64) @ B.T.astype(np.float64), rtol=1e-5, atol=1e-4)
