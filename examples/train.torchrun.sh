#!/usr/bin/env bash
# bash examples/train.torchrun.sh            (NPROC=8 on an 8-GPU node)
#
# Stage two under torchrun, unchanged: DDP with NCCL on GPUs, gloo on CPUs. Every rank reads its own
# rows of the store; rank 0 writes the run directory. --batch-size is per rank.
set -euo pipefail
torchrun --standalone --nproc_per_node "${NPROC:-2}" -m mtkd.pipeline.cli train \
    --student examples/student.toml --data "${DATA:-mnist1d:train}" --store "${STORE:-stores/train}" \
    --temperature 2 --lr 0.01 --epochs "${EPOCHS:-30}" --out "${RUN:-runs/student-ddp}" --quiet --json
