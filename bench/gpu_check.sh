#!/usr/bin/env bash
# GPU check (issue 15): kdistill's loop on one GPU with synthetic data, no installs.
# Run from the repository root on the GPU machine; uses that machine's own torch and timm.
# Under 4 minutes on one GPU. Anywhere else: `python bench/gpu_check.py --tiny`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
exec python bench/gpu_check.py "$@"
