"""The backend contract (``rnnlm.backends.OPS``): both backends export exactly its ops with its parameters,
and every op gives the same results on both for the same small random inputs (float64; the CUDA backend
under the simulator), each output compared, whether overwritten, accumulated or returned."""

import inspect
from pathlib import Path

import numpy as np
import pytest

from rnnlm import step
from rnnlm.backends import OPS, cpu, cuda
from rnnlm.backends.cuda import device
from rnnlm.huffman import huffman_tree

N, m, V, T, B = 6, 5, 9, 3, 2
CLASS_BOUNDS = np.array([0, 2, 5, 7, 9], np.int32)  # class 3 unused by the targets below
ROW_SLOT = np.array([2, -1, -1, 0, 3, -1, -1, -1, 1], np.int32)  # rows 0, 3, 4, 8 in slots 2, 0, 3, 1


def public_ops(module):
    """The functions a backend exports (numba's dispatchers included), by name."""
    ops = {}
    for name, value in vars(module).items():
        function = getattr(value, "py_func", value)
        if name.startswith("_") or not inspect.isfunction(function):
            continue
        if function.__module__.startswith(module.__name__):
            ops[name] = function
    return ops


@pytest.mark.parametrize("backend", [cpu, cuda], ids=["cpu", "cuda"])
def test_a_backend_exports_the_contracts_ops_with_its_parameters(backend):
    ops = public_ops(backend)
    assert sorted(ops) == sorted(OPS)
    for name, function in ops.items():
        assert tuple(inspect.signature(function).parameters) == OPS[name].params, name


def test_the_numba_cuda_pin_is_the_one_the_device_module_is_written_against():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    pins = [requirement for extra in ("dev", "cuda") for requirement in extras[extra] if "numba-cuda" in requirement]
    assert pins and all(pin.endswith(device.NUMBA_CUDA) for pin in pins), pins


def rand(rng, *shape):
    return rng.standard_normal(shape)


def column_major(ops, array):
    """A backend copy of array (m, V) laid out column-major, as rnnlm.step keeps W_x."""
    return ops.asarray(np.ascontiguousarray(array.T)).T


def slotted(ops, rng, rows=V, dtype=None):
    """A slotted gradient (rows, m) with ROW_SLOT's four slots (rows 0, 3, 4 and 8) filled: (grad_rows, slot,
    claimed) backend arrays."""
    grad = np.zeros((rows, m))
    grad[:4] = rand(rng, 4, m)
    return ops.asarray(grad, dtype), ops.asarray(ROW_SLOT[:rows]), ops.asarray(np.array([4], np.int32))


def slotted_outputs(ops, grad_rows, slot, claimed):
    """A slotted gradient as the contract fixes it, whatever the order of its slots: the gradient in table
    order, the rows with a slot, and the count claimed, checked to be the slots used."""
    grad_rows, slot, claimed = ops.to_numpy(grad_rows), ops.to_numpy(slot), ops.to_numpy(claimed)
    assert sorted(slot[slot >= 0]) == list(range(claimed[0]))
    assert not grad_rows[claimed[0]:].any()
    return {"gradient": step.unslotted(grad_rows, slot), "rows": slot >= 0, "claimed": claimed}


def outputs(ops, result, **arrays):
    """Every named backend array as numpy, and the op's result (a loss: read as a float)."""
    out = {name: ops.to_numpy(array) for name, array in arrays.items()}
    if result is not None:
        out["result"] = float(result)
    return out


def case_asarray(ops, rng):
    return {"float32": ops.to_numpy(ops.asarray(rand(rng, 3, 4), np.float32)),
            "kept": ops.to_numpy(ops.asarray(np.asfortranarray(rand(rng, 3, 4))))}


def case_to_numpy(ops, rng):
    return {"copy": ops.to_numpy(ops.asarray(rand(rng, 2, 3)))}


def case_zeros(ops, rng):
    return {"float32": ops.to_numpy(ops.zeros((2, 3))), "uint8": ops.to_numpy(ops.zeros(4, np.uint8))}


def case_copy_into(ops, rng):
    from_host, from_device = ops.zeros((3, 4), np.float64), ops.zeros((4, 3), np.float64).T
    ops.copy_into(rand(rng, 3, 4), from_host)
    ops.copy_into(column_major(ops, rand(rng, 3, 4)), from_device)
    return outputs(ops, None, from_host=from_host, from_device=from_device)


