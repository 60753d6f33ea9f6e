#!/usr/bin/env bash
# On a GPU host prepared with the offline stack (PYTHONPATH=/tmp/site): install this package next
# to it (for its entry point) and run the GPU-marked tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --no-index --target /tmp/site . >/dev/null
# -P: keep the checkout off sys.path, so the installed package (with kernels/ mapped in) is used.
python3 -P -m pytest -q -p no:cacheprovider -m gpu "$@"
