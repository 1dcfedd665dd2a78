"""One implementation of the benchmarked model in a process of its own, driven by JSON lines on stdin.

    python benchmarks/worker.py rnnlm|numpy|torch      (started by common.Worker; not meant to be run by hand)

Requests {"command": ..., fields} and one answer line each: setup (config: seed, vocab, hidden, bptt, batch,
threads, softmax, classes, device; "model": false for a worker that only samples its library's GEMM), block
(kind, n, start: seconds for n windows), gemm (seconds: GFLOP/s of the output layer's forward GEMM in this
process's library), breakdown (n: rnnlm's training step kernel by kernel), memory (peak RSS). A baseline
loads numpy (and PyTorch) before anything of rnnlm, and rnnlm's thread variables are taken out of its
environment again, so that its libraries start with their own defaults.
"""

import json
import os
import sys
import time

import common  # beside this file; it imports nothing heavy at the top

IMPL = sys.argv[1] if __name__ == "__main__" else None
START_ENV = dict(os.environ)
THREAD_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")

if IMPL == "rnnlm":
    import rnnlm  # noqa: F401  (rnnlm's worker: its thread settings before numpy loads)
import numpy as np  # noqa: E402

if IMPL == "torch":
    import torch
import rnnlm  # noqa: E402, F401  (in a baseline, after its libraries loaded with their defaults)

for _name in THREAD_VARS:  # rnnlm's settings out of a baseline's environment again
    if IMPL != "rnnlm" and _name not in START_ENV:
        os.environ.pop(_name, None)


def peak_rss_mb():
    """This process's peak resident set size in MB (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Numpy:
    """rnnlm.reference (plain numpy, float32) with a plain numpy clipped-SGD update."""

    def __init__(self, params, data, bounds):
        self.params, self.bounds = params, bounds
        self.s = np.zeros((1, data[0].shape[2], params["W_s"].shape[0]), np.float32)
        self.data = list(zip(*data, strict=True))

    def train(self, k):
        from rnnlm import reference

        loss, grads, self.s = reference.loss_and_grads(self.params, *self.data[k], self.s, self.bounds)
        norm = np.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads.values()))
        step = np.float32(common.LR * (common.CLIP / norm if 0 < common.CLIP < norm else 1.0))
        for name, param in self.params.items():
            param -= step * grads[name]
        return float(loss)

    def eval(self, k):
        from rnnlm import reference

        loss, self.s = reference.loss(self.params, *self.data[k], self.s, self.bounds)
        return float(loss)

    def sync(self):
        pass


def make_impl(config, params, data, bounds):
    if IMPL == "rnnlm":
        from rnnlm.backends import get_backend

        return common.RnnlmSgd(get_backend(config["device"]), params, data, bounds)
    if IMPL == "numpy":
        return Numpy(params, data, bounds)
    from torch_rnn import TorchRNN

    if config["softmax"] != "full":
        raise ValueError("the PyTorch baseline implements the full softmax only")
    return TorchRNN(params, zip(*data, strict=True), config["batch"], common.LR, common.CLIP, config["device"])


class Session:
    """The state of this worker: the implementation, its windows, the GEMM operands."""

    def setup(self, config):
        self.config, threads = config, config["threads"]
        if IMPL == "rnnlm":
            from rnnlm._env import set_threads

            set_threads(threads)
        else:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=threads, user_api="blas")
            if IMPL == "torch":
                torch.set_num_threads(threads)
        imports_mb = peak_rss_mb()
        versions = {"numpy": np.__version__, "torch": torch.__version__ if IMPL == "torch" else None}
        if not config.get("model", True):  # a GEMM sampler only
            return {"versions": versions, "thread_env": {k: os.environ.get(k) for k in THREAD_VARS}}
        V = config["vocab"]
        self.bounds = None if config["softmax"] == "full" else common.class_bounds(V, config["classes"])
        self.data = common.windows(config["seed"], V, config["bptt"], config["batch"])
        self.impl = make_impl(config, self.fresh_params(), self.data, self.bounds)
        t0 = time.perf_counter()
        first = {"eval_loss_window0": float(self.impl.eval(0)), "train_loss_window1": float(self.impl.train(1))}
        return {"first": first, "first_call_s": time.perf_counter() - t0, "after_imports_mb": imports_mb,
                "thread_env": {k: os.environ.get(k) for k in THREAD_VARS}, "versions": versions,
                "mean_class_size": self.mean_class_size()}

    def fresh_params(self):
        n_classes = None if self.bounds is None else len(self.bounds) - 1
        return common.params(self.config["seed"] + 1, self.config["vocab"], self.config["hidden"], n_classes)

    def mean_class_size(self):
        """Words in the target's class, the mean over the windows' targets (None for the full softmax)."""
        if self.bounds is None:
            return None
        from rnnlm.model import word_classes

        return float(np.diff(self.bounds)[word_classes(self.bounds)[self.data[1]]].mean())

    def block(self, kind, n, start):
        fn = self.impl.train if kind == "train" else self.impl.eval
        self.impl.sync()
        t0 = time.perf_counter()
        for i in range(n):
            loss = fn((start + i) % common.POOL)
        self.impl.sync()
        return {"seconds": time.perf_counter() - t0, "loss": float(loss)}

    def gemm(self, seconds):
        """GFLOP/s of the logits GEMM (N x m)·(m x V) in float32, repeated for about ``seconds``."""
        rng = np.random.default_rng(0)
        N, m, V = self.config["bptt"] * self.config["batch"], self.config["hidden"], self.config["vocab"]
        S, W_o = rng.standard_normal((N, m), np.float32), rng.standard_normal((V, m), np.float32)
        Z = np.empty((N, V), np.float32)
        if IMPL == "torch":
            S, W_o, Z = (torch.from_numpy(a) for a in (S, W_o, Z))
            call = lambda: torch.mm(S, W_o.t(), out=Z)  # noqa: E731
        else:
            call = lambda: np.matmul(S, W_o.T, out=Z)  # noqa: E731
        call()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            call()
            n += 1
        return {"gflops": 2 * N * m * V * n / (time.perf_counter() - t0) / 1e9,
                "library": "torch.mm" if IMPL == "torch" else "np.matmul"}

    def breakdown(self, n):
        """rnnlm's training step kernel by kernel (synchronized after each), per window."""
        N, m = self.config["bptt"] * self.config["batch"], self.config["hidden"]
        timed = common.TimedOps(self.impl.ops, {"forward": 2 * m * m * N, "backward": 2 * m * m * N})
        impl = common.RnnlmSgd(timed, self.fresh_params(), self.data, self.bounds)
        impl.train(0)
        timed.records.clear()
        for k in range(n):
            impl.train(k + 1)
        return {"ops": timed.summary(n)}

    def memory(self):
        return {"peak_mb": peak_rss_mb()}


def main():
    session = Session()
    for line in sys.stdin:
        request = json.loads(line)
        command = request.pop("command")
        try:
            answer = getattr(session, command)(**request)
        except Exception as error:  # noqa: BLE001 - reported to the driving process, which stops
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
