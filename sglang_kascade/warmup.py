"""Start-up compilation of every Triton kernel variant the device path can launch.

Triton compiles a kernel at its first launch with a new specialization key: the constexpr
values, the launch options, each pointer's dtype and 16-byte alignment, and for each plain int
argument whether it is 1 and whether it is divisible by 16 (triton/runtime/jit.py; the same rules
in Triton 3.6 on the GPU hosts); compiled while serving, that stalls a long chunked prefill for
seconds at a time. The contract: after ``warm_up``, no request compiles a kernel of ours.

How each run-time value is kept out of the key (kernels/*_triton.py):
  * plain int arguments that follow the request mix (split and chunk counts, a block's first
    tile, scratch rows, strides of buffers sized by a batch or a capacity) are
    ``do_not_specialize``; the buffers whose strides the kernels vectorize on (prefill pooled
    scores, the prefill selection) are padded to a multiple of 16 instead, so their strides stay
    specialized and take one value class;
  * pointers read at run-time offsets (a prefill block's slices of its tiles' tensors, a layer's
    row of the profile tables) are ``do_not_specialize_on_alignment``; every other buffer is a
    whole allocation (aligned);
  * Top-k's positions per program (``topk_chunk``) and the scoring chunk are run-time values
    (each a multiple of 16);
  * constexprs that still follow the step are enumerated here: ``_sparse_decode_kernel``'s
    MERGE and S_CH from its split count (``split_counts``), ``_combine_kernel``'s BLOCK_S from its
    partials (``combine_counts``), LOGITS 0 (reuse) and 1 (anchor);
  * everything else is fixed by the model (heads, head dim, dtype, the pools' and
    ``req_to_token``'s strides), the prefill tile size (BLOCK_T and the launch settings chosen for
    it) or the launch site (WITH_V, PASS, RAGGED, OVERFLOW, collect mode).
So a warm-up with tiny lengths, the model's shapes and a ``req_to_token`` of the server's row
stride compiles exactly the variants serving launches. Decode CUDA graphs compile theirs (LOGITS
2, the gate table's rows) while SGLang captures them, also at start-up; this covers eager decode
(batches the graphs cannot hold, ``--disable-cuda-graph``) and prefill. A hot-swapped profile
with another tile size compiles its prefill variants when it is applied (DevicePath.set_budget),
between batches.

``compiled_variants`` counts the compiled variants of our kernels (tests/gpu/test_no_compile_gpu.py
checks that workloads after the warm-up add none). ``--kascade-warmup off`` skips the warm-up.
"""

from __future__ import annotations

import importlib
import logging
import time
from types import SimpleNamespace

import torch


logger = logging.getLogger("sglang_kascade")

# Modules of the device path's Triton kernels (every launched kernel is named *_kernel).
KERNEL_MODULES = ("decode_select_triton", "decode_attention_triton", "topk_triton",
                  "graph_plan_triton", "prefill_select_triton", "prefill_attention_triton")
GROUPS = ("decode selection", "decode layer 0", "decode attention", "prefill selection",
          "prefill attention")


def enabled(options) -> bool:
    """``--kascade-warmup`` / SGLANG_KASCADE_WARMUP: "on" (default) or "off"."""
    value = getattr(options, "warmup", None)  # checked by KascadeOptions: on/off, any case
    return value is None or value.strip().lower() == "on"


# ---- the constexprs that follow the step --------------------------------------------------------


def split_counts(kv_heads: int, group: int, num_sms: int | None = None) -> list:
    """One split count per distinct (MERGE, S_CH) of ``_sparse_decode_kernel`` among the counts
    ``num_splits`` can return for ``kv_heads`` (1 up to its value at batch 1 and an unbounded
    Top-k capacity), smallest first."""
    from .kernels.decode_attention_triton import MERGE_MAX_SPLITS, merge_chunk
    from .kernels.decode_plan import NUM_SMS_H100, num_splits

    most = num_splits(1, kv_heads, 1 << 40, num_sms or NUM_SMS_H100)
    seen: dict = {}
    for s in range(1, most + 1):
        seen.setdefault((s <= MERGE_MAX_SPLITS, merge_chunk(group, s)), s)
    return sorted(seen.values())


