#!/usr/bin/env bash
# Tensor parallelism on a multi-GPU host, in one command: the multi-GPU tests
# (tests/gpu/test_gpu_tp.py at --tp-size TP), then the served sweep (bench/e2e_served.py, kascade vs
# FlashInfer) on Llama-3.1-70B shapes (80 layers, 64 query heads, 8 KV heads; random weights,
# bf16) at --tp-size TP. Host prepared as for bench/gpu_run_tests.sh (PYTHONPATH=/tmp/site;
# docs/gpu-runs.md, "Tensor parallelism").
# Usage: bench/gpu_tp_run.sh OUT_DIR [TP] [PHASES]
#   TP      ranks (default 8; 70B bf16 weights need TP >= 4 on 80 GB cards)
#   PHASES  any of: tests, tests:EXPR (pytest -k EXPR), sync, served (default: "tests sync
#           served"); sync: the host time of the hot-swap agreement per batch boundary over TP
#           ranks (bench/tp_sync_cost.py)
# Environment: CELLS (default 1x131000,16x32768,16x4096), NEW_TOKENS (128), SERVED_BUDGET_S (480:
# the sweep's whole time, e2e_served.py --time-budget-s), TIMEOUT_S (540: the tests' limit,
# gpu_run_tests.sh). Writes OUT_DIR/tests-tpTP.log, sync-tpTP.log, served-tpTP.json (+ server
# logs, .log).
# Exit status: non-zero if a phase failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?out dir}; tp=${2:-8}; phases=${3:-"tests sync served"}
mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 KASCADE_TP=$tp
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target /tmp/site . >/dev/null
rc=0
for phase in $phases; do
  case $phase in
    tests|tests:*)
      args=(tests/gpu/test_gpu_tp.py)
      [[ $phase == tests:* ]] && args+=(-k "${phase#tests:}")
      bash bench/gpu_run_tests.sh "${args[@]}" 2>&1 | tee "$out/tests-tp$tp.log"
      rc=$((rc | PIPESTATUS[0]));;
    sync)
      python3 -P bench/tp_sync_cost.py --ranks "$tp" 2>&1 | tee "$out/sync-tp$tp.log"
      rc=$((rc | PIPESTATUS[0]));;
    served)
      python3 -P bench/e2e_served.py --out "$out/served-tp$tp.json" \
        --model bench/assets/llama-3.1-70b-config \
        --server-arg=--tp-size --server-arg="$tp" \
        --server-arg=--tokenizer-path --server-arg=bench/assets/llama-3.1-8b-config \
        --cells "${CELLS:-1x131000,16x32768,16x4096}" --new-tokens "${NEW_TOKENS:-128}" \
        --time-budget-s "${SERVED_BUDGET_S:-480}" 2>&1 | tee "$out/served-tp$tp.log"
      rc=$((rc | PIPESTATUS[0]));;
    *) echo "unknown phase $phase (tests, tests:EXPR, sync, served)" >&2; rc=2;;
  esac
done
exit $rc
