#!/usr/bin/env bash
# Feature (hint) distillation on MNIST-1D: a 64-channel CNN teacher's pooled features into an
# 8-channel student, logits only against logits + features. Run from this folder; SEED=1 ./run.sh
# again reuses the teacher and the store (stage one skips a complete teacher).
set -euo pipefail
EPOCHS=${EPOCHS:-15}
SEED=${SEED:-0}
[ -f runs/teacher/student.pt ] || mtkd train --student teacher.toml --data mnist1d:train --out runs/teacher --epochs 20 --quiet
mtkd infer --teachers teachers.toml --data mnist1d:train --out store.zarr --quiet
mtkd inspect store.zarr
common=(--student student.toml --data mnist1d:train --store store.zarr --temperature 2 --alpha 0.5 --epochs "$EPOCHS" --seed "$SEED" --quiet)
mtkd train "${common[@]}" --out "runs/logits-$SEED"
mtkd train "${common[@]}" --out "runs/features-$SEED" --feature 10=cnn:10 --feature-loss cosine --feature-weight 1
for run in runs/teacher "runs/logits-$SEED" "runs/features-$SEED"; do
  echo "$run: $(mtkd eval "$run" --data mnist1d:test --json --quiet | tail -n 1)"
done
