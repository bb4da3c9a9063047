#!/usr/bin/env bash
# Every GPU check and benchmark of the kernels in one device call (device time is scarce):
#   run(command="bash scripts/gpu_session.sh", timeout_s=600)
# Writes each step's log, summary.txt and kernels-<device>-<date>.json under $OUT (./out
# when unset); a failing step is recorded in summary.txt and the next one still runs.
# Then commit the JSON as benchmarks/results/ and record the figures in benchmarks/RESULTS.md.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
device=$($py -c "import torch; n = torch.cuda.get_device_name(); print(next((d for d in ('h200', 'h100', 'a100', 'l40s') if d in n.lower()), 'gpu'))")
json="$out/kernels-$device-$(date -u +%F).json"

step() {
  local name=$1 started=$SECONDS rc
  shift
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - started))s" | tee -a "$out/summary.txt"
  tail -n 8 "$out/$name.log"
}

$py -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$out/summary.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/summary.txt"
step pytest_gpu $py -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_rans.py tests/test_kernels_encode.py \
  tests/test_retrieval_kernel.py
step pq_topk $py -m kvstore.kernels.pq_topk_bench
step bench_kernels $py -m kvstore.cli bench kernels --json "$json"
step gpu_check $py scripts/gpu_check.py
step fuzz $py -c "import json
from kvstore.testing.fuzz import run_fuzz
r = run_fuzz(3000, device='cuda', time_budget_s=90)
print(json.dumps({k: r[k] for k in ('fuzz_cases', 'fuzz_unexpected_exceptions', 'examples', 'seconds')}, indent=1))"
