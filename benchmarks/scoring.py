"""Sentences per second of ``rnnlm score`` (independent sentences, batched by length) on PTB's test set.

Against (a) the same model scored by a plain PyTorch batched scorer (sentences sorted by length, padded,
``--torch-batch`` at a time, nn.RNN and log_softmax, padding masked; the class softmax one class at a time:
padding grows with the batch, so it keeps its own, 64 by default), run in its own process
with PyTorch's default environment, and (b) ``rnnlm perplexity``'s token rate on the same text (one
stream, B = 1): the cost of batching. m = 200, full and class softmax (C = √V), randomly initialized
(speed does not depend on training). Timings are the median of ``--rounds`` timed passes after a warm-up, in
process, without the start of Python (about 1 s for the command); rnnlm's rounds are taken before and again
after PyTorch's and pooled, so that a load that changes meanwhile hits both; every ratio is of medians of
this one run. The numbers of both scorers are compared (ln_prob_difference: the sums of their
sentence scores).

    python benchmarks/scoring.py [--threads 2] [--batch N] [--torch-batch 64] [--rounds 3] [--softmax class]

The text is data/ptb/test.txt (``bash data/ptb/prepare.sh``), else ../shared/data/ptb/test.txt; the
vocabulary is its train.txt's. ``pip install torch`` for the baseline (skipped without it).
"""

import argparse
import importlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # beside this file; before anything that imports rnnlm
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [REPO / "data" / "ptb", REPO.parent / "shared" / "data" / "ptb"]


def timed(rounds, work):
    """The seconds of each of ``rounds`` timed calls of ``work`` after one untimed call, and its last result."""
    result = work()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = work()
        seconds.append(time.perf_counter() - start)
    return seconds, result


# ---------------------------------------------------------------------------------------- PyTorch side


def torch_scores(model_path, text_path, boundary, batch, threads, rounds):
    """Run in the child process: every sentence's ln p by a plain PyTorch batched scorer; prints JSON.

    text_path holds each sentence's token ids (the boundary id last), as the parent read them."""
    import torch
    from torch.nn import functional

    torch.set_num_threads(threads)
    arrays = np.load(model_path)
    ids = [np.array(line.split(), np.int64) for line in Path(text_path).read_text().splitlines()]
    W = {name: torch.from_numpy(arrays[name]) for name in arrays.files if name[0] in "Wb"}
    m = W["W_s"].shape[0]
    rnn = torch.nn.RNN(m, m, nonlinearity="tanh")
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.eye(m))
        rnn.bias_ih_l0.zero_()
        rnn.weight_hh_l0.copy_(W["W_s"])
        rnn.bias_hh_l0.copy_(W["b_s"])
    embedding = W["W_x"].T.contiguous()
    bounds = arrays["class_bounds"] if "class_bounds" in arrays.files else None
    order = np.argsort([len(x) for x in ids], kind="stable")

    def batch_scores(members):
        lengths = torch.tensor([len(ids[k]) for k in members])
        T = int(lengths.max())
        targets = torch.zeros((T, len(members)), dtype=torch.long)
        for b, k in enumerate(members):
            targets[: len(ids[k]), b] = torch.from_numpy(ids[k])
        inputs = torch.cat([torch.full((1, len(members)), boundary), targets[:-1]])
        states, _ = rnn(functional.embedding(inputs, embedding))
        s, y = states.reshape(T * len(members), m), targets.reshape(-1)
        if bounds is None:
            log_p = functional.log_softmax(s @ W["W_o"].T + W["b_o"], dim=1).gather(1, y[:, None])[:, 0]
        else:
            classes = torch.from_numpy(np.searchsorted(bounds, y.numpy(), side="right") - 1)
            log_p = functional.log_softmax(s @ W["W_c"].T + W["b_c"], dim=1).gather(1, classes[:, None])[:, 0]
            for c in torch.unique(classes).tolist():
                rows = (classes == c).nonzero()[:, 0]
                lo, hi = int(bounds[c]), int(bounds[c + 1])
                words = functional.log_softmax(s[rows] @ W["W_o"][lo:hi].T + W["b_o"][lo:hi], dim=1)
                log_p[rows] += words.gather(1, (y[rows] - lo)[:, None])[:, 0]
        mask = torch.arange(T)[:, None] < lengths[None, :]
        return (log_p.reshape(T, -1) * mask).sum(dim=0)

    def score_all():
        totals = np.zeros(len(ids))
        with torch.no_grad():
            for first in range(0, len(order), batch):
                members = order[first : first + batch]
                totals[members] = batch_scores(members).double().numpy()
        return totals

    seconds, totals = timed(rounds, score_all)
    print(json.dumps({"seconds": statistics.median(seconds), "ln_prob": float(totals.sum()),
                      "torch": torch.__version__}))


# ---------------------------------------------------------------------------------------- rnnlm side


def make_models(folder, train, level="word"):
    """Randomly initialized m = 200 models, full and class softmax (C = √V), saved in ``folder``."""
    from rnnlm.model import Model, frequency_classes
    from rnnlm.tokenizer import tokenize_text

    ids, vocab, _ = tokenize_text(train, level)
    counts = np.bincount(ids, minlength=len(vocab))
    paths = {"full": folder / "full.npz", "class": folder / "class.npz"}
    Model.create(vocab, 200, seed=0).save(paths["full"])
    Model.create(vocab, 200, seed=0, class_bounds=frequency_classes(counts, round(math.sqrt(len(vocab))))).save(
        paths["class"])
    return paths


