#!/usr/bin/env bash
# Every stage on CUDA on the full SD v1.4 architecture (seeded random weights, 512x512, a few steps and
# iterations): time and peak GPU memory per stage -> benchmarks/results/gpu_check.json.
#   scripts/gpu_check.sh              # on a CUDA machine (refuses clearly without one); ~8 min on an H200 at most
#   scripts/gpu_check.sh --dry-run    # the same stages on the CPU at tiny size (checks the script itself)
# Other flags: --precision 32-true|16-mixed|bf16-mixed, --work DIR, --out FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout -k 10 1800 python scripts/gpu_check.py "$@"
