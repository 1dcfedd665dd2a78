"""GPU speed benchmark of rnnlm's CUDA backend against PyTorch (cuDNN), and a CPU/GPU parity check.

    python benchmarks/gpu.py                          # m ∈ {200, 650, 1024} × B ∈ {20, 64, 256}, V=10000, T=35
    python benchmarks/gpu.py --quick --json out.json  # m=200, B ∈ {20, 64}: a minute or two
    python benchmarks/gpu.py --sizes 650x64,1024x256 --repeats 7
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu.py --quick   # the simulator: tiny sizes, a smoke test

rnnlm trains a window with rnnlm.step.forward_backward and a clipped SGD step (rnnlm.optim), state
carried between windows (common.RnnlmSgd); PyTorch runs in a worker process of its own (common.Worker, with
the environment this script started with) the same model the usual way: nn.Embedding, cuDNN's nn.RNN(tanh),
nn.Linear, mean cross-entropy, clip_grad_norm_, torch.optim.SGD, in float32 with TF32 off (rnnlm has no
tensor-core path). Both see the same random Zipf-distributed token windows (common.windows, V=10000,
T=35). Every kernel is
compiled and every allocation made in a warm-up; then blocks of windows, timed with a device synchronize
at each end, alternate between the implementations for --repeats rounds, and the medians are reported in
tokens/s, with rnnlm's useful TFLOP/s (6·m·(V + m) per training token, 2·m·(V + m) per evaluated one), and then
the host's time to queue a training window against the window's whole time (when they are close, the host
bounds the step, not the GPU), and the time of each of rnnlm's kernels in a training window (with the
GEMMs' TFLOP/s).

The parity check runs one window (m=200, B=20 and B=256) through the CPU and the CUDA backends from the same
float32 parameters and compares the losses, every gradient and the last states (max |Δ| / max |g|), for three
models: full softmax; class softmax with 100 classes; two layers with tied weights and dropout (the same masks).
It also runs the CUDA window twice, which must give bitwise-identical results (no floating-point atomics).

Exit status: 0 on success, 1 when the parity check fails, 2 for a usage error. PyTorch is optional.
"""

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time

import common  # beside this file; before anything that imports rnnlm
import numpy as np
from numba import config as numba_config
from numba import cuda

import rnnlm
from rnnlm import step
from rnnlm.backends import get_backend
from rnnlm.model import init_params, word_classes

BLOCK_SECONDS = 0.3  # target length of one timed block
LARGE_SIZE = 65536  # m·B from which a size gets 3 timed rounds by default
PARITY_LOSS_RTOL = 1e-4  # float32, different summation orders on the two backends
PARITY_GRAD_RTOL = 1e-3
FULL_SIZES = [(m, B) for m in (200, 650, 1024) for B in (20, 64, 256)]
QUICK_SIZES = [(200, 20), (200, 64)]
PARITY_SIZES = [(200, 20), (200, 256)]  # one stream per block, and several (recurrence._streams_per_block)
SIMULATOR = {"sizes": [(8, 2)], "vocab": 50, "bptt": 3, "parity": [(8, 2), (8, 9)], "classes": 5, "host_windows": 2}
HOST_WINDOWS = 20  # training windows that host_time times


def breakdown(params, data, n_windows=3):
    """Where a training window's time goes: {op: {"ms": per window, "share": of the total, "gflops": GEMMs}}."""
    timed = common.TimedOps(get_backend("cuda"))
    impl = common.RnnlmSgd(timed, params, data)
    impl.train(0)  # compiled already; this fills the workspaces
    timed.records.clear()
    for k in range(n_windows):
        impl.train(k + 1)
    return timed.summary(n_windows)


