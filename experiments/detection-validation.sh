#!/usr/bin/env bash
# Detection validation on every model with a reference test: which dims are massive activations
# (by intervention) and how every preset, pr154 criteria subset (both median scopes, both
# persistence counts) and threshold curve finds them. One study file per model in
# experiments/detection-validation/; runs land in runs/detection-validation/<model>, reports in
# reports/detection-validation/<model>/ (report.md, report.html, figures).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${OUTLIERLAB:-target/release/outlierlab}
for m in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct gemma3-270m qwen2.5-coder-1.5b-instruct; do
  start=$(date +%s)
  "$bin" run "experiments/detection-validation/$m.yaml" --report-dir "reports/detection-validation/$m"
  echo "$m: $(( $(date +%s) - start )) s"
done