def combine_counts() -> list:
    """One partial count per ``_combine_kernel`` BLOCK_S (layer 0's score chunks take any count
    from 1; the sparse attention's unmerged splits are among them)."""
    from .kernels.decode_attention_triton import COMBINE_BLOCK_S, combine_block

    seen: dict = {}
    for n in range(1, 2 * COMBINE_BLOCK_S + 1):
        seen.setdefault(combine_block(n), n)
    return sorted(seen.values())


# ---- the compile counter ------------------------------------------------------------------------


def kernels() -> dict:
    """"module.name" -> the Triton kernel object of every kernel the device path launches."""
    out = {}
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(f"sglang_kascade.kernels.{mod_name}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "__getitem__"):
                out[f"{mod_name}.{name}"] = obj
    return out


def _variants(fn) -> int:
    """Compiled variants of one kernel on every device (0 under TRITON_INTERPRET)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:  # Triton >= 3.2: device -> (kernel cache, key cache, target, ...)
        return sum(len(e[0] if isinstance(e, tuple) else e) for e in list(caches.values()))
    cache = getattr(fn, "cache", None)  # older: device -> {key: kernel}
    return sum(len(c) for c in cache.values()) if isinstance(cache, dict) else 0


def compiled_by_kernel() -> dict:
    """"module.name" -> compiled variants (in this process)."""
    return {name: _variants(fn) for name, fn in kernels().items()}


def compiled_variants() -> int:
    return sum(compiled_by_kernel().values())


# ---- the warm-up --------------------------------------------------------------------------------


class WarmUp:
    """Launches every kernel variant of the eager decode and the prefill path on tiny inputs
    shaped like the model: the real head counts, head dim and dtype, the server's KV pool (read
    at slot 0 only: the rows of ``req_to_token`` it builds are zeros) or a scratch pool of its
    layout, and a ``req_to_token`` of the server's row stride. Outputs are discarded."""

    def __init__(self, device, hq: int, hkv: int, d: int, dtype, k_pool=None, v_pool=None,
                 r2t_stride: int = 4096):
        self.device = torch.device(device)
        self.hq, self.hkv, self.d, self.dtype = hq, hkv, d, dtype
        if k_pool is None:
            k_pool = torch.zeros(16, hkv, d, dtype=dtype, device=self.device)
        if v_pool is None:
            v_pool = torch.zeros_like(k_pool)
        self.k_pool, self.v_pool = k_pool, v_pool
        self.r2t_stride = r2t_stride
        self.tiles: set = set()  # prefill tile sizes compiled
        self.variants = 0  # compiled so far (compile counter; 0 under TRITON_INTERPRET)
        self.seconds = 0.0

    def _inputs(self, n_q: int, rows: int, keys: int):
        gen = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(n_q, self.hq, self.d, generator=gen).to(self.device, self.dtype)
        # Rows of the server's stride; spare rows after them, so positions up to ``keys`` stay
        # inside the tensor whatever that stride is.
        rows += -(-keys // self.r2t_stride)
        r2t = torch.zeros(rows, self.r2t_stride, dtype=torch.int32, device=self.device)
        head_map = torch.arange(self.hkv, dtype=torch.int32, device=self.device)
        return q, r2t, head_map

    # Each group launches through the launchers serving calls (so their launch settings and
    # constexprs are the ones serving computes), once per value of the step's constexprs.

    def decode_selection(self, st) -> None:
        from .kernels.decode_select_triton import decode_select

        decode_select(st.q, self.k_pool, st.r2t, st.req_idx, st.seq_lens, st.tok_off, st.topk,
                      st.scale, st.buf, lscan=st.lscan)

    def decode_layer0(self, st) -> None:
        from .kernels.decode_attention_triton import combine_splits
        from .kernels.decode_dense_triton import decode_dense_select

        out = st.q.new_empty(st.q.shape)
        decode_dense_select(st.q, self.k_pool, self.v_pool, st.r2t, st.req_idx, st.seq_lens,
                            st.tok_off, st.topk, st.scale, st.buf, out, lscan=st.lscan)
        counts = combine_counts()  # every BLOCK_S, on partials laid out as the step's
        f32 = dict(dtype=torch.float32, device=self.device)
        po = torch.zeros(1, self.hq, max(counts), self.d, **f32)
        pe = torch.zeros(1, self.hq, max(counts), **f32)
        for n in counts:
            combine_splits(po, pe, n, out)

    def decode_attention(self, st) -> None:
        from .kernels.decode_attention_triton import decode_sparse_attention
        from .kernels.decode_plan import sm_count

        out = st.q.new_empty(st.q.shape)
        buf = st.buf
        for s in split_counts(self.hkv, self.hq // self.hkv, sm_count(self.device)):
            for anchor in (True, False):  # LOGITS 1 (stored logits + V), 0 (K and V)
                extra = dict(sel_pos=buf.sel_pos, logits=buf.logits) if anchor else {}
                decode_sparse_attention(st.q, self.k_pool, self.v_pool, buf.sel_slot, st.tok_off,
                                        st.topk, st.head_map, st.scale, buf, out,
                                        launch={"splits": s}, **extra)

    def _decode_state(self) -> SimpleNamespace:
        from .kernels.decode_plan import DecodeBuffers, num_splits, sm_count

        # A Top-k capacity at which one row gets the most splits num_splits gives this Hkv.
        kmax = 256 * num_splits(1, self.hkv, 1 << 40, sm_count(self.device))
        lmax = max(1024, 1 << (kmax - 1).bit_length())
        buf = DecodeBuffers(1, self.hq, self.hkv, self.d, lmax, lmax, self.device, tokens=lmax)
        q, r2t, head_map = self._inputs(1, 1, 300)
        dev = self.device
        return SimpleNamespace(
            q=q, r2t=r2t, buf=buf, head_map=head_map, scale=1.0 / self.d ** 0.5, lscan=300,
            req_idx=torch.zeros(1, dtype=torch.int64, device=dev),
            seq_lens=torch.full((1,), 300, dtype=torch.int32, device=dev),
            tok_off=torch.zeros(1, dtype=torch.int64, device=dev),
            topk=torch.full((1,), 40, dtype=torch.int32, device=dev))

    def _prefill_state(self, tile_size: int) -> SimpleNamespace:
        from .device_path import sel_width
        from .kernels.prefill_plan import plan_prefill_tiles

        t = tile_size
        prefix, extend = [0, t + 3], [3 * t + 5, t + 1]  # a cold prompt, a cached prefix
        dev = self.device
        tiles = plan_prefill_tiles(prefix, extend, t, dev)
        ks = [max(1, s // 2) if s else 0 for s in tiles.host_start]
        q, r2t, head_map = self._inputs(sum(extend), len(prefix),
                                        max(p + e for p, e in zip(prefix, extend)))
        req_idx = torch.arange(len(prefix), dtype=torch.int64, device=dev)
        sel = torch.empty(tiles.num_tiles, self.hkv, sel_width(max(ks)), dtype=torch.int32,
                          device=dev)
        return SimpleNamespace(
            q=q, r2t=r2t, head_map=head_map, tiles=tiles, req_idx=req_idx, sel=sel,
            tile_k=torch.tensor(ks, dtype=torch.int32, device=dev),
            tile_row=req_idx[tiles.tile_req.long()], max_start=max(tiles.host_start),
            scale=1.0 / self.d ** 0.5)

    def prefill_selection(self, st, tile_size: int) -> None:
        from .kernels.prefill_select_triton import prefill_select

        prefill_select(st.q, self.k_pool, st.r2t, st.req_idx, st.tiles, tile_size, st.tile_k,
                       st.tile_row, st.max_start, st.scale, st.sel)

    def prefill_attention(self, st, tile_size: int) -> None:
        from .kernels.prefill_attention_triton import prefill_sparse_attention

        prefill_sparse_attention(st.q, self.k_pool, self.v_pool, st.r2t, st.req_idx, st.tiles,
                                 tile_size, st.sel, st.tile_k, st.head_map, st.scale,
                                 st.q.new_empty(st.q.shape))

    def _run(self, groups) -> None:
        t0, c0 = time.perf_counter(), compiled_variants()
        with torch.no_grad():
            for i, (name, fn) in enumerate(groups, 1):
                logger.info("kascade: compiling Triton kernels (%d of %d): %s ...", i,
                            len(groups), name)
                fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # a fault surfaces here, at start-up
        n, secs = compiled_variants() - c0, time.perf_counter() - t0
        self.variants += n
        self.seconds += secs
        logger.info("kascade: Triton kernels ready: %d variants compiled in %.1f s "
                    "(--kascade-warmup off skips this)", n, secs)

    def run(self, tile_size: int) -> None:
        """Every variant of eager decode and of prefill at ``tile_size``."""
        dec = self._decode_state()
        pre = self._prefill_state(tile_size)
        self._run([
            (GROUPS[0], lambda: self.decode_selection(dec)),
            (GROUPS[1], lambda: self.decode_layer0(dec)),
            (GROUPS[2], lambda: self.decode_attention(dec)),
            (GROUPS[3], lambda: self.prefill_selection(pre, tile_size)),
            (GROUPS[4], lambda: self.prefill_attention(pre, tile_size)),
        ])
        self.tiles.add(tile_size)

    def prefill(self, tile_size: int) -> None:
        """The prefill variants of another tile size (a hot-swapped profile); no-op if done."""
        if tile_size in self.tiles:
            return
        pre = self._prefill_state(tile_size)
        self._run([(f"{GROUPS[3]} (tile {tile_size})",
                    lambda: self.prefill_selection(pre, tile_size)),
                   (f"{GROUPS[4]} (tile {tile_size})",
                    lambda: self.prefill_attention(pre, tile_size))])
        self.tiles.add(tile_size)


def warm_up_backend(backend, model_runner, options) -> None:
    """The server's warm-up (plugin.create_backend): after the KV pool and the profile exist,
    before SGLang captures its CUDA graphs and serves. Skipped off CUDA, with
    ``--kascade-warmup off``, under a policy the device path does not run, and for models its
    kernels do not take (DevicePath.layer_supported: they would run the PyTorch path)."""
    from .policies import POLICY_TABLE

    if not enabled(options) or torch.device(backend.device).type != "cuda":
        return
    if not POLICY_TABLE[backend.policy.name].on_device:
        logger.info("kascade: no Triton warm-up (policy %s runs the PyTorch path)",
                    backend.policy.name)
        return
    kv = backend.token_to_kv_pool
    layer = int(getattr(kv, "start_layer", 0) or 0)  # the pools index by model layer id
    k_pool, v_pool = kv.get_key_buffer(layer), kv.get_value_buffer(layer)
    hq = int(model_runner.model_config.num_attention_heads)
    if backend.tp is not None:  # this rank's query heads (SGLang splits them evenly)
        hq //= backend.tp.size
    hkv, d = int(k_pool.shape[1]), int(k_pool.shape[2])
    dtype = getattr(model_runner, "dtype", k_pool.dtype)  # the activations' (q's) dtype
    ok = (d >= 16 and (d & (d - 1)) == 0 and hq % hkv == 0 and dtype in (torch.float16,
          torch.bfloat16) and k_pool.dtype == dtype and v_pool.dtype == dtype
          and v_pool.shape[-1] == d and k_pool.stride(-1) == 1 and v_pool.stride(-1) == 1)
    if not ok:
        logger.info("kascade: no Triton warm-up (these shapes run the PyTorch path)")
        return
    backend.device_path.warm_up(
        hq=hq, hkv=hkv, d=d, dtype=dtype, k_pool=k_pool, v_pool=v_pool,
        r2t_stride=int(backend.req_to_token_pool.req_to_token.stride(0)),
        tile_size=backend.budget.tile_size)
