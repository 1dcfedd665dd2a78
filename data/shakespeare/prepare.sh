#!/usr/bin/env bash
# tiny-shakespeare (1.1M characters), split as nanoGPT does: first 90% train, last 10% validation.
# Writes data/shakespeare/{input,train,valid}.txt; takes the copy in ../shared when there is one.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
shared="$here/../../../shared/data/tinyshakespeare/input.txt"
if [ -f "$shared" ]; then
  cp "$shared" "$here/input.txt"
else
  curl -fsSL https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt \
    -o "$here/input.txt"
fi
python3 - "$here" <<'PY'
import sys
from pathlib import Path
here = Path(sys.argv[1])
text = (here / "input.txt").read_text(encoding="utf-8")
cut = int(len(text) * 0.9)
(here / "train.txt").write_text(text[:cut], encoding="utf-8")
(here / "valid.txt").write_text(text[cut:], encoding="utf-8")
print(f"{len(text):,} characters: {cut:,} train, {len(text) - cut:,} validation")
PY
