#!/usr/bin/env bash
# Detection validation on the four models: which dims and which entries are massive activations
# (by intervention), and how every preset, pr154 criteria subset (both median scopes, both
# persistence counts) and threshold curve finds them on held-out prompts. One study file per model
# in experiments/detection-validation/ (bf16); SmolLM2 and Qwen2.5-Coder-0.5B run in f32 as well,
# so that each report can say whether bf16 changes the labels (the f32 runs stay in runs/). Runs land in
# runs/detection-validation/<model> (and runs/detection-validation-f32/<model>), reports in
# reports/detection-validation/<model>/, the cross-model summary in reports/detection-validation/.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${OUTLIERLAB:-target/release/outlierlab}
models="smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma3-270m qwen2.5-coder-1.5b-instruct"
f32_check="smollm2-135m-instruct qwen2.5-coder-0.5b-instruct"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for m in $models; do
  start=$(date +%s)
  "$bin" run "experiments/detection-validation/$m.yaml"
  echo "$m bf16: $(( $(date +%s) - start )) s"
  if [[ " $f32_check " == *" $m "* ]]; then
    sed -e 's/^precision: bf16/precision: f32/' \
        -e "s|^output: runs/detection-validation/|output: runs/detection-validation-f32/|" \
        -e "s/^name: \(.*\)/name: \1-f32/" \
        "experiments/detection-validation/$m.yaml" > "$tmp/$m.yaml"
    start=$(date +%s)
    "$bin" run "$tmp/$m.yaml"
    echo "$m f32: $(( $(date +%s) - start )) s"
  fi
done
# The run folders are committed beside their reports (reports/detection-validation/<model>/run),
# so every report re-renders from what is in the repository.
for m in $models; do
  other=()
  [[ -d "runs/detection-validation-f32/$m" ]] && other=(--compare-labels "runs/detection-validation-f32/$m")
  "$bin" report "runs/detection-validation/$m" --out "reports/detection-validation/$m" "${other[@]}"
  rm -rf "reports/detection-validation/$m/run"
  cp -r "runs/detection-validation/$m" "reports/detection-validation/$m/run"
done
runs=()
for m in $models; do runs+=("reports/detection-validation/$m/run"); done
"$bin" report --across "${runs[@]}" --out reports/detection-validation