def case_synchronize(ops, rng):
    assert ops.synchronize() is None
    return {}


def matmul_case(name, a_shape, b_shape):
    def case(ops, rng):
        out = ops.zeros((4, 7), np.float64)
        getattr(ops, name)(ops.asarray(rand(rng, *a_shape)), ops.asarray(rand(rng, *b_shape)), out)
        return outputs(ops, None, out=out)

    return case


def case_embed(ops, rng):
    U = ops.zeros((T, B, m), np.float64)
    ops.embed(column_major(ops, rand(rng, m, V)), ops.asarray(rng.integers(0, 3, (T, B)), np.int32), U)
    return outputs(ops, None, U=U)


def case_forward(ops, rng):
    S = np.zeros((T + 1, B, m))
    S[0] = rand(rng, B, m)
    S = ops.asarray(S)
    ops.forward(ops.asarray(rand(rng, m, m) / 2), ops.asarray(rand(rng, m)), ops.asarray(rand(rng, T, B, m)), S)
    return outputs(ops, None, S=S)


def case_forward_packed(ops, rng):
    """Streams of 3, 2 and 2 steps from carried states with the input term by token, then from zero states
    with the input term row by row."""
    offsets = np.array([0, 3, 6, 7])
    W_s, b_s, U = ops.asarray(rand(rng, m, m) / 2), ops.asarray(rand(rng, m)), ops.asarray(rand(rng, V, m))
    carried, first = ops.zeros((7, m), np.float64), ops.zeros((7, m), np.float64)
    ops.forward_packed(W_s, b_s, U, ops.asarray(rng.integers(0, V, 7), np.int32), ops.asarray(rand(rng, 3, m)),
                       carried, offsets)
    ops.forward_packed(W_s, b_s, U, None, None, first, offsets)
    return outputs(ops, None, carried=carried, first=first)


def case_backward(ops, rng):
    dL_da = ops.asarray(rand(rng, T, B, m))  # overwritten whole
    S = ops.asarray(np.tanh(rand(rng, T + 1, B, m)))
    ops.backward(ops.asarray(rand(rng, m, m) / 2), S, ops.asarray(rand(rng, T, B, m)), dL_da)
    return outputs(ops, None, dL_da=dL_da)


def case_input_grads(ops, rng):
    inputs = rng.integers(2, 6, (T, B)).astype(np.int32)
    dW_x, slot, claimed = slotted(ops, rng)  # rows 0, 3, 4, 8 slotted by an earlier op (tied: the class softmax)
    dW_x = column_major(ops, ops.to_numpy(dW_x).T)
    ops.input_grads(ops.asarray(inputs), ops.asarray(rand(rng, T, B, m)), dW_x, slot, claimed)
    return slotted_outputs(ops, dW_x.T, slot, claimed)


def case_bias_grad(ops, rng):
    db = ops.asarray(rand(rng, m))
    ops.bias_grad(ops.asarray(rand(rng, N, m)), db)
    return outputs(ops, None, db=db)


def case_multiply(ops, rng):
    out, a = ops.zeros((T, B, m), np.float64), ops.asarray(rand(rng, T, B, m))
    ops.multiply(ops.asarray(rand(rng, T, B, m)), ops.asarray(rand(rng, T, B, m)), out)
    ops.multiply(a, ops.asarray(rand(rng, T, B, m)), a)
    return outputs(ops, None, out=out, in_place=a)


def softmax_args(ops, rng):
    return ops.asarray(3 * rand(rng, N, V)), ops.asarray(rand(rng, V)), ops.asarray(rng.integers(0, V, N), np.int32)


def case_softmax_xent_grad(ops, rng):
    Z, b_o, targets = softmax_args(ops, rng)
    db_o = ops.asarray(rand(rng, V))
    return outputs(ops, ops.softmax_xent_grad(Z, b_o, targets, 0.5, db_o), Z=Z, db_o=db_o)


def case_softmax_xent(ops, rng):
    return outputs(ops, ops.softmax_xent(*softmax_args(ops, rng)))  # Z is scratch


def case_softmax_log_probs(ops, rng):
    out = ops.zeros(N, np.float64)
    ops.softmax_log_probs(*softmax_args(ops, rng), out)
    return outputs(ops, None, out=out)


