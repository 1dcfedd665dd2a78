"""Adam with bfloat16 moments (--moments bfloat16: stochastic rounding with hashed random bits), and the memory
of slotted sparse gradients."""

import json

import numpy as np
import pytest

import rnnlm
from rnnlm.backends import MIX_GOLDEN, MIX_MULTIPLIERS, cpu
from rnnlm.errors import RnnlmError
from rnnlm.model import write_npz

from .conftest import demo_texts, train_whole_and_interrupted

M32 = 0xFFFFFFFF


def mix(x):
    """murmur3's fmix32 on uint64 values below 2³² (``rnnlm.backends``)."""
    x = x ^ (x >> 16)
    x = (x * MIX_MULTIPLIERS[0]) & M32
    x = x ^ (x >> 13)
    x = (x * MIX_MULTIPLIERS[1]) & M32
    return x ^ (x >> 16)


def random_bits(t, shape):
    """r(t, k) of ``rnnlm.backends`` for every flat index k of an array of ``shape``."""
    k = np.arange(int(np.prod(shape)), dtype=np.uint64)
    return mix((((k & M32) * MIX_GOLDEN) & M32) ^ mix(np.uint64(t & M32)) ^ (k >> 32)).reshape(shape)


def to_bf16(values, u):
    """The stochastic rounding of ``rnnlm.backends``: float32 values, u uint64 below 2¹⁶ -> uint16 bits."""
    bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    nonfinite = (bits >> 16) | np.where(bits & 0x7FFFFF, 0x40, 0).astype(np.uint64)
    return np.where((bits & 0x7F800000) == 0x7F800000, nonfinite, (bits + u) >> 16).astype(np.uint16)