def host_time(impl, n_windows):
    """{"queue_ms", "window_ms"}: medians over training windows of the host's time to queue one and of
    the window's whole time, its loss read. Close to each other, the host bounds the step, not the GPU."""
    impl.sync()
    queued, whole = [], []
    for k in range(n_windows):
        t0 = time.perf_counter()
        loss = impl.queue(k % common.POOL)
        t1 = time.perf_counter()
        float(loss)
        queued.append(t1 - t0)
        whole.append(time.perf_counter() - t0)
    return {"queue_ms": 1e3 * statistics.median(queued), "window_ms": 1e3 * statistics.median(whole)}


def format_breakdown(ops):
    parts = []
    for name, r in ops.items():
        tflops = f", {r['gflops'] / 1e3:.1f} TFLOP/s" if "gflops" in r else ""
        parts.append(f"{name} {r['ms']:.2f} ms ({100 * r['share']:.0f}%{tflops})")
    return "; ".join(parts)


def timed_block(impl, kind, n_windows, start):
    """Seconds for n_windows consecutive windows of one kind, synchronized at both ends (a worker's in its
    own process)."""
    if isinstance(impl, common.Worker):
        return impl.call("block", kind=kind, n=n_windows, start=start)["seconds"]
    fn = impl.train if kind == "train" else impl.eval
    impl.sync()
    t0 = time.perf_counter()
    for i in range(n_windows):
        fn((start + i) % common.POOL)
    impl.sync()
    return time.perf_counter() - t0


def torch_status():
    """(usable, why not): PyTorch with a CUDA device, outside the simulator (asked in a process of its own)."""
    if numba_config.ENABLE_CUDASIM:
        return False, "the CUDA simulator is on"
    if importlib.util.find_spec("torch") is None:
        return False, "PyTorch is not installed"
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    if subprocess.run([sys.executable, "-c", probe], env=common.BASELINE_ENV).returncode != 0:
        return False, "PyTorch sees no CUDA device"
    return True, ""


def bench_size(m, B, args, with_torch):
    """Median tokens/s of each implementation and kind at one size: {impl: {kind: tokens/s}}, rnnlm's host
    time and its kernels; PyTorch in a worker process of its own."""
    T, V = args.bptt, args.vocab
    params, data = common.params(args.seed + 1, V, m), common.windows(args.seed, V, T, B)
    impls = {"rnnlm": common.RnnlmSgd(get_backend("cuda"), params, data)}
    if with_torch:
        config = {"seed": args.seed, "vocab": V, "hidden": m, "bptt": T, "batch": B, "threads": 1,
                  "softmax": "full", "classes": None, "device": "cuda"}
        impls["torch"] = common.Worker("torch", config)
    result = {}
    try:
        for kind in ("train", "eval"):
            counts = {}
            for name, impl in impls.items():  # warm-up: compiles, allocations; then the windows per block
                timed_block(impl, kind, 2, 0)
                counts[name] = max(1, min(50, round(BLOCK_SECONDS / (timed_block(impl, kind, 2, 2) / 2))))
            times = {name: [] for name in impls}
            for r in range(repeats(args, m, B)):
                for name, impl in impls.items():
                    times[name].append(timed_block(impl, kind, counts[name], r * counts[name]) / counts[name])
            for name, samples in times.items():
                result.setdefault(name, {})[kind] = T * B / statistics.median(samples)
    finally:
        if with_torch:
            impls["torch"].close()
    result["host"] = host_time(impls["rnnlm"], args.host_windows)
    result["breakdown"] = breakdown(params, data)
    return result


def repeats(args, m, B):
    """--repeats, or 5 rounds (3 with --quick, and at the sizes where a window takes longest)."""
    if args.repeats:
        return args.repeats
    return 3 if args.quick or numba_config.ENABLE_CUDASIM or m * B >= LARGE_SIZE else 5


def table_header(with_torch):
    head = f"{'m':>5} {'B':>4} | {'train tok/s':>12} {'TFLOP/s':>7}"
    head += f" {'torch':>12} {'ratio':>6}" if with_torch else ""
    head += f" | {'eval tok/s':>12} {'TFLOP/s':>7}" + (f" {'torch':>12} {'ratio':>6}" if with_torch else "")
    return head + "\n" + "-" * len(head)