def class_args(ops, rng):
    target_classes = np.array([1, 0, 2, 1, 1, 2], np.int32)
    targets = np.array([rng.integers(CLASS_BOUNDS[c], CLASS_BOUNDS[c + 1]) for c in target_classes], np.int32)
    S_next, W_o, b_o = rand(rng, N, m), rand(rng, V, m), rand(rng, V)
    return [ops.asarray(a) for a in (S_next, W_o, b_o, targets, target_classes, CLASS_BOUNDS)]


def direct_scores(ops, rng):
    """Direct scores (N, the widest class + 1) for class_args' rows."""
    return ops.asarray(rand(rng, N, 4))


def case_class_xent_grad(ops, rng):
    args = class_args(ops, rng)
    written = {"dW_o": ops.zeros((V, m), np.float64), "db_o": ops.asarray(rand(rng, V)),
               "dL_ds": ops.asarray(rand(rng, N, m)), "slot": ops.asarray(np.full(V, -1, np.int32)),
               "claimed": ops.zeros(1, np.int32), "dW_o_norm": ops.zeros(1, np.float64)}
    loss = ops.class_xent_grad(*args, 0.25, *written.values())
    out = outputs(ops, loss, db_o=written["db_o"], dL_ds=written["dL_ds"], dW_o_norm=written["dW_o_norm"])
    out |= slotted_outputs(ops, written["dW_o"], written["slot"], written["claimed"])
    direct = direct_scores(ops, rng)
    for name in ("slot", "claimed", "dW_o"):  # as the optimizer leaves them
        written[name] = ops.asarray(np.full(V, -1, np.int32)) if name == "slot" else ops.zeros(
            (1,) if name == "claimed" else (V, m), np.int32 if name == "claimed" else np.float64)
    loss = ops.class_xent_grad(*args, 0.25, *written.values(), direct)
    with_direct = outputs(ops, loss, direct=direct, db_o=written["db_o"], dL_ds=written["dL_ds"],
                          dW_o_norm=written["dW_o_norm"])
    with_direct |= slotted_outputs(ops, written["dW_o"], written["slot"], written["claimed"])
    return out | {f"with direct: {name}": value for name, value in with_direct.items()}


def case_class_xent(ops, rng):
    args = class_args(ops, rng)
    return outputs(ops, ops.class_xent(*args)) | {"with direct": float(ops.class_xent(*args, direct_scores(ops, rng)))}


def case_class_log_probs(ops, rng):
    out, with_direct = ops.zeros(N, np.float64), ops.zeros(N, np.float64)
    args = class_args(ops, rng)
    ops.class_log_probs(*args, out)
    ops.class_log_probs(*args, with_direct, direct_scores(ops, rng))
    return outputs(ops, None, out=out, with_direct=with_direct)


def case_class_output_log_probs(ops, rng):
    S_next, W_o, b_o, targets, target_classes, bounds = class_args(ops, rng)
    C = len(CLASS_BOUNDS) - 1
    W_c, b_c = ops.asarray(rand(rng, C, m)), ops.asarray(rand(rng, C))
    out, with_scores = ops.zeros(N, np.float64), ops.zeros(N, np.float64)
    ops.class_output_log_probs(S_next, W_c, b_c, W_o, b_o, targets, target_classes, bounds, out)
    ops.class_output_log_probs(S_next, W_c, b_c, W_o, b_o, targets, target_classes, bounds, with_scores,
                               ops.asarray(rand(rng, N, C)), direct_scores(ops, rng))
    return outputs(ops, None, out=out, with_scores=with_scores)


def hs_args(ops, rng):
    """S_next, W_o, b_o, targets (a repeated one) and the Huffman tree of V words with tied counts."""
    tree = huffman_tree(np.array([9, 1, 4, 4, 0, 2, 7, 1, 3]))
    targets = np.array([0, 4, 8, 4, 2, 6], np.int32)
    return [ops.asarray(a) for a in (rand(rng, N, m), rand(rng, V - 1, m), rand(rng, V - 1), targets, tree.parent,
                                     tree.sign)]


