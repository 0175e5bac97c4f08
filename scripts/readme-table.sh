#!/usr/bin/env bash
# Replaces the README's quickstart table (between the readme-table markers) with the one
# `outlierlab report runs/quickstart --summary` prints from the stored run: the README's numbers
# come from the run, never from a hand edit.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/quickstart}
bin=${OUTLIERLAB:-target/release/outlierlab}
table=$("$bin" report "$run" --summary)
python3 - "$table" <<'PY'
import re, sys
table = sys.argv[1].rstrip("\n")
text = open("README.md").read()
start, end = "<!-- readme-table:start -->", "<!-- readme-table:end -->"
if start not in text or end not in text:
    sys.exit("README.md has no readme-table markers")
head, rest = text.split(start, 1)
_, tail = rest.split(end, 1)
open("README.md", "w").write(head + start + "\n" + table + "\n" + end + tail)
PY
echo "README.md: quickstart table replaced from $run"
