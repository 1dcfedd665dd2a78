"""CPU speed benchmark of rnnlm's training and evaluation step against a numpy (and a PyTorch) baseline.

    python benchmarks/throughput.py                       # m=200, V=10000, T=35, B=20, 2 threads, vs numpy
    python benchmarks/throughput.py --vs both --memory --breakdown --json results.json
    python benchmarks/throughput.py --hidden 650 --vs torch
    python benchmarks/throughput.py --quick               # a few seconds, tiny sizes: a smoke test for CI

Every implementation trains (forward, backward, clipped SGD, state carried between windows) and evaluates
the same tanh RNN on the same random token windows (fixed seed), starting from the same parameters
(rnnlm.model.init_params). After a warm-up (JIT compile, and a check that all implementations compute
the same loss on the first window), timed blocks of a fixed number of windows alternate between the
implementations, for --repeats rounds; the medians, and the median of the per-round ratios, are reported.
The float32 GEMM rate of the output layer's shapes, measured in the same run with the same thread count,
gives a ceiling: see ``flops_per_token``. README.md next to this file explains every number.

Exit status: 0 on success, 1 when the implementations disagree on the loss or training diverges,
2 for a usage error (e.g. --vs torch without PyTorch installed).
"""

# ruff: noqa: I001  (import order matters here: rnnlm before numpy)
# rnnlm first: importing it sets the thread and cache environment (rnnlm/_env.py) before numpy, SciPy and
# Numba load. The stdlib modules before it load none of them.
import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import rnnlm
import numpy as np

from rnnlm import _env, reference, step
from rnnlm.backends import get_backend
from rnnlm.model import frequency_classes, init_params, word_classes
from rnnlm.optim import make_optimizer
from torch_rnn import TorchRNN  # beside this script

LR = 0.01  # small: the parameters barely move, so every block does the same work
CLIP = 1.0
BLOCK_SECONDS = 2.5  # target length of one timed block when --windows is not given
POOL = 64  # distinct random windows, cycled through
LOSS_RTOL = 1e-3  # agreement required between implementations on the first windows (float32 sums)
IMPL_ORDER = ("rnnlm", "numpy", "torch")
UNATTRIBUTED = "(unattributed: total - sum)"


# ------------------------------------------------------------------------------------------ FLOP model


def flops_per_token(m, V, C=None, class_size=None):
    """Useful FLOPs per token of the model (multiply-add = 2), dominated by the output layer.

    Full softmax, training: the output layer's three GEMMs per token -- logits z = W_o s (forward),
    dW_o += dL/dz sᵀ, W_oᵀ dL/dz -- at 2·m·V each, plus the recurrence's three m×m products --
    W_s s_{t-1} (forward), W_sᵀ dL/da (backward), dW_s += dL/da s_{t-1}ᵀ -- at 2·m² each:
        train = 3·2·m·V + 3·2·m² = 6·m·(V + m)
    Evaluation: the forward product and the forward recurrence:
        eval = 2·m·V + 2·m² = 2·m·(V + m)
    Class softmax with C classes: the output layer is the C class logits plus the logits of the words of
    the target's class, |c| on average over the targets (``class_size``), so V becomes C + |c|:
        train = 6·m·(C + |c| + m)        eval = 2·m·(C + |c| + m)
    Softmax, tanh, the embedding lookup/scatter and the SGD update are O(V) or O(m) per token and are not
    counted. (PyTorch's nn.RNN also multiplies its input by W_ih, 3·2·m² more per training token: not
    counted either, the numbers are this model's FLOPs.)
    """
    out = V if C is None else C + class_size
    return {"train": 3 * 2 * m * out + 3 * 2 * m * m, "eval": 2 * m * out + 2 * m * m}


# ------------------------------------------------------------------------------------------ setup


def apply_threads(n_threads, with_torch):
    """The same thread count for Numba's parallel loops, every BLAS pool and (when loaded) PyTorch."""
    if with_torch:
        import torch

        torch.set_num_threads(n_threads)
    _env.set_threads(n_threads)


def token_probabilities(cfg):
    """The distribution the random tokens are drawn from: Zipf (p ∝ 1/rank, ids in frequency order, as
    the tokenizer numbers them) or uniform."""
    if cfg.tokens == "uniform":
        return np.full(cfg.vocab, 1.0 / cfg.vocab)
    p = 1.0 / np.arange(1, cfg.vocab + 1)
    return p / p.sum()


