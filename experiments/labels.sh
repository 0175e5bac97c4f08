#!/usr/bin/env bash
# Labels massive activations by intervention on every model with a reference test, and scores
# every preset, pr154 criteria subset and threshold against them (`outlierlab label`). Writes
# reports/labels/<model>.txt (the printed tables) and .json (every candidate's measurements and
# every configuration's dims, precision, recall and F1).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${OUTLIERLAB:-target/release/outlierlab}
corpus=${CORPUS:-harmless-outlierlab:8}
mkdir -p reports/labels
for m in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma3-270m qwen2.5-coder-1.5b-instruct; do
  raw=()
  [ "$m" = gemma3-270m ] && raw=(--raw)   # a base model: no chat template
  "$bin" label --model "$m" "${raw[@]}" --dataset "$corpus" --json "reports/labels/$m.json" \
    > "reports/labels/$m.txt"
  echo "reports/labels/$m.txt"
done
