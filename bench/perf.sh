#!/usr/bin/env bash
# The performance benchmark in one command: build (or reuse) everything `snakemake perf` needs for
# MODEL (default e2b-4l: Gemma 4 E2B's shapes at 4 layers), then print the table.
# Usage: bench/perf.sh [MODEL] [more snakemake arguments, e.g. --configfile g64.yaml]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-e2b-4l}
shift || true
.venv/bin/snakemake --cores 2 perf --config model="$model" "$@"
table=$(ls -t results/perf/"$model"/*/xnnpack-*/perf.md | head -n 1)
echo
echo "== $table (JSON beside it: perf.json)"
cat "$table"