def class_bounds(cfg):
    """None for the full softmax; else Mikolov's √frequency binning of the token distribution (the counts
    of a notional 10⁶-token corpus) into --classes classes."""
    if cfg.softmax == "full":
        return None
    return frequency_classes(token_probabilities(cfg) * 1e6, cfg.classes)


def make_windows(cfg):
    """POOL random windows cut from B random token streams: (inputs, targets, target classes or None),
    each (POOL, T, B) int32."""
    rng = np.random.default_rng(cfg.seed)
    T, B = cfg.bptt, cfg.batch
    streams = rng.choice(cfg.vocab, size=(POOL * T + 1, B), p=token_probabilities(cfg)).astype(np.int32)
    inputs = np.stack([streams[k * T:(k + 1) * T] for k in range(POOL)])
    targets = np.stack([streams[k * T + 1:(k + 1) * T + 1] for k in range(POOL)])
    bounds = class_bounds(cfg)
    classes = None if bounds is None else word_classes(bounds)[targets]
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets), classes


def make_params(cfg):
    n_classes = None if cfg.softmax == "full" else len(class_bounds(cfg)) - 1
    return init_params(cfg.vocab, cfg.hidden, np.random.default_rng(cfg.seed + 1), np.float32, n_classes=n_classes)


class RnnlmImpl:
    """This package: rnnlm.step and rnnlm.optim's SGD over the CPU backend's kernels."""

    name = "rnnlm"

    def __init__(self, params, cfg, windows):
        self.ops = ops = get_backend("cpu")
        self.params = step.to_device(ops, params)
        self.grads = step.zero_grads(ops, params)
        self.optimizer = make_optimizer("sgd", ops, self.params, clip=CLIP)
        self.window = step.Window(ops, cfg.bptt, cfg.batch, cfg.hidden, cfg.vocab, class_bounds=class_bounds(cfg))
        inputs, targets, classes = windows
        self.data = [(ops.asarray(inputs[k]), ops.asarray(targets[k]),
                      None if classes is None else ops.asarray(classes[k])) for k in range(POOL)]

    def train(self, k):
        loss = step.forward_backward(self.ops, self.params, self.grads, self.window, *self.data[k])
        self.optimizer.update(self.params, self.grads, self.window, LR)
        self.window.carry_state()
        return loss

    def eval(self, k):
        loss = step.window_loss(self.ops, self.params, self.window, *self.data[k])
        self.window.carry_state()
        return loss

    def sync(self):
        self.ops.synchronize()


class NumpyImpl:
    """The plain-numpy reference (rnnlm.reference) with a plain numpy clipped-SGD update."""

    name = "numpy"

    def __init__(self, params, cfg, windows):
        self.params = {name: np.array(p) for name, p in params.items()}
        self.s = np.zeros((1, cfg.batch, cfg.hidden), np.float32)  # (layers, B, m) carried states
        self.bounds = class_bounds(cfg)
        self.data = list(zip(windows[0], windows[1], strict=True))

    def train(self, k):
        inputs, targets = self.data[k]
        loss, grads, self.s = reference.loss_and_grads(self.params, inputs, targets, self.s, self.bounds)
        norm = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads.values()))
        scale = CLIP / norm if 0 < CLIP < norm else 1.0
        step_size = np.float32(LR * scale)
        for name, param in self.params.items():
            param -= step_size * grads[name]
        return float(loss)

    def eval(self, k):
        inputs, targets = self.data[k]
        loss, self.s = reference.loss(self.params, inputs, targets, self.s, self.bounds)
        return float(loss)

    def sync(self):
        pass


class TorchImpl(TorchRNN):
    """The same model in PyTorch (see benchmarks/torch_rnn.py), on the CPU."""

    name = "torch"

    def __init__(self, params, cfg, windows):
        super().__init__(params, zip(windows[0], windows[1], strict=True), cfg.batch, LR, CLIP)

    def sync(self):
        pass


IMPLS = {"rnnlm": RnnlmImpl, "numpy": NumpyImpl, "torch": TorchImpl}


def run_block(impl, kind, n_windows, start):
    """Seconds for n_windows consecutive windows of one kind ('train' or 'eval'), and the last loss."""
    fn = impl.train if kind == "train" else impl.eval
    t0 = time.perf_counter()
    for i in range(n_windows):
        loss = fn((start + i) % POOL)
    impl.sync()
    return time.perf_counter() - t0, loss


