"""What the shared kernel tests do not reach in the CUDA backend at their toy sizes: split-k and both GEMM
tiles, the recurrence in several passes and stage chunks, long token lists, rows wider than a block,
the class softmax with an unused class, the row-masked updates, the gradient norm's and the SGD step's
launches over several arrays, and the device arrays' view transposes and the fused kernels' argument types
(real-GPU code paths, checked here without a GPU). Oracles: numpy, or the CPU backend.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnnlm.backends import cpu
from rnnlm.backends import cuda as ops
from rnnlm.backends.cuda import device, gemm, recurrence

REPO = Path(__file__).resolve().parents[1]


def random(rng, *shape):
    return rng.standard_normal(shape)


def clear_caches(*factories):
    for factory in factories:
        factory.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("n, p, K", [(40, 20, 40), (40, 36, 20)], ids=["small-tile", "large-tile"])
def test_gemms_with_k_split_over_blocks(monkeypatch, n, p, K):
    """Partial row and column tiles, k split into chunks of 16 (the last one partial), the three layouts."""
    monkeypatch.setattr(device, "sm_count", lambda: 8)
    monkeypatch.setattr(gemm, "MIN_K_PER_SPLIT", 8)
    rng = np.random.default_rng(0)
    A, B = random(rng, n, K), random(rng, p, K)
    cases = {
        ops.matmul_nt: (A, B, A @ B.T),
        ops.matmul_nn: (A, np.ascontiguousarray(B.T), A @ B.T),
        ops.matmul_tn: (np.ascontiguousarray(A.T), np.ascontiguousarray(B.T), A @ B.T),
    }
    for matmul, (left, right, expected) in cases.items():
        out = ops.zeros((n, p), np.float64)
        matmul(ops.asarray(left), ops.asarray(right), out)
        np.testing.assert_allclose(ops.to_numpy(out), expected, rtol=1e-12, atol=1e-12, err_msg=matmul.__name__)


@pytest.fixture
def small_recurrence_blocks(monkeypatch):
    """32 threads and 16-value stage chunks: m = 40 takes two row passes and three chunks, both partial."""
    monkeypatch.setattr(recurrence, "MAX_RECURRENCE_THREADS", 32)
    monkeypatch.setattr(recurrence, "STAGE_BYTES", 16 * 8)
    clear_caches(recurrence._stream_matvec, recurrence._stream_kernel)  # the chunk is a constant of the kernels
    yield
    clear_caches(recurrence._stream_matvec, recurrence._stream_kernel)


def check_recurrence(T, B, m):
    """Forward and backward over a window against the CPU backend."""
    rng = np.random.default_rng(1)
    W_s, b_s, U = random(rng, m, m) / np.sqrt(m), random(rng, m), random(rng, T, B, m)
    S = np.zeros((T + 1, B, m))
    S[0] = random(rng, B, m)
    dL_ds_out = random(rng, T, B, m)
    S_dev, dL_da_dev = ops.asarray(S), ops.zeros((T, B, m), np.float64)
    ops.forward(ops.asarray(W_s), ops.asarray(b_s), ops.asarray(U), S_dev)
    ops.backward(ops.asarray(W_s), S_dev, ops.asarray(dL_ds_out), dL_da_dev)
    dL_da = np.zeros((T, B, m))
    cpu.forward(W_s, b_s, U, S)
    cpu.backward(W_s, S, dL_ds_out, dL_da)
    np.testing.assert_allclose(ops.to_numpy(S_dev), S, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ops.to_numpy(dL_da_dev), dL_da, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("streams", [1, 2, 4])
def test_recurrence_in_passes_and_chunks(monkeypatch, small_recurrence_blocks, streams):
    """Streams split over blocks: B = 3 streams in blocks of 1, 2 or 4 (partial)."""
    monkeypatch.setattr(recurrence, "_streams_per_block", lambda B: streams)
    check_recurrence(3, 3, 40)


@pytest.mark.slow
@pytest.mark.parametrize("B", [3, 11])
def test_recurrence_with_units_split_over_blocks(monkeypatch, B):
    """Units split over blocks (the large-m kernels): 40 units in 5 groups of 8 on the simulator's one block,
    streams in groups of 8 (the last partial), the vectors staged 16 values at a time (three chunks, the last
    partial), a lane's share of a chunk one value or none."""
    monkeypatch.setattr(recurrence, "SPLIT_MIN_M", 0)
    monkeypatch.setattr(recurrence, "SPLIT_STAGE_BYTES", 8 * 16 * 8)
    clear_caches(recurrence._split_lanes, recurrence._split_kernel)  # the chunk is a constant of the kernels
    try:
        check_recurrence(3, B, 40)
    finally:
        clear_caches(recurrence._split_lanes, recurrence._split_kernel)


