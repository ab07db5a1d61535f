#!/usr/bin/env bash
# The README's quick start, run for real (CIFAR-10 JPEGs, 10,000 images x 3 epochs) to show what
# each command prints:  bash bench/quickstart.sh > quickstart.log   (about 3 minutes on 2 cores)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PATH=$ROOT/.venv/bin:$PATH
D=${KDISTILL_CIFAR:-$ROOT/../shared/data/cifar10}
WORK=${QUICKSTART_DIR:-/tmp/kdistill-quickstart}
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
step() { echo; echo "### \$ $*"; local t0=$EPOCHREALTIME; "$@" 2>&1; echo "### took $(python3 -c "print(round($EPOCHREALTIME - $t0, 1))") s"; }
step kdistill train --data $D --model resnet20 --epochs 3 -o data.max_train_images=10000 --out runs/teacher --no-progress
step kdistill train --data $D --model resnet8 --epochs 3 -o data.max_train_images=10000 --out runs/baseline --no-progress
step kdistill distill --data $D --teacher runs/teacher --model resnet8 --loss kd:0.9 --loss ce:0.1 --epochs 3 -o data.max_train_images=10000 --out runs/kd --no-progress
step kdistill eval runs/kd --data $D --teacher runs/teacher
step kdistill report runs/teacher runs/baseline runs/kd --data $D --out report.html
step kdistill export runs/kd --format onnx --out student.onnx
step kdistill predict student.onnx $D/val/cat/0000.jpg
(kdistill serve student.onnx --port 8765 > serve.log 2>&1 &) ; sleep 8
step curl -s -F file=@$D/val/dog/0000.jpg 'http://127.0.0.1:8765/predict?top_k=3'
pkill -f "kdistill serve student.onnx" || true
echo; cat serve.log | head -5
