"""Workarounds that let SGLang 0.5.x serve on a CPU-only machine.

Everything here is active only when torch is a CPU build (``torch.version.cuda is None``) and only
touches imports of third-party modules; none of it is on the serving hot path. Each shim states the
reason. They are installed at interpreter start-up by a ``.pth`` file (``install_pth()``), because
SGLang spawns scheduler processes that import ``torchvision`` and ``sgl_kernel`` before any plugin
code runs in them.

Pinned to: torch 2.13.0 (CPU), torchvision 0.28.0 (CUDA wheel), sglang 0.5.23 (scripts/setup.sh);
the same shims serve 0.5.21.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

PTH_NAME = "sglang_kascade_cpu_workarounds.pth"
_PTH_LINE = "import sglang_kascade.cpu_workarounds as _k; _k.install_import_hooks()\n"


def _torch_is_cpu_build() -> bool:
    import torch

    return torch.version.cuda is None and not torch.cuda.is_available()


def _define_torchvision_fake_ops() -> None:
    # Reason: the only torchvision wheel on PyPI for torch 2.13 is a CUDA build; its C extension
    # fails to load on CPU torch, and torchvision/_meta_registrations.py then calls
    # register_fake("torchvision::nms"/"qnms") on ops that were never defined, which raises at
    # import. transformers (5.12, 5.19) and SGLang import torchvision, so we define the two schemas
    # first.
    import torch

    for name in ("nms", "qnms"):
        try:
            torch.library.define(
                f"torchvision::{name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
            )
        except RuntimeError:
            pass  # already defined (real extension loaded, or defined earlier in this process)


class _SglKernelStub(types.ModuleType):
    # Reason: sgl_kernel on PyPI is CUDA-only, yet SGLang 0.5.21-0.5.23 import its CPU kernels
    # (names ending in `_cpu`: copy_all_layer_kv_cache_cpu, assign_req_to_token_pool_cpu, the EAGLE
    # tree helpers, ...) at module level under `if _is_cpu:`, outside any try/except. None of them
    # is called when serving Llama-family models without speculative decoding on a CPU without
    # AMX, so those names resolve to functions that raise if called. Other names stay missing, so
    # SGLang's own `except ImportError` fallbacks keep working.
    def __getattr__(self, name: str):
        if not name.endswith("_cpu"):
            raise AttributeError(f"sgl_kernel stub has no {name!r}")

        def _unavailable(*args, **kwargs):
            raise RuntimeError(
                f"sgl_kernel.{name} is not available on a CPU-only machine "
                "(sglang_kascade.cpu_workarounds stub)"
            )

        _unavailable.__name__ = name
        return _unavailable


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _SglKernelStub(spec.name)

    def exec_module(self, module):
        pass


class _CpuImportFinder(importlib.abc.MetaPathFinder):
    """Intercepts `torchvision` (to pre-define ops) and `sgl_kernel` (to stub it) on CPU builds."""

    def find_spec(self, fullname, path=None, target=None):
        root = fullname.split(".")[0]
        if root not in ("torchvision", "sgl_kernel") or self._busy:
            return None
        self._busy = True  # our own look-ups below must not recurse into this finder
        try:
            if not _torch_is_cpu_build():
                return None
            if root == "torchvision":
                if fullname == "torchvision":
                    _define_torchvision_fake_ops()
                return None  # the regular finders load the real torchvision
            if fullname == "sgl_kernel" and importlib.util.find_spec("sgl_kernel") is None:
                return importlib.machinery.ModuleSpec(fullname, _StubLoader())
            return None  # submodules stay missing: SGLang guards those imports itself
        finally:
            self._busy = False

    _busy = False


def install_import_hooks() -> None:
    """Called at interpreter start-up by the .pth file; cheap (imports nothing heavy)."""
    if not any(isinstance(f, _CpuImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CpuImportFinder())


def install_pth() -> Path:
    """Write the start-up .pth file into this interpreter's site-packages."""
    import sysconfig

    target = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text(_PTH_LINE)
    return target


if __name__ == "__main__":
    print(f"installed {install_pth()}")


# ------------------------------------------------------------------------------------------------
# Paged KV allocation (--page-size > 1) on CPU. Applied by the plugin in every SGLang process.
# ------------------------------------------------------------------------------------------------


class _GridLaunch:
    """Stands in for a Triton kernel object: ``kernel[grid](*args)`` calls ``fn(*args)``."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn


def _alloc_extend_torch(prefix_lens, seq_lens, last_loc, free_pages, out_indices, _bs_pow2,
                        page_size):
    from sglang.srt.mem_cache.allocator.paged import alloc_extend_naive

    alloc_extend_naive(prefix_lens, seq_lens, last_loc, free_pages, out_indices, page_size,
                       out_indices.device)


def _alloc_decode_torch(seq_lens, last_loc, free_pages, out_indices, _bs_pow2, page_size):
    import torch

    # The new token opens a page when it is the first of one; such requests take free pages in
    # batch order, the others continue after their last slot.
    needs_page = (seq_lens - 1) % page_size == 0
    page_rank = torch.cumsum(needs_page.to(torch.int64), 0) - 1
    new_slot = free_pages[page_rank.clamp(min=0)] * page_size
    out_indices.copy_(torch.where(needs_page, new_slot, last_loc + 1))


def patch_sglang_paged_allocation() -> None:
    # Reason: with --page-size > 1 SGLang 0.5.17-0.5.21 allocate slots with Triton kernels
    # (mem_cache/allocator/paged.py alloc_extend_kernel/alloc_decode_kernel), and 0.5.17-0.5.23
    # find the last slot with get_last_loc_triton for every backend but torch_native/ascend;
    # Triton has no CPU driver. SGLang ships torch equivalents (alloc_extend_naive,
    # get_last_loc_torch): use them. 0.5.22+ pick torch allocation kernels themselves where the
    # platform has no Triton (the replaced kernels are then not called).
    if not _torch_is_cpu_build():
        return
    from sglang.srt.mem_cache import allocation
    from sglang.srt.mem_cache.allocator import paged

    paged.alloc_extend_kernel = _GridLaunch(_alloc_extend_torch)
    paged.alloc_decode_kernel = _GridLaunch(_alloc_decode_torch)
    allocation.get_last_loc_triton = allocation.get_last_loc_torch
