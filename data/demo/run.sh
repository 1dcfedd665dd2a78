#!/usr/bin/env bash
# The demo: train a model on data/demo/train.txt (about a minute on 2 cores), compare its test perplexity
# with the exact optimum of the grammar that generated the corpus, and draw a few sentences from it.
# Run it from anywhere after `pip install -e .`:   bash data/demo/run.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."   # the repository root

RNNLM=${RNNLM:-rnnlm}
if ! command -v "$RNNLM" > /dev/null; then
    echo "run.sh: the rnnlm command was not found; install it first (pip install -e .) and activate" \
         "its environment, or set RNNLM=/path/to/rnnlm" >&2
    exit 1
fi
PYTHON=${PYTHON:-python3}
MODEL=runs/demo/model.npz

mkdir -p "$(dirname "$MODEL")"
"$RNNLM" train data/demo/train.txt --valid data/demo/valid.txt -o "$MODEL" \
    --hidden 128 --bptt 10 --batch 20 --lr 1 --epochs 20

echo
echo "test perplexity of the model:"
"$RNNLM" perplexity "$MODEL" data/demo/test.txt
"$PYTHON" -c 'import json; d = json.load(open("data/demo/optimum.json")); print("optimum perplexity %.2f (the grammar that generated the text)" % d["perplexity"])'

echo
echo "three samples:"
"$RNNLM" sample "$MODEL" --num 3 --seed 1