def case_hs_xent_grad(ops, rng):
    args = hs_args(ops, rng)
    written = {"dW_o": ops.zeros((V - 1, m), np.float64), "db_o": ops.asarray(rand(rng, V - 1)),
               "dL_ds": ops.asarray(rand(rng, N, m)), "slot": ops.asarray(np.full(V - 1, -1, np.int32)),
               "claimed": ops.zeros(1, np.int32), "dW_o_norm": ops.zeros(1, np.float64)}
    loss = ops.hs_xent_grad(*args, 0.25, *written.values())
    out = outputs(ops, loss, db_o=written["db_o"], dL_ds=written["dL_ds"], dW_o_norm=written["dW_o_norm"])
    return out | slotted_outputs(ops, written["dW_o"], written["slot"], written["claimed"])


def case_hs_xent(ops, rng):
    return outputs(ops, ops.hs_xent(*hs_args(ops, rng)))


def case_hs_log_probs(ops, rng):
    out = ops.zeros(N, np.float64)
    ops.hs_log_probs(*hs_args(ops, rng), out)
    return outputs(ops, None, out=out)


def direct_args(ops, rng, size=13):
    """Keys of N rows (some cut), a region of a table of size + 2 entries, rows' classes of CLASS_BOUNDS."""
    keys = rng.integers(0, 2**61 - 1, (N, 3))
    keys[1, 2] = keys[4, 1:] = -1
    classes = np.array([1, 0, 2, 1, 3, 2], np.int32)
    return ops.asarray(rand(rng, size + 2)), ops.asarray(keys), 2, size, ops.asarray(classes), ops.asarray(CLASS_BOUNDS)


def case_direct_keys(ops, rng):
    history = rng.integers(-1, 4, (2 + T, B)).astype(np.int32)
    keys = ops.zeros((T * B, 4), np.int64)
    ops.direct_keys(ops.asarray(history), 0, keys)
    return outputs(ops, None, keys=keys)


def case_direct_scores(ops, rng):
    out = ops.asarray(rand(rng, N, 3))
    ops.direct_scores(*direct_args(ops, rng), out)
    return outputs(ops, None, out=out)


def case_direct_scatter(ops, rng):
    W_d, *args = direct_args(ops, rng)
    ops.direct_scatter(W_d, *args, ops.asarray(rand(rng, N, 3)), -0.5)
    return outputs(ops, None, W_d=W_d)


def case_grad_norm(ops, rng):
    dense, (rows, slot, _) = ops.asarray(rand(rng, 3, 4)), slotted(ops, rng)
    rows = column_major(ops, ops.to_numpy(rows).T).T  # W_x's rows: any layout
    clipping, unclipped = ops.zeros(2, np.float64), ops.zeros(2, np.float64)
    pairs = [(dense, None), (rows, slot)]
    ops.grad_norm(pairs, 1.0, clipping)
    ops.grad_norm(pairs, 0.0, unclipped)
    return outputs(ops, None, clipping=clipping, unclipped=unclipped)


def clipping(ops):
    return ops.asarray(np.array([4.0, 0.5]))


def case_sgd_update(ops, rng):
    param = ops.asarray(rand(rng, T, B, m))
    ops.sgd_update(param, ops.asarray(rand(rng, T, B, m)), 0.1, np.float64(0.99), clipping(ops))
    return outputs(ops, None, param=param)


def case_sgd_updates(ops, rng):
    params = [ops.asarray(rand(rng, 3, 4)), ops.asarray(rand(rng, 5))]
    pairs = [(p, ops.asarray(rand(rng, *p.shape))) for p in params]
    ops.sgd_updates(pairs, 0.1, 0.99, clipping(ops))
    return outputs(ops, None, first=params[0], second=params[1])


def case_sparse_sgd_update(ops, rng):
    param, gradient = ops.asarray(rand(rng, V, m)), slotted(ops, rng)
    ops.sparse_sgd_update(param, *gradient, 0.1, clipping(ops))
    return outputs(ops, None, param=param, grad=gradient[0], slot=gradient[1], claimed=gradient[2])


def adam_arrays(ops, rng, shape):
    return [ops.asarray(a) for a in (rand(rng, *shape), rand(rng, *shape), rand(rng, *shape), rng.random(shape))]


def case_adam_update(ops, rng):
    param, grad, moment1, moment2 = adam_arrays(ops, rng, (3, 4))
    scalars = [np.float64(s) for s in (0.01, 0.001, 0.9, 0.999, 1e-8)]
    ops.adam_update(param, grad, moment1, moment2, scalars[0], clipping(ops), *scalars[1:])
    return outputs(ops, None, param=param, moment1=moment1, moment2=moment2)


