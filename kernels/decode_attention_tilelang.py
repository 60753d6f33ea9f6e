"""Decode attention over a selection in TileLang: the reuse path of the Triton kernel, for a
side-by-side measurement (bench/decode_tilelang.py) of the split kernel against Triton.

Reference: ``decode_torch.decode_sparse_attention_torch``; the Triton kernel it mirrors is
``decode_attention_triton._sparse_decode_kernel`` with ``USE_LOGITS=False`` (a reuse layer: K and
V both read through the selection). Nothing on the serving path imports this file; tilelang
itself is imported only when a kernel is built, so the package imports without it.

Same work split as the Triton kernel: one program per (split, KV head, request) walks its share
of the first ``topk[b]`` entries of selection row ``head_map[h]`` (token-indexed: request b's run
starts at ``sel_slot[row, tok_off[b]]``), gathers ``block_n`` K and V rows from the token-major pool
(``[slots, Hkv, D]``) into shared memory with per-row index loads in a ``T.Parallel`` copy, and
keeps an online softmax for the G query heads of the KV head at once, as the rows of two
``T.gemm`` (padded to ``block_g(G)`` >= 16 rows). The split partials go to
``buf.step(B).attn_o`` / ``attn_lse`` and the Triton reduce (``combine_splits``) merges them (the
Triton kernel merges in its last split; the TileLang one was measured with the separate reduce).

Compiled once per (Hkv, G, D, dtype, block_n, num_stages, num_threads): batch, splits, pool slots
and tokens are symbolic (``T.dynamic``) and topk / tok_off / head_map / the scale are read at run
time, so a captured CUDA graph replays with new lengths and nothing recompiles. tvm-ffi launches
on torch's current stream (read from the tensor arguments), so the call can be captured.

Assumes ``topk[b] >= 1`` (as the Triton kernel does) and K and V of one head dim.
"""

# No `from __future__ import annotations`: TileLang evaluates the prim_func's annotations, and
# string annotations cannot see the builder's locals (HQ, D, ...).
import functools
import math

import torch

from .decode_attention_triton import combine_splits
from .decode_plan import ATTN_BLOCK_N, DecodeBuffers, block_g

LOG2E = math.log2(math.e)
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Gathered copies cannot use TMA; warp specialisation is off in TileLang's own sparse-attention
# and flash-decoding examples too.
PASS_CONFIGS = {"tl.disable_warp_specialized": True}


