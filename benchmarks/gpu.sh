#!/usr/bin/env bash
# The GPU check (issue 24, item 7): one prepared script for the first machine with a CUDA GPU. It runs the CUDA
# tests, then the kernel, detector, runtime and service benchmarks with GPU-sized, time-boxed arguments, and ends
# by printing every benchmark's summary line. Each step has its own time limit and the whole run stops starting
# steps past its budget, so it stays under 8 minutes on one GPU (the limits below sum to 460 s).
#
#   bash benchmarks/gpu.sh              # run (from any directory; logs in $GPU_LOG_DIR, default a temp folder)
#   bash benchmarks/gpu.sh --dry-run    # print what it would run, run nothing (tests/test_gpu_script.py)
#
# Where things run: the tests that take the `device` fixture (tests/conftest.py) get a "cuda" case when CUDA
# is present; `-k cuda` selects those (fused kernels against the torch reference on CUDA, detectors, proposals,
# the service). The benchmarks have no CUDA mode of their own yet, except where noted: the kernel, detector and
# runtime benchmarks time the CPU kernels and models at the machine's core count beside the GPU (ORT's
# execution provider is chosen by benchmarks/runtime.py), and the service benchmark's server gets
# DETECT_DEVICE=cuda, so its model runs on the GPU.
set -u -o pipefail

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BUDGET_S=${GPU_BUDGET_S:-470}
LOG_DIR=${GPU_LOG_DIR:-}
if [ "$DRY_RUN" -eq 0 ]; then
  LOG_DIR=${LOG_DIR:-$(mktemp -d)}
  mkdir -p "$LOG_DIR"
fi
START=$SECONDS
FAILED=()
SUMMARIES=()

# step NAME LIMIT_S SUMMARY_PATTERN COMMAND...: run COMMAND under `timeout LIMIT_S`, log to $LOG_DIR/NAME.log,
# keep the lines matching SUMMARY_PATTERN for the end.
step() {
  local name=$1 limit=$2 pattern=$3
  shift 3
  echo "== $name (limit ${limit}s): $*"
  if [ "$DRY_RUN" -eq 1 ]; then
    return 0
  fi
  if [ $((SECONDS - START + limit)) -gt "$BUDGET_S" ]; then
    echo "   skipped: would pass the ${BUDGET_S}s budget"
    FAILED+=("$name (skipped, budget)")
    return 0
  fi
  local log="$LOG_DIR/$name.log"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  tail -n 3 "$log" | sed 's/^/   /'
  if [ "$rc" -ne 0 ]; then
    FAILED+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))")
  fi
  while IFS= read -r line; do
    SUMMARIES+=("$name: $line")
  done < <(grep -E "$pattern" "$log" || true)
}

if [ "$DRY_RUN" -eq 0 ]; then
  "$PYTHON" -c "import torch, sys; ok = torch.cuda.is_available(); print('cuda', ok, torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 3)" \
    || { echo "no CUDA device: nothing to check here" >&2; exit 3; }
fi

# 1. The CUDA tests: every device-fixture test's cuda case, and the Triton kernels compiled for real.
step cuda-tests 120 '^[0-9]+ (passed|failed)|^no tests ran' \
  "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests/ops tests/proposals tests/detectors tests/api tests/test_transform.py

# 2. Shared kernels (NMS, IoU, decode) against torchvision.
step kernels 60 '^SUMMARY' "$PYTHON" benchmarks/kernels.py --repeats 5

# 3. Detectors: Faster R-CNN part at the full image size, one run.
step detectors 70 '^SUMMARY' "$PYTHON" benchmarks/detectors.py --only faster --batches 1,8 --repeats 3 --runs 1

# 4. Runtimes: ONNX Runtime (and the exported backends) against eager, both models, no mAP pass.
step runtime 100 '^runtime \(' "$PYTHON" benchmarks/runtime.py --repeats 5 --calibration-images 4 --skip-map

# 5. The service, its model on the GPU.
step service 50 '^API overhead|target' env DETECT_DEVICE=cuda "$PYTHON" benchmarks/service.py --requests 30

# 6. Training at scale (issue 25): runs once benchmarks/train_scale.py exists; its arguments are its owner's.
if [ -f benchmarks/train_scale.py ]; then
  step train-scale 60 '^SUMMARY' "$PYTHON" benchmarks/train_scale.py
else
  echo "== train-scale: benchmarks/train_scale.py not present, skipped"
fi

echo
echo "== summary lines (${SECONDS}s in all; logs in ${LOG_DIR:-<dry run>})"
for line in "${SUMMARIES[@]+"${SUMMARIES[@]}"}"; do
  echo "$line"
done
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "failed or skipped: ${FAILED[*]}"
  exit 1
fi
exit 0