def test_embedding_and_its_gradient_over_long_token_lists():
    """Three tokens over 20 positions, W_x column-major: the lookup, then each W_x column summing its list
    in order onto what it held, and the bias gradient (column sums over the 20 rows)."""
    rng = np.random.default_rng(2)
    T, B, m, V = 4, 5, 40, 6
    inputs = rng.choice([1, 3, 4], (T, B)).astype(np.int32)
    W_x = random(rng, m, V)
    U = ops.zeros((T, B, m), np.float64)
    ops.embed(ops.asarray(W_x.T).T, ops.asarray(inputs), U)
    np.testing.assert_array_equal(ops.to_numpy(U), W_x[:, inputs].transpose(1, 2, 0))
    dL_dU = random(rng, T, B, m)
    dW_x = np.zeros((m, V))
    dW_x[:, 3] = random(rng, m)  # a column marked by an earlier window
    touched = np.zeros(V, np.uint8)
    touched[3] = 1
    dW_x_dev, touched_dev = ops.asarray(dW_x.T).T, ops.asarray(touched)
    ops.input_grads(ops.asarray(inputs), ops.asarray(dL_dU), dW_x_dev, touched_dev)
    expected = dW_x.copy()
    np.add.at(expected.T, inputs.reshape(-1), dL_dU.reshape(-1, m))
    np.testing.assert_allclose(ops.to_numpy(dW_x_dev), expected, rtol=1e-12)
    np.testing.assert_array_equal(ops.to_numpy(touched_dev), [0, 1, 0, 1, 1, 0])
    db = ops.zeros(m, np.float64)
    ops.bias_grad(ops.asarray(dL_dU.reshape(-1, m)), db)
    np.testing.assert_allclose(ops.to_numpy(db), dL_dU.sum(axis=(0, 1)), rtol=1e-12)