# ------------------------------------------------------------------------------------------ GEMM ceiling


class Gemm:
    """The output layer's three float32 GEMMs, laid out as rnnlm.step calls them (N = T·B rows)."""

    def __init__(self, cfg):
        rng = np.random.default_rng(cfg.seed + 2)
        N, m, V = cfg.bptt * cfg.batch, cfg.hidden, cfg.vocab
        self.S = rng.standard_normal((N, m), dtype=np.float32)
        self.W_o = rng.standard_normal((V, m), dtype=np.float32)
        self.Z = rng.standard_normal((N, V), dtype=np.float32)
        self.dW_o = np.empty((V, m), np.float32)
        self.dS = np.empty((N, m), np.float32)
        self.flops = 2 * N * m * V
        # name -> (description, call)
        self.calls = {
            "logits": (f"({N}x{m})@({m}x{V})", lambda: np.matmul(self.S, self.W_o.T, out=self.Z)),
            "dW_o": (f"({V}x{N})@({N}x{m})", lambda: np.matmul(self.Z.T, self.S, out=self.dW_o)),
            "dS": (f"({N}x{V})@({V}x{m})", lambda: np.matmul(self.Z, self.W_o, out=self.dS)),
        }
        self.torch_call = None

    def add_torch(self):
        import torch

        S, W_o, Z = (torch.from_numpy(a) for a in (self.S, self.W_o, self.Z.copy()))
        self.torch_call = lambda: torch.mm(S, W_o.t(), out=Z)

    @staticmethod
    def rate(call, flops, seconds):
        """GFLOP/s of ``call`` repeated for about ``seconds``."""
        call()
        n, t0 = 0, time.perf_counter()
        while True:
            call()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return flops * n / elapsed / 1e9

    def sample(self, seconds):
        """One rate sample of each GEMM: {name: GFLOP/s}."""
        out = {name: self.rate(call, self.flops, seconds) for name, (_, call) in self.calls.items()}
        if self.torch_call is not None:
            out["torch_logits"] = self.rate(self.torch_call, self.flops, seconds)
        return out


# ------------------------------------------------------------------------------------------ breakdown


class TimedOps:
    """A stand-in for a backend module that times every kernel call rnnlm.step makes through it.

    The step code runs unchanged (so the breakdown follows whatever rnnlm.step does today); each call is
    recorded as (label, seconds, FLOPs or None). GEMMs are labelled with their output shape and their
    FLOPs come from their operands; ``kernel_flops`` gives the FLOPs of other kernels by name.
    """

    def __init__(self, ops, kernel_flops):
        self._ops = ops
        self.kernel_flops = kernel_flops
        self.records = []

    def __getattr__(self, name):
        attr = getattr(self._ops, name)
        if not callable(attr) or name in ("zeros", "asarray", "to_numpy", "copy_into", "synchronize"):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            result = attr(*args, **kwargs)
            self._ops.synchronize()
            label, flops = _label(name, args, self.kernel_flops)
            self.records.append((label, time.perf_counter() - t0, flops))
            return result

        return timed


def _label(name, args, kernel_flops):
    """(label, FLOPs or None) of a kernel call: matmul_xy(A, B, out) computes out = op(A) op(B)."""
    if name.startswith("matmul_") and len(args) == 3:
        A, _, out = args
        inner = A.shape[0] if name == "matmul_tn" else A.shape[1]
        return f"{name} -> {out.shape[0]}x{out.shape[1]}", 2 * out.shape[0] * out.shape[1] * inner
    return name, kernel_flops.get(name)


