#!/usr/bin/env bash
# Set up (if needed), then serve the embedded SmolLM2-135M-Instruct with the stock SGLang launcher
# and --attention-backend kascade, send one chat request, print the answer, and keep serving.
# Extra arguments go to the launcher, e.g. `bash scripts/serve.sh --kascade-topk 0.2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
MODEL=$(python -m sglang_kascade.embedded_model)
PORT=${PORT:-30000}
export SGLANG_USE_CPU_ENGINE=1  # SGLang's CPU engine (no vllm/CUDA imports)
python -m sglang.launch_server --model-path "$MODEL" --device cpu \
  --attention-backend kascade --max-total-tokens 32768 \
  --host 127.0.0.1 --port "$PORT" "$@" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 200); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server exited"; exit 1; }
  sleep 3
done
echo; echo "== chat request to http://127.0.0.1:$PORT/v1/chat/completions"
curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' -d '{
  "model": "default", "temperature": 0, "max_tokens": 64,
  "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
}' | python -c 'import json,sys; r=json.load(sys.stdin); print("answer:", r["choices"][0]["message"]["content"])'
echo "== serving on http://127.0.0.1:$PORT (Ctrl-C to stop)"
if [ "${KASCADE_SERVE_ONCE:-0}" = 1 ]; then exit 0; fi
wait $SERVER
