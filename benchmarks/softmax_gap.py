"""PTB validation perplexity of the class softmax against the full softmax after the same epochs, per recipe.

    python benchmarks/softmax_gap.py --device cuda --jobs 6               # every recipe, C = 100, 6 epochs
    python benchmarks/softmax_gap.py --recipes adam-dropout0.2 --classes 25 --epochs 6

Each (recipe, softmax) pair is one ``rnnlm train`` subprocess (``--json``; ``--jobs`` of them at a time, which
pays on a GPU, where one run at m=200 leaves it mostly idle). Prints the validation perplexity after every
epoch of each run and, per recipe, the class softmax's relative gap after the last epoch; ``--json FILE``
writes them all. Both runs of a recipe share everything but the output layer: m=200, bptt 20, batch 20,
seed 0, a cosine schedule over the epochs.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # beside this file

REPO = Path(__file__).resolve().parents[1]

COMMON = ["--hidden", "200", "--bptt", "20", "--batch", "20", "--schedule", "cosine", "--seed", "0", "--json"]
RECIPES = {
    "adam-dropout0.2": ["--optimizer", "adam", "--lr", "0.002", "--clip", "1", "--dropout", "0.2"],
    "adam": ["--optimizer", "adam", "--lr", "0.002", "--clip", "1"],
    "adam-dropout0.5": ["--optimizer", "adam", "--lr", "0.002", "--clip", "1", "--dropout", "0.5"],
    "sgd": ["--optimizer", "sgd", "--lr", "20", "--clip", "0.25"],
}


def train(recipe, softmax, args, workdir):
    """One training run; returns its epoch records (dicts of ``rnnlm train --json``) or raises."""
    output = Path(workdir) / f"{recipe}-{softmax}.npz"
    train_text, valid_text, _ = args.files
    command = [sys.executable, "-m", "rnnlm", "train", str(train_text),
               "--valid", str(valid_text), "-o", str(output), "--device", args.device,
               "--epochs", str(args.epochs), "--softmax", softmax, *COMMON, *RECIPES[recipe]]
    if softmax == "class":
        command += ["--classes", str(args.classes)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{recipe}/{softmax}: {done.stderr.strip().splitlines()[-1]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"epoch"')]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated, from {', '.join(RECIPES)} (default: all)")
    parser.add_argument("--classes", type=int, default=100, help="classes C of the class softmax (default 100)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of every run (default 6)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default cpu)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--data", type=Path, help="folder with train.txt, valid.txt (default: data/ptb, filled by "
                        "data/ptb/prepare.sh)")
    parser.add_argument("--json", type=Path, help="also write every run's epochs to this file")
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")

    args.files = (args.data / "train.txt", args.data / "valid.txt", None) if args.data else \
        common.corpus_files("ptb", None)
    runs = [(recipe, softmax) for recipe in recipes for softmax in ("full", "class")]
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(args.jobs) as pool:
        epochs = dict(zip(runs, pool.map(lambda run: train(*run, args, workdir), runs), strict=True))

    print(f"validation perplexity per epoch on {args.files[0].parent} (m=200, C={args.classes} for class, "
          f"device {args.device})")
    for recipe, softmax in runs:
        values = " ".join(f"{e['valid_perplexity']:7.1f}" for e in epochs[recipe, softmax])
        print(f"  {recipe:16s} {softmax:5s} {values}")
    gaps = {}
    for recipe in recipes:
        full, cls = (epochs[recipe, s][-1]["valid_perplexity"] for s in ("full", "class"))
        gaps[recipe] = cls / full - 1
        print(f"  {recipe:16s} class vs full after {args.epochs} epochs: {cls:.1f} vs {full:.1f} ({gaps[recipe]:+.1%})")
    if args.json:
        records = [{"recipe": r, "softmax": s, "classes": args.classes if s == "class" else None,
                    "epochs": epochs[r, s]} for r, s in runs]
        args.json.write_text(json.dumps({"device": args.device, "runs": records, "gaps": gaps}, indent=1))


if __name__ == "__main__":
    main()
