#!/usr/bin/env bash
# Regression teachers distilled into a small student (README, "Regression"), every command in order.
# Run it from this folder: `bash run.sh`; SEED=1 bash run.sh again trains the students with another
# seed and reuses the teachers and the stores (stage one skips complete teachers).
set -euo pipefail
SEED=${SEED:-0}
python friedman.py
[ -f runs/wide/student.pt ] || mtkd train --student teacher-wide.toml --data data/train.npz --val-data data/val.npz --epochs 200 --lr 0.003 --out runs/wide --quiet
[ -f runs/narrow/student.pt ] || mtkd train --student teacher-narrow.toml --data data/train.npz --val-data data/val.npz --epochs 200 --lr 0.01 --out runs/narrow --quiet
[ -f runs/quadratic/student.pt ] || mtkd train --student teacher-quadratic.toml --data data/train.npz --val-data data/val.npz --epochs 200 --lr 0.1 --out runs/quadratic --quiet
mtkd infer --teachers teachers.toml --data data/transfer.npz --out stores/transfer --quiet
mtkd infer --teachers teachers.toml --data data/test.npz --out stores/test --quiet
mtkd inspect stores/test
common=(--student student.toml --val-data data/val.npz --lr 0.01 --seed "$SEED" --quiet)
mtkd train "${common[@]}" --data data/train.npz --epochs 800 --out "runs/baseline-$SEED"
for teacher in wide narrow quadratic; do
  mtkd train "${common[@]}" --data data/transfer.npz --store stores/transfer --teachers "$teacher" --epochs 100 --out "runs/$teacher-only-$SEED"
done
for fusion in mean median; do
  mtkd train "${common[@]}" --data data/transfer.npz --store stores/transfer --fusion "$fusion" --epochs 100 --out "runs/$fusion-$SEED"
done
for run in runs/wide runs/narrow runs/quadratic "runs/baseline-$SEED" runs/{wide,narrow,quadratic}-only-"$SEED" "runs/mean-$SEED" "runs/median-$SEED"; do
  echo "$run: $(mtkd eval "$run" --data data/test.npz --json --quiet | tail -n 1)"
done
