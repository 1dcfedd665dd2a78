"""What the benchmarks share: the FLOP model, the random Zipf windows, rnnlm's clipped-SGD step, a timing
stand-in for a backend, the corpora's folders, and the worker processes that run each implementation.

Every implementation (rnnlm, and the numpy and PyTorch baselines) runs in a worker process of its own
(benchmarks/worker.py), started by ``Worker``: ``import rnnlm`` sets process-wide thread variables
(rnnlm/_env.py: OMP_WAIT_POLICY=passive, KMP_BLOCKTIME=0, ...) that slow other libraries' OpenMP pools, so a
baseline gets the environment this process was started with, without them. Import this module before
rnnlm (it records that environment at import).
"""

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if "rnnlm" in sys.modules:
    raise RuntimeError("import benchmarks/common.py before rnnlm: it records the environment rnnlm changes")

BASELINE_ENV = dict(os.environ)  # before rnnlm's thread settings
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
POOL = 64  # distinct random windows an implementation cycles through
LR = 0.01  # small: the parameters barely move, so every timed block does the same work
CLIP = 1.0


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
    the target's class, |c| on average over the targets (``class_size``), so V becomes C + |c|.
    Softmax, tanh, the embedding lookup and scatter and the update are O(V) or O(m) per token and are not
    counted, nor is PyTorch's extra input product W_ih (these are this model's FLOPs).
    """
    out = V if C is None else C + class_size
    return {"train": 3 * 2 * m * out + 3 * 2 * m * m, "eval": 2 * m * out + 2 * m * m}


# ------------------------------------------------------------------------------------------ data


def zipf(V):
    """p(id) ∝ 1/(id + 1): ids in frequency order, as the tokenizer numbers them."""
    import numpy as np

    p = 1.0 / np.arange(1, V + 1)
    return p / p.sum()


def class_bounds(V, classes):
    """Mikolov's √frequency binning of the Zipf distribution (the counts of a notional 10⁶-token corpus)."""
    from rnnlm.model import frequency_classes

    return frequency_classes(zipf(V) * 1e6, classes)


def windows(seed, V, T, B, pool=POOL):
    """``pool`` windows (inputs, targets), each (pool, T, B) int32, cut from B random Zipf streams."""
    import numpy as np

    streams = np.random.default_rng(seed).choice(V, size=(pool * T + 1, B), p=zipf(V)).astype(np.int32)
    inputs = np.stack([streams[k * T : (k + 1) * T] for k in range(pool)])
    targets = np.stack([streams[k * T + 1 : (k + 1) * T + 1] for k in range(pool)])
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


def params(seed, V, m, n_classes=None):
    """rnnlm's float32 initial parameters (fan-in init) from ``seed``."""
    import numpy as np

    from rnnlm.model import init_params

    return init_params(V, m, np.random.default_rng(seed), np.float32, n_classes=n_classes)


