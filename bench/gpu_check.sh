#!/usr/bin/env bash
# One prepared GPU check: run from anywhere, on a machine with only torch installed.
#   bench/gpu_check.sh [--tiny] [--steps N] [--out DIR] [--time-limit-s S]
# Writes gpu-check.json (bench/results/ unless --out) and prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
"$PY" -m bench.gpu_check "$@"
out="bench/results"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    *) shift ;;
  esac
done
echo "result: $(cd "$out" && pwd)/gpu-check.json"