def test_softmax_rows_wider_than_a_block():
    """V = 300: more logits than threads (128) and a two-level merge; logits far apart."""
    rng = np.random.default_rng(3)
    N, V = 3, 300
    Z = 20 * random(rng, N, V)
    b_o = random(rng, V)
    targets = np.array([0, 299, 17], np.int32)
    z = Z + b_o - (Z + b_o).max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -log_p[np.arange(N), targets].sum()
    grad = 0.5 * (np.exp(log_p) - np.eye(V)[targets])
    Z_dev, db_o = ops.asarray(Z), ops.zeros(V, np.float64)
    assert float(ops.softmax_xent(Z_dev, ops.asarray(b_o), ops.asarray(targets))) == pytest.approx(loss, rel=1e-12)
    assert float(ops.softmax_xent_grad(Z_dev, ops.asarray(b_o), ops.asarray(targets), 0.5, db_o)) == pytest.approx(
        loss, rel=1e-12
    )
    np.testing.assert_allclose(ops.to_numpy(Z_dev), grad, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(ops.to_numpy(db_o), grad.sum(axis=0), rtol=1e-10, atol=1e-15)


def test_class_softmax_with_an_unused_class_equals_cpu():
    """Rows sharing classes, class 2 unused (its db_o zeroed, its rows left untouched), dL_ds accumulated,
    and the norm of the dW_o rows written."""
    rng = np.random.default_rng(4)
    N, m = 6, 5
    class_bounds = np.array([0, 3, 10, 25, 40], np.int32)
    target_classes = np.array([1, 0, 3, 1, 1, 3], np.int32)
    targets = np.array([rng.integers(class_bounds[c], class_bounds[c + 1]) for c in target_classes], np.int32)
    S_next, W_o, b_o = random(rng, N, m), random(rng, 40, m), random(rng, 40)
    host = {
        "dW_o": np.zeros((40, m)),
        "db_o": np.full(40, 7.0),
        "dL_ds": random(rng, N, m),
        "touched": np.zeros(40, np.uint8),
        "dW_o_norm": np.zeros(1),
    }
    dev = {k: ops.asarray(v) for k, v in host.items()}
    args = (targets, target_classes, class_bounds)
    expected = cpu.class_xent_grad(S_next, W_o, b_o, *args, 0.25, *host.values())
    loss = ops.class_xent_grad(*(ops.asarray(a) for a in (S_next, W_o, b_o, *args)), 0.25, *dev.values())
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    for name, array in host.items():
        np.testing.assert_allclose(ops.to_numpy(dev[name]), array, rtol=1e-12, atol=1e-15, err_msg=name)
    assert not host["touched"][10:25].any() and host["touched"][25:].all()
    assert host["dW_o_norm"][0] == pytest.approx(np.linalg.norm(host["dW_o"]), rel=1e-12)
    eval_loss = ops.class_xent(*(ops.asarray(a) for a in (S_next, W_o, b_o, *args)))
    assert float(eval_loss) == pytest.approx(cpu.class_xent(S_next, W_o, b_o, *args), rel=1e-12)


def test_masked_row_updates():
    """The sparse gradient's norm and update by a row mask, which clears the gradient's rows and the mask."""
    rng = np.random.default_rng(5)
    rows, grads = random(rng, 9, 40), random(rng, 9, 40)
    mask = np.array([1, 0, 0, 1, 1, 0, 0, 0, 1], np.uint8)
    marked = mask[:, None] == 1
    rows_dev, grads_dev, mask_dev = (ops.asarray(a) for a in (rows, grads, mask))
    clipping = ops.zeros(2, np.float64)
    ops.grad_norm([(grads_dev, mask_dev)], 0.0, clipping)
    assert ops.to_numpy(clipping)[0] ** 2 == pytest.approx((grads[mask == 1] ** 2).sum(), rel=1e-12)
    ops.masked_sgd_update(rows_dev, grads_dev, mask_dev, 0.5, clipping)  # clipping factor 1
    np.testing.assert_allclose(ops.to_numpy(rows_dev), np.where(marked, rows - 0.5 * grads, rows), rtol=1e-12)
    np.testing.assert_array_equal(ops.to_numpy(grads_dev), np.where(marked, 0.0, grads))
    assert not ops.to_numpy(mask_dev).any()
    multiplied = ops.zeros((9, 40), np.float64)
    ops.multiply(ops.asarray(rows), ops.asarray(grads), multiplied)
    np.testing.assert_array_equal(ops.to_numpy(multiplied), rows * grads)
    ops.copy_into(ops.asarray(grads).T, multiplied.T)  # device to device, column-major
    np.testing.assert_array_equal(ops.to_numpy(multiplied), grads)


def test_grad_norm_and_sgd_updates_over_several_arrays():
    """One norm for dense and masked arrays of several shapes and layouts (a float64 pair in its own group),
    equal to the CPU twin, and its clipping factor; then one SGD step over several arrays, one of them
    column-major, scaled by that factor."""
    rng = np.random.default_rng(6)
    host = [random(rng, 9, 40), random(rng, 40), random(rng, 3, 5)]
    rows, other = random(rng, 9, 40), random(rng, 12, 3)
    mask, other_mask = np.array([1, 0, 0, 1, 1, 0, 0, 0, 1], np.uint8), np.zeros(12, np.uint8)
    other_mask[[2, 11]] = 1
    dev = [ops.asarray(a, np.float32) for a in host[:2]] + [ops.asarray(host[2].T).T]
    pairs = [(a, None) for a in dev] + [(ops.asarray(rows, np.float32), ops.asarray(mask))]
    pairs.append((ops.asarray(other), ops.asarray(other_mask)))
    cpu_pairs = [(np.ascontiguousarray(ops.to_numpy(a)), m if m is None else ops.to_numpy(m)) for a, m in pairs]
    expected = sum((a**2).sum() for a in host) + (rows[mask == 1] ** 2).sum() + (other[other_mask == 1] ** 2).sum()
    norm = np.sqrt(expected)
    clipping, cpu_clipping = ops.zeros(2, np.float64), np.zeros(2)
    ops.grad_norm(pairs, 2 * norm, clipping)
    np.testing.assert_allclose(ops.to_numpy(clipping), [norm, 1.0], rtol=1e-6)
    ops.grad_norm(pairs, norm / 4, clipping)
    cpu.grad_norm(cpu_pairs, norm / 4, cpu_clipping)
    np.testing.assert_allclose(ops.to_numpy(clipping), cpu_clipping, rtol=1e-6)
    np.testing.assert_allclose(ops.to_numpy(clipping), [norm, 0.25], rtol=1e-6)
    grads = [ops.asarray(random(rng, *a.shape), np.float32) for a in host[:2]] + [ops.asarray(random(rng, 5, 3)).T]
    before = [ops.to_numpy(a) for a in dev]
    ops.sgd_updates(list(zip(dev, grads, strict=True)), 2.0, 0.75, clipping)
    for param, grad, old in zip(dev, grads, before, strict=True):
        # a GPU contracts shrink·p - step·g into one FMA: compare against the magnitudes, not element by element
        expected = 0.75 * old - 0.5 * ops.to_numpy(grad)
        np.testing.assert_allclose(ops.to_numpy(param), expected, rtol=1e-5, atol=1e-6 * np.abs(old).max())


VIEW_TRANSPOSE = """
import numpy as np
from rnnlm.backends.cuda.arrays import flat
from rnnlm.backends.cuda.device import DeviceArray

a = DeviceArray((2, 3), (12, 4), np.float32, 0, object())
t = a.T
assert type(t) is DeviceArray and t.gpu_data is a.gpu_data
assert t.shape == (3, 2) and t.strides == (4, 12) and t.is_f_contiguous()
assert t.T.shape == (2, 3) and t.T.is_c_contiguous()
assert flat(t).shape == (6,) and type(flat(t)) is DeviceArray
assert a.T is t and flat(t) is flat(t) and a.reshape(3, 2) is a.reshape(3, 2)

# each view as a kernel parameter laid out as numba-cuda's own launch lays it out (no memory here: pointer 0)
from types import SimpleNamespace
from numba import typeof
from numba.cuda.dispatcher import _Kernel
for view in (a, t, a.reshape(6), flat(t), a.reshape(3, 2).T):
    params = []
    _Kernel._prepare_args(SimpleNamespace(extensions=[]), typeof(view), view, 0, [], params)
    assert view.launch_params == tuple(p or 0 for p in params), (view.launch_params, params)
"""


@pytest.mark.slow
def test_device_arrays_transpose_as_views():
    """Without the simulator (and without a GPU: no memory is touched), a backend array's .T is a view
    sharing its memory, as rnnlm.step needs for W_x; numba's own DeviceNDArray.T would copy. Views are
    built once per array, and passed to a kernel as numba-cuda passes them."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", VIEW_TRANSPOSE], env=env, check=True)


@pytest.mark.skipif(not device.SIMULATOR, reason="a fix of the CUDA simulator")
def test_a_blocks_threads_share_one_array_per_shared_array_call_in_the_simulator(monkeypatch):
    """The simulator's threads allocate a shared array at their first call; with a thread switch between
    looking the call site up and storing its array (forced here by a slow np.empty), numba-cuda's own
    allocator gives each thread its own array, and kernel results depend on the interleaving."""
    import threading
    import time

    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    empty = np.empty

    def slow_empty(*args, **kwargs):
        time.sleep(0.01)
        return empty(*args, **kwargs)

    monkeypatch.setattr(np, "empty", slow_empty)
    shared, arrays = FakeCUDAShared(0), []

    def thread():
        arrays.append(shared.array(4, np.float64))

    threads = [threading.Thread(target=thread) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(arrays) == 8 and all(a is arrays[0] for a in arrays)
