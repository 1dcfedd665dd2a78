"""Training at a million-word vocabulary: tokens/s and peak memory of `rnnlm train` at V = 793,470 (the One
Billion Word benchmark's vocabulary), m = 256, class softmax (or --softmax hs: the hierarchical softmax), lazy
Adam, 2 threads.

The text is generated: V - 2 distinct lowercase words (2 to 12 letters; with <unk> and <eos> the vocabulary
is V), a word list of each once (in lines of 20), and a Zipf text (p ∝ 1/rank, s = 1) of --tokens words in
lines of 5 to 40. `rnnlm tokenize` builds the vocabulary of V from the word list and the Zipf text together
(its time and peak RSS are reported, and again with the cut-offs --max-vocab and --min-count); the training
store is the Zipf text alone, tokenized with that vocabulary, so that its windows are Zipf's law throughout
(the word list would give the streams that cross it uniform words); a separate short Zipf text is the
validation store.

Training runs in a process of its own (this script with --worker): rnnlm.train.train on the store for
--windows windows, then stops (no epoch end: no validation and no model written; the run's start checkpoint,
6.6 GB at this size, is, and its time is part of start_to_first_window_s). The speed is
the median of the per-window rates after the first --warmup windows (compilation, and the page faults of the
first touches of the zeroed gradients and moments); the peak RSS is the kernel's ru_maxrss of that process
(os.wait4), the whole run's from start-up to the last window (training_peak_rss_bytes: the same at the last
window, before the GEMM probe below allocates its arrays; window_rss_max_bytes: the largest VmRSS read after a
timed window). --moments bfloat16 stores Adam's moments in bfloat16; --touch-all writes a word on every page
of the parameters and the moments after the start checkpoint, before the first window, so that the peak is a
long run's, whose every row has been touched (the sparse gradients are slotted: only the rows a window claims
are ever written). The ceiling is the FLOP model's (benchmarks/common.py: 6·m·(C + E|c|) + 6·m² per token,
E|c| the mean size of the targets' classes on the store's counts; with --softmax hs, C + E|c| becomes the mean
path length of the Huffman tree over the targets) at the GEMM rate measured in the same process (a (T·B, m) ×
(m, 4096) float32 product, 2 threads), an upper bound no step can beat (for hs a loose one: its node products
are not GEMMs).

    python benchmarks/large_vocab.py                  # V = 793,470, 2 to 3 minutes
    python benchmarks/large_vocab.py --batch 4096 --tied --windows 10 --warmup 3
    python benchmarks/large_vocab.py --softmax hs --batch 1024 --cutoffs ''
    python benchmarks/large_vocab.py --softmax hs --batch 2048 --moments bfloat16 --touch-all --cutoffs ''
    python benchmarks/large_vocab.py --quick          # V = 5,000, seconds: the smoke test

Everything generated is in --workdir (default /tmp/rnnlm-large-vocab) and deleted at the end (--keep keeps
it). The report is printed and, with --json, written as one JSON object.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import string
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import flops_per_token  # noqa: E402  (benchmarks/ is not a package)
from memory import measured  # noqa: E402

ONE_BILLION_WORD_V = 793_470
CLASS_SWEEP = (250, 500, 891, 1000, 2000)  # class counts whose rows per token the report lists


def distinct_words(n_words, rng):
    """``n_words`` distinct lowercase words of 2 to 12 letters, in random order."""
    letters = np.array(list(string.ascii_lowercase))
    found = np.array([], dtype=object)
    while len(found) < n_words:
        lengths = rng.integers(2, 13, 2 * n_words)
        chars = letters[rng.integers(0, 26, (2 * n_words, 12))]
        drawn = np.array(["".join(row[:k]) for row, k in zip(chars, lengths, strict=True)], dtype=object)
        found = np.unique(np.concatenate([found, drawn]))
    return rng.permutation(found)[:n_words]


def write_texts(words_path, zipf_path, V, n_tokens, seed):
    """The word list and the Zipf text of the module docstring; returns the words."""
    rng = np.random.default_rng(seed)
    words = distinct_words(V - 2, rng)
    with open(words_path, "w", encoding="ascii") as f:
        for first in range(0, len(words), 20):
            f.write(" ".join(words[first:first + 20]) + "\n")
    write_zipf(zipf_path, words, n_tokens, rng)
    return words


def write_zipf(path, words, n_tokens, rng):
    """``n_tokens`` words drawn with p ∝ 1/rank, in lines of 5 to 40."""
    cdf = np.cumsum(1.0 / np.arange(1, len(words) + 1))
    cdf /= cdf[-1]
    with open(path, "w", encoding="ascii") as f:
        for first in range(0, n_tokens, 1 << 20):
            n = min(1 << 20, n_tokens - first)
            ids = np.minimum(np.searchsorted(cdf, rng.random(n)), len(words) - 1)
            ends = np.cumsum(rng.integers(5, 41, n // 5 + 1))
            separators = np.full(n, " ", dtype=object)
            separators[ends[ends < n]] = "\n"
            separators[-1] = "\n"
            pieces = np.empty(2 * n, dtype=object)
            pieces[0::2], pieces[1::2] = words[ids], separators
            f.write("".join(pieces))


def tokenize(texts, store, folder, *options):
    """(seconds, peak RSS MiB, the --json record) of `rnnlm tokenize` in a process of its own."""
    seconds, rss, stdout = measured([sys.executable, "-m", "rnnlm", "tokenize", *texts, "-o", store, "--json",
                                     *options], folder)
    return {"seconds": seconds, "peak_rss_mib": rss, **json.loads(stdout.splitlines()[-1])}


def hs_costs(counts):
    """The hierarchical softmax's cost: nodes per training token (the Huffman tree's count-weighted mean path
    length over ``counts``) and its deepest path."""
    from rnnlm.huffman import huffman_tree

    tree = huffman_tree(counts.astype(np.int64))
    return {"rows_per_token": tree.mean_depth(), "max_depth": tree.max_depth}


def class_costs(counts, class_counts):
    """For each C: C + E|c|, the output rows one training token reads (E|c| over the counts' targets)."""
    from rnnlm.model import frequency_classes

    costs = {}
    p = counts / counts.sum()
    for C in class_counts:
        bounds = frequency_classes(counts, C)
        sizes = np.diff(bounds)
        mass = np.add.reduceat(p, bounds[:-1])
        costs[int(C)] = {"classes": len(sizes), "mean_class_size": float(mass @ sizes),
                         "rows_per_token": float(len(sizes) + mass @ sizes)}
    return costs


def gemm_rate(N, m, threads):
    """GFLOP/s of a float32 (N, m) × (m, 4096) product with ``threads`` BLAS threads (median of 20)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    A, B = rng.random((N, m), np.float32), rng.random((m, 4096), np.float32)
    out = np.empty((N, 4096), np.float32)
    times = []
    with threadpool_limits(threads, user_api="blas"):
        for _ in range(21):
            start = time.perf_counter()
            np.matmul(A, B, out=out)
            times.append(time.perf_counter() - start)
    return 2 * N * m * 4096 / np.median(times[1:]) / 1e9


def resident_bytes():
    """This process's resident set size now (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class _EnoughWindowsError(Exception):
    """Raised from the window callback once the worker has timed its windows (not an error)."""


def touch_pages(array):
    """Write one element of every 4 KiB page of a C- or F-contiguous numpy array (its own value back, from a
    copy: numpy skips an assignment whose source is its destination)."""
    flat = (array.T if array.flags.f_contiguous and not array.flags.c_contiguous else array).reshape(-1)
    stride = 4096 // flat.itemsize
    flat[::stride] = flat[::stride].copy()


def steady_state():
    """Make a run touch its parameters' and moments' pages before its first window, once its start checkpoint is
    written (which frees the initial model's host copy)."""
    from rnnlm.train import Trainer

    mark_epoch_start = Trainer.mark_epoch_start

    def touching_mark(self):
        mark_epoch_start(self)
        for array in [*self.params.values(), *self.optimizer.arrays().values()]:
            touch_pages(array)

    Trainer.mark_epoch_start = touching_mark


def worker(spec):
    """Train for spec's windows in this process; prints a JSON record of the per-window times."""
    from rnnlm.store import token_counts
    from rnnlm.tokenizer import open_token_dir
    from rnnlm.train import RunOptions, TrainConfig, train

    if spec["touch_all"]:
        steady_state()
    stamps, resident = [], []

    def on_window(done, total, stats):
        stamps.append(time.perf_counter())
        resident.append(resident_bytes())
        if done >= spec["windows"]:
            raise _EnoughWindowsError

    classes = spec["classes"] if spec["softmax"] == "class" else None
    config = TrainConfig(hidden=spec["hidden"], softmax=spec["softmax"], classes=classes, optimizer="lazyadam",
                         bptt=spec["bptt"], batch=spec["batch"], epochs=1, tied=spec["tied"], moments=spec["moments"])
    started = time.perf_counter()
    with contextlib.suppress(_EnoughWindowsError):
        train(spec["store"], spec["model"], valid=spec["valid"], config=config,
              options=RunOptions(threads=spec["threads"]), on_window=on_window)
    training_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the GEMM probe's arrays
    ids, vocab = open_token_dir(spec["store"])
    counts = token_counts(ids, len(vocab))
    record = {"window_s": np.diff(stamps).tolist(), "start_to_first_window_s": stamps[0] - started,
              "training_peak_rss_bytes": training_peak, "window_rss_bytes": resident,
              "vocab_size": len(vocab), "hs_cost": hs_costs(counts),
              "class_costs": class_costs(counts.astype(np.float64), sorted({spec["classes"], *CLASS_SWEEP})),
              "gemm_gflops": gemm_rate(spec["bptt"] * spec["batch"], spec["hidden"], spec["threads"])}
    print(json.dumps(record))


def train_run(args, folder, store, valid):
    """Run the worker; the training part of the report."""
    spec = {"store": str(store), "valid": str(valid), "model": str(folder / "model.npz"), "hidden": args.hidden,
            "classes": args.classes, "bptt": args.bptt, "batch": args.batch, "threads": args.threads,
            "windows": args.windows, "tied": args.tied, "softmax": args.softmax, "moments": args.moments,
            "touch_all": args.touch_all}
    seconds, rss, stdout = measured([sys.executable, __file__, "--worker", json.dumps(spec)], folder)
    record = json.loads(stdout.splitlines()[-1])
    tokens = args.bptt * args.batch
    rates = tokens / np.array(record["window_s"][args.warmup - 1:])  # window_s[k]: window k + 2's time
    if args.softmax == "hs":
        cost = record["hs_cost"]
        flops = flops_per_token(args.hidden, record["vocab_size"], 0, cost["rows_per_token"])["train"]
    else:
        cost = record["class_costs"][str(args.classes)]
        flops = flops_per_token(args.hidden, record["vocab_size"], cost["classes"], cost["mean_class_size"])["train"]
    return {"vocab_size": record["vocab_size"], "softmax": args.softmax, **cost, "hidden": args.hidden,
            "bptt": args.bptt,
            "batch": args.batch, "tied": args.tied, "moments": args.moments,
            "touch_all": args.touch_all, "threads": args.threads, "windows_timed": len(rates),
            "tokens_per_s_median": float(np.median(rates)), "tokens_per_s_min": float(rates.min()),
            "tokens_per_s_max": float(rates.max()), "peak_rss_mib": rss,
            "training_peak_rss_bytes": record["training_peak_rss_bytes"],
            "window_rss_max_bytes": max(record["window_rss_bytes"][args.warmup:]), "process_s": seconds,
            "start_to_first_window_s": record["start_to_first_window_s"], "mflop_per_token": flops / 1e6,
            "gemm_gflops": record["gemm_gflops"],
            "ceiling_tokens_per_s": record["gemm_gflops"] * 1e9 / flops, "class_sweep": record["class_costs"]}


def cpu_model():
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor()


def run(args):
    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_before": os.getloadavg()}
    word_list, text, valid_text = folder / "words.txt", folder / "text.txt", folder / "valid.txt"
    started = time.perf_counter()
    words = write_texts(word_list, text, args.vocab, args.tokens, args.seed)
    report["text_bytes"] = word_list.stat().st_size + text.stat().st_size
    report["generate_s"] = time.perf_counter() - started
    write_zipf(valid_text, words, args.tokens // 100, np.random.default_rng(args.seed + 1))
    full, store, valid = folder / "full", folder / "store", folder / "valid"
    report["tokenize"] = tokenize([word_list, text], full, folder)
    report["tokenize"]["MB_per_s"] = report["text_bytes"] / 1e6 / report["tokenize"]["seconds"]
    for cut in args.cutoffs:
        option, value = cut.split("=")
        report[f"tokenize_{option}_{value}"] = tokenize([word_list, text], folder / "cut", folder, f"--{option}",
                                                        value)
        shutil.rmtree(folder / "cut")
    report["tokenize_with_vocab"] = tokenize([text], store, folder, "--vocab", full / "vocab.json")
    tokenize([valid_text], valid, folder, "--vocab", full / "vocab.json")
    report["train"] = train_run(args, folder, store, valid)
    report["load_after"] = os.getloadavg()
    if not args.keep:
        shutil.rmtree(folder)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/rnnlm-large-vocab")
    parser.add_argument("--vocab", type=int, default=ONE_BILLION_WORD_V, help="V, <unk> and <eos> included")
    parser.add_argument("--tokens", type=int, default=5_000_000, help="words of the Zipf text")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--softmax", choices=("class", "hs"), default="class")
    parser.add_argument("--classes", type=int, default=500, help="C of --softmax class")
    parser.add_argument("--bptt", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--moments", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--touch-all", action="store_true",
                        help="touch every page of the weights and moments first (a long run's steady state)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=40, help="windows trained")
    parser.add_argument("--warmup", type=int, default=10, help="first windows left out of the rates (at least 1)")
    parser.add_argument("--cutoffs", type=lambda s: s.split(",") if s else [], default=["max-vocab=100000",
                        "min-count=2"], help="tokenize again with each OPTION=VALUE (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--quick", action="store_true", help="V = 5,000, m = 32, 12 windows: a smoke test")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.quick:
        args.vocab, args.tokens, args.hidden, args.classes, args.windows, args.warmup = 5000, 50_000, 32, 50, 12, 2
        args.cutoffs = ["max-vocab=1000"]
    report = run(args)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
