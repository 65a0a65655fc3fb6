#!/usr/bin/env bash
# The one script a session with a lent GPU runs: mtkd's CUDA checks and the kernel benchmark, in
# about 9 minutes, each step under its own timeout, every step's result in the last lines printed.
#
#   1. here, where PyPI is reachable: the wheels the GPU machine lacks (zarr and its codecs for
#      stage two, mnist1d for its data, liger-kernel for the benchmark's peer), into .whl/:
#          bash bench/gpu_check.sh wheels
#   2. on the GPU machine (the device tool's `run`, carry [".whl"], timeout_s 600):
#          bash bench/gpu_check.sh
#      It runs, from the repository root:
#        a. pytest -m gpu tests/kernels                       the kernels' CUDA tests   (TESTS_S)
#        b. python bench/kernel.py --quick --json ...         headline shapes, < 6 min  (BENCH_S)
#        c. mtkd infer + mtkd train --device cuda             stage one, then one epoch of stage
#           (two small teachers, 2000 MNIST-1D rows)          two through the kernel on CUDA, if
#                                                             zarr and mnist1d import   (STAGE2_S)
#      Results go to $OUT (the device tool's folder; bench/results/ without one):
#      kernel-<gpu>-<date>.json (written row by row: a step killed by its timeout keeps its rows),
#      and each step's log. Copy the JSON to bench/results/ and commit it, the GPU named in its
#      name; quote numbers only from it.
#   The exit status is the number of failed steps (0: all passed).
#   3. stage one's per-position work against a Llama-shaped forward (V = 128256), on its own call:
#          bash bench/gpu_check.sh stage1        # bench/stage_one_gpu.py, ~2 min, stage-one-<gpu>-<date>.json
#
# The machine has torch and triton (other versions than here: the JSON records them), pytest,
# hypothesis, typer and rich, but neither zarr nor mnist1d nor liger-kernel. Nothing is installed
# into its environment: the wheels go to /tmp/site, mtkd is imported from this tree through
# /tmp/mtkd-root (the links /work/wt/new.sh makes for a worktree).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = wheels ]; then
    # cp312 manylinux wheels, the GPU machine's Python; versions as in the project's venv.
    set -e
    mkdir -p .whl
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
        mnist1d==0.0.2.post1 liger-kernel==0.8.5
    du -sh .whl
    exit 0
fi

TESTS_S=${TESTS_S:-150}
BENCH_S=${BENCH_S:-330}
STAGE2_S=${STAGE2_S:-90}
RESULTS=${OUT:-$REPO/bench/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "gpu_check: installing .whl/ failed"
fi
mkdir -p /tmp/mtkd-root/mtkd
ln -sfn "$REPO/kernels" /tmp/mtkd-root/mtkd/kernels
ln -sfn "$REPO/pipeline" /tmp/mtkd-root/mtkd/pipeline
export PYTHONPATH=/tmp/mtkd-root:/tmp/site${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'triton', triton.__version__, torch.cuda.get_device_name())"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' \
      | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/-$//')
json=$RESULTS/kernel-${gpu:-gpu}-$(date -u +%F).json

declare -a summary
failed=0
step() {  # step NAME SECONDS COMMAND...: run it under a timeout, log it, remember how it ended
    local name=$1 seconds=$2 start=$SECONDS
    shift 2
    echo "== $name (timeout ${seconds}s): $*"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    local how="ok"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && how="TIMED OUT"
    [ "$rc" -ne 0 ] && [ "$how" = ok ] && how="FAILED"
    [ "$rc" -ne 0 ] && failed=$((failed + 1))
    summary+=("$(printf '%-8s %-9s rc=%-3s %4ss' "$name" "$how" "$rc" $((SECONDS - start)))")
}

if [ "${1:-}" = stage1 ]; then  # on its own (the default steps fill the 10-minute call already)
    step stage1 "${STAGE1_S:-240}" "$PYTHON" bench/stage_one_gpu.py --json "$RESULTS/stage-one-${gpu:-gpu}-$(date -u +%F).json"
    printf '%s\n' "${summary[@]}"
    exit "$failed"
fi
step tests "$TESTS_S" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/kernels
step bench "$BENCH_S" "$PYTHON" bench/kernel.py --quick --json "$json"
if "$PYTHON" -c "import zarr, mnist1d" 2>/dev/null; then
    # Two untrained teachers (their logits are what matters here, not their accuracy) and a small
    # MLP student: stage one, then one epoch of stage two through the dense kernel on CUDA.
    work=/tmp/mtkd-stage-two
    rm -rf "$work" && mkdir -p "$work"
    cat >"$work/teachers.toml" <<'EOT'
[[teachers]]
name = "cnn"
factory = "mtkd.pipeline.models:cnn1d"
kwargs = { channels = 16 }

[[teachers]]
name = "mlp"
factory = "mtkd.pipeline.models:mlp"
kwargs = { in_features = 40, hidden = [64], num_classes = 10 }
EOT
    cat >"$work/student.toml" <<'EOT'
[student]
name = "mlp"
factory = "mtkd.pipeline.models:mlp"
kwargs = { in_features = 40, hidden = [32], num_classes = 10 }
EOT
    data="mnist1d:train?n=2000"
    step stage2 "$STAGE2_S" bash -c "set -e
        $PYTHON -m mtkd.pipeline.cli infer --teachers $work/teachers.toml --data '$data' \
            --out $work/store --device cuda --quiet
        $PYTHON -m mtkd.pipeline.cli train --student $work/student.toml --data '$data' \
            --store $work/store --epochs 1 --out $work/run --device cuda --quiet --json"
else
    summary+=("stage2   SKIPPED   (no zarr or mnist1d: bash bench/gpu_check.sh wheels, carry .whl)")
fi

echo "== summary ($json)"
printf '%s\n' "${summary[@]}"
exit "$failed"