def from_bf16(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_bits(values):
    """Round toward zero to bfloat16 (the upper half of each float32)."""
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def reference_step(param, grad, moment1, moment2, t, lr_t, scale, decay, beta1, beta2, eps):
    """adam_update_bf16 in numpy float32, one rounding per operation: (param, moment1, moment2)."""
    f = np.float32
    g = f(scale) * grad + f(decay) * param
    m1 = f(beta1) * from_bf16(moment1) + (f(1) - f(beta1)) * g
    m2 = f(beta2) * from_bf16(moment2) + (f(1) - f(beta2)) * g * g
    param = param - f(lr_t) * m1 / (np.sqrt(m2) + f(eps))
    r = random_bits(t, param.shape)
    return param, to_bf16(m1, r & 0xFFFF), to_bf16(m2, r >> 16)


def problem(rng, shape):
    """Float32 parameters and gradient (one +inf and one -inf entry) and bfloat16 moments."""
    param, grad = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    grad.flat[3], grad.flat[5] = np.inf, -np.inf
    moment1 = bf16_bits(0.1 * rng.standard_normal(shape))
    moment2 = bf16_bits(0.1 * rng.random(shape))
    return param, grad, moment1, moment2


SCALARS = dict(lr_t=0.01, decay=0.001, beta1=0.9, beta2=0.999, eps=1e-8)


def kernel_scalars():
    return [np.float32(SCALARS[name]) for name in ("lr_t", "decay", "beta1", "beta2", "eps")]


def test_the_cpu_step_is_the_numpy_reference_to_the_bit():
    rng = np.random.default_rng(0)
    param, grad, moment1, moment2 = problem(rng, (37, 11))
    clipping = np.array([3.0, 0.75])
    lr_t, decay, beta1, beta2, eps = kernel_scalars()
    with np.errstate(invalid="ignore"):  # inf / inf in the rows of the infinite gradients
        expected = reference_step(param, grad, moment1, moment2, 5, scale=0.75, **SCALARS)
    p, m1, m2 = param.copy(), moment1.copy(), moment2.copy()
    with np.errstate(invalid="ignore"):
        cpu.adam_update_bf16(p, grad, m1, m2, 5, lr_t, clipping, decay, beta1, beta2, eps)
    np.testing.assert_array_equal(p, expected[0])
    np.testing.assert_array_equal(m1, expected[1])
    np.testing.assert_array_equal(m2, expected[2])
    assert m1.flat[3] == 0x7F80 and m1.flat[5] == 0xFF80  # ±inf stay infinite

    marked = rng.random(37) < 0.4
    slot, g = slotted(grad, marked, rng)
    p, m1, m2 = param.copy(), moment1.copy(), moment2.copy()
    with np.errstate(invalid="ignore"):
        cpu.sparse_adam_update_bf16(p, g, m1, m2, slot, np.array([marked.sum()], np.int32), 0, 5, lr_t, clipping,
                                    decay, beta1, beta2, eps)
    for got, step_result, before in zip((p, m1, m2), expected, (param, moment1, moment2), strict=True):
        np.testing.assert_array_equal(got[marked], step_result[marked])
        np.testing.assert_array_equal(got[~marked], before[~marked])
    assert not g.any() and (slot == -1).all()

    slot, g = slotted(grad, marked, rng)  # every row, those without a slot on a zero gradient
    p, m1, m2 = param.copy(), moment1.copy(), moment2.copy()
    with np.errstate(invalid="ignore"):
        cpu.sparse_adam_update_bf16(p, g, m1, m2, slot, np.array([marked.sum()], np.int32), 1, 5, lr_t, clipping,
                                    decay, beta1, beta2, eps)
        expected = reference_step(param, np.where(marked[:, None], grad, 0), moment1, moment2, 5, scale=0.75,
                                  **SCALARS)
    for got, step_result in zip((p, m1, m2), expected, strict=True):
        np.testing.assert_array_equal(got, step_result)


def slotted(grad, marked, rng):
    """The rows of ``grad`` marked as a slotted gradient, in a random order of slots: (slot, grad_rows)."""
    rows = rng.permutation(np.flatnonzero(marked))
    slot = np.full(len(grad), -1, np.int32)
    slot[rows] = np.arange(len(rows))
    grad_rows = np.zeros_like(grad)
    grad_rows[:len(rows)] = grad[rows]
    return slot, grad_rows


@pytest.mark.parametrize("x", [1 / 3, -2.7182817, 3.1e-7, 0.0123])
def test_stochastic_rounding_gives_a_neighbour_and_is_unbiased(x):
    """β1 = β2 = 0 and no decay: moment1 = g and moment2 = g², each rounded once, one element at a time."""
    n = 1 << 18
    grad = np.full(n, x, np.float32)
    clipping = np.array([0.0, 1.0])
    for moment, exact in ((0, np.float32(x)), (1, np.float32(x) * np.float32(x))):
        param, m1, m2 = np.zeros(n, np.float32), np.zeros(n, np.uint16), np.zeros(n, np.uint16)
        cpu.adam_update_bf16(param, grad, m1, m2, 11, np.float32(0.01), clipping, np.float32(0), np.float32(0),
                             np.float32(0), np.float32(1e-8))
        rounded = from_bf16((m1, m2)[moment]).astype(np.float64)
        low, high = sorted(float(from_bf16(b)[()]) for b in (bf16_bits(exact), bf16_bits(exact) + 1))
        assert np.isin(rounded, [low, high]).all()
        p = (abs(float(exact)) - abs(low if exact > 0 else high)) / (high - low)  # the chance to round away
        assert 0.01 < p < 0.99
        assert abs(rounded.mean() - float(exact)) < 5 * (high - low) * np.sqrt(p * (1 - p) / n)


def test_the_second_moment_keeps_growing_where_round_to_nearest_would_freeze_it():
    """At β2 = 0.999 and g = 1, v's step (1 - β2)(1 - v) is below half a bfloat16 ulp of v from v = 1/4 on:
    round to nearest would hold v there. Stochastic rounding follows 1 - β2ᵗ."""
    n, steps = 4096, 1500
    param, grad = np.zeros(n, np.float32), np.ones(n, np.float32)
    m1, m2 = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    clipping = np.array([0.0, 1.0])
    for t in range(1, steps + 1):
        cpu.adam_update_bf16(param, grad, m1, m2, t, np.float32(0), clipping, np.float32(0), np.float32(0.9),
                             np.float32(0.999), np.float32(1e-8))
    assert abs(from_bf16(m2).mean() - (1 - 0.999**steps)) < 0.01


def test_bf16_moments_train_a_toy_regression_like_float32_ones():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((256, 8)).astype(np.float32)
    W_true = rng.standard_normal((16, 8)).astype(np.float32)
    Y = X @ W_true.T

    def train(bfloat16):
        W = np.zeros((16, 8), np.float32)
        dtype = np.uint16 if bfloat16 else np.float32
        m1, m2 = np.zeros(W.shape, dtype), np.zeros(W.shape, dtype)
        clipping = np.array([0.0, 1.0])
        for t in range(1, 401):
            grad = (2 * (X @ W.T - Y).T @ X / len(X)).astype(np.float32)
            lr_t = np.float32(0.05 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t))
            scalars = (lr_t, clipping, np.float32(0), np.float32(0.9), np.float32(0.999), np.float32(1e-8))
            if bfloat16:
                cpu.adam_update_bf16(W, grad, m1, m2, t, *scalars)
            else:
                cpu.adam_update(W, grad, m1, m2, *scalars)
        return W, float(np.mean((X @ W.T - Y) ** 2))

    (W_32, loss_32), (W_16, loss_16) = train(False), train(True)
    start = float(np.mean(Y**2))
    assert loss_32 < 1e-3 * start and loss_16 < 1e-3 * start
    np.testing.assert_allclose(W_16, W_32, atol=0.02)
    assert not np.array_equal(W_16, W_32)


