#!/usr/bin/env bash
# Set up (if needed), then run the whole test suite: unit tests, the method against its
# reference, and end-to-end tests that start real SGLang servers on the CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not server"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m sglang_kascade.embedded_model >/dev/null  # convert the embedded model once
exec python -m pytest -q -p no:cacheprovider "$@"
