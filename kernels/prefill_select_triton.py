"""Prefill anchor selection in Triton: per query tile and KV head, the exact Top-k of the pooled
post-softmax probabilities, on the paged pool, for a ragged extend batch with cached prefixes.

Reference: ``selection_torch.select_topk`` (token granularity, per KV head) and the float64 oracle
``tests/helpers/reference.py::select``. Semantics: each query's probabilities are a softmax over its
whole causal row (keys 0..its position); they are summed over the G query heads of a KV head and
over the tile's queries; the tile's Top-k is taken among its candidates (positions < tile start)
with the budget ``tile_k[t]`` (= start: every candidate, a dense tile).

Stages (no score matrix of L x L is ever held):
  1. ``_lse_kernel``   grid (tiles, KV heads): one pass over each query's causal row, the
     log-sum-exp (log2 units) of every query head, [N, Hq] fp32 (flash attention without V).
  2. ``_pool_kernel``  grid (key chunks, KV heads, tiles of a block): pooled probabilities
     ``sum_{query, g} exp2(logit - lse)`` of each candidate key, [tiles, Hkv, keys] fp32 for a
     block of tiles at a time (``block_bytes`` bounds it).
  3. ``topk_select``   (topk_triton.py, the decode anchor's radix select) with one row per
     (tile, KV head): length = tile start, budget = tile_k, written as pool slots into
     ``sel_slot[t, h, :tile_k[t]]``, which the prefill attention kernel reads.
Both Triton stages compute the logits with tl.dot (the pooled pass, keys-major, as its
transpose), so exp2(logit - lse) <= 1 up to rounding.

Why Triton: see decode_select_triton.py; the radix select is shared with decode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_select_triton import LOG2E
from .prefill_plan import PrefillTiles
from .topk_triton import topk_select

POOL_CHUNK = 1024  # keys per pooling program
DEFAULT_BLOCK_BYTES = 256 << 20  # pooled scores of one block of tiles


@triton.jit
def _tile_queries(q_ptr, tile_q_lo_ptr, tile_q_len_ptr, tile_p_lo_ptr, t, h, s_qn, s_qh,
                  G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
                  D: tl.constexpr):
    """The tile's queries of KV head h as tl.dot rows (query-major, then group head):
    (q [BLOCK_M, D], row of q [BLOCK_M] int64, query head [BLOCK_M], valid [BLOCK_M],
    position [BLOCK_M])."""
    q_lo = tl.load(tile_q_lo_ptr + t).to(tl.int64)
    nq = tl.load(tile_q_len_ptr + t)
    p_lo = tl.load(tile_p_lo_ptr + t)
    offs_m = tl.arange(0, BLOCK_T * BLOCK_G)
    ti = offs_m // BLOCK_G
    g = offs_m % BLOCK_G
    m_ok = (ti < nq) & (g < G)
    rows = q_lo + ti
    heads = h * G + g
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + rows[:, None] * s_qn + heads[:, None] * s_qh + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    return q, rows, heads, m_ok, p_lo + ti


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, r2t_ptr, req_idx_ptr,
    tile_req_ptr, tile_start_ptr, tile_q_lo_ptr, tile_q_len_ptr, tile_p_lo_ptr,
    lse_ptr, sm_scale_log2,
    s_qn, s_qh, s_ks, s_kh, s_r2t, s_en, s_eh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t, h = tl.program_id(0), tl.program_id(1)
    b = tl.load(tile_req_ptr + t)
    start = tl.load(tile_start_ptr + t)
    row = tl.load(req_idx_ptr + b).to(tl.int64)
    q, rows, heads, m_ok, q_pos = _tile_queries(q_ptr, tile_q_lo_ptr, tile_q_len_ptr,
                                                tile_p_lo_ptr, t, h, s_qn, s_qh,
                                                G, BLOCK_G, BLOCK_T, D)
    end = tl.max(tl.where(m_ok, q_pos, 0), 0) + 1  # keys of the tile's last query
    offs_d = tl.arange(0, D)
    m_i = tl.full([BLOCK_T * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * BLOCK_G], tl.float32)
    for j0 in range(0, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < end
        slot = tl.load(r2t_ptr + row * s_r2t + j, mask=ok, other=0).to(tl.int64)
        k = tl.load(k_ptr + slot[:, None] * s_ks + h * s_kh + offs_d[None, :],
                    mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
        if j0 + BLOCK_N > start:  # the causal diagonal (and the row's end)
            s = tl.where(ok[None, :] & (j[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    tl.store(lse_ptr + rows * s_en + heads * s_eh, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit(do_not_specialize=["t0"])  # the block's first tile: a run-time value
def _pool_kernel(
    q_ptr, k_ptr, r2t_ptr, req_idx_ptr,
    tile_req_ptr, tile_start_ptr, tile_q_lo_ptr, tile_q_len_ptr, tile_p_lo_ptr,
    lse_ptr, pooled_ptr, t0, sm_scale_log2,
    s_qn, s_qh, s_ks, s_kh, s_r2t, s_en, s_eh, s_pt, s_ph,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, KEYS_MAJOR: tl.constexpr,
):
    c, h, tt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = t0 + tt
    start = tl.load(tile_start_ptr + t)
    j_lo = c * CHUNK
    if j_lo < start:
        b = tl.load(tile_req_ptr + t)
        row = tl.load(req_idx_ptr + b).to(tl.int64)
        q, rows, heads, m_ok, q_pos = _tile_queries(q_ptr, tile_q_lo_ptr, tile_q_len_ptr,
                                                    tile_p_lo_ptr, t, h, s_qn, s_qh,
                                                    G, BLOCK_G, BLOCK_T, D)
        # Padded rows get lse = +inf: they add exp2(-inf) = 0.
        lse = tl.load(lse_ptr + rows * s_en + heads * s_eh, mask=m_ok, other=float("inf"))
        offs_d = tl.arange(0, D)
        out_base = tt.to(tl.int64) * s_pt + h * s_ph
        for j0 in range(j_lo, tl.minimum(j_lo + CHUNK, start), BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            ok = j < start  # candidates only; every query of the tile sees them all
            slot = tl.load(r2t_ptr + row * s_r2t + j, mask=ok, other=0).to(tl.int64)
            k = tl.load(k_ptr + slot[:, None] * s_ks + h * s_kh + offs_d[None, :],
                        mask=ok[:, None], other=0.0)
            if KEYS_MAJOR:  # logits^T [BLOCK_N, BLOCK_M]: the pooling sums along a row
                s = tl.dot(k, tl.trans(q)) * sm_scale_log2
                pooled = tl.sum(tl.exp2(s - lse[None, :]), 1)  # [BLOCK_N]
            else:  # logits [BLOCK_M, BLOCK_N]: the pooling sums down the columns
                s = tl.dot(q, tl.trans(k)) * sm_scale_log2
                pooled = tl.sum(tl.exp2(s - lse[:, None]), 0)
            tl.store(pooled_ptr + out_base + j, pooled, mask=ok)


def _rows(tile_size: int, g: int) -> tuple:
    """(BLOCK_G, BLOCK_T): tl.dot rows of a tile (>= 16)."""
    bg = triton.next_power_of_2(g)
    return bg, max(triton.next_power_of_2(tile_size), 16 // bg)


def default_launch(rows: int) -> dict:
    """Launch parameters of the two passes for tl.dot tiles of ``rows`` query rows (a tile's
    queries x the group). ``launch=`` of prefill_select overrides them.

    128 rows (Llama-3.1-8B: tiles of 32 x groups of 4): the fastest of
    ``python3 -P bench/tune_kernels.py prefill_select --contexts 32768`` on an H200
    (docs/results/kernels-h100.md): log-sum-exp 11.69 -> 10.66 ms (128 keys per step, 8 warps),
    pooled pass 15.47 -> 12.49 ms (keys-major: the pooling sums along rows of the transposed
    logits, not down columns across warps; 3 stages). Other tile sizes keep the first
    settings (not swept)."""
    if rows == 128:
        lse = dict(BLOCK_N=128, num_warps=8, num_stages=2)
        pool = dict(BLOCK_N=64, num_warps=4, num_stages=3, KEYS_MAJOR=True)
    else:
        small = rows < 128
        lse = dict(BLOCK_N=64 if small else 32, num_warps=4 if small else 8, num_stages=2)
        pool = dict(lse, KEYS_MAJOR=False)
    return dict(lse=lse, pool=dict(pool, CHUNK=POOL_CHUNK))


def _launch(tile_size: int, g: int, launch: dict | None) -> dict:
    bg, bt = _rows(tile_size, g)
    out = default_launch(bg * bt)
    for stage, cfg in (launch or {}).items():
        out[stage] = dict(out[stage], **cfg)
    return out


def prefill_lse(q, k_pool, req_to_token, req_idx, tiles: PrefillTiles, tile_size: int,
                scale: float, lse: torch.Tensor, launch: dict | None = None) -> torch.Tensor:
    """lse [N, Hq] fp32 (log2 units) of every query's causal row; written and returned."""
    hq, d = q.shape[1], q.shape[2]
    hkv = k_pool.shape[1]
    g = hq // hkv
    bg, bt = _rows(tile_size, g)
    _lse_kernel[(tiles.num_tiles, hkv)](
        q, k_pool, req_to_token, req_idx,
        tiles.tile_req, tiles.tile_start, tiles.tile_q_lo, tiles.tile_q_len, tiles.tile_p_lo,
        lse, scale * LOG2E,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), req_to_token.stride(0),
        lse.stride(0), lse.stride(1),
        G=g, BLOCK_G=bg, BLOCK_T=bt, D=d, **_launch(tile_size, g, launch)["lse"],
    )
    return lse