def test_cuda_steps_bf16_moments_to_the_cpu_bits():
    from rnnlm.backends import cuda

    rng = np.random.default_rng(2)
    param, grad, moment1, moment2 = problem(rng, (9, 6))
    grad[np.isinf(grad)] = 2.0
    marked = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1], bool)
    results = {}
    for ops in (cpu, cuda):
        p, m1, m2 = (ops.asarray(a) for a in (param, moment1, moment2))
        lr_t, *rest = kernel_scalars()
        clipping = ops.asarray(np.array([2.0, 0.5]))
        for t in (1, 2, 3):
            slot, g = (ops.asarray(a) for a in slotted(grad * np.float32(t), marked, np.random.default_rng(t)))
            claimed = ops.asarray(np.array([marked.sum()], np.int32))
            ops.sparse_adam_update_bf16(p, g, m1, m2, slot, claimed, t % 2, t, lr_t, clipping, *rest)
            ops.adam_update_bf16(p, ops.asarray(grad), m1, m2, t + 10, lr_t, clipping, *rest)
        results[ops.name] = [ops.to_numpy(a) for a in (p, m1, m2)]
    for got, expected in zip(results["cuda"], results["cpu"], strict=True):
        np.testing.assert_array_equal(got, expected)


def rss_bytes():
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_a_slotted_gradient_makes_only_its_claimed_rows_resident():
    """64 MiB of gradient for V = 2¹⁸ rows; a window of 2,000 tokens spread over all of them writes 2,000 rows'
    worth (0.5 MiB), not a page per token (8 MiB)."""
    V, m, T, B = 1 << 18, 64, 20, 100
    tokens = np.random.default_rng(0).permutation(V)[:T * B].astype(np.int32).reshape(T, B)
    dL_dU = np.ones((T, B, m), np.float32)
    cpu.input_grads(tokens[:1, :1], dL_dU[:1, :1], np.zeros((V, m), np.float32).T, np.full(V, -1, np.int32),
                    np.zeros(1, np.int32))  # compiled before the measurement
    dW_x, slot, claimed = np.zeros((V, m), np.float32), np.full(V, -1, np.int32), np.zeros(1, np.int32)
    before = rss_bytes()
    cpu.input_grads(tokens, dL_dU, dW_x.T, slot, claimed)
    assert rss_bytes() - before < 4 << 20
    assert claimed[0] == T * B and dW_x[:T * B].all() and not dW_x[T * B:].any()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    demo_texts(folder, 400, 60)
    return folder


SETTINGS = {"hidden": 8, "bptt": 5, "batch": 3, "epochs": 2, "softmax": "hs", "optimizer": "lazyadam", "lr": 0.01,
            "dropout": 0.1, "moments": "bfloat16"}


@pytest.mark.slow
def test_an_interrupted_bf16_run_resumes_to_the_same_bytes_and_a_wrong_moment_dtype_is_refused(corpus, tmp_path):
    checkpoint = train_whole_and_interrupted(corpus, tmp_path, rnnlm.TrainConfig(**SETTINGS))
    with np.load(checkpoint, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    assert arrays["optimizer/moment2/W_o"].dtype == np.uint16 and arrays["optimizer/moment2/W_o"].any()
    assert json.loads(str(arrays["meta"]))["config"]["moments"] == "bfloat16"

    as_float = dict(arrays, **{"optimizer/moment1/W_x": from_bf16(arrays["optimizer/moment1/W_x"])})
    with open(tmp_path / "wrong.ckpt.npz", "wb") as f:
        write_npz(f, as_float)
    with pytest.raises(RnnlmError, match=r"optimizer/moment1/W_x.npy' has dtype '<f4', expected one of u2") as error:
        rnnlm.resume(tmp_path / "wrong.ckpt.npz", text=corpus / "train.txt", valid=corpus / "valid.txt")
    assert "\n" not in str(error.value)

    rnnlm.resume(checkpoint, text=corpus / "train.txt", valid=corpus / "valid.txt")
    assert (tmp_path / "cut.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()


def test_bf16_moments_are_adams_and_take_half_the_memory_bound():
    with pytest.raises(RnnlmError, match="sgd keeps no moments"):
        rnnlm.TrainConfig(optimizer="sgd", moments="bfloat16").check()
    with pytest.raises(RnnlmError, match="--moments must be one of float32, bfloat16"):
        rnnlm.TrainConfig(optimizer="adam", moments="float16").check()
    from rnnlm.runplan import memory_needed

    settings = dict(optimizer="lazyadam", softmax="hs", hidden=256, batch=1, bptt=1)
    full, half = (memory_needed(rnnlm.TrainConfig(**settings, moments=moments), 10**6)
                  for moments in ("float32", "bfloat16"))
    assert full - half == pytest.approx(4 * 2 * 10**6 * 256, rel=0.01)