def table_row(row, V, with_torch):
    """One size's line: rnnlm's tokens/s and TFLOP/s, torch's tokens/s and the ratio, training and eval."""
    m, B = row["m"], row["B"]
    line = f"{m:>5} {B:>4} |"
    for kind in ("train", "eval"):
        ours = row["rnnlm"][kind]
        line += f" {ours:>12,.0f} {ours * common.flops_per_token(m, V)[kind] / 1e12:>7.2f}"
        if with_torch:
            theirs = row["torch"][kind]
            line += f" {theirs:>12,.0f} {ours / theirs:>6.2f}"
        line += " |" if kind == "train" else ""
    return line


def parity_structures(args):
    """The models the parity check runs: Window keyword arguments by name."""
    classes = common.class_bounds(args.vocab, args.classes)
    return {
        "full": dict(class_bounds=None, layers=1, tied=False, dropout=0.0),
        "class": dict(class_bounds=classes, layers=1, tied=False, dropout=0.0),
        "2 layers, tied, dropout": dict(class_bounds=None, layers=2, tied=True, dropout=0.3),
    }


def window_results(ops, params, window_data, structure, seed):
    """Loss, trainable gradients and last states (numpy) of one training window on a backend."""
    (x, y), s0 = window_data
    T, B = x.shape
    m, V = params["W_s"].shape[0], params["W_o"].shape[0]
    window = step.Window(ops, T, B, m, V, np.float32, **structure)
    for S in window.S:
        ops.copy_into(s0, S[0])
    if structure["dropout"]:
        window.draw_masks(np.random.default_rng(seed))  # drawn on the host: the same masks on every backend
    bounds = structure["class_bounds"]
    classes = None if bounds is None else ops.asarray(word_classes(bounds)[y])
    P, G = step.to_device(ops, params, structure["tied"]), step.zero_grads(ops, params, structure["tied"])
    loss = float(step.forward_backward(ops, P, G, window, ops.asarray(x), ops.asarray(y), classes))
    out = step.host_grads(ops, G, window)
    for k, S in enumerate(window.S):
        out[f"S_T{k + 1}"] = ops.to_numpy(S[T])
    return loss, out


