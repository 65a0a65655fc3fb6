#!/usr/bin/env bash
# Every command of the bring-your-own-data example, in order (README, "Bring your own data").
# Run it from this folder: `bash run.sh`.
set -euo pipefail
python shapes.py
mtkd train --student teacher-cnn.toml --data data/train.npz --val-data data/val.npz --epochs 30 --lr 0.003 --out runs/cnn
mtkd train --student teacher-pooled.toml --data data/train.npz --val-data data/val.npz --epochs 30 --lr 0.003 --out runs/pooled
mtkd infer --teachers teachers.toml --data shapes:transfer --out stores/transfer
mtkd inspect stores/transfer
mtkd train --student student.toml --data shapes:transfer --store stores/transfer --val-data data/val.npz --epochs 30 --lr 0.003 --out runs/student
mtkd train --student student.toml --data data/train.npz --val-data data/val.npz --epochs 30 --lr 0.003 --out runs/baseline
mtkd eval runs/cnn --data data/test.npz
mtkd eval runs/pooled --data data/test.npz
mtkd eval runs/student --data data/test.npz
mtkd eval runs/baseline --data data/test.npz
