"""The KN5 baseline on Penn Treebank: KenLM's lmplz (interpolated modified Kneser-Ney, order 5, no pruning).

    python benchmarks/kn5.py --kenlm-src PATH      # a kenlm checkout, or a bare clone of github.com/kpu/kenlm

Builds lmplz and query from the source with cmake into runs/kenlm/build (Debian: apt-get install cmake
libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev zlib1g-dev), unless
runs/kenlm/build/bin/lmplz exists or --lmplz names one; estimates runs/kn5/ptb.kn5.arpa from
data/ptb/train.txt (filled by data/ptb/prepare.sh; ../shared/data/ptb otherwise); then scores
data/ptb/test.txt as ``rnnlm perplexity`` counts (every word and every end of sentence) through
rnnlm.ngram, and checks the number against KenLM's own query. Mikolov's thesis (Table 4.1) has 141.2.
Ends by printing one JSON line {"corpus", "metric", "value", "query_value", "arpa", "wall_s", "command"}.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "runs" / "kenlm"
sys.path.insert(0, str(REPO))

from rnnlm.ngram import LN10, NgramModel  # noqa: E402
from rnnlm.textio import iter_lines  # noqa: E402
from rnnlm.tokenizer import UNK  # noqa: E402

PLACEHOLDER = "<unk-counted>"


def ptb(split):
    """data/ptb/SPLIT.txt, or the shared copy beside the checkout."""
    for folder in (REPO / "data" / "ptb", REPO.parent / "shared" / "data" / "ptb"):
        if (folder / f"{split}.txt").is_file():
            return folder / f"{split}.txt"
    sys.exit(f"no PTB {split}.txt: run bash data/ptb/prepare.sh")


def build_kenlm(source):
    """lmplz and query built from ``source`` (a checkout, or a bare git directory exported first)."""
    source = Path(source)
    if not (source / "CMakeLists.txt").is_file():
        tree = BUILD / "src"
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "--git-dir", str(source), "archive", "HEAD"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        source = tree
    build = BUILD / "build"
    build.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cmake", str(source), "-DCMAKE_BUILD_TYPE=Release"], cwd=build, check=True)
    subprocess.run(["make", f"-j{os.cpu_count()}", "lmplz", "query"], cwd=build, check=True)
    return build / "bin"


def estimate(lmplz, train, arpa):
    """lmplz -o 5 on ``train`` into ``arpa``, written under a temporary name and renamed when complete.

    lmplz refuses the word <unk> in its text, and Penn Treebank's text is full of it (Mikolov's copy maps
    rare words to <unk>; SRILM, which gave 141.2, counts it as a word). So <unk> is counted under a
    placeholder, and the ARPA written back with the placeholder as <unk> in place of lmplz's own <unk>
    (the mass it reserves for unseen words, which PTB's test text has none of, is left out).
    """
    arpa.parent.mkdir(parents=True, exist_ok=True)
    partial = arpa.with_name(arpa.name + ".partial")
    with tempfile.TemporaryDirectory(dir=arpa.parent) as scratch:
        counted, raw = Path(scratch) / "train.txt", Path(scratch) / "raw.arpa"
        with open(counted, "w", encoding="utf-8") as out:
            for line in iter_lines(train):
                words = line.split()
                if PLACEHOLDER in words:
                    sys.exit(f"{train} has the word {PLACEHOLDER}")
                out.write(" ".join(PLACEHOLDER if w == UNK else w for w in words) + "\n")
        command = [str(lmplz), "-o", "5", "-S", "1G", "-T", scratch, "--text", str(counted), "--arpa", str(raw)]
        subprocess.run(command, check=True)
        with open(raw, encoding="utf-8") as source, open(partial, "w", encoding="utf-8") as out:
            for line in source:
                fields = line.rstrip("\n").split("\t")
                if line.startswith("ngram 1="):
                    line = f"ngram 1={int(line[8:]) - 1}\n"
                elif len(fields) >= 2 and fields[1] == UNK:
                    continue
                elif len(fields) >= 2 and PLACEHOLDER in fields[1].split(" "):
                    fields[1] = " ".join(UNK if w == PLACEHOLDER else w for w in fields[1].split(" "))
                    line = "\t".join(fields) + "\n"
                out.write(line)
    os.replace(partial, arpa)
    return ["lmplz", "-o", "5", "--text", str(train)]


def rnnlm_count(arpa, test):
    """Perplexity over every word and every </s> of ``test``, each line a sentence, via rnnlm.ngram."""
    model = NgramModel(arpa)
    log10_total, tokens = 0.0, 0
    for line in iter_lines(test):
        log10_p, _ = model.sentence_log10(line.split())
        log10_total += log10_p.sum()
        tokens += len(log10_p)
    return math.exp(-log10_total * LN10 / tokens)


def query_count(query, arpa, test):
    """KenLM query's own 'Perplexity including OOVs' (which counts </s> too)."""
    with open(test, "rb") as text:
        out = subprocess.run([str(query), "-v", "summary", str(arpa)], stdin=text, check=True,
                             capture_output=True, text=True).stdout
    return float(re.search(r"Perplexity including OOVs:\s*([0-9.]+)", out).group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kenlm-src", help="kenlm source: a checkout or a bare git directory")
    parser.add_argument("--bin", type=Path, default=BUILD / "build" / "bin", help="where lmplz and query are")
    parser.add_argument("--arpa", type=Path, default=REPO / "runs" / "kn5" / "ptb.kn5.arpa")
    args = parser.parse_args()
    start = time.monotonic()
    binaries = args.bin
    if not (binaries / "lmplz").is_file():
        if args.kenlm_src is None:
            sys.exit(f"no lmplz in {binaries}: pass --kenlm-src (a kenlm checkout) to build it")
        binaries = build_kenlm(args.kenlm_src)
    command = estimate(binaries / "lmplz", ptb("train"), args.arpa)
    test = ptb("test")
    print(json.dumps({"corpus": "ptb", "metric": "test perplexity (words and </s>)",
                      "value": round(rnnlm_count(args.arpa, test), 2),
                      "query_value": query_count(binaries / "query", args.arpa, test), "arpa": str(args.arpa),
                      "wall_s": round(time.monotonic() - start, 1), "command": " ".join(command)}))


if __name__ == "__main__":
    main()
