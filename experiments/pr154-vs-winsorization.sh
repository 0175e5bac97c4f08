#!/usr/bin/env bash
# The decisive study (experiments/pr154-vs-winsorization.yaml), run across as many machines or
# sessions as it takes. Each call resumes from what is committed: it copies the finished scores,
# tunings and unedited reference from reports/pr154-vs-winsorization/run/ into the run
# directory, runs the study until it ends or TIME_LIMIT seconds have passed (then stops it; a
# stopped run loses only the score in progress), copies what is finished back, and renders the
# report into reports/pr154-vs-winsorization/ — marked partial until every score is in.
#
#   TIME_LIMIT=7200 experiments/pr154-vs-winsorization.sh      # then commit reports/pr154-vs-winsorization
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${OUTLIERLAB:-target/release/outlierlab}
root=$(pwd)
run=$root/runs/pr154-vs-winsorization
keep=$root/reports/pr154-vs-winsorization/run
mkdir -p "$run" "$keep"
# Copies finished work only — score files, tunings, the unedited references, the plan — from
# one run folder to another. Into the run folder never over an existing file; back into the
# kept folder over older files (a stored score changes only when the study adds a refusal
# classifier: its replies cut at heretic's markers are completed).
# The cache's residual files (tens of MB) are recomputed in about a minute and stay out of git.
copy_finished() { # FROM TO MODE (-n: never overwrite, -u: overwrite older)
  (cd "$1" && find . -type f \( -path './results/*.json' -o -path './tune/*.json' \
      -o -path './cache/reference-*.json' -o -name plan.json -o -name study.yaml \
      -o -name 'assignments*.json' \) \
      -exec cp --parents "$3" -t "$2" {} +)
}
copy_finished "$keep" "$run" -n
start=$(date +%s)
set +e
timeout --signal=TERM "${TIME_LIMIT:-86400}" "$bin" run experiments/pr154-vs-winsorization.yaml \
  --out "$run" --report-dir reports/pr154-vs-winsorization
status=$?
set -e
echo "study: $(( $(date +%s) - start )) s this call (exit $status)"
copy_finished "$run" "$keep" -u
if [ "$status" -ne 0 ]; then
  # Stopped part-way: what is finished, merged and marked partial, is what the report shows.
  # Relative, so the committed report does not name this machine's folders.
  partial=runs/pr154-vs-winsorization-partial
  rm -rf "$partial"
  "$bin" merge --allow-partial --into "$partial" "$run"
  "$bin" report "$partial" --out reports/pr154-vs-winsorization
fi