def case_sparse_adam_update(ops, rng):
    out = {}
    for every in (0, 1):  # lazy Adam, Adam
        param, _, moment1, moment2 = adam_arrays(ops, rng, (V, m))
        gradient = slotted(ops, rng)
        scalars = [np.float64(s) for s in (0.01, 0.001, 0.9, 0.999, 1e-8)]
        ops.sparse_adam_update(param, gradient[0], moment1, moment2, *gradient[1:], every, scalars[0], clipping(ops),
                               *scalars[1:])
        out |= sparse_step_outputs(ops, every, param, moment1, moment2, *gradient)
    return out


def sparse_step_outputs(ops, every, param, moment1, moment2, grad, slot, claimed):
    """What a sparse Adam step with ``every`` leaves, by name."""
    out = outputs(ops, None, param=param, grad=grad, moment1=moment1, moment2=moment2, slot=slot, claimed=claimed)
    return {f"every {every}: {name}": value for name, value in out.items()}


def bf16_bits(values):
    """The bfloat16 bits (upper halves) of values as float32, uint16."""
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def adam_bf16_arrays(ops, rng, shape):
    param, grad, moment1, moment2 = (rand(rng, *shape), rand(rng, *shape), rand(rng, *shape), rng.random(shape))
    return [ops.asarray(param, np.float32), ops.asarray(grad, np.float32), ops.asarray(bf16_bits(moment1)),
            ops.asarray(bf16_bits(moment2))]


BF16_SCALARS = [np.float32(s) for s in (0.01, 0.001, 0.9, 0.999, 1e-8)]


def case_adam_update_bf16(ops, rng):
    param, grad, moment1, moment2 = adam_bf16_arrays(ops, rng, (3, 4))
    ops.adam_update_bf16(param, grad, moment1, moment2, 7, BF16_SCALARS[0], clipping(ops), *BF16_SCALARS[1:])
    return outputs(ops, None, param=param, moment1=moment1, moment2=moment2)


def case_sparse_adam_update_bf16(ops, rng):
    out = {}
    for every in (0, 1):  # lazy Adam, Adam
        param, _, moment1, moment2 = adam_bf16_arrays(ops, rng, (V, m))
        gradient = slotted(ops, rng, dtype=np.float32)
        ops.sparse_adam_update_bf16(param, gradient[0], moment1, moment2, *gradient[1:], every, 7, BF16_SCALARS[0],
                                    clipping(ops), *BF16_SCALARS[1:])
        out |= sparse_step_outputs(ops, every, param, moment1, moment2, *gradient)
    return out


def case_decay_rows(ops, rng):
    param, start = ops.asarray(rand(rng, V, m)), ops.asarray(rand(rng, V, m))
    keep = ops.asarray(rng.random((V, m)))
    rows, powers = (ops.asarray(np.array(a, np.int32)) for a in ([0, 3, V - 1], [1, 5, 2]))
    ops.decay_rows(param, start, keep, rows, powers)
    return outputs(ops, None, param=param)


def case_pulled_rms_update(ops, rng):
    param, grad, start = (ops.asarray(rand(rng, V, m)) for _ in range(3))
    keep, moment2 = ops.asarray(rng.random((V, m))), ops.asarray(rng.random((V, m)))
    ops.pulled_rms_update(param, grad, start, keep, moment2, np.float64(0.01), clipping(ops), np.float64(1e-3))
    return outputs(ops, None, param=param)


CASES = {name[len("case_"):]: case for name, case in globals().items() if name.startswith("case_")}
CASES.update(matmul_nt=matmul_case("matmul_nt", (4, 3), (7, 3)), matmul_nn=matmul_case("matmul_nn", (4, 3), (3, 7)),
             matmul_tn=matmul_case("matmul_tn", (3, 4), (3, 7)))


def test_every_op_has_a_parity_case():
    assert sorted(CASES) == sorted(OPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_both_backends_give_the_same_results(name):
    on_cpu = CASES[name](cpu, np.random.default_rng(0))
    on_cuda = CASES[name](cuda, np.random.default_rng(0))
    assert sorted(on_cpu) == sorted(on_cuda)
    for output, expected in on_cpu.items():
        np.testing.assert_allclose(on_cuda[output], expected, rtol=1e-12, atol=1e-13, err_msg=output)
