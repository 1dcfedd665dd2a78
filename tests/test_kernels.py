"""The kernels of every backend against the numpy reference and against central differences.

Every test runs for both backends (``ops``) and both output layers (``softmax``: full, or class-based
with 3 classes). Toy sizes (V=11, m=6, T=4, B=3) so that the CUDA backend runs under the simulator.
"""

import numpy as np
import pytest

from rnnlm import optim, reference, step
from rnnlm.model import init_params, word_classes

V, m, T, B = 11, 6, 4, 3
CLASS_BOUNDS = np.array([0, 2, 6, 11], np.int32)


@pytest.fixture(params=["full", "class"])
def class_bounds(request):
    return None if request.param == "full" else CLASS_BOUNDS


def toy_problem(dtype, class_bounds, seed=0):
    """Parameters with nonzero biases, a nonzero carried state, and a window with a repeated token."""
    rng = np.random.default_rng(seed)
    n_classes = None if class_bounds is None else len(class_bounds) - 1
    params = init_params(V, m, rng, np.float64, n_classes=n_classes)
    for name in params:
        params[name] = params[name] + 0.3 * rng.standard_normal(params[name].shape)
    inputs = rng.integers(0, V, (T, B)).astype(np.int32)
    inputs[2, 1] = inputs[0, 0]  # the same token twice: its W_x column must sum both gradients
    targets = rng.integers(0, V, (T, B)).astype(np.int32)
    targets[3, 2] = targets[1, 0]  # and a repeated target: rows of one class share W_o's rows
    s0 = 0.5 * rng.standard_normal((B, m))
    return {k: v.astype(dtype) for k, v in params.items()}, inputs, targets, s0.astype(dtype)


def device_window(ops, params, inputs, targets, s0, class_bounds):
    """Backend parameters, window (with s0 carried in) and token arrays for one step."""
    window = step.Window(ops, T, B, m, V, s0.dtype, class_bounds)
    ops.copy_into(s0, window.S[0])
    classes = None if class_bounds is None else ops.asarray(word_classes(class_bounds)[targets])
    return step.to_device(ops, params), window, (ops.asarray(inputs), ops.asarray(targets), classes)


def run_window(ops, params, inputs, targets, s0, class_bounds):
    """Loss sum, gradients (numpy, dense) and last state from the backend's fused step."""
    P, window, tokens = device_window(ops, params, inputs, targets, s0, class_bounds)
    G = step.zero_grads(ops, params)
    loss = step.forward_backward(ops, P, G, window, *tokens)
    grads = {k: ops.to_numpy(v) for k, v in G.items()}
    return loss, grads, ops.to_numpy(window.S[T])


def test_float64_kernels_equal_reference(ops, class_bounds):
    params, inputs, targets, s0 = toy_problem(np.float64, class_bounds)
    loss, grads, s_last = run_window(ops, params, inputs, targets, s0, class_bounds)
    ref_loss, ref_grads, ref_last = reference.loss_and_grads(params, inputs, targets, s0, class_bounds)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(s_last, ref_last, rtol=1e-12)
    for name in params:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-10, atol=1e-14, err_msg=name)


def test_float32_kernels_equal_float64_reference(ops, class_bounds):
    params, inputs, targets, s0 = toy_problem(np.float32, class_bounds)
    loss, grads, _ = run_window(ops, params, inputs, targets, s0, class_bounds)
    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    ref_loss, ref_grads, _ = reference.loss_and_grads(params64, inputs, targets, s0.astype(np.float64), class_bounds)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name in params:
        scale = np.abs(ref_grads[name]).max()
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def test_gradients_equal_central_differences(ops, class_bounds):
    """Every entry of every parameter's gradient against (L(θ+ε) - L(θ-ε)) / 2ε of the mean loss."""
    params, inputs, targets, s0 = toy_problem(np.float64, class_bounds, seed=1)
    _, grads, _ = run_window(ops, params, inputs, targets, s0, class_bounds)
    eps = 1e-5
    for name in params:
        numeric = np.zeros_like(params[name])
        for idx in np.ndindex(params[name].shape):
            shifted = {k: v.copy() for k, v in params.items()}
            shifted[name][idx] += eps
            up = reference.loss(shifted, inputs, targets, s0, class_bounds)[0]
            shifted[name][idx] -= 2 * eps
            down = reference.loss(shifted, inputs, targets, s0, class_bounds)[0]
            numeric[idx] = (up - down) / (2 * eps) / (T * B)
        error = np.abs(grads[name] - numeric).max() / np.abs(numeric).max()
        assert error < 1e-7, (name, error)


