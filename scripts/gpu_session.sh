#!/usr/bin/env bash
# Every GPU check and benchmark of the kernels in one device call (device time is scarce):
#   run(command="KVSTORE_COMMIT=<git rev-parse --short HEAD here> bash scripts/gpu_session.sh", timeout_s=600)
# (commit first and read the hash before writing the call; KVSTORE_COMMIT names the commit in the
# JSON and the summary: the device's copy of the tree may carry a .git whose HEAD is stale)
# Writes each step's log, summary.txt and kernels-<device>-<date>.json under $OUT (./out
# when unset); a failing step is recorded in summary.txt and the next one still runs.
# The benchmark runs first (its JSON is what the issue asks for, and it checks the kernels'
# output itself); every step has a time cap, and all of them end before the call's 600 s
# (BUDGET_S, 560 by default), so one hang costs its step and not the whole call.
# Then commit the JSON as benchmarks/results/ and record the figures in benchmarks/RESULTS.md.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
device=$($py -c "import torch; n = torch.cuda.get_device_name(); print(next((d for d in ('h200', 'h100', 'a100', 'l40s') if d in n.lower()), 'gpu'))")
json="$out/kernels-$device-$(date -u +%F).json"

budget=${BUDGET_S:-560}

step() {  # step NAME CAP_S COMMAND...: runs COMMAND for at most CAP_S seconds, or what is left
  local name=$1 cap=$2 started=$SECONDS rc left
  shift 2
  left=$((budget - SECONDS))
  if [ "$left" -lt 10 ]; then
    echo "$name skipped: ${left}s left of ${budget}s" | tee -a "$out/summary.txt"
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (at most ${cap}s): $*"
  timeout -k 5 "$cap" "$@" >"$out/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && rc="124 (timed out after ${cap}s)"
  echo "$name rc=$rc $((SECONDS - started))s" | tee -a "$out/summary.txt"
  tail -n 8 "$out/$name.log"
}

$py -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$out/summary.txt"
echo "commit ${KVSTORE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" | tee -a "$out/summary.txt"
step bench_kernels 300 $py -m kvstore.cli bench kernels --json "$json"
step pytest_gpu 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_rans.py tests/test_kernels_encode.py \
  tests/test_retrieval_kernel.py tests/test_cuda_streams.py
step gpu_check 120 $py scripts/gpu_check.py
step pq_topk 60 $py -m benchmarks.pq_topk
step fuzz 90 $py -c "import json
from tests.tools.fuzz import run_fuzz
r = run_fuzz(3000, device='cuda', time_budget_s=60, case_timeout_s=30)  # a case may compile kernels (~1 s each)
print(json.dumps({k: r[k] for k in ('fuzz_cases', 'fuzz_unexpected_exceptions', 'examples', 'seconds')}, indent=1))"
