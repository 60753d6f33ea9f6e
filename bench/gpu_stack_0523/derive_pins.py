"""Derive the pins of the offline SGLang 0.5.23 stack from pip's own resolution.

Usage (on a machine with PyPI; writes the files beside this script):
    python3 bench/gpu_stack_0523/derive_pins.py [--report REPORT.json]

Without --report it first runs pip's resolver for `sglang==0.5.23` as a Python 3.12 manylinux
x86-64 target (`pip install --dry-run --ignore-installed --report`, metadata read through HTTP
range requests, so torch and the CUDA wheels are not downloaded) and keeps the report in a
temporary folder. From that closure it writes:

- pins.txt (route A, the host's torch 2.11): the closure minus what the GPU host already has
  (HOST_CUDA, and HOST_PACKAGES unless SGLang's tree pins another version with `==`) minus what
  the Llama serving path never imports (NOT_SERVED), and minus what only those dropped packages
  pulled in.
- pins-torch.txt (route B, torch 2.14.1 travels): torch, triton and torchvision at the closure's
  versions plus the CUDA libraries of ROUTE_B_CUDA.

Each pin line ends with who asked for the package, so a reader can see why it travels.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn

HERE = os.path.dirname(os.path.abspath(__file__))
SGLANG = "sglang==0.5.23"

# The platform tags of the target; manylinux_2_18 and _2_25 are where some CUDA wheels live.
PLATFORMS = ["manylinux2014", "manylinux2010", "manylinux1"] + [f"manylinux_2_{x}" for x in range(34, 4, -1)]

# On the host with torch 2.11.0+cu130 (torch, triton and the CUDA libraries torch pins, and the
# cuda-python pieces). Never shipped for route A.
HOST_CUDA_PREFIXES = ("nvidia-",)
HOST_CUDA_EXCEPT = {"nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-core",
                    "nvidia-cutlass-dsl-libs-cu12", "nvidia-cutlass-dsl-libs-cu13", "nvidia-cudnn-frontend",
                    "nvidia-mathdx"}
HOST_CUDA = {"torch", "triton", "cuda-toolkit", "cuda-bindings", "cuda-core", "cuda-pathfinder"}

# The host image's Python packages (the workplace's list, 2026-11-17) with the versions seen there
# where known (None: present, version not read). A package here travels only when a requirement in
# SGLang's tree pins it with `==` to a version the host is not known to have, except for
# KEEP_HOST_ABI.
HOST_PACKAGES = {
    "absl-py": None, "accelerate": "1.15.0", "aiofiles": None, "aiohappyeyeballs": None, "aiohttp": None,
    "aiosignal": None, "annotated-doc": None, "anyio": None, "attrs": None, "build": None, "certifi": None,
    "charset-normalizer": None, "click": None, "cloudpickle": None, "cmake": None, "contourpy": None,
    "cupy-cuda13x": "14.2.0", "cycler": None, "cython": None, "einops": None, "filelock": None,
    "fonttools": None, "frozenlist": None, "fsspec": None, "grpcio": None, "h11": None, "hf-xet": None,
    "httpcore": None, "httpx": None, "huggingface-hub": "1.33.0", "idna": None, "jinja2": None,
    "joblib": None, "kiwisolver": None, "llvmlite": None, "lxml": None, "markdown-it-py": None,
    "markupsafe": None, "matplotlib": None, "mdurl": None, "ml-dtypes": None, "mpmath": None,
    "msgpack": None, "multidict": None, "networkx": None, "ninja": None, "numba": None, "numpy": "2.5.2",
    "nvidia-ml-py": None, "packaging": None, "pandas": None, "pillow": None, "pip": None,
    "prometheus-client": None, "propcache": None, "protobuf": None, "psutil": None, "pyarrow": None,
    "pygments": None, "pyparsing": None, "pyproject-hooks": None, "python-dateutil": None,
    "pyyaml": None, "regex": None, "requests": None, "rich": None, "safetensors": "0.8.0", "scipy": None,
    "sentencepiece": "0.2.2", "setuptools": None, "shellingham": None, "six": None, "sympy": None,
    "tabulate": None, "tiktoken": "0.14.0", "timm": None, "tokenizers": "0.23.2", "torchaudio": "2.11.0",
    "torchvision": "0.26.0", "tqdm": None, "transformers": "5.17.0", "typer": None,
    "typing-extensions": None, "urllib3": None, "uvloop": None, "wheel": None, "xxhash": None,
    "yarl": None, "zipp": None,
}
# Pinned by SGLang but bound to the host's numpy 2.5.2: numba 0.65.1 wants numpy<2.5, and a
# numpy shadowing the host's would break what the host built against it. The host's stay.
KEEP_HOST_ABI = {"numba", "llvmlite", "numpy"}

# Required by sglang 0.5.23 but not imported on the path the plugin serves (Llama-type models
# with the flashinfer/triton backends on Hopper): every import of them in SGLang and FlashInfer
# sits behind an availability check, an ImportError handler or another model's code. The
# compiled ones among them are also built against torch 2.14.1.
NOT_SERVED = {
    "sgl-deep-ep": "DeepSeek expert parallel; built on torch 2.14.1",
    "sgl-deep-gemm": "FP8 GEMMs behind SGLANG_ENABLE_JIT_DEEPGEMM and an import probe",
    "sgl-flash-mla": "MLA attention (DeepSeek); built on torch 2.14.1",
    "flash-attn-4": "FA4 (Blackwell) backend",
    "quack-kernels": "CuTe-DSL kernels for FA4/Blackwell paths",
    "humming-kernels": "humming quantization",
    "nvidia-cutlass-dsl": "CuTe DSL; FlashInfer imports it only where available",
    "nvidia-mathdx": "cuBLASDx/cuFFTDx for DSL kernels",
    "nvshmem4py-cu13": "NVSHMEM (multi-GPU)",
    "deepseek-recipe": "DeepSeek models",
    "tml-renderers": "chat renderers of other model families",
    "torchcodec": "video/audio decoding (multimodal); built per torch version",
    "modelscope": "only with SGLANG_USE_MODELSCOPE",
    "nccl4py": "FlashInfer multi-GPU communication",
    "nccl-extensions": "FlashInfer multi-GPU communication",
    "cuda-tile": "FlashInfer cuTile kernels (newer GPUs)",
    "nvidia-cudnn-frontend": "FlashInfer cuDNN paths, imported only where available",
}

# Route B: the CUDA libraries whose version the host (torch 2.11's pins) lacks symbols of.
# libtorch_cuda.so of torch 2.14.1 imports 11 NCCL functions that NCCL 2.28.9 does not export
# (ncclCommGrow, ncclCommSuspend, ...); cuBLAS 13.1.0.3, cuSPARSELt 0.8.0 and cuDNN 9.19's
# libcudnn.so.9 export all it imports (nm -D against the wheels torch 2.11.0 pins).
ROUTE_B_CUDA = {"nvidia-nccl-cu13": "torch 2.14.1 needs NCCL functions absent from the host's 2.28.9"}
ROUTE_B_TORCH = {"torch", "triton", "torchvision"}


def resolve(report: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", report, "--only-binary=:all:", "--python-version", "3.12", "--implementation",
           "cp", "--platform", "any", "--target", os.path.join(os.path.dirname(report), "t"),
           "--use-feature=fast-deps", SGLANG]
    for p in PLATFORMS:
        cmd[-1:-1] = ["--platform", f"{p}_x86_64"]
    # This machine's pip configuration (local indexes, caps for its own CPU installs) is not the
    # target's: resolve against PyPI alone.
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull)
    env.pop("PIP_FIND_LINKS", None)
    subprocess.run(cmd, check=True, env=env)


def closure(report: str):
    """name -> (version, {parent: specifier}) for every package pip would install."""
    r = json.load(open(report))
    env = dict(r["environment"], python_version="3.12", python_full_version="3.12.3",
               implementation_version="3.12.3")
    items = {cn(i["metadata"]["name"]): i for i in r["install"]}
    parents = {n: {} for n in items}
    for n, i in items.items():
        extras = set(i.get("requested_extras") or []) or {""}
        for rs in i["metadata"].get("requires_dist") or []:
            q = Requirement(rs)
            if q.marker and not any(q.marker.evaluate(dict(env, extra=e)) for e in extras):
                continue
            if cn(q.name) in items:
                parents[cn(q.name)][n] = str(q.specifier)
    return {n: (i["metadata"]["version"], parents[n]) for n, i in items.items()}


def host_has(name: str, pins: dict) -> bool:
    """True when the host's copy serves: not pinned with == to another version than the host's."""
    if name in KEEP_HOST_ABI:
        return True
    exact = {s[2:] for s in pins.values() if s.startswith("==")}
    if not exact:
        return True
    known = HOST_PACKAGES[name]
    return known is not None and exact == {known}


def route_a(cl: dict) -> dict:
    def dropped(n):
        if n in HOST_CUDA or (n.startswith(HOST_CUDA_PREFIXES) and n not in HOST_CUDA_EXCEPT):
            return "host (CUDA)"
        if n in NOT_SERVED or n.startswith("nvidia-cutlass-dsl"):
            return "not served"
        if n in HOST_PACKAGES and host_has(n, cl[n][1]):
            return "host"
        return None
    # Keep what is still reachable from sglang once the dropped packages and their edges are gone.
    keep, stack = {}, ["sglang"]
    children = {n: [c for c, (_, ps) in cl.items() if n in ps] for n in cl}
    while stack:
        n = stack.pop()
        if n in keep or dropped(n):
            continue
        keep[n] = cl[n][0]
        stack.extend(children[n])
    return keep


def write(path: str, header: str, names: dict, cl: dict) -> None:
    with open(path, "w") as f:
        f.write(header)
        for n in sorted(names):
            ps = ", ".join(f"{p}{s}" for p, s in sorted(cl[n][1].items())) or "-"
            f.write(f"{n}=={names[n]}  # {ps}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", help="pip's --report JSON of the resolution (default: resolve now)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = a.report or os.path.join(tmp, "report.json")
        if not a.report:
            resolve(report)
        cl = closure(report)
    if cl["sglang"][0] != SGLANG.split("==")[1]:
        sys.exit(f"resolved sglang {cl['sglang'][0]}, expected {SGLANG}")
    a_pins = route_a(cl)
    write(os.path.join(HERE, "pins.txt"),
          f"# Route A: {SGLANG} for the GPU host's own torch 2.11 (written by derive_pins.py;\n"
          "# each line: the pin, then who requires it). Build: bench/gpu_stack_0523/build.sh.\n",
          a_pins, cl)
    b_pins = {n: cl[n][0] for n in ROUTE_B_TORCH | set(ROUTE_B_CUDA)}
    write(os.path.join(HERE, "pins-torch.txt"),
          f"# Route B: the torch that {SGLANG} pins, with what must travel with it (written by\n"
          "# derive_pins.py). An add-on site ahead of route A's on PYTHONPATH.\n",
          b_pins, cl)
    print(f"route A: {len(a_pins)} pins; route B add-on: {len(b_pins)} pins", file=sys.stderr)


if __name__ == "__main__":
    main()