def build_split_kernel(kv_heads: int, group: int, head_dim: int, dtype: str, block_n: int,
                       num_stages: int, num_threads: int):
    """The split kernel as a TileLang prim_func (not compiled): writes normalised partials
    part_o [B, Hq, S, D] fp32 and part_lse [B, Hq, S] fp32 (log2 units, -inf: empty split)."""
    import tilelang.language as T

    HKV, G, D, BN = kv_heads, group, head_dim, block_n
    HQ, BG = kv_heads * group, block_g(group)
    f32, neg_inf = "float32", -math.inf
    batch, splits, slots, tokens = T.dynamic("batch, splits, slots, tokens")

    @T.prim_func
    def sparse_decode_split(
        q: T.Tensor([batch, HQ, D], dtype),
        k_pool: T.Tensor([slots, HKV, D], dtype),
        v_pool: T.Tensor([slots, HKV, D], dtype),
        sel_slot: T.Tensor([HKV, tokens], "int32"),
        tok_off: T.Tensor([batch], "int64"),
        topk: T.Tensor([batch], "int32"),
        head_map: T.Tensor([HKV], "int32"),
        part_o: T.Tensor([batch, HQ, splits, D], f32),
        part_lse: T.Tensor([batch, HQ, splits], f32),
        sm_scale_log2: T.float32,
    ):
        with T.Kernel(splits, HKV, batch, threads=num_threads) as (sp, h, b):
            q_s = T.alloc_shared([BG, D], dtype)
            k_s = T.alloc_shared([BN, D], dtype)
            v_s = T.alloc_shared([BN, D], dtype)
            p_s = T.alloc_shared([BG, BN], dtype)
            s = T.alloc_fragment([BG, BN], f32)  # scores, then probabilities (log2 units)
            acc = T.alloc_fragment([BG, D], f32)
            m = T.alloc_fragment([BG], f32)
            m_prev = T.alloc_fragment([BG], f32)
            alpha = T.alloc_fragment([BG], f32)
            l_sum = T.alloc_fragment([BG], f32)
            l_blk = T.alloc_fragment([BG], f32)

            k_b = topk[b]
            row = head_map[h]  # selection row read by this KV head
            off = tok_off[b]
            per = T.ceildiv(T.ceildiv(k_b, splits), BN) * BN
            lo = sp * per
            hi = T.min(lo + per, k_b)
            n_blocks = T.ceildiv(T.max(hi - lo, 0), BN)

            # Padded query rows repeat row G-1: their results are never stored.
            for g, d in T.Parallel(BG, D):
                q_s[g, d] = q[b, h * G + T.min(g, G - 1), d]
            T.fill(acc, 0)
            T.fill(l_sum, 0)
            T.fill(m, neg_inf)
            for it in T.Pipelined(n_blocks, num_stages=num_stages):
                # Rows past hi re-read row hi-1 (always in the run) and are masked below: no
                # predicated loads, no read outside the selection's run.
                for i, d in T.Parallel(BN, D):
                    k_s[i, d] = k_pool[T.cast(sel_slot[row, off + T.min(lo + it * BN + i, hi - 1)],
                                              "int64"), h, d]
                T.clear(s)
                T.gemm(q_s, k_s, s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                for g, i in T.Parallel(BG, BN):
                    s[g, i] = T.if_then_else(lo + it * BN + i < hi, s[g, i] * sm_scale_log2,
                                             neg_inf)
                T.copy(m, m_prev)
                T.reduce_max(s, m, dim=1, clear=False)
                for g in T.Parallel(BG):
                    alpha[g] = T.exp2(m_prev[g] - m[g])
                for g, i in T.Parallel(BG, BN):
                    s[g, i] = T.exp2(s[g, i] - m[g])
                T.reduce_sum(s, l_blk, dim=1)
                for g in T.Parallel(BG):
                    l_sum[g] = l_sum[g] * alpha[g] + l_blk[g]
                for g, d in T.Parallel(BG, D):
                    acc[g, d] *= alpha[g]
                T.copy(s, p_s)
                for i, d in T.Parallel(BN, D):
                    v_s[i, d] = v_pool[T.cast(sel_slot[row, off + T.min(lo + it * BN + i, hi - 1)],
                                              "int64"), h, d]
                T.gemm(p_s, v_s, acc, policy=T.GemmWarpPolicy.FullRow)
            # An empty split writes o = 0 and lse = -inf, which combine_splits ignores.
            for g, d in T.Parallel(BG, D):
                if g < G:
                    part_o[b, h * G + g, sp, d] = T.if_then_else(
                        l_sum[g] > 0, acc[g, d] / l_sum[g], T.float32(0))
            for g in T.Parallel(BG):
                if g < G:
                    part_lse[b, h * G + g, sp] = T.if_then_else(
                        l_sum[g] > 0, m[g] + T.log2(l_sum[g]), T.float32(neg_inf))

    return sparse_decode_split


@functools.lru_cache(maxsize=None)
def split_kernel(kv_heads: int, group: int, head_dim: int, dtype: torch.dtype, block_n: int,
                 num_stages: int, num_threads: int):
    """The compiled split kernel (tilelang JITKernel), built once per compile-time tuple."""
    import tilelang

    func = build_split_kernel(kv_heads, group, head_dim, _DTYPES[dtype], block_n, num_stages,
                              num_threads)
    return tilelang.compile(func, pass_configs=PASS_CONFIGS)


def decode_sparse_attention_tilelang(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [slots, Hkv, D]
    v_pool: torch.Tensor,  # [slots, Hkv, D]
    sel_slot: torch.Tensor,  # [Hkv, tokens] int32 pool slots (buf.sel_slot)
    tok_off: torch.Tensor,  # [B] int64 row starts (decode_plan.row_offsets)
    topk: torch.Tensor,  # [B] int32 valid entries of each request's rows (>= 1)
    head_map: torch.Tensor,  # [Hkv] int32: KV head h reads selection row head_map[h]
    scale: float,
    buf: DecodeBuffers,
    out: torch.Tensor,  # [B, Hq, D], written
    block_n: int = ATTN_BLOCK_N,
    num_threads: int = 128,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of each request's query over its selected keys (the reuse path of
    ``decode_attention_triton.decode_sparse_attention``): TileLang split kernel + Triton reduce.
    The first call for a new (Hkv, G, D, dtype, block_n, num_stages, num_threads) compiles."""
    b_sz, hq, d = q.shape
    hkv = k_pool.shape[1]
    if v_pool.shape != k_pool.shape or k_pool.shape[-1] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)}, k_pool {tuple(k_pool.shape)}, "
                         f"v_pool {tuple(v_pool.shape)}: need Hq = G * Hkv and K, V of dim D")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous() and sel_slot.is_contiguous()):
        raise ValueError("k_pool, v_pool and sel_slot must be contiguous")
    st = buf.step(b_sz)
    kernel = split_kernel(hkv, hq // hkv, d, q.dtype, block_n, num_stages, num_threads)
    kernel(q.contiguous(), k_pool, v_pool, sel_slot, tok_off, topk, head_map, st.attn_o,
           st.attn_lse, scale * LOG2E)
    combine_splits(st.attn_o, st.attn_lse, st.splits, out)
    return out
