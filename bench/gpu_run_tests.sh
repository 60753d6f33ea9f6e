#!/usr/bin/env bash
# On a GPU host prepared with the offline stack (PYTHONPATH=/tmp/site): install this package next
# to it (for its entry point) and run the GPU-marked tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target /tmp/site . >/dev/null
# -P: keep the checkout off sys.path, so the installed package (with kernels/ mapped in) is used.
# Stopped with SIGINT after TIMEOUT_S (default 540, inside a device call's 600 s), so pytest still
# prints its summary and the failures it has seen (a SIGKILL at the call's limit prints nothing).
# -rfE: each failure's one-line reason in the summary.
exec timeout -s INT "${TIMEOUT_S:-540}" python3 -P -m pytest -q -p no:cacheprovider -rfE -m gpu "$@"
