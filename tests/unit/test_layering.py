"""The package's layering: the serving path never imports the offline tools (calibrate/, eval/),
and the offline tools do not import each other in a cycle (they share corpus.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "sglang_kascade"


def test_serving_path_never_imports_the_offline_tools():
    code = ("import sys; import sglang_kascade.plugin, sglang_kascade.backend, "
            "sglang_kascade.sglang_adapter, sglang_kascade.device_path, sglang_kascade.control; "
            "print(sorted(m for m in sys.modules if m.startswith(('sglang_kascade.calibrate', "
            "'sglang_kascade.eval'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PKG.parent, check=True).stdout.strip().splitlines()[-1]
    assert out == "[]"


def _imports(folder: str) -> set:
    """Package-relative modules imported anywhere in sglang_kascade/<folder> (any depth)."""
    found = set()
    for path in (PKG / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("sglang_kascade."):
                found.add(node.module.split(".")[1])
    return found


def test_eval_does_not_import_calibrate():
    assert "calibrate" not in _imports("eval")
    assert "corpus" in _imports("eval") and "corpus" in _imports("calibrate")


def test_the_sglang_adapter_imports_only_config_and_profile():
    """Start-up runs plugin -> adapter (SGLang internals) -> resolve -> backend: the adapter's hooks
    reach the sidecar launcher and the graph editor through PackageHooks, set by the plugin."""
    tree = ast.parse((PKG / "sglang_adapter.py").read_text())
    ours = {node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1}
    ours |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.level == 1 and node.module is None for alias in node.names}
    assert ours <= {"config", "profile"}, ours
