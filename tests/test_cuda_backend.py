"""What the shared kernel tests do not reach in the CUDA backend at their toy sizes: split-k and both GEMM
tiles, the recurrence in several passes and stage chunks, long token lists, rows wider than a block,
the class softmax with an unused class and its slots shared with the input gradient, the updates of slotted
gradients (whatever the order of their slots) in several sweeps of rows, the gradient norm's and the SGD step's
launches over several arrays, and the device arrays' view transposes and the fused kernels' argument types
(real-GPU code paths, checked here without a GPU). Oracles: numpy, the CPU backend, or the CUDA backend's dense
ops.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnnlm import step
from rnnlm.backends import cpu
from rnnlm.backends import cuda as ops
from rnnlm.backends.cuda import device, gemm, recurrence

REPO = Path(__file__).resolve().parents[1]


def random(rng, *shape):
    return rng.standard_normal(shape)


def slotted(table, rows, order_seed=0):
    """``rows`` of a (R, m) table as a slotted gradient (``rnnlm.backends``) in a shuffled order of slots:
    (grad_rows, slot, claimed) numpy arrays."""
    rows = np.random.default_rng(order_seed).permutation(rows)
    slot = np.full(len(table), -1, np.int32)
    slot[rows] = np.arange(len(rows), dtype=np.int32)
    grad_rows = np.zeros_like(table)
    grad_rows[:len(rows)] = table[rows]
    return grad_rows, slot, np.array([len(rows)], np.int32)


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
    dW_x[:, 3] = random(rng, m)  # a column slotted by an earlier op
    grad_rows, slot, claimed = (ops.asarray(a) for a in slotted(dW_x.T, [3]))
    ops.input_grads(ops.asarray(inputs), ops.asarray(dL_dU), grad_rows.T, slot, claimed)
    expected = dW_x.copy()
    np.add.at(expected.T, inputs.reshape(-1), dL_dU.reshape(-1, m))
    slots = ops.to_numpy(slot)
    np.testing.assert_allclose(step.unslotted(ops.to_numpy(grad_rows), slots).T, expected, rtol=1e-12)
    assert slots[3] == 0 and sorted(slots[[1, 4]]) == [1, 2] and ops.to_numpy(claimed)[0] == 3
    assert (slots[[0, 2, 5]] == -1).all()
    dense, every_slot = ops.asarray(dW_x.T).T, ops.asarray(np.arange(V, dtype=np.int32))  # the full softmax tied
    ops.input_grads(ops.asarray(inputs), ops.asarray(dL_dU), dense, every_slot, claimed)
    np.testing.assert_allclose(ops.to_numpy(dense), expected, rtol=1e-12)
    assert (ops.to_numpy(every_slot) == np.arange(V)).all() and ops.to_numpy(claimed)[0] == 3  # nothing claimed
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
    """Rows sharing classes, class 2 unused (its db_o zeroed, its rows without a slot), dL_ds accumulated,
    the norm of the dW_o rows written, each class's words in consecutive slots; then the input gradient of
    tied weights into the same slotted gradient: its tokens of the classes used keep their slots, the others
    claim new ones."""
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
        "slot": np.full(40, -1, np.int32),
        "claimed": np.zeros(1, np.int32),
        "dW_o_norm": np.zeros(1),
    }
    dev = {k: ops.asarray(v) for k, v in host.items()}
    args = (targets, target_classes, class_bounds)
    expected = cpu.class_xent_grad(S_next, W_o, b_o, *args, 0.25, *host.values())
    loss = ops.class_xent_grad(*(ops.asarray(a) for a in (S_next, W_o, b_o, *args)), 0.25, *dev.values())
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    for name in ("db_o", "dL_ds", "dW_o_norm", "claimed"):
        np.testing.assert_allclose(ops.to_numpy(dev[name]), host[name], rtol=1e-12, atol=1e-15, err_msg=name)
    dW_o = step.unslotted(ops.to_numpy(dev["dW_o"]), ops.to_numpy(dev["slot"]))
    np.testing.assert_allclose(dW_o, step.unslotted(host["dW_o"], host["slot"]), rtol=1e-12, atol=1e-15)
    assert (host["slot"][10:25] == -1).all() and (host["slot"][25:] >= 0).all() and host["claimed"][0] == 25
    slots = ops.to_numpy(dev["slot"])
    assert all((np.diff(slots[lo:hi]) == 1).all() for lo, hi in ((0, 3), (3, 10), (25, 40)))  # classes in any order
    assert sorted(slots[slots >= 0]) == list(range(25)) and (slots[10:25] == -1).all()
    assert host["dW_o_norm"][0] == pytest.approx(np.linalg.norm(host["dW_o"]), rel=1e-12)
    inputs = np.array([[12, 3], [30, 12]], np.int32)  # 12 of the unused class, 3 and 30 of classes used
    dL_dU = random(rng, 2, 2, m)
    cpu.input_grads(inputs, dL_dU, host["dW_o"].T, host["slot"], host["claimed"])
    ops.input_grads(ops.asarray(inputs), ops.asarray(dL_dU), dev["dW_o"].T, dev["slot"], dev["claimed"])
    np.testing.assert_array_equal(ops.to_numpy(dev["slot"])[[3, 30]], slots[[3, 30]])
    assert ops.to_numpy(dev["slot"])[12] == 25 and ops.to_numpy(dev["claimed"])[0] == host["claimed"][0] == 26
    dW_o = step.unslotted(ops.to_numpy(dev["dW_o"]), ops.to_numpy(dev["slot"]))
    np.testing.assert_allclose(dW_o, step.unslotted(host["dW_o"], host["slot"]), rtol=1e-12, atol=1e-15)
    eval_loss = ops.class_xent(*(ops.asarray(a) for a in (S_next, W_o, b_o, *args)))
    assert float(eval_loss) == pytest.approx(cpu.class_xent(S_next, W_o, b_o, *args), rel=1e-12)


def test_slotted_row_updates(monkeypatch):
    """The sparse gradient's norm and update through its slots, which clears the gradient's rows and the
    slots: the same bits for two orders of the slots. Blocks of 2 rows of 8 threads: 9 rows in three sweeps
    (the last partial), 5 passes along a row of 40."""
    monkeypatch.setattr(device, "row_grid", lambda R, m: (2, (8, 2)))
    rng = np.random.default_rng(5)
    rows, grads = random(rng, 9, 40), random(rng, 9, 40)
    marked = np.zeros((9, 1), bool)
    marked[[0, 3, 4, 8]] = True
    grads = np.where(marked, grads, 0.0)
    results = []
    for order_seed in (0, 1):
        grad_rows, slot, claimed = (ops.asarray(a) for a in slotted(grads, [0, 3, 4, 8], order_seed))
        rows_dev = ops.asarray(rows)
        clipping = ops.zeros(2, np.float64)
        ops.grad_norm([(grad_rows, slot)], 0.0, clipping)
        assert ops.to_numpy(clipping)[0] ** 2 == pytest.approx((grads**2).sum(), rel=1e-12)
        ops.sparse_sgd_update(rows_dev, grad_rows, slot, claimed, 0.5, clipping)  # clipping factor 1
        np.testing.assert_allclose(ops.to_numpy(rows_dev), rows - 0.5 * grads, rtol=1e-12)
        assert not ops.to_numpy(grad_rows).any() and (ops.to_numpy(slot) == -1).all()
        assert ops.to_numpy(claimed)[0] == 0
        results.append((ops.to_numpy(clipping), ops.to_numpy(rows_dev)))
    for first, second in zip(*results, strict=True):
        np.testing.assert_array_equal(first, second)
    multiplied = ops.zeros((9, 40), np.float64)
    ops.multiply(ops.asarray(rows), ops.asarray(grads), multiplied)
    np.testing.assert_array_equal(ops.to_numpy(multiplied), rows * grads)
    ops.copy_into(ops.asarray(grads).T, multiplied.T)  # device to device, column-major
    np.testing.assert_array_equal(ops.to_numpy(multiplied), grads)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bfloat16"])
def test_sparse_adam_equals_the_dense_step_on_the_gradient_in_row_order(monkeypatch, bf16):
    """Lazy Adam (every 0) steps the rows with a slot alone, their moments included; Adam (every 1) every
    row, those without a slot on a zero gradient: both bit for bit the dense step on the gradient in row order,
    on the rows they step (bfloat16 moments: the random bits of each element's index in the table); the
    gradient cleared after either. Rows in sweeps as in test_slotted_row_updates."""
    monkeypatch.setattr(device, "row_grid", lambda R, m: (2, (8, 2)))
    rng = np.random.default_rng(7)
    R, m, rows = 9, 40, [0, 3, 4, 8]
    marked = np.isin(np.arange(R), rows)[:, None]
    grads = np.where(marked, random(rng, R, m), 0.0).astype(np.float32)
    param = random(rng, R, m).astype(np.float32)
    moments = [random(rng, R, m), rng.random((R, m))]
    if bf16:
        moments = [(np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16) for a in moments]
    else:
        moments = [a.astype(np.float32) for a in moments]
    lr_t, *rest = (np.float32(s) for s in (0.01, 0.001, 0.9, 0.999, 1e-8))
    clipping = ops.asarray(np.array([4.0, 0.5]))
    for every in (0, 1):
        dense = [ops.asarray(a) for a in (param, grads, *moments)]
        sparse = [ops.asarray(a) for a in (param, *moments)]
        grad_rows, slot, claimed = (ops.asarray(a) for a in slotted(grads, rows, order_seed=every))
        if bf16:
            ops.adam_update_bf16(*dense, 5, lr_t, clipping, *rest)
            ops.sparse_adam_update_bf16(sparse[0], grad_rows, *sparse[1:], slot, claimed, every, 5, lr_t, clipping,
                                        *rest)
        else:
            ops.adam_update(*dense, lr_t, clipping, *rest)
            ops.sparse_adam_update(sparse[0], grad_rows, *sparse[1:], slot, claimed, every, lr_t, clipping, *rest)
        stepped = marked | bool(every)
        for name, after, stepped_dense, before in zip(("param", "moment1", "moment2"), sparse, dense[:1] + dense[2:],
                                                     (param, *moments), strict=True):
            expected = np.where(stepped, ops.to_numpy(stepped_dense), before)
            np.testing.assert_array_equal(ops.to_numpy(after), expected, err_msg=f"every {every}: {name}")
        assert not ops.to_numpy(grad_rows).any() and (ops.to_numpy(slot) == -1).all()
        assert ops.to_numpy(claimed)[0] == 0


def test_grad_norm_and_sgd_updates_over_several_arrays():
    """One norm for dense and slotted arrays of several shapes and layouts (a float64 pair in its own group),
    equal to the CPU twin, and its clipping factor; then one SGD step over several arrays, one of them
    column-major, scaled by that factor."""
    rng = np.random.default_rng(6)
    host = [random(rng, 9, 40), random(rng, 40), random(rng, 3, 5)]
    rows, other = random(rng, 9, 40), random(rng, 12, 3)
    rows_slotted, other_slotted = slotted(rows, [0, 3, 4, 8]), slotted(other, [2, 11])
    dev = [ops.asarray(a, np.float32) for a in host[:2]] + [ops.asarray(host[2].T).T]
    pairs = [(a, None) for a in dev] + [(ops.asarray(rows_slotted[0], np.float32), ops.asarray(rows_slotted[1]))]
    pairs.append((ops.asarray(other_slotted[0]), ops.asarray(other_slotted[1])))
    cpu_pairs = [(np.ascontiguousarray(ops.to_numpy(a)), m if m is None else ops.to_numpy(m)) for a, m in pairs]
    expected = sum((a**2).sum() for a in host) + (rows[[0, 3, 4, 8]] ** 2).sum() + (other[[2, 11]] ** 2).sum()
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