def prefill_pool(q, k_pool, req_to_token, req_idx, tiles: PrefillTiles, tile_size: int,
                 scale: float, lse: torch.Tensor, pooled: torch.Tensor, t0: int, nb: int,
                 max_start: int, launch: dict | None = None) -> None:
    """pooled[:nb, h, j] = the pooled probability of candidate j for tile t0 + i (i < nb)."""
    hkv, d = k_pool.shape[1], q.shape[2]
    g = q.shape[1] // hkv
    bg, bt = _rows(tile_size, g)
    cfg = _launch(tile_size, g, launch)["pool"]
    _pool_kernel[(triton.cdiv(max_start, cfg["CHUNK"]), hkv, nb)](
        q, k_pool, req_to_token, req_idx,
        tiles.tile_req, tiles.tile_start, tiles.tile_q_lo, tiles.tile_q_len,
        tiles.tile_p_lo, lse, pooled, t0, scale * LOG2E,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
        req_to_token.stride(0), lse.stride(0), lse.stride(1),
        pooled.stride(0), pooled.stride(1),
        G=g, BLOCK_G=bg, BLOCK_T=bt, D=d, **cfg,
    )


def prefill_select(
    q: torch.Tensor,  # [N, Hq, D] queries of the extend batch, request after request
    k_pool: torch.Tensor,  # [slots, Hkv, D]
    req_to_token: torch.Tensor,  # [R, C] int32
    req_idx: torch.Tensor,  # [B] int: request b's row of req_to_token
    tiles: PrefillTiles,
    tile_size: int,
    tile_k: torch.Tensor,  # [nt] int32 budgets, 0 <= tile_k[t] <= tile_start[t]
    tile_row: torch.Tensor,  # [nt] int: req_idx[tile_req[t]]
    max_start: int,  # host: the largest tile start (keys scanned)
    scale: float,
    sel_slot: torch.Tensor,  # [nt, Hkv, kmax] int32 out: entries [0, tile_k[t]) of each row
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    launch: dict | None = None,  # {"lse": {...}, "pool": {...}} over default_launch
) -> None:
    """Fill ``sel_slot`` with each (tile, KV head)'s Top-tile_k[t] pool slots (no set order)."""
    n, hq, d = q.shape
    hkv = k_pool.shape[1]
    nt, kmax = tiles.num_tiles, sel_slot.shape[-1]
    if max_start <= 0 or nt == 0:
        return
    if q.stride(-1) != 1:
        q = q.contiguous()
    lse = prefill_lse(q, k_pool, req_to_token, req_idx, tiles, tile_size, scale,
                      torch.empty(n, hq, dtype=torch.float32, device=q.device), launch)
    # Rows padded to a multiple of 16 keys: the pooled and Top-k kernels' row strides then keep
    # one specialization (divisible by 16: contiguous loads and stores vectorize) for every
    # max_start, so no batch compiles a variant of its own (warmup.py).
    row = -(-max_start // 16) * 16
    block = max(1, min(nt, block_bytes // (hkv * row * 4)))
    pooled = torch.empty(block, hkv, row, dtype=torch.float32, device=q.device)
    pos = torch.empty(block, hkv, kmax, dtype=torch.int32, device=q.device)
    hist = torch.empty(4, block * hkv, 256, dtype=torch.int32, device=q.device)
    ctr = torch.empty(block * hkv, 2, dtype=torch.int32, device=q.device)
    for a in range(0, nt, block):
        nb = min(block, nt - a)
        prefill_pool(q, k_pool, req_to_token, req_idx, tiles, tile_size, scale, lse, pooled,
                     a, nb, max_start, launch)
        # One radix-select row per (tile, KV head): "request" = tile, length = its start.
        topk_select(pooled[:nb], tiles.tile_start[a:a + nb], tile_k[a:a + nb], req_to_token,
                    tile_row[a:a + nb], hist, ctr, pos[:nb], sel_slot[a:a + nb], max_start)