def measure(model_path, lines, batch, rounds):
    """rnnlm score's seconds per round for the lines (read and scored, as the command does), perplexity's
    seconds per round for the same tokens, and the scored sentences."""
    import rnnlm
    from rnnlm import evaluate, step
    from rnnlm.backends import get_backend

    scoring = importlib.import_module("rnnlm.score")
    model = rnnlm.load(model_path)
    scorer = scoring.Scorer(model, batch=batch)

    def score_all():
        sentences = scoring.read_sentences(model.vocab, enumerate(lines))
        scorer.score_independent(sentences)
        return sentences

    score_s, sentences = timed(rounds, score_all)
    ops = get_backend("cpu")
    params = step.to_device(ops, model.params, model.tied)
    ids = np.concatenate([s.ids for s in sentences])
    stream_s, _ = timed(rounds, lambda: evaluate.stream_loss(ops, params, ids, model.vocab.boundary_id,
                                                                 model.structure))
    return score_s, stream_s, sentences


def run_torch(model_path, sentences, boundary, folder, args):
    """The PyTorch scorer in its own process, with the environment this one started with (without rnnlm's
    thread settings): {"seconds" (median), "ln_prob", "torch"} or None."""
    ids_path = folder / "ids.txt"
    ids_path.write_text("".join(" ".join(map(str, s.ids)) + "\n" for s in sentences))
    command = [sys.executable, __file__, "--torch-child", str(model_path), str(ids_path), "--batch",
               str(args.torch_batch), "--threads", str(args.threads), "--rounds", str(args.rounds), "--boundary",
               str(boundary)]
    done = subprocess.run(command, capture_output=True, text=True, env=common.BASELINE_ENV)
    if done.returncode != 0:
        print(f"PyTorch baseline skipped: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="rnnlm's sentences side by side [default: rnnlm's]")
    parser.add_argument("--torch-batch", type=int, default=64, help="PyTorch's sentences side by side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--softmax", choices=["full", "class"], action="append",
                        help="the models to measure (repeatable) [default: both]")
    parser.add_argument("--torch-child", nargs=2, metavar=("MODEL", "IDS"), help=argparse.SUPPRESS)
    parser.add_argument("--boundary", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        return torch_scores(*args.torch_child, args.boundary, args.batch, args.threads, args.rounds)
    import rnnlm
    from rnnlm._env import set_threads
    from rnnlm.score import DEFAULT_BATCH

    args.batch = args.batch or DEFAULT_BATCH
    set_threads(args.threads)
    ptb = next((folder for folder in CANDIDATES if (folder / "test.txt").exists()), None)
    if ptb is None:
        sys.exit("no PTB text: run bash data/ptb/prepare.sh")
    lines = (ptb / "test.txt").read_text(encoding="utf-8").splitlines()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for softmax, path in make_models(folder, ptb / "train.txt").items():
            if args.softmax and softmax not in args.softmax:
                continue
            score_s, stream_s, sentences = measure(path, lines, args.batch, args.rounds)
            baseline = run_torch(path, sentences, rnnlm.load(path).vocab.boundary_id, folder, args)
            again = measure(path, lines, args.batch, args.rounds)  # before and after PyTorch: a load that
            score_s = statistics.median(score_s + again[0])  # changes meanwhile hits both
            stream_s = statistics.median(stream_s + again[1])
            tokens = sum(len(s.ids) for s in sentences)
            row = {"softmax": softmax, "sentences": len(lines), "tokens": tokens, "batch": args.batch,
                   "torch_batch": args.torch_batch,
                   "threads": args.threads, "cpu": common.cpu_model(), "score_sentences_per_s": len(lines) / score_s,
                   "score_tokens_per_s": tokens / score_s, "perplexity_tokens_per_s": tokens / stream_s}
            row["vs_perplexity"] = row["score_tokens_per_s"] / row["perplexity_tokens_per_s"]
            if baseline is not None:
                row["torch_sentences_per_s"] = len(lines) / baseline["seconds"]
                row["vs_torch"] = row["score_sentences_per_s"] / row["torch_sentences_per_s"]
                row["ln_prob_difference"] = sum(s.ln_prob for s in sentences) - baseline["ln_prob"]
                row["torch"] = baseline["torch"]
            results.append(row)
            print(json.dumps(row), flush=True)
    for row in results:
        torch_part = (f", PyTorch {row['torch_sentences_per_s']:,.0f} sentences/s ({row['vs_torch']:.2f}×)"
                      if "vs_torch" in row else "")
        print(f"{row['softmax']:>5}: rnnlm score {row['score_sentences_per_s']:,.0f} sentences/s "
              f"({row['score_tokens_per_s']:,.0f} tok/s, {row['vs_perplexity']:.0%} of perplexity's "
              f"{row['perplexity_tokens_per_s']:,.0f} tok/s){torch_part}")
    print(f"rnnlm {rnnlm.__version__} on {common.cpu_model()}, {args.threads} threads, batch {args.batch} "
          f"(PyTorch {args.torch_batch}), "
          f"medians of {args.rounds} rounds (rnnlm: {2 * args.rounds}, before and after PyTorch)")


if __name__ == "__main__":
    main()
