"""Kascade sparse attention as an SGLang attention backend (``--attention-backend kascade``)."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# The repository's top-level kernels/, server/ and profiles/ folders are installed as
# sglang_kascade.kernels/.server/.profiles (pyproject.toml, package-dir). When this package is
# imported straight from a source checkout (e.g. `python -m sglang.launch_server` started in the
# repository root puts it first on sys.path), resolve those subpackages from the checkout too.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "kernels" / "tiles.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821  (module __path__ of a package)