def corpus_files(corpus, workdir):
    """(train, valid, test or None) of a corpus: data/<corpus>/, filled by data/<corpus>/prepare.sh; else this
    project's ../shared/data copy (tiny-shakespeare split into ``workdir`` as prepare.sh splits it)."""
    folder = REPO / "data" / corpus
    if (folder / "train.txt").is_file():
        test = folder / "test.txt"
        return folder / "train.txt", folder / "valid.txt", test if test.is_file() else None
    shared = REPO.parent / "shared" / "data"
    if corpus == "ptb" and (shared / "ptb" / "train.txt").is_file():
        return shared / "ptb" / "train.txt", shared / "ptb" / "valid.txt", shared / "ptb" / "test.txt"
    if corpus == "shakespeare" and (shared / "tinyshakespeare" / "input.txt").is_file():
        text = (shared / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
        cut = int(len(text) * 0.9)
        train, valid = Path(workdir) / "train.txt", Path(workdir) / "valid.txt"
        train.write_text(text[:cut], encoding="utf-8")
        valid.write_text(text[cut:], encoding="utf-8")
        return train, valid, None
    sys.exit(f"no {corpus} data: run data/{corpus}/prepare.sh")


# ------------------------------------------------------------------------------------------ rnnlm's step


class RnnlmSgd:
    """rnnlm.step and rnnlm.optim's clipped SGD over a backend (or a ``TimedOps`` around one), state carried
    between windows: what ``rnnlm train`` runs per window, on the windows of ``windows()``."""

    name = "rnnlm"

    def __init__(self, ops, params, data, bounds=None):
        from rnnlm import step
        from rnnlm.model import word_classes
        from rnnlm.optim import make_optimizer

        self.ops, self.step = ops, step
        (inputs, targets), T, B = data, data[0].shape[1], data[0].shape[2]
        m, V = params["W_s"].shape[0], params["W_o"].shape[0]
        self.params, self.grads = step.to_device(ops, params), step.zero_grads(ops, params)
        self.optimizer = make_optimizer("sgd", ops, self.params, clip=CLIP)
        self.window = step.Window(ops, T, B, m, V, class_bounds=bounds)
        classes = [None] * len(inputs) if bounds is None else word_classes(bounds)[targets]
        self.data = [(ops.asarray(x), ops.asarray(y), None if c is None else ops.asarray(c))
                     for x, y, c in zip(inputs, targets, classes, strict=True)]

    def queue(self, k):
        """Queue training window k on the device; returns its loss unread."""
        loss = self.step.forward_backward(self.ops, self.params, self.grads, self.window, *self.data[k])
        self.optimizer.update(self.params, self.grads, self.window, LR)
        self.window.carry_state()
        return loss

    def train(self, k):
        return float(self.queue(k))  # read once the step is queued, as rnnlm.train does

    def eval(self, k):
        loss = self.step.window_loss(self.ops, self.params, self.window, *self.data[k])
        self.window.carry_state()
        return loss

    def sync(self):
        self.ops.synchronize()


class TimedOps:
    """A stand-in for a backend module that times every kernel call made through it, synchronizing before
    and after each: ``records`` {op: [seconds, calls, FLOPs]}, GEMMs counting 2·n·p·k FLOPs and the others
    what ``kernel_flops`` gives by name."""

    UNTIMED = ("asarray", "to_numpy", "zeros", "copy_into", "synchronize")

    def __init__(self, ops, kernel_flops=None):
        self._ops, self.kernel_flops, self.records = ops, kernel_flops or {}, {}

    def __getattr__(self, name):
        attr = getattr(self._ops, name)
        if name in self.UNTIMED or not callable(attr):
            return attr

        def timed(*args):
            self._ops.synchronize()
            t0 = time.perf_counter()
            result = attr(*args)
            self._ops.synchronize()
            record = self.records.setdefault(name, [0.0, 0, 0])
            record[0] += time.perf_counter() - t0
            record[1] += 1
            if name.startswith("matmul"):
                A, out = args[0], args[2]
                record[2] += 2 * out.shape[0] * out.shape[1] * A.shape[0 if name == "matmul_tn" else 1]
            else:
                record[2] += self.kernel_flops.get(name, 0)
            return result

        return timed

    def summary(self, n_windows):
        """{op: {"ms": per window, "share": of the timed total, "gflops": where FLOPs are counted}}, slowest
        first."""
        total = sum(seconds for seconds, _, _ in self.records.values())
        out = {}
        for name, (seconds, calls, flops) in sorted(self.records.items(), key=lambda item: -item[1][0]):
            out[name] = {"ms": 1e3 * seconds / n_windows, "calls": calls // n_windows, "share": seconds / total}
            if flops:
                out[name]["gflops"] = flops / seconds / 1e9
        return out


# ------------------------------------------------------------------------------------------ workers


class Worker:
    """One implementation in a process of its own (benchmarks/worker.py), driven by JSON lines.

    rnnlm's worker inherits this process's environment; a baseline's gets ``BASELINE_ENV``. ``call(command,
    **fields)`` sends one request and returns the worker's answer (a dict); an error in the worker raises
    here with its message.
    """

    def __init__(self, impl, config):
        env = dict(os.environ) if impl.startswith("rnnlm") else dict(BASELINE_ENV)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.impl = impl
        self.process = subprocess.Popen([sys.executable, str(HERE / "worker.py"), impl], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.setup = self.call("setup", config=config)

    def call(self, command, **fields):
        self.process.stdin.write(json.dumps({"command": command, **fields}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.impl} worker died (exit code {self.process.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.impl} worker: {answer['error']}")
        return answer

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows, else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def median_ratio(a, b):
    """The median of the ratios a[i] / b[i]."""
    import statistics

    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def geometric_mean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))
