#!/usr/bin/env bash
# GPU check, run from the repository root on a machine with a CUDA device (no network needed):
# builds fullvq_rt with its CUDA kernels, runs the GPU tests and the GPU lookup benchmark, then
# prints a summary. Every step runs even if an earlier one failed; exits non-zero if any failed.
# Logs and results go to ${OUT:-/tmp/device_out}. Budget: under 8 minutes on an H100.
set -euo pipefail

OUT="${OUT:-/tmp/device_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_check.log") 2>&1

STEPS=()
declare -A STATUS

# step NAME TIMEOUT_S COMMAND...: runs COMMAND under a time limit and records its status.
step() {
    local name=$1 limit=$2 rc=0
    shift 2
    echo "=== $name ==="
    timeout "$limit" "$@" || rc=$?
    STEPS+=("$name")
    if [[ $rc -eq 0 ]]; then STATUS[$name]=ok; else STATUS[$name]="FAILED (exit $rc)"; fi
}

# Time limits add up to under 8 minutes; pipelines fail when any part fails.
step nvidia-smi 15 bash -o pipefail -c "nvidia-smi | tee '$OUT/nvidia-smi.txt'"
step build 180 bash -o pipefail -c "pip install --no-build-isolation -e . 2>&1 | tee '$OUT/build.log' | tail -n 15"
step cuda_available 30 python -c "import fullvq_rt; assert fullvq_rt.cuda_available(), 'fullvq_rt.cuda_available() is False'"
step gpu_tests 120 bash -o pipefail -c "python -m pytest -m gpu -q tests 2>&1 | tee '$OUT/pytest_gpu.log'"
step benchmark 120 bash -o pipefail -c "python bench/lookup_gpu.py --json '$OUT/lookup_gpu.json' | tee '$OUT/lookup_gpu.md'"

echo
echo "=== summary ==="
failed=0
for name in "${STEPS[@]}"; do
    printf '%-16s %s\n' "$name" "${STATUS[$name]}"
    [[ ${STATUS[$name]} == ok ]] || failed=1
done
if [[ -f $OUT/pytest_gpu.log ]]; then
    counts=$(grep -E '(passed|failed|errors?|skipped|no tests ran).* in [0-9.]+s' "$OUT/pytest_gpu.log" | tail -n 1 || true)
    echo "gpu tests: ${counts:-no pytest summary line}"
fi
if [[ -s $OUT/lookup_gpu.md ]]; then
    echo
    cat "$OUT/lookup_gpu.md"
fi
exit $failed
