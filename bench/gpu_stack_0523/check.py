"""On the GPU host, once a stack is unpacked: what of SGLang 0.5.23 loads and runs there, in one call.

Usage (repository root on the host):
    PYTHONPATH=[ADDON_SITE:]SITE python3 -P bench/gpu_stack_0523/check.py [--flashinfer-jit]

Prints one line per step, `OK` or `FAIL` with the error's first line (the loader's message names
the missing symbol when a compiled library was built against another torch), then a verdict line
starting `VERDICT`. Exit status 0 only when torch sees the GPU, sgl_kernel's compiled ops load
and give torch's results, and FlashInfer, TileLang, SGLang's serving modules and the plugin import.
--flashinfer-jit also compiles and runs one FlashInfer kernel (about a minute on a fresh host).
Steps never stop the run: every failure is listed.
"""
import argparse
import ctypes
import importlib
import importlib.metadata as md
import importlib.util
import os
import re
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FAILED: list[str] = []

# SGLang 0.5.23's modules on the path the plugin serves (launch, scheduler, model runner, Llama,
# the dense backends the plugin delegates to, the CUDA-graph runners its hooks wrap, the one-batch
# benchmark, sglang.bench_one_batch up to 0.5.17).
SGLANG_MODULES = [
    "sglang.srt.server_args",
    "sglang.srt.entrypoints.http_server",
    "sglang.srt.managers.scheduler",
    "sglang.srt.model_executor.model_runner",
    "sglang.srt.model_executor.runner.decode_cuda_graph_runner",
    "sglang.srt.model_executor.runner_backend.full_cuda_graph_backend",
    "sglang.srt.models.llama",
    "sglang.srt.layers.attention.flashinfer_backend",
    "sglang.srt.layers.attention.triton_backend",
    "sglang.benchmark.one_batch",
]


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return demangle(f"{type(e).__name__}: {lines[0] if lines else ''}")[:600]


def demangle(text: str) -> str:
    """Append the demangled C++ name to a loader message that carries a mangled one."""
    m = re.search(r"(_Z[\w]+)", text)
    if not m:
        return text
    try:
        name = subprocess.run(["c++filt", m.group(1)], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return text
    return f"{text}  [{name}]" if name and name != m.group(1) else text


def step(name: str, fn, *, required: bool = True):
    t0 = time.perf_counter()
    try:
        out = fn()
    except BaseException as e:  # noqa: BLE001 - a step reports whatever stopped it
        print(f"FAIL {name}: {first_line(e)}", flush=True)
        tb = traceback.format_exc().strip().splitlines()
        for line in tb[-6:-1]:
            print(f"     {line}", flush=True)
        if required:
            FAILED.append(f"{name}: {first_line(e)}")
        return None
    extra = f" {out}" if isinstance(out, str) and out else ""
    print(f"OK   {name} ({time.perf_counter() - t0:.1f} s){extra}", flush=True)
    return out


def origin(mod) -> str:
    return os.path.dirname(getattr(mod, "__file__", "") or "?")


def dist_version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"


def check_torch():
    import torch
    import triton
    assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
    dev = torch.cuda.get_device_name()
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) from {origin(torch)}; "
            f"triton {triton.__version__} from {origin(triton)}; {dev}; "
            f"cuda-bindings {dist_version('cuda-bindings')}, cuda-python {dist_version('cuda-python')}")


def check_torch_libs():
    import torch
    torch.zeros(1, device="cuda")
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    libs = set()
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split()[-1]
            if re.search(r"lib(nccl|cudnn|cublas|cublasLt|cudart|torch_cuda)\.so", p):
                libs.add(p)
    return f"NCCL {nccl}; loaded: {', '.join(sorted(libs))}"


def check_cudnn():
    import torch
    t = torch.zeros(1, device="cuda")
    # is_acceptable runs torch's runtime-vs-compile cuDNN version check (raises on a mismatch).
    ok = torch.backends.cudnn.is_acceptable(t)
    return f"cuDNN {torch.backends.cudnn.version()} acceptable={ok}"


def check_sgl_kernel_dlopen():
    """Load sgl_kernel's Hopper ops the way Python does (RTLD_NOW): the loader names what is missing."""
    import torch  # noqa: F401 - libtorch first, as sgl_kernel's own import does
    spec = importlib.util.find_spec("sgl_kernel")
    assert spec and spec.submodule_search_locations, "sgl_kernel not on the path"
    pkg = list(spec.submodule_search_locations)[0]
    path = os.path.join(pkg, "sm90", "common_ops.abi3.so")
    ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    return f"{path} (sglang-kernel {dist_version('sglang-kernel')})"