def breakdown(cfg, windows, n_windows, gemm, gemm_seconds):
    """Per-kernel times of one training step (step.forward_backward + SGD update) and of one eval step.

    The load on the machine drifts, so the ceiling here is the mean of two GEMM samples taken just before
    and just after.
    """
    before = gemm.sample(gemm_seconds)["logits"]
    impl = RnnlmImpl(make_params(cfg), cfg, windows)
    N, m = cfg.bptt * cfg.batch, cfg.hidden
    # the recurrence's m×m products: W_s s_{t-1} in forward, W_sᵀ dL/da in backward
    timed = TimedOps(impl.ops, {"forward": 2 * m * m * N, "backward": 2 * m * m * N})
    optimizer = make_optimizer("sgd", timed, impl.params, clip=CLIP)
    result, runs = {}, {}
    for kind in ("train", "eval"):
        per_window, flops = [], {}  # [{label: seconds}] with "total"; {label: FLOPs per window}
        for k in range(n_windows + 1):  # the first is a warm-up, dropped
            data = impl.data[k % POOL]
            timed.records.clear()
            t0 = time.perf_counter()
            if kind == "train":
                t_fb0 = time.perf_counter()
                step.forward_backward(timed, impl.params, impl.grads, impl.window, *data)
                t_fb = time.perf_counter() - t_fb0
                n_fb = len(timed.records)
                t_sgd0 = time.perf_counter()
                optimizer.update(impl.params, impl.grads, impl.window, LR)
                t_sgd = time.perf_counter() - t_sgd0
            else:
                t_fb0 = time.perf_counter()
                step.window_loss(timed, impl.params, impl.window, *data)
                t_fb = time.perf_counter() - t_fb0
                n_fb, t_sgd = len(timed.records), 0.0
            impl.window.carry_state()
            total = time.perf_counter() - t0
            row, counts, window_flops = {}, {}, {}
            for i, (label, seconds, f) in enumerate(timed.records):
                if i >= n_fb:
                    label = "SGD update: " + label
                row[label] = row.get(label, 0.0) + seconds
                counts[label] = counts.get(label, 0) + 1
                if f is not None:
                    window_flops[label] = window_flops.get(label, 0) + f

            def named(label, counts=counts):
                return f"{label} x{counts[label]}" if counts[label] > 1 else label

            row = {named(label): v for label, v in row.items()}
            flops = {named(label): v for label, v in window_flops.items()}
            fb_ops = sum(sec for i, (_, sec, _) in enumerate(timed.records) if i < n_fb)
            sgd_ops = sum(sec for i, (_, sec, _) in enumerate(timed.records) if i >= n_fb)
            row["(python between kernels)"] = (t_fb - fb_ops) + (t_sgd - sgd_ops)
            row["total"] = total
            if k > 0:
                per_window.append(row)
        runs[kind] = per_window, flops
    after = gemm.sample(gemm_seconds)["logits"]
    ceiling_gflops = (before + after) / 2
    gemm_ideal_s = 2 * N * cfg.hidden * cfg.vocab / (ceiling_gflops * 1e9)
    for kind, (per_window, flops) in runs.items():
        labels = list(per_window[0])
        total_med = statistics.median(r["total"] for r in per_window)
        ops = []
        medians = {label: statistics.median(r.get(label, 0.0) for r in per_window) for label in labels}
        # each median leaves out the windows in which that op was preempted, the total's does not: on a loaded
        # machine the difference is the typical time a window loses to other processes
        medians[UNATTRIBUTED] = medians["total"] - sum(
            v for label, v in medians.items() if label != "total")
        for label in [*labels[:-1], UNATTRIBUTED, "total"]:
            med = medians[label]
            entry = {"op": label, "ms": med * 1e3, "share": med / total_med, "x_gemm_at_ceiling": med / gemm_ideal_s}
            if label in flops and med > 0:
                entry["gflops"] = flops[label] / med / 1e9
                entry["fraction_of_ceiling"] = entry["gflops"] / ceiling_gflops
            ops.append(entry)
        result[kind] = {"windows": n_windows, "ops": ops, "tokens_per_s": N / total_med}
    result["gemm_at_ceiling_ms"] = gemm_ideal_s * 1e3
    result["ceiling_gflops"] = ceiling_gflops
    result["ceiling_samples_gflops"] = [before, after]
    return result


def print_breakdown(bd, out):
    print(f"\nbreakdown of rnnlm's step, one kernel at a time (median ms per window of {bd['train']['windows']}; "
          f"GEMM ceiling re-measured around it: {bd['ceiling_gflops']:.1f} GFLOP/s; 'xGEMM' = time / one "
          f"output-layer GEMM at that rate = {bd['gemm_at_ceiling_ms']:.2f} ms):", file=out)
    for kind in ("train", "eval"):
        part = bd[kind]
        print(f"  {kind} step ({part['tokens_per_s']:,.0f} tok/s with per-kernel synchronisation):", file=out)
        print(f"    {'op':36s} {'ms':>8s} {'%step':>6s} {'xGEMM':>6s} {'GFLOP/s':>8s} {'%ceil':>6s}", file=out)
        for e in part["ops"]:
            rate = f"{e['gflops']:8.1f}" if "gflops" in e else f"{'':8s}"
            frac = f"{100 * e['fraction_of_ceiling']:5.0f}%" if "fraction_of_ceiling" in e else f"{'':6s}"
            print(f"    {e['op']:36s} {e['ms']:8.2f} {100 * e['share']:5.1f}% {e['x_gemm_at_ceiling']:6.2f} "
                  f"{rate} {frac}", file=out)


