"""Memory and speed of the token store: peak RSS of `rnnlm train` on stores of 10M and 100M tokens, and the
throughput and peak RSS of `rnnlm tokenize` on about 1 GB of text.

The text is generated: V words (lowercase strings of 2 to 10 letters, one per rank) drawn independently
with probability ∝ 1/rank^s (a finite Zipf law), in lines of 5 to 40 words. The training stores are the
first 10M and 100M tokens' worth of lines of the 1 GB text, tokenized with the big store's vocabulary
(so both models are the same size); a separate 100k-token text is the validation store. Every command
runs in a process of its own; its peak RSS is the kernel's ru_maxrss for it (os.wait4): the largest of the
process's and of each of its worker processes', not their sum. The load average is recorded before and
after, since the throughput depends on what else the cores run.

    python benchmarks/memory.py                       # ~1 GB of text in /tmp, a few minutes
    python benchmarks/memory.py --text-gb 0.05 --sizes 1e6,2e6 --budget 0.1   # a quick smoke run

Everything generated is deleted at the end (--keep keeps it). The report is printed and, with --json,
written as one JSON object.
"""

import argparse
import json
import os
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def zipf_words(V, seed):
    """V distinct lowercase words (rank order) and their Zipf probabilities' cumulative sums, s = 1.1."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))
    words = set()
    while len(words) < V:
        words.add("".join(rng.choice(letters, int(rng.integers(2, 11)))))
    p = 1 / np.arange(1, V + 1) ** 1.1
    return np.array(sorted(words), dtype=object), np.cumsum(p / p.sum())


def write_text(path, n_bytes, V, seed):
    """About ``n_bytes`` of generated text in ``path`` (see the module docstring); returns its word count."""
    words, cdf = zipf_words(V, seed)
    rng = np.random.default_rng(seed + 1)
    written = n_words = 0
    with open(path, "w", encoding="ascii") as f:
        while written < n_bytes:
            ids = np.minimum(np.searchsorted(cdf, rng.random(min(1 << 20, n_bytes // 6 + 1))), V - 1)
            ends = np.cumsum(rng.integers(5, 41, len(ids) // 5))
            separators = np.full(len(ids), " ", dtype=object)
            separators[ends[ends < len(ids)]] = "\n"
            separators[-1] = "\n"
            pieces = np.empty(2 * len(ids), dtype=object)
            pieces[0::2], pieces[1::2] = words[ids], separators
            chunk = "".join(pieces)
            written += f.write(chunk)
            n_words += len(ids)
    return n_words


def head_lines(source, target, n_tokens):
    """The first lines of ``source`` holding about ``n_tokens`` tokens (words and line ends) into ``target``."""
    with open(source, "rb") as f, open(target, "wb") as out:
        count = 0
        while count < n_tokens:
            block = f.read(min(1 << 24, max(1 << 16, int((n_tokens - count) * 6))))
            if not block:
                break
            block += f.readline()
            count += len(block.split()) + block.count(b"\n")
            out.write(block)


def measured(args, folder):
    """(seconds, peak RSS in MiB, stdout) of a command run in a process of its own; exits on failure."""
    start = time.perf_counter()
    with open(folder / "stdout", "w+b") as out, open(folder / "stderr", "w+b") as err:
        process = subprocess.Popen(list(map(str, args)), stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status):
            sys.exit(f"{' '.join(map(str, args))} failed:\n{err.read().decode()[-2000:]}")
        return seconds, usage.ru_maxrss / 1024, out.read().decode()


def tokenize(texts, store, folder, *options):
    seconds, rss, stdout = measured([sys.executable, "-m", "rnnlm", "tokenize", *texts, "-o", store, "--json",
                                     *options], folder)
    return seconds, rss, json.loads(stdout)


def run(args):
    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    report = {"disk_free_gib": shutil.disk_usage(folder).free / 2**30, "load_before": os.getloadavg()}
    big = folder / "text.txt"
    started = time.perf_counter()
    report["text_words"] = write_text(big, int(args.text_gb * 1e9), args.vocab, args.seed)
    report["text_bytes"] = big.stat().st_size
    report["generate_s"] = time.perf_counter() - started
    for workers in args.workers:
        seconds, rss, summary = tokenize([big], folder / "big", folder, "--workers", workers)
        report[f"tokenize_{workers}"] = {"seconds": seconds, "MB_per_s": report["text_bytes"] / 1e6 / seconds,
                                         "peak_rss_mib": rss, "tokens": summary["tokens"],
                                         "vocab_size": summary["vocab_size"]}
    vocab = folder / "big" / "vocab.json"
    write_text(folder / "valid.txt", 600_000, args.vocab, args.seed + 7)
    tokenize([folder / "valid.txt"], folder / "valid", folder, "--vocab", vocab)
    for size in args.sizes:
        text = folder / f"train-{size:.0e}.txt"
        head_lines(big, text, size)
        _, _, summary = tokenize([text], folder / "train", folder, "--vocab", vocab)
        text.unlink()
        seconds, rss, _ = measured([sys.executable, "-m", "rnnlm", "train", folder / "train", "--valid",
                                    folder / "valid", "-o", folder / "model.npz", "--softmax", "class", "--hidden",
                                    64, "--epochs", 1, "--time-budget", args.budget, "--threads", 2], folder)
        report[f"train_{size:.0e}"] = {"tokens": summary["tokens"], "seconds": seconds, "peak_rss_mib": rss}
    rss = [report[f"train_{size:.0e}"]["peak_rss_mib"] for size in args.sizes]
    report["train_rss_spread"] = (max(rss) - min(rss)) / min(rss)
    report["load_after"] = os.getloadavg()
    if not args.keep:
        shutil.rmtree(folder)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/rnnlm-memory")
    parser.add_argument("--text-gb", type=float, default=1.0)
    parser.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")], default=[10**7, 10**8])
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[2, 1])
    parser.add_argument("--vocab", type=int, default=10_000, help="V of the Zipf law")
    parser.add_argument("--budget", type=float, default=0.5, help="minutes of training per store")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = run(args)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
