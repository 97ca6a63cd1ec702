#!/usr/bin/env bash
# The recipe sweep of bench.quality (issue #15) on one rented GPU box in one call: 16 cores, one
# H100/H200, the packages importable by $PY (e.g. the carried wheels on PYTHONPATH).
#
#   bench/gpu_quality.sh            # the sweep: 8 trainings at once, ~7 min of wall time
#   bench/gpu_quality.sh --dry      # the same path on this machine's CPU in quick mode (a few minutes)
#
# Results (quality_sweep.{json,md}, the log) go to $OUT if set, else bench/results/. The model's
# recipes are NOT changed on the GPU box; record the winners afterwards, where the repository is:
#   python -m bench.quality --recipes-from bench/results/quality_sweep.json
#
# Wall-time estimate (the sweep prints its own before starting and keeps to --budget-min): the
# trainer ran the demo model at 0.037 s/step on an H200 (bench/results/train_e2e_cuda.md), so one
# 600-step cell is ~22 s of steps plus ~15 s to start; the model is too small to fill the GPU, so
# about 3 trainings run at full speed at once and 8 at once each run ~2.7x slower (assumed, not
# measured; the log's per-cell walls will tell). All 54 cells of the default variants would take
# about 12 min; --budget-min 7 keeps the 28 most useful (every method's middle rate at the
# paper's blocks first) and stops starting cells when the measured pace says they would not end
# in time. Extra arguments pass through (e.g. --methods lora,adapter to sweep fewer methods fully).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
if [[ "${1:-}" == "--dry" ]]; then
    shift
    args=(--quick --device cpu --jobs 2 --methods "${DRY_METHODS:-prefix,full}" --budget-min 15)
else
    args=(--device cuda --jobs "${JOBS:-8}" --budget-min "${BUDGET_MIN:-7}")
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
fi
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/restuning-sweep.XXXXXX")}
echo "work folder: $WORK; results: $OUT_DIR; $(nproc) cores"
start=$(date +%s)
status=0
$PY -m bench.quality --sweep "${args[@]}" --work "$WORK" --out "$OUT_DIR" "$@" 2>&1 \
    | grep --line-buffered -v -e "should be kept in float32" -e "requires torchvision" -e "kernels-community" \
    | tee "$OUT_DIR/quality_sweep.log" || status=$?
echo "wall: $(( $(date +%s) - start )) s, exit $status" | tee -a "$OUT_DIR/quality_sweep.log"
# Per-cell logs, small: the trainer's output of each cell, for a cell that failed or was slow.
tar -czf "$OUT_DIR/quality_sweep_logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls -d */log.txt */result.json 2>/dev/null) 2>/dev/null || true
exit "$status"