def parity(args):
    """CPU against CUDA backend on one window per size and model: a report, and whether it all passed."""
    report, passed = {}, True
    for m, B in args.parity:
        rng = np.random.default_rng(args.seed + 1)
        inputs, targets = common.windows(args.seed + 1, args.vocab, args.bptt, B, pool=1)
        window_data = ((inputs[0], targets[0]), (0.5 * rng.standard_normal((B, m))).astype(np.float32))
        for name, structure in parity_structures(args).items():
            bounds, layers = structure["class_bounds"], structure["layers"]
            n_classes = None if bounds is None else len(bounds) - 1
            params = init_params(
                args.vocab, m, np.random.default_rng(args.seed + 2), np.float32, n_classes=n_classes, layers=layers
            )
            if structure["tied"]:
                params["W_x"] = params["W_o"].T
            runs = [
                window_results(get_backend(device), params, window_data, structure, args.seed + 3)
                for device in ("cpu", "cuda", "cuda")
            ]
            (cpu_loss, cpu_out), (gpu_loss, gpu_out), (again_loss, again_out) = runs
            errors = {"loss": abs(gpu_loss - cpu_loss) / abs(cpu_loss)}
            for key, ref in cpu_out.items():
                errors[key] = float(np.abs(gpu_out[key] - ref).max() / max(np.abs(ref).max(), 1e-30))
            deterministic = again_loss == gpu_loss and all(np.array_equal(again_out[k], gpu_out[k]) for k in gpu_out)
            ok = deterministic and errors["loss"] < PARITY_LOSS_RTOL
            ok = ok and all(e < PARITY_GRAD_RTOL for key, e in errors.items() if key != "loss")
            passed = passed and ok
            report[f"{m}x{B} {name}"] = {"errors": errors, "deterministic": deterministic, "passed": ok}
            print(f"parity m={m} B={B} V={args.vocab} T={args.bptt}, {name}: " + ("ok" if ok else "FAILED"))
            print("  max |cuda - cpu| / max |cpu|: " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
            print(f"  two CUDA runs bitwise identical: {deterministic}")
    return report, passed


def parse_sizes(text):
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected MxB[,MxB...], e.g. 200x20,650x64, got {text!r}")
    return sizes


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=parse_sizes, help="state size x streams, e.g. 200x20,650x64 (default: all 9)")
    p.add_argument("--vocab", type=int, help="vocabulary size V (default 10000)")
    p.add_argument("--bptt", type=int, help="window length T (default 35)")
    p.add_argument(
        "--repeats", type=int, help="timed rounds per size and kind (default 5; 3 with --quick or m·B ≥ 65536)"
    )
    p.add_argument("--quick", action="store_true", help="m=200 with B ∈ {20, 64}, 3 repeats")
    p.add_argument("--no-parity", dest="parity_check", action="store_false", help="skip the CPU/GPU parity check")
    p.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sim = numba_config.ENABLE_CUDASIM
    args.sizes = args.sizes or (SIMULATOR["sizes"] if sim else QUICK_SIZES if args.quick else FULL_SIZES)
    args.vocab = args.vocab or (SIMULATOR["vocab"] if sim else 10000)
    args.bptt = args.bptt or (SIMULATOR["bptt"] if sim else 35)
    args.parity = SIMULATOR["parity"] if sim else PARITY_SIZES
    args.classes = SIMULATOR["classes"] if sim else 100
    args.host_windows = SIMULATOR["host_windows"] if sim else HOST_WINDOWS
    if args.vocab < 2 or args.bptt < 1 or (args.repeats is not None and args.repeats < 1):
        p.error("--vocab must be at least 2, --bptt and --repeats at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not (numba_config.ENABLE_CUDASIM or cuda.is_available()):
        print("no CUDA GPU found (set NUMBA_ENABLE_CUDASIM=1 for the simulator)", file=sys.stderr)
        return 2
    device = "CUDA simulator" if numba_config.ENABLE_CUDASIM else cuda.get_current_device().name
    device = device.decode() if isinstance(device, bytes) else device
    with_torch, why = torch_status()
    print(f"rnnlm {rnnlm.__version__} on {device}; V={args.vocab}, T={args.bptt}")
    if numba_config.ENABLE_CUDASIM:
        print("(simulator: tiny sizes, the timings mean nothing)")
    if not with_torch:
        print(f"PyTorch baseline skipped: {why}")
    t_start = time.perf_counter()
    results = {
        "device": device,
        "platform": platform.platform(),
        "rnnlm": rnnlm.__version__,
        "config": {"vocab": args.vocab, "bptt": args.bptt, "lr": common.LR, "clip": common.CLIP},
        "torch": with_torch,
        "results": [],
        "parity": {},
    }

    def save():  # after every size, so that a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    print(table_header(with_torch), flush=True)
    for m, B in args.sizes:
        row = {"m": m, "B": B, "repeats": repeats(args, m, B), **bench_size(m, B, args, with_torch)}
        results["results"].append(row)
        print(table_row(row, args.vocab, with_torch), flush=True)
        save()
    if with_torch:
        print("ratio = rnnlm tokens/s / torch tokens/s (> 1: rnnlm faster)")
    print("\nrnnlm's training window: the host's time to queue it, of the whole; then kernel by kernel")
    print("(synchronized after each call):")
    for row in results["results"]:
        host = row["host"]
        print(f"  m={row['m']} B={row['B']}: queued in {host['queue_ms']:.2f} of {host['window_ms']:.2f} ms; "
              + format_breakdown(row["breakdown"]))
    print(f"({time.perf_counter() - t_start:.0f} s)\n", flush=True)
    passed = True
    if args.parity_check:
        results["parity"], passed = parity(args)
        save()
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
