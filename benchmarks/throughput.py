"""CPU speed of rnnlm's training and evaluation step against numpy and PyTorch, each in a process of its own.

    python benchmarks/throughput.py --quick          # seconds, tiny sizes: a smoke test (CI runs it)
    python benchmarks/throughput.py                  # m=200, V=10000, T=35, B=20, full softmax, 2 threads
    python benchmarks/throughput.py --hidden 650 --softmax class --breakdown
    python benchmarks/throughput.py --suite          # m=200 and m=650, full and class softmax: results/cpu-*.json

Every implementation trains (forward, backward, clipped SGD, state carried between windows) and evaluates
the same tanh RNN on the same random Zipf token windows, from the same parameters, in a worker process of
its own (benchmarks/worker.py): rnnlm with its thread settings, numpy (rnnlm.reference) and PyTorch
(benchmarks/torch_rnn.py, full softmax only, when installed) with their libraries' defaults, all with
--threads threads. After a warm-up (compiling, and a check that all compute the same first losses), timed
blocks of windows alternate between the workers for --repeats rounds; medians are reported, and the median
of the per-round ratios. The ceiling is the fastest float32 GEMM of the output layer's shape on the machine:
np.matmul and torch.mm, each in its own worker, sampled every round. benchmarks/README.md explains every
number.

Exit status: 0 on success, 1 when the implementations disagree on the loss or training diverges, 2 for a
usage error.
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys

import common  # beside this file; before anything that imports rnnlm
import tables

BLOCK_SECONDS = 2.5  # target length of one timed block when --windows is not given
LOSS_RTOL = 1e-3  # agreement required between implementations on the first windows (float32 sums)
FULL = {"hidden": 200, "vocab": 10000, "bptt": 35, "batch": 20, "repeats": 5, "windows": None}
QUICK = {"hidden": 32, "vocab": 500, "bptt": 8, "batch": 4, "repeats": 2, "windows": 3}
SUITE = [(200, "full"), (200, "class"), (650, "full"), (650, "class")]


def start_workers(cfg, log):
    """(the timed workers, rnnlm's first; the workers whose GEMM library gives the ceiling). PyTorch is timed
    when installed and the softmax is full; with the class softmax, which its model lacks, its worker only
    samples torch.mm."""
    config = {k: getattr(cfg, k) for k in ("seed", "vocab", "hidden", "bptt", "batch", "threads", "softmax",
                                            "classes")} | {"device": "cpu"}
    timed = {name: common.Worker(name, config) for name in ("rnnlm", "numpy")}
    gemm = {"numpy": timed["numpy"]}
    if cfg.torch and cfg.softmax == "full":
        timed["torch"] = gemm["torch"] = common.Worker("torch", config)
    elif cfg.torch:
        print("the PyTorch baseline implements the full softmax only: torch.mm is sampled for the ceiling alone",
              file=log)
        gemm["torch"] = common.Worker("torch", config | {"model": False})
    return timed, gemm


def disagreements(workers):
    """Lines naming every first-window loss that differs from rnnlm's by more than LOSS_RTOL."""
    ref = workers["rnnlm"].setup["first"]
    return [f"{name} {key}: {value:.6g} vs rnnlm {ref[key]:.6g}" for name, w in workers.items()
            for key, value in w.setup["first"].items()
            if not (math.isfinite(value) and abs(value - ref[key]) <= LOSS_RTOL * abs(ref[key]))]


def calibrate(workers, cfg):
    """Windows per timed block, train and eval: --windows, or about BLOCK_SECONDS at the geometric mean of
    the implementations' times per window."""
    if cfg.windows is not None:
        return {"train": cfg.windows, "eval": cfg.windows}
    target = 0.15 if cfg.quick else BLOCK_SECONDS
    n = {}
    for kind in ("train", "eval"):
        per_window = [w.call("block", kind=kind, n=2, start=2)["seconds"] / 2 for w in workers.values()]
        n[kind] = max(1, round(target / common.geometric_mean(per_window)))
    return n


def gemm_sample(gemm_workers, seconds):
    """{library: GFLOP/s}, one sample from each GEMM library's worker."""
    samples = [worker.call("gemm", seconds=seconds) for worker in gemm_workers.values()]
    return {sample["library"]: sample["gflops"] for sample in samples}


def timed_rounds(workers, gemm_workers, cfg, n_windows, log):
    """(tokens/s per implementation and kind, one GEMM sample per round); None when a loss went non-finite."""
    names, N = list(workers), cfg.bptt * cfg.batch
    rates = {name: {"train": [], "eval": []} for name in names}
    gemm, start = [], 4
    for r in range(cfg.repeats):
        order = names if r % 2 == 0 else names[::-1]  # none always follows the same neighbour
        for kind in ("train", "eval"):
            for name in order:
                block = workers[name].call("block", kind=kind, n=n_windows[kind], start=start)
                if not math.isfinite(block["loss"]):
                    print(f"error: {name} {kind} loss became {block['loss']}", file=log)
                    return None
                rates[name][kind].append(n_windows[kind] * N / block["seconds"])
            start += n_windows[kind]
        gemm.append(gemm_sample(gemm_workers, 0.05 if cfg.quick else 0.25))
        print(f"round {r + 1}/{cfg.repeats}: " + "; ".join(
            f"{name} train {rates[name]['train'][-1]:,.0f} eval {rates[name]['eval'][-1]:,.0f}" for name in names)
            + " tok/s; GEMM " + ", ".join(f"{lib} {g:.0f}" for lib, g in gemm[-1].items()) + " GFLOP/s", file=log)
    return rates, gemm


def results(rates, gemm, fpt):
    """Per implementation and kind: medians, ratios to numpy, and fractions of the per-round ceiling."""
    ceilings = [max(sample.values()) for sample in gemm]
    ceiling = statistics.median(ceilings)
    out = {}
    for name, kinds in rates.items():
        out[name] = {}
        for kind, xs in kinds.items():
            med, base = statistics.median(xs), rates["numpy"][kind]
            out[name][kind] = {
                "tokens_per_s": xs, "median": med, "min": min(xs), "max": max(xs),
                "ratio_vs_numpy": med / statistics.median(base),
                "ratio_vs_numpy_per_round_median": common.median_ratio(xs, base),
                "fraction_of_ceiling": fpt[kind] * med / (ceiling * 1e9),
                "fraction_of_ceiling_per_round_median": statistics.median(
                    fpt[kind] * x / (c * 1e9) for x, c in zip(xs, ceilings, strict=True)),
                "gflops": fpt[kind] * med / 1e9,
            }
    return out, ceiling


def environment(workers, gemm_workers, cfg, load):
    import numba
    import threadpoolctl

    import rnnlm

    return {
        "python": platform.python_version(), "numba": numba.__version__, "rnnlm": rnnlm.__version__,
        "numpy": workers["numpy"].setup["versions"]["numpy"],
        "torch": gemm_workers["torch"].setup["versions"]["torch"] if "torch" in gemm_workers else None,
        "cpu_count": os.cpu_count(), "processor": common.cpu_model(), "threads": cfg.threads,
        "blas": [{k: info.get(k) for k in ("internal_api", "filepath")} for info in threadpoolctl.threadpool_info()],
        "thread_env": {name: w.setup["thread_env"] for name, w in workers.items()},
        "loadavg_start": load[0], "loadavg_end": load[1],
    }


def run(cfg, log):
    """One configuration: the report (a dict), or None when the implementations disagree or diverge."""
    load_start = os.getloadavg()
    workers, gemm_workers = start_workers(cfg, log)
    try:
        bad = disagreements(workers)
        if bad:
            print("error: the implementations disagree on the loss of the first windows:\n  " + "\n  ".join(bad),
                  file=log)
            return None
        n_windows = calibrate(workers, cfg)
        measured = timed_rounds(workers, gemm_workers, cfg, n_windows, log)
        if measured is None:
            return None
        rates, gemm = measured
        class_size = workers["rnnlm"].setup["mean_class_size"]
        fpt = common.flops_per_token(cfg.hidden, cfg.vocab, None if class_size is None else cfg.classes, class_size)
        res, ceiling = results(rates, gemm, fpt)
        for name, worker in workers.items():
            res[name]["first_call_s"] = worker.setup["first_call_s"]
            if cfg.memory:
                peak = worker.call("memory")["peak_mb"]
                res[name]["memory_mb"] = {"peak": peak, "working": peak - worker.setup["after_imports_mb"]}
        breakdown = workers["rnnlm"].call("breakdown", n=3 if cfg.quick else 10) if cfg.breakdown else None
        env = environment(workers, gemm_workers, cfg, (load_start, os.getloadavg()))
    finally:
        for worker in {**workers, **gemm_workers}.values():
            worker.close()
    N = cfg.bptt * cfg.batch
    return {
        "config": {"hidden": cfg.hidden, "vocab": cfg.vocab, "bptt": cfg.bptt, "batch": cfg.batch,
                   "tokens_per_window": N, "threads": cfg.threads, "repeats": cfg.repeats,
                   "windows_per_block": n_windows, "softmax": cfg.softmax,
                   "classes": cfg.classes if cfg.softmax == "class" else None, "seed": cfg.seed, "lr": common.LR,
                   "clip": common.CLIP, "dtype": "float32", "quick": cfg.quick},
        "environment": env,
        "gemm": {"samples_gflops": gemm, "ceiling_gflops": ceiling,
                 "shape": f"({N}x{cfg.hidden})@({cfg.hidden}x{cfg.vocab})"},
        "flops_per_token": {**fpt, "mean_target_class_size": class_size},
        "ceiling_tokens_per_s": {kind: ceiling * 1e9 / fpt[kind] for kind in fpt},
        "results": res,
        "breakdown": breakdown,
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, help="state size m (default 200)")
    p.add_argument("--vocab", type=int, help="vocabulary size V (default 10000)")
    p.add_argument("--bptt", type=int, help="window length T (default 35)")
    p.add_argument("--batch", type=int, help="parallel streams B (default 20)")
    p.add_argument("--threads", type=int, default=2, help="threads of every implementation (default 2)")
    p.add_argument("--repeats", type=int, help="rounds of alternating timed blocks (default 5)")
    p.add_argument("--windows", type=int, help=f"windows per timed block (default: about {BLOCK_SECONDS:g} s)")
    p.add_argument("--softmax", choices=("full", "class"), default="full", help="output layer (default full)")
    p.add_argument("--classes", type=int, help="classes C of --softmax class (default round(sqrt(V)))")
    p.add_argument("--no-torch", dest="torch", action="store_false", help="leave the PyTorch baseline out")
    p.add_argument("--memory", action="store_true", help="also report each worker's peak memory")
    p.add_argument("--breakdown", action="store_true", help="also time each kernel of rnnlm's training step")
    p.add_argument("--json", metavar="FILE", help="write every measurement to FILE")
    p.add_argument("--seed", type=int, default=0, help="seed of the token windows and parameters (default 0)")
    p.add_argument("--quick", action="store_true", help="m=32, V=500, T=8, B=4, 2 rounds of 3-window blocks")
    p.add_argument("--suite", action="store_true",
                   help="m=200 and m=650, full and class softmax, with --memory and --breakdown; each report in "
                        "benchmarks/results/cpu-m<m>-<softmax>.json")
    cfg = p.parse_args(argv)
    for name, value in (QUICK if cfg.quick else FULL).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    for name in ("hidden", "vocab", "bptt", "batch", "threads", "repeats"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name} must be at least 1")
    if cfg.windows is not None and cfg.windows < 1:
        p.error("--windows must be at least 1")
    if cfg.classes is not None and not 1 <= cfg.classes <= cfg.vocab:
        p.error("--classes must be between 1 and --vocab")
    cfg.torch = cfg.torch and importlib.util.find_spec("torch") is not None
    return cfg


def configurations(cfg):
    """(config, result file or None) for each run: the suite's four, or the one on the command line."""
    if not cfg.suite:
        return [(cfg, cfg.json)]
    runs = []
    for m, softmax in SUITE:
        one = argparse.Namespace(**{**vars(cfg), "hidden": m, "softmax": softmax, "memory": True, "breakdown": True})
        runs.append((one, common.HERE / "results" / f"cpu-m{m}-{softmax}.json"))
    return runs


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    for one, path in configurations(cfg):
        if one.classes is None:
            one.classes = max(1, round(math.sqrt(one.vocab)))
        report = run(one, sys.stderr)
        if report is None:
            return 1
        text = tables.throughput(report)
        print(text)
        if path:
            report["text"] = text
            with open(path, "w") as f:
                json.dump(report, f, indent=1)
            print(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