def test_window_loss_equals_reference(ops, class_bounds):
    params, inputs, targets, s0 = toy_problem(np.float32, class_bounds, seed=2)
    P, window, tokens = device_window(ops, params, inputs, targets, s0, class_bounds)
    loss = step.window_loss(ops, P, window, *tokens)
    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    ref_loss, ref_last = reference.loss(params64, inputs, targets, s0.astype(np.float64), class_bounds)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(ops.to_numpy(window.S[T]), ref_last, rtol=1e-5, atol=1e-6)


def test_sgd_step_clips_the_global_norm_and_decays(ops, class_bounds):
    """A real step's gradients, then the update: dense and sparse (W_x, class W_o) rows alike, and the
    sparse gradients are left zero for the next window."""
    params, inputs, targets, s0 = toy_problem(np.float64, class_bounds, seed=3)
    _, ref_grads, _ = reference.loss_and_grads(params, inputs, targets, s0, class_bounds)
    P, window, tokens = device_window(ops, params, inputs, targets, s0, class_bounds)
    G = step.zero_grads(ops, params)
    step.forward_backward(ops, P, G, window, *tokens)
    norm = np.sqrt(sum((g**2).sum() for g in ref_grads.values()))
    lr, clip, l2 = 0.5, norm / 4, 0.01
    assert optim.SGD(ops, P, clip=clip, l2=l2).update(P, G, window, lr) == pytest.approx(norm, rel=1e-10)
    for name in params:
        expected = params[name] - lr * (ref_grads[name] / 4 + 2 * l2 * params[name])
        np.testing.assert_allclose(ops.to_numpy(P[name]), expected, rtol=1e-10, atol=1e-14, err_msg=name)
    for name in step.sparse_names(window):
        assert not ops.to_numpy(G[name]).any(), name


def test_class_probabilities_sum_to_one():
    params, *_ = toy_problem(np.float64, CLASS_BOUNDS)
    s = np.random.default_rng(6).standard_normal((5, m))
    p = np.exp(reference.log_probs(params, s, CLASS_BOUNDS))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)


def test_adam_step_equals_a_hand_computed_step(ops, class_bounds):
    """Two Adam steps on a real window's gradients against the formulas written out in numpy."""
    params, inputs, targets, s0 = toy_problem(np.float64, class_bounds, seed=7)
    P, window, tokens = device_window(ops, params, inputs, targets, s0, class_bounds)
    G = step.zero_grads(ops, params)
    adam = optim.Adam(ops, P, clip=0.5, l2=0.01, beta1=0.8, beta2=0.9, eps=1e-6)
    expected = {k: v.copy() for k, v in params.items()}
    m1 = {k: np.zeros_like(v) for k, v in params.items()}
    m2 = {k: np.zeros_like(v) for k, v in params.items()}
    lr = 0.05
    for t in (1, 2):
        ops.copy_into(s0, window.S[0])
        step.forward_backward(ops, P, G, window, *tokens)
        _, grads, _ = reference.loss_and_grads(expected, inputs, targets, s0, class_bounds)
        norm = np.sqrt(sum((g**2).sum() for g in grads.values()))
        assert adam.update(P, G, window, lr) == pytest.approx(norm, rel=1e-10)
        for name in params:
            g = grads[name] * min(1.0, 0.5 / norm) + 0.02 * expected[name]
            m1[name] = 0.8 * m1[name] + 0.2 * g
            m2[name] = 0.9 * m2[name] + 0.1 * g**2
            m_hat, v_hat = m1[name] / (1 - 0.8**t), m2[name] / (1 - 0.9**t)
            expected[name] -= lr * m_hat / (np.sqrt(v_hat) + 1e-6)
    for name in params:
        np.testing.assert_allclose(ops.to_numpy(P[name]), expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
