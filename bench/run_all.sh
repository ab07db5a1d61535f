#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md, in dependency order (the CIFAR-10 resnet56 teacher first).
# Each step reuses finished runs in bench/cache and resumes interrupted ones: rerun after a kill.
#   nohup bench/run_all.sh > bench/cache/run_all.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
step() { echo "== $(date -Is) $*"; "$PY" "$@" || echo "== FAILED ($?): $*"; }  # a failure does not stop the rest
step bench/train_baselines.py                                   # issue 2: teacher, baseline, loop speed
step bench/merge_teachers.py                                    # issue 3: teachers over different label sets
step bench/funmatch.py throughput                               # issue 5a
step bench/ssld.py                                              # issue 16: SSLD in the paper's setting (hours; ~/.cache/kdistill-bench)
step bench/distill_methods.py --seeds 3                         # issue 16: baseline/kd/dkd/mgd x 3 seeds (its teacher)
step bench/funmatch.py accuracy                                 # issue 5b
step bench/funmatch.py topk                                     # issue 5: top-k truncation
step bench/funmatch.py patience --epochs 30 --train-images 10000  # issue 5c
step bench/patience.py                                          # issue 17: patient, consistent teacher (~2 h; ~/.cache/kdistill-bench)
step bench/serve_load.py --run bench/cache/cifar/resnet20       # issue 6: load test, ORT vs eager (not cached: reruns)