# ------------------------------------------------------------------------------------------ memory


def _peak_rss_mb():
    """This process image's peak resident set size in MB.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: that survives exec, so a spawned child would report
    at least its (large) parent's size at the fork.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, else kB


def _memory_child(impl_name, cfg, n_train, n_eval, conn):
    """In a fresh (spawned) process: peak RSS after the imports, then after one train and one eval block.

    The working set is the difference: the implementation's parameters, gradients, buffers and
    temporaries, plus (for rnnlm) its compiled kernels loaded from Numba's cache.
    """
    try:
        apply_threads(cfg.threads, impl_name == "torch")
        windows = make_windows(cfg)
        imports_mb = _peak_rss_mb()
        params = make_params(cfg)
        impl = IMPLS[impl_name](params, cfg, windows)
        del params
        run_block(impl, "train", 1, 0)
        run_block(impl, "eval", 1, 1)
        run_block(impl, "train", n_train, 2)
        run_block(impl, "eval", n_eval, 2 + n_train)
        peak_mb = _peak_rss_mb()
        conn.send({"peak_mb": peak_mb, "after_imports_mb": imports_mb, "working_mb": peak_mb - imports_mb})
    except BaseException as exc:  # report, don't hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def measure_memory(impl_names, cfg, n_train, n_eval):
    """Peak RSS of each implementation, each in its own spawned process (fork hangs after OpenMP use)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = {}
    for name in impl_names:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_memory_child, args=(name, cfg, n_train, n_eval, child))
        proc.start()
        child.close()
        try:
            results[name] = parent.recv()
        except EOFError:
            results[name] = {"error": f"the child process died (exit code {proc.exitcode})"}
        proc.join()
    return results


# ------------------------------------------------------------------------------------------ main


