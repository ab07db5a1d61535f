#!/usr/bin/env bash
# GPU check: kdistill's loop on one GPU (the lent NVIDIA H200) with synthetic data, unattended,
# in under 5 minutes (bench/gpu_check.py's docstring says what it measures). It uses that
# machine's own python3 (3.12, torch 2.11, timm, torchmetrics, onnx, onnxruntime): of kdistill's
# dependencies only pytorch-optimizer is missing there, and kdistill imports it lazily (optim.name
# po:NAME), so nothing is installed. Anything else the check comes to need travels as wheels in
# .whl/ (ignored through .git/info/exclude; the device README's Notes say how to download them),
# installed here first with pip --target /tmp/site.
#
# The one call, from a session that holds the device tool (wall limit 360 s: the check stops
# itself at 290 s, leaving room in the 15 device minutes for a second try):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=360)
# Rows come back in $OUT/gpu_check.json (appended as each arm ends, so a killed run keeps them)
# and the workers' logs in $OUT/gpu_check.log; the table is printed at the end.
# Anywhere else, the CPU smoke test (run by tests/test_compiled.py): python3 bench/gpu_check.py --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
