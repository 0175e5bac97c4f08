#!/usr/bin/env bash
# Run a study as a Slurm array: one shard per task, then merge and report.
#   sbatch --array=0-7 experiments/slurm-array.sh experiments/criteria-ablation.yaml
# then, when all tasks are done:
#   outlierlab merge --into runs/criteria-ablation runs/criteria-ablation-shard-*
#   outlierlab report runs/criteria-ablation
#SBATCH --job-name=outlierlab
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
set -euo pipefail
study="$1"
name=$(basename "$study" .yaml)
n=${SLURM_ARRAY_TASK_COUNT:?run as an array job}
i=${SLURM_ARRAY_TASK_ID:?run as an array job}
outlierlab run "$study" --shard "$i/$n" --out "runs/$name-shard-$i"
