#!/usr/bin/env bash
# Replaces the README's generated blocks with what `outlierlab report RUN --summary` prints from
# the stored runs, so the README's numbers come from the runs, never from a hand edit:
#   readme-table   the quickstart's variant table        (reports/quickstart/run, or $1)
#   decisive       the decisive study's answer and spread (reports/pr154-vs-winsorization/run, or $2)
#   criteria       the detection validations side by side  (reports/detection-validation/*/run)
# A block whose run folder is absent is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${OUTLIERLAB:-target/release/outlierlab}
replace() { # MARKER RUN [RUN...]: one run's summary, or several validations side by side
  if ! [ -d "$2" ]; then
    echo "README.md: $1 block left as it is ($2 does not exist)"
    return
  fi
  local block marker=$1
  shift
  if [ "$marker" = criteria ]; then
    block=$("$bin" report --across "$@" --summary)
  else
    block=$("$bin" report "$1" --summary)
  fi
  set -- "$marker" "$@"
  python3 - "$1" "$block" <<'PY'
import sys
marker, block = sys.argv[1], sys.argv[2].rstrip("\n")
text = open("README.md").read()
start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
if start not in text or end not in text:
    sys.exit(f"README.md has no {marker} markers")
head, rest = text.split(start, 1)
_, tail = rest.split(end, 1)
open("README.md", "w").write(head + start + "\n" + block + "\n" + end + tail)
PY
  echo "README.md: $1 block replaced from $2"
}
replace readme-table "${1:-reports/quickstart/run}"
replace decisive "${2:-reports/pr154-vs-winsorization/run}"
validated=()
for m in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma3-270m qwen2.5-coder-1.5b-instruct; do
  [ -d "reports/detection-validation/$m/run" ] && validated+=("reports/detection-validation/$m/run")
done
if [ ${#validated[@]} -gt 0 ]; then
  replace criteria "${validated[@]}"
fi
