"""bench/gpu_stack_0523: the rules that turn pip's resolution of SGLang 0.5.23 into the pins of the
offline GPU stack, and the committed pin files that follow them. CPU only, no network."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "bench" / "gpu_stack_0523"
sys.path.insert(0, str(STACK))
import derive_pins  # noqa: E402


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (STACK / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            n, v = line.split("==")
            out[n] = v
    return out


def report(tmp_path: Path, packages: dict[str, tuple[str, list[str]]]) -> str:
    """A pip --report with the given name -> (version, requires_dist) entries."""
    doc = {"environment": {"implementation_name": "cpython", "os_name": "posix",
                           "platform_machine": "x86_64", "platform_system": "Linux",
                           "sys_platform": "linux", "platform_python_implementation": "CPython",
                           "platform_release": "", "platform_version": ""},
           "install": [{"metadata": {"name": n, "version": v, "requires_dist": r}}
                       for n, (v, r) in packages.items()]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_route_a_drops_host_cuda_unserved_and_what_only_they_pulled(tmp_path):
    cl = derive_pins.closure(report(tmp_path, {
        "sglang": ("0.5.23", ["torch==2.14.1", "sgl-deep-ep==0.1.2", "transformers==5.19.0",
                              "tokenizers==0.23.2", "numba==0.65.1", "fastapi",
                              'torchcodec==0.17.0; sys_platform == "darwin"']),
        "torch": ("2.14.1", ["nvidia-nccl-cu13==2.30.7", "triton~=3.8.0"]),
        "nvidia-nccl-cu13": ("2.30.7", []), "triton": ("3.8.0", []),
        "sgl-deep-ep": ("0.1.2", ["cython>=3", "nvshmem-only-dep"]),
        "nvshmem-only-dep": ("1.0", []), "cython": ("3.3.2", []),
        "transformers": ("5.19.0", ["tokenizers<0.24,>=0.23.1"]),
        "tokenizers": ("0.23.2", []), "numba": ("0.65.1", ["numpy<2.5"]), "numpy": ("2.3.5", []),
        "fastapi": ("0.165.0", []), "torchcodec": ("0.17.0", []),
    }))
    kept = derive_pins.route_a(cl)
    # Pinned to a version the host lacks (transformers 5.17.0 there) or not on the host: travels.
    assert kept == {"sglang": "0.5.23", "transformers": "5.19.0", "fastapi": "0.165.0"}
    # A marker that does not hold for the target adds no edge.
    assert cl["torchcodec"][1] == {}


def test_committed_route_a_pins_keep_the_host_torch():
    a = pins("pins.txt")
    assert a["sglang"] == "0.5.23" and a["flashinfer-python"] == "0.7.2"
    assert a["tilelang"] == "0.1.12" and a["sglang-kernel"] == "0.4.10"
    host = [n for n in a if n in derive_pins.HOST_CUDA or n.startswith("nvidia-")
            and n not in derive_pins.HOST_CUDA_EXCEPT]
    assert not host, f"route A ships what the host has: {host}"
    assert not set(a) & set(derive_pins.NOT_SERVED)


def test_committed_addons_hold_only_their_packages():
    assert pins("pins-torch.txt") == {"torch": "2.14.1", "triton": "3.8.0", "torchvision": "0.29.2",
                                      "nvidia-nccl-cu13": "2.30.7"}
    assert pins("pins-k046.txt") == {"sglang-kernel": "0.4.6"}


@pytest.mark.parametrize("script", ["check.py", "derive_pins.py"])
def test_scripts_import_without_torch(script):
    """The host check imports its heavy modules inside its steps, so it reports, never crashes."""
    src = (STACK / script).read_text()
    compile(src, script, "exec")
    top = [ln for ln in src.splitlines() if ln.startswith(("import ", "from "))]
    assert not [ln for ln in top if any(m in ln for m in ("torch", "sglang", "flashinfer"))]
