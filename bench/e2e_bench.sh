#!/usr/bin/env bash
# End-to-end batch-1 latency, kascade vs flashinfer: SGLang's bench_one_batch on the
# Llama-3.1-8B architecture with random weights (--load-format dummy), bf16.
# On a GPU host prepared with ../shared/gpu-stack (PYTHONPATH=/tmp/site).
# Usage: bench/e2e_bench.sh OUT_DIR "LENS" "BACKENDS"   e.g. $OUT "4096 32768" "flashinfer kascade"
# Backend names: flashinfer (decode CUDA graphs on, SGLang's default), flashinfer-nograph
# (--disable-cuda-graph), kascade (the stock command: the shipped profile SGLang resolves for this
# architecture, topk 0.10, k_min 128, decode CUDA graphs on with SGLang's default capture sizes),
# kascade-nograph (SGLANG_KASCADE_CUDA_GRAPH=0), kascade-bs1 (decode graphs for batch 1 only:
# --cuda-graph-max-bs-decode 1), kascade-dp (SGLANG_KASCADE_DENSE_PREFILL=1:
# prefill dense through FlashInfer), kascade-sp (SGLANG_KASCADE_DENSE_PREFILL_BELOW=0: sparse
# prefill at every length instead of dense below the default threshold), kascade-tcN (the decode
# Top-k's chunk fixed at N positions per program instead of topk_triton.topk_chunk's rule),
# kascade-nocollect (the decode Top-k's five-launch path instead of collect mode:
# topk_triton.COLLECT), kascade-collect (collect mode named explicitly: the same as kascade).
# Appends one JSON line per run to OUT_DIR/e2e.jsonl (bench_one_batch's result file) and keeps
# each run's log as OUT_DIR/<backend>-<len>.log. REPEATS=N (default 1) runs every backend N times
# per length, interleaved (A B A B ...: single runs on lent hosts spread by several percent), logs
# OUT_DIR/<backend>-<len>-r<i>.log. KASCADE_HOST_PROBE=1: each run also prints bench/host_probe.py's line.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?out dir}; lens=${2:-"4096 32768"}; backends=${3:-"flashinfer flashinfer-nograph kascade"}
outlen=${OUTPUT_LEN:-32}
repeats=${REPEATS:-1}
mkdir -p "$out"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target /tmp/site . >/dev/null
model=bench/assets/llama-3.1-8b-config
for len in $lens; do
 for rep in $(seq 1 "$repeats"); do
  tag=$len; [ "$repeats" -gt 1 ] && tag=$len-r$rep
  for b in $backends; do
    extra=(); envs=()
    case $b in
      flashinfer) attn=flashinfer ;;
      flashinfer-nograph) attn=flashinfer; extra+=(--disable-cuda-graph) ;;
      kascade) attn=kascade ;;
      kascade-nograph) attn=kascade; envs=(SGLANG_KASCADE_CUDA_GRAPH=0) ;;
      kascade-bs1) attn=kascade; extra+=(--cuda-graph-max-bs-decode 1) ;;
      kascade-dp) attn=kascade; envs=(SGLANG_KASCADE_DENSE_PREFILL=1) ;;
      kascade-sp) attn=kascade; envs=(SGLANG_KASCADE_DENSE_PREFILL_BELOW=0) ;;
      kascade-tc*) attn=kascade; envs=(SGLANG_KASCADE_TOPK_CHUNK=${b#kascade-tc}) ;;
      kascade-nocollect) attn=kascade; envs=(SGLANG_KASCADE_TOPK_COLLECT=0) ;;
      kascade-collect) attn=kascade; envs=(SGLANG_KASCADE_TOPK_COLLECT=1) ;;  # = kascade (the default)
      *) echo "unknown backend name: $b (see the list at the top of $0)" >&2; exit 2 ;;
    esac
    if [ "$len" -ge 65536 ]; then  # every backend alike: room for a 128K prefill's activations
      extra+=(--mem-fraction-static 0.55 --cuda-graph-backend-prefill=disabled)
    fi
    cmd=(env "${envs[@]}" python3 -P bench/one_batch.py --model-path "$model" --load-format dummy --dtype bfloat16
         --batch-size 1 --input-len "$len" --output-len "$outlen" --attention-backend "$attn"
         --run-name "$b" --result-filename "$out/e2e.jsonl" "${extra[@]}")
    echo "== $b L=$len (run $rep of $repeats): ${cmd[*]}" | tee -a "$out/commands.txt"
    start=$(date +%s)
    "${cmd[@]}" >"$out/$b-$tag.log" 2>&1
    echo "rc=$? wall=$(( $(date +%s) - start ))s" | tee -a "$out/commands.txt"
    grep -E "^(Prefill|Decode\.|Total|host-probe)" "$out/$b-$tag.log" | tail -4
  done
 done
done