FULL_DEFAULTS = {"hidden": 200, "vocab": 10000, "bptt": 35, "batch": 20, "repeats": 5, "windows": None}
QUICK_DEFAULTS = {"hidden": 32, "vocab": 500, "bptt": 8, "batch": 4, "repeats": 2, "windows": 3}


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Training and evaluation tokens/s of rnnlm's CPU step vs a numpy reference (and PyTorch).")
    p.add_argument("--hidden", type=int, help="state size m (default 200)")
    p.add_argument("--vocab", type=int, help="vocabulary size V (default 10000)")
    p.add_argument("--bptt", type=int, help="window length T (default 35)")
    p.add_argument("--batch", type=int, help="parallel streams B (default 20)")
    p.add_argument("--threads", type=int, default=2, help="threads for Numba, BLAS and PyTorch (default 2)")
    p.add_argument("--repeats", type=int, help="rounds of alternating timed blocks (default 5)")
    p.add_argument("--windows", type=int,
                   help="windows per timed block, train and eval alike (default: calibrated after the warm-up so "
                        f"that a block takes about {BLOCK_SECONDS:g} s, separately for train and eval)")
    p.add_argument("--vs", choices=("numpy", "torch", "both"), default="numpy",
                   help="what rnnlm is compared with: the numpy reference is always measured (it is the baseline); "
                        "'torch' and 'both' add PyTorch (default numpy)")
    p.add_argument("--memory", action="store_true",
                   help="also measure each implementation's peak RSS in a fresh spawned process (adds ~10 s each)")
    p.add_argument("--breakdown", action="store_true", help="also time each kernel of rnnlm's step")
    p.add_argument("--json", metavar="FILE", help="write every measurement to FILE")
    p.add_argument("--softmax", choices=("full", "class"), default="full",
                   help="output layer: the full softmax over V words, or Mikolov's class-based softmax (default full)")
    p.add_argument("--classes", type=int, help="classes C of --softmax class (default round(sqrt(V)))")
    p.add_argument("--tokens", choices=("zipf", "uniform"), default="zipf",
                   help="distribution of the random tokens: Zipf (p ~ 1/rank, like text) or uniform (default zipf)")
    p.add_argument("--seed", type=int, default=0, help="seed of the token windows and parameters (default 0)")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run: m=32, V=500, T=8, B=4, 2 rounds of 3-window blocks unless "
                        "given explicitly")
    args = p.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else FULL_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("hidden", "vocab", "bptt", "batch", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.windows is not None and args.windows < 1:
        p.error("--windows must be at least 1")
    if args.classes is None:
        args.classes = max(1, round(math.sqrt(args.vocab)))
    elif args.softmax != "class":
        p.error("--classes needs --softmax class")
    elif not 1 <= args.classes <= args.vocab:
        p.error("--classes must be between 1 and --vocab")
    return args


def _median_ratio(a, b):
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    out, log = sys.stdout, sys.stderr
    with_torch = cfg.vs in ("torch", "both")
    if with_torch and importlib.util.find_spec("torch") is None:
        print(f"error: --vs {cfg.vs} needs PyTorch, which is not installed (pip install torch, or "
              "pip install 'rnnlm[bench]'); use --vs numpy", file=log)
        return 2
    if with_torch and cfg.softmax == "class":
        print("error: the PyTorch baseline implements the full softmax only; use --softmax full or --vs numpy",
              file=log)
        return 2
    names = [n for n in IMPL_ORDER if n != "torch" or with_torch]
    apply_threads(cfg.threads, with_torch)
    load_start = os.getloadavg()

    T, B, m, V = cfg.bptt, cfg.batch, cfg.hidden, cfg.vocab
    N = T * B
    windows = make_windows(cfg)
    params = make_params(cfg)

    # ---- warm-up: JIT compile, then check that everyone computes the same losses from the same start
    impls, first_call_s, check = {}, {}, {}
    for name in names:
        impl = IMPLS[name](params, cfg, windows)
        t0 = time.perf_counter()
        eval_loss = impl.eval(0)
        train_loss = impl.train(1)
        first_call_s[name] = time.perf_counter() - t0
        check[name] = {"eval_loss_window0": eval_loss, "train_loss_window1": train_loss}
        impls[name] = impl
    del params
    ref = check["rnnlm"]
    bad = [f"{name} {key}: {value:.6g} vs rnnlm {ref[key]:.6g}" for name in names for key, value in check[name].items()
           if not (math.isfinite(value) and abs(value - ref[key]) <= LOSS_RTOL * abs(ref[key]))]
    if bad:
        print("error: the implementations disagree on the loss of the first windows:\n  " + "\n  ".join(bad), file=log)
        return 1
    print(f"warm-up done; first-window losses agree (rnnlm eval {ref['eval_loss_window0'] / N:.4f}/token, "
          f"train {ref['train_loss_window1'] / N:.4f}/token)", file=log)

    # ---- calibrate the block lengths on the geometric mean of the implementations' per-window times
    per_window = {"train": [], "eval": []}
    for name in names:
        for kind in ("train", "eval"):
            seconds, _ = run_block(impls[name], kind, 2, 2)
            per_window[kind].append(seconds / 2)
    block_target = 0.15 if cfg.quick else BLOCK_SECONDS
    n_windows = {}
    for kind in ("train", "eval"):
        if cfg.windows is not None:
            n_windows[kind] = cfg.windows
        else:
            geo = math.exp(statistics.fmean(math.log(s) for s in per_window[kind]))
            n_windows[kind] = max(1, round(block_target / geo))

    gemm = Gemm(cfg)
    if with_torch:
        gemm.add_torch()
    gemm_seconds = 0.05 if cfg.quick else 0.25
    gemm_samples = [gemm.sample(gemm_seconds) for _ in range(1 if cfg.quick else 2)]

    # ---- timed rounds: train blocks then eval blocks, implementations alternating (order reversed every
    # other round so that none always follows the same neighbour), one GEMM sample per round
    rates = {name: {"train": [], "eval": []} for name in names}
    start = 4
    for r in range(cfg.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for kind in ("train", "eval"):
            for name in order:
                seconds, loss = run_block(impls[name], kind, n_windows[kind], start)
                if not math.isfinite(loss):
                    print(f"error: {name} {kind} loss became {loss}", file=log)
                    return 1
                rates[name][kind].append(n_windows[kind] * N / seconds)
            start += n_windows[kind]
        gemm_samples.append(gemm.sample(gemm_seconds))
        print(f"round {r + 1}/{cfg.repeats}: " + "; ".join(
            f"{name} train {rates[name]['train'][-1]:,.0f} eval {rates[name]['eval'][-1]:,.0f}" for name in names)
            + f" tok/s; GEMM {gemm_samples[-1]['logits']:.0f} GFLOP/s", file=log)
    load_end = os.getloadavg()

    # ---- summarise
    gemm_med = {key: statistics.median(s[key] for s in gemm_samples) for key in gemm_samples[0]}
    ceiling = gemm_med["logits"]
    bounds = class_bounds(cfg)
    if bounds is None:
        fpt = flops_per_token(m, V)
        formula = {"train": "6*m*(V+m)", "eval": "2*m*(V+m)"}
        mean_class = None
    else:
        mean_class = float(np.diff(bounds)[windows[2]].mean())  # words in the target's class, mean over targets
        fpt = flops_per_token(m, V, len(bounds) - 1, mean_class)
        formula = {"train": "6*m*(C+|c|+m)", "eval": "2*m*(C+|c|+m)"}
    ceiling_tps = {kind: ceiling * 1e9 / fpt[kind] for kind in fpt}
    round_gemm = gemm_samples[-cfg.repeats:]
    results = {}
    for name in names:
        results[name] = {"first_call_s": first_call_s[name], "check": check[name]}
        for kind in ("train", "eval"):
            xs = rates[name][kind]
            med = statistics.median(xs)
            base = rates["numpy"][kind]
            entry = {
                "tokens_per_s": xs, "median": med, "min": min(xs), "max": max(xs),
                "ratio_vs_numpy": med / statistics.median(base),
                "ratio_vs_numpy_per_round_median": _median_ratio(xs, base),
                "fraction_of_ceiling": fpt[kind] * med / (ceiling * 1e9),
                # against the GEMM sample of the same round, which saw the same load
                "fraction_of_ceiling_per_round_median": statistics.median(
                    fpt[kind] * x / (g["logits"] * 1e9) for x, g in zip(xs, round_gemm, strict=True)),
                "gflops": fpt[kind] * med / 1e9,
            }
            results[name][kind] = entry
    vs_torch = None
    if with_torch:
        vs_torch = {kind: {"ratio": results["rnnlm"][kind]["median"] / results["torch"][kind]["median"],
                           "per_round_median": _median_ratio(rates["rnnlm"][kind], rates["torch"][kind])}
                    for kind in ("train", "eval")}

    memory = None
    if cfg.memory:
        print("measuring peak memory, one spawned process per implementation ...", file=log)
        memory = measure_memory(names, cfg, n_windows["train"], n_windows["eval"])
    bd = None
    if cfg.breakdown:
        bd = breakdown(cfg, windows, 3 if cfg.quick else min(max(n_windows["train"], 5), 20), gemm, gemm_seconds)

    import numba
    import threadpoolctl

    env = {
        "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
        "rnnlm": rnnlm.__version__, "torch": impls["torch"].torch.__version__ if with_torch else None,
        "numba_threading_layer": numba.threading_layer(), "numba_threads": numba.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": _cpu_model(),
        "blas": [{k: info.get(k) for k in ("internal_api", "num_threads", "filepath")}
                 for info in threadpoolctl.threadpool_info()],
        "thread_env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "KMP_BLOCKTIME")},
        "loadavg_start": load_start, "loadavg_end": load_end,
    }
    report = {
        "config": {"hidden": m, "vocab": V, "bptt": T, "batch": B, "tokens_per_window": N, "threads": cfg.threads,
                   "repeats": cfg.repeats, "windows_per_block": n_windows, "windows_given": cfg.windows,
                   "softmax": cfg.softmax, "classes": None if bounds is None else len(bounds) - 1,
                   "tokens": cfg.tokens,
                   "vs": cfg.vs, "seed": cfg.seed, "lr": LR, "clip": CLIP, "dtype": "float32", "quick": cfg.quick},
        "environment": env,
        "gemm": {"shapes": {k: d for k, (d, _) in gemm.calls.items()}, "flops_per_call": gemm.flops,
                 "samples_gflops": gemm_samples, "median_gflops": gemm_med, "ceiling_gflops": ceiling},
        "flops_per_token": {**fpt, "formula": formula, "mean_target_class_size": mean_class},
        "ceiling_tokens_per_s": ceiling_tps,
        "results": results,
        "rnnlm_vs_torch": vs_torch,
        "memory": memory,
        "breakdown": bd,
    }
    print_report(report, out)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {cfg.json}", file=out)
    return 0


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def print_report(rep, out):
    c, env, g = rep["config"], rep["environment"], rep["gemm"]
    wpb = c["windows_per_block"]
    print(f"config: m={c['hidden']} V={c['vocab']} T={c['bptt']} B={c['batch']} ({c['tokens_per_window']} "
          f"tokens/window), float32, threads={c['threads']}, repeats={c['repeats']}, windows/block "
          f"train={wpb['train']} eval={wpb['eval']}, lr={c['lr']} clip={c['clip']} seed={c['seed']}", file=out)
    softmax = "full softmax" if c["softmax"] == "full" else f"class softmax, C={c['classes']}"
    print(f"        {softmax}, {c['tokens']} random tokens", file=out)
    print(f"machine: {env['processor']}, {env['cpu_count']} CPUs; numpy {env['numpy']}, numba {env['numba']} "
          f"({env['numba_threading_layer']} layer, {env['numba_threads']} threads)"
          + (f", torch {env['torch']}" if env["torch"] else "")
          + f"; load average {env['loadavg_start'][0]:.2f} at start, {env['loadavg_end'][0]:.2f} at end", file=out)
    med = g["median_gflops"]
    n = len(g["samples_gflops"])
    logits = [s["logits"] for s in g["samples_gflops"]]
    print(f"GEMM ceiling: np.matmul float32 {g['shapes']['logits']}, {c['threads']} threads: {g['ceiling_gflops']:.1f} "
          f"GFLOP/s (median of {n}, range {min(logits):.1f}-{max(logits):.1f}); the backward GEMMs "
          f"{g['shapes']['dW_o']} {med['dW_o']:.1f}, {g['shapes']['dS']} {med['dS']:.1f}"
          + (f"; torch.mm {med['torch_logits']:.1f}" if "torch_logits" in med else ""), file=out)
    fpt, ctp = rep["flops_per_token"], rep["ceiling_tokens_per_s"]
    cls = f" (|c| = {fpt['mean_target_class_size']:.1f})" if fpt["mean_target_class_size"] is not None else ""
    print(f"FLOPs/token{cls}: train {fpt['formula']['train']} = {fpt['train'] / 1e6:.3f} M, "
          f"eval {fpt['formula']['eval']} = {fpt['eval'] / 1e6:.3f} M; "
          f"ceiling: train {ctp['train']:,.0f} tok/s, eval {ctp['eval']:,.0f} tok/s", file=out)
    print(file=out)
    head = f"{'tok/s':>9s} {'min-max':>15s} {'xnumpy':>6s} {'/round':>6s} {'%ceil':>6s}"
    print(f"{'':8s} | {'train':^46s} | {'eval':^46s}", file=out)
    print(f"{'impl':8s} | {head} | {head}", file=out)
    for name, res in rep["results"].items():
        cells = []
        for kind in ("train", "eval"):
            e = res[kind]
            cells.append(f"{e['median']:9,.0f} {e['min']:7,.0f}-{e['max']:<7,.0f} {e['ratio_vs_numpy']:6.2f} "
                         f"{e['ratio_vs_numpy_per_round_median']:6.2f} {100 * e['fraction_of_ceiling']:5.1f}%")
        print(f"{name:8s} | {cells[0]} | {cells[1]}", file=out)
    print("(tok/s: median over rounds; xnumpy: ratio of medians; /round: median of the per-round ratios; "
          "%ceil: FLOPs/token x tok/s / GEMM rate)", file=out)
    vt = rep["rnnlm_vs_torch"]
    if vt:
        tr, ev = vt["train"], vt["eval"]
        print(f"rnnlm / torch: train {tr['ratio']:.2f} (per-round median {tr['per_round_median']:.2f}), "
              f"eval {ev['ratio']:.2f} (per-round median {ev['per_round_median']:.2f})", file=out)
    if rep["memory"]:
        print("\npeak memory (each implementation alone in a fresh spawned process; VmHWM):", file=out)
        for name, mem in rep["memory"].items():
            if "error" in mem:
                print(f"  {name:8s} failed: {mem['error']}", file=out)
            else:
                print(f"  {name:8s} peak {mem['peak_mb']:7.0f} MB = {mem['after_imports_mb']:.0f} MB after imports "
                      f"+ {mem['working_mb']:.0f} MB working set", file=out)
    if rep["breakdown"]:
        print_breakdown(rep["breakdown"], out)


if __name__ == "__main__":
    sys.exit(main())