def rmsnorm_ref(x, w, eps: float):
    """torch's RMSNorm of ``x`` [n, d] with weight ``w`` [d], in float32, back in x's dtype."""
    import torch
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def check_sgl_kernel_ops():
    import sgl_kernel
    import torch
    torch.manual_seed(0)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    eps = 1e-6
    errs = {}
    errs["rmsnorm"] = (sgl_kernel.rmsnorm(x, w, eps) - rmsnorm_ref(x, w, eps)).abs().max().item()
    r = torch.randn_like(x)
    xa, ra = x.clone(), r.clone()
    sgl_kernel.fused_add_rmsnorm(xa, ra, w, eps)
    errs["fused_add_rmsnorm"] = (xa - rmsnorm_ref(x + r, w, eps)).abs().max().item()
    g = torch.randn(64, 2 * 4096, device="cuda", dtype=torch.bfloat16)
    ref = (torch.nn.functional.silu(g[:, :4096].float()) * g[:, 4096:].float()).to(g.dtype)
    errs["silu_and_mul"] = (sgl_kernel.silu_and_mul(g) - ref).abs().max().item()
    torch.cuda.synchronize()
    bad = {k: v for k, v in errs.items() if not v < 0.1}
    assert not bad, f"results differ from torch's: {bad}"
    return (f"sglang-kernel {sgl_kernel.__version__} from {origin(sgl_kernel)}; max |err| "
            + ", ".join(f"{k} {v:.3g}" for k, v in errs.items()))


def check_flashinfer():
    import flashinfer
    return f"flashinfer {flashinfer.__version__} from {origin(flashinfer)}"


def check_flashinfer_jit():
    import flashinfer
    import torch
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    y = flashinfer.norm.rmsnorm(x, w, 1e-6)
    err = (y - rmsnorm_ref(x, w, 1e-6)).abs().max().item()
    assert err < 0.1, f"flashinfer rmsnorm differs from torch's: {err}"
    return f"rmsnorm compiled and ran, max |err| {err:.3g}"


def check_tilelang():
    import tilelang
    return f"tilelang {tilelang.__version__} from {origin(tilelang)}"


def check_sglang():
    import sglang
    return f"sglang {sglang.__version__} from {origin(sglang)}"


def check_module(name: str):
    importlib.import_module(name)
    return ""


def check_plugin():
    """The checkout's plugin registers its backend and hooks into this SGLang, as a server does."""
    # Appended, not prepended: the checkout's top-level kernels/ must not shadow PyPI's `kernels`.
    sys.path.append(ROOT)
    import sglang_kascade
    from sglang_kascade import backend, plugin, sglang_adapter  # noqa: F401 - backend: imports only
    plugin.register()
    return f"sglang_kascade from {origin(sglang_kascade)}; supports {sglang_adapter.SUPPORTED_SGLANG}"


def check_requirements():
    """Requirements of the packages on PYTHONPATH that what is importable does not meet."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as cn
    sys.path.insert(0, HERE)
    from derive_pins import NOT_SERVED
    roots = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    unmet = []
    for d in md.distributions():
        loc = str(getattr(d, "_path", ""))
        if not any(loc.startswith(r.rstrip("/") + "/") for r in roots):
            continue
        for rs in d.requires or []:
            q = Requirement(rs)
            if q.marker and not q.marker.evaluate({"extra": ""}):
                continue
            name = cn(q.name)
            if name in NOT_SERVED or name.startswith("nvidia-cutlass-dsl"):
                continue
            have = dist_version(q.name)
            if have == "absent" or (q.specifier and not q.specifier.contains(have, prereleases=True)):
                unmet.append(f"{d.metadata['Name']} needs {q.name}{q.specifier} (have {have})")
    return f"{len(unmet)} unmet" + ("".join(f"\n     {u}" for u in sorted(set(unmet))) if unmet else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flashinfer-jit", action="store_true",
                    help="also compile and run one FlashInfer kernel")
    a = ap.parse_args()
    print(f"python {sys.version.split()[0]}; PYTHONPATH={os.environ.get('PYTHONPATH', '')}", flush=True)
    step("torch and the GPU", check_torch)
    step("torch's CUDA libraries", check_torch_libs)
    step("cuDNN version check", check_cudnn, required=False)
    step("sgl_kernel sm90/common_ops loads", check_sgl_kernel_dlopen)
    step("sgl_kernel imports and its ops match torch", check_sgl_kernel_ops)
    step("flashinfer imports", check_flashinfer)
    if a.flashinfer_jit:
        step("flashinfer JIT kernel", check_flashinfer_jit)
    step("tilelang imports", check_tilelang)
    step("sglang imports", check_sglang)
    for m in SGLANG_MODULES:
        step(f"import {m}", lambda m=m: check_module(m))
    step("sglang_kascade registers with this SGLang", check_plugin)
    step("requirements of the stack", check_requirements, required=False)
    torch_version = dist_version("torch")  # metadata only: torch itself may be what failed
    if FAILED:
        print(f"VERDICT FAIL on torch {torch_version}: {len(FAILED)} step(s); first: {FAILED[0]}")
        sys.exit(1)
    print(f"VERDICT OK: SGLang 0.5.23's stack loads and sgl_kernel's ops run on torch {torch_version}")


if __name__ == "__main__":
    main()
