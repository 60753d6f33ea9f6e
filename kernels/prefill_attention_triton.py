"""Prefill attention over a Kascade selection in Triton: ragged extend batches on the paged pool.

Reference: ``sparse_attention_torch.sparse_attention`` (one request) and the float64 oracle
``tests/helpers/reference.py::sparse_attention``. One program per (query tile, KV head): the tile's
queries (up to T, at absolute positions p_lo..) times the G query heads of the KV head are the
rows of one tl.dot block (T*G rows). It attends
  1. the tile's selected candidate keys (all before the tile start, so visible to every query):
     ``sel_slot[t, head_map[h], :sel_len[t]]`` pool slots, gathered straight from the pool;
  2. the causal diagonal block: positions tile_start .. last query, through req_to_token,
     masked per query (key position <= query position).
No score matrix is kept: an online softmax over both, as in flash attention. A dense tile (start
<= k) is a selection holding every candidate. Cached prefixes and chunk boundaries only shift
p_lo and the query rows (kernels/prefill_plan.py).

Why Triton: see decode_select_triton.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_select_triton import LOG2E
from .prefill_plan import PrefillTiles
from .softmax_triton import online_softmax_step


@triton.jit
def _attend_slots(q, k_ptr, v_ptr, slot, ok, keep, m_i, l_i, acc, sm_scale_log2,
                  h, s_ks, s_kh, s_vs, s_vh, offs_d, offs_dv):
    """One online-softmax step: the keys and values at pool ``slot`` [BLOCK_N] (``ok``: loaded)
    of KV head h, scores kept where ``keep`` [BLOCK_M, BLOCK_N]. Returns (m_i, l_i, acc)."""
    k = tl.load(k_ptr + slot[:, None] * s_ks + h * s_kh + offs_d[None, :],
                mask=ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
    s = tl.where(keep, s, float("-inf"))
    v = tl.load(v_ptr + slot[:, None] * s_vs + h * s_vh + offs_dv[None, :],
                mask=ok[:, None], other=0.0)
    return online_softmax_step(s, v, m_i, l_i, acc)


# The head map is a scalar load from a layer's row of the profile table (any offset): its
# alignment is not specialized on. The selection's strides are (kept: its rows are loaded
# contiguously); device_path pads its last dimension to a multiple of 16, so they take one value
# class for every budget.
@triton.jit(do_not_specialize_on_alignment=["head_map_ptr"])
def _prefill_sparse_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, r2t_ptr, req_idx_ptr,
    tile_req_ptr, tile_start_ptr, tile_q_lo_ptr, tile_q_len_ptr, tile_p_lo_ptr,
    sel_ptr, sel_len_ptr, head_map_ptr,
    sm_scale_log2,
    s_qn, s_qh, s_ks, s_kh, s_vs, s_vh, s_on, s_oh, s_r2t, s_st, s_sh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr,
    DV: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t, h = tl.program_id(0), tl.program_id(1)
    b = tl.load(tile_req_ptr + t)
    start = tl.load(tile_start_ptr + t)
    q_lo = tl.load(tile_q_lo_ptr + t).to(tl.int64)
    nq = tl.load(tile_q_len_ptr + t)
    p_lo = tl.load(tile_p_lo_ptr + t)
    k_t = tl.load(sel_len_ptr + t)
    hs = tl.load(head_map_ptr + h)
    row = tl.load(req_idx_ptr + b).to(tl.int64)

    BLOCK_M: tl.constexpr = BLOCK_T * BLOCK_G
    offs_m = tl.arange(0, BLOCK_M)
    ti = offs_m // BLOCK_G  # query of the tile
    g = offs_m % BLOCK_G  # query head within the group
    m_ok = (ti < nq) & (g < G)
    q_pos = p_lo + ti  # [BLOCK_M]
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    q = tl.load(q_ptr + (q_lo + ti)[:, None] * s_qn + (h * G + g)[:, None] * s_qh
                + offs_d[None, :], mask=m_ok[:, None], other=0.0)  # [BLOCK_M, D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)

    # 1. Selected candidates: visible to every query of the tile.
    sel_base = t.to(tl.int64) * s_st + hs * s_sh
    for r0 in range(0, k_t, BLOCK_N):
        r = r0 + tl.arange(0, BLOCK_N)
        ok = r < k_t
        slot = tl.load(sel_ptr + sel_base + r, mask=ok, other=0).to(tl.int64)
        m_i, l_i, acc = _attend_slots(q, k_ptr, v_ptr, slot, ok, ok[None, :], m_i, l_i, acc,
                                      sm_scale_log2, h, s_ks, s_kh, s_vs, s_vh, offs_d, offs_dv)

    # 2. The causal diagonal block: positions start .. p_lo + nq - 1.
    for j0 in range(start, p_lo + nq, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < p_lo + nq
        slot = tl.load(r2t_ptr + row * s_r2t + j, mask=ok, other=0).to(tl.int64)
        causal = ok[None, :] & (j[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _attend_slots(q, k_ptr, v_ptr, slot, ok, causal, m_i, l_i, acc,
                                      sm_scale_log2, h, s_ks, s_kh, s_vs, s_vh, offs_d, offs_dv)

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_lo + ti)[:, None] * s_on + (h * G + g)[:, None] * s_oh
             + offs_dv[None, :], o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


def prefill_sparse_attention(
    q: torch.Tensor,  # [N, Hq, D] queries of the extend batch, request after request
    k_pool: torch.Tensor,  # [slots, Hkv, D]
    v_pool: torch.Tensor,  # [slots, Hkv, Dv]
    req_to_token: torch.Tensor,  # [R, C] int32
    req_idx: torch.Tensor,  # [B] int
    tiles: PrefillTiles,
    tile_size: int,
    sel_slot: torch.Tensor,  # [nt, Hkv_anchor, kmax] int32 pool slots of each tile's selection
    sel_len: torch.Tensor,  # [nt] int32 selected keys of each tile (<= its start)
    head_map: torch.Tensor,  # [Hkv] int32: KV head h reads selection row head_map[h]
    scale: float,
    out: torch.Tensor,  # [N, Hq, Dv], written
    launch: dict | None = None,  # override BLOCK_N / num_warps / num_stages (tuning)
) -> torch.Tensor:
    hq, d = q.shape[1], q.shape[2]
    hkv, dv = k_pool.shape[1], v_pool.shape[-1]
    g = hq // hkv
    bg = triton.next_power_of_2(g)
    bt = max(triton.next_power_of_2(tile_size), 16 // bg)  # tl.dot needs >= 16 rows
    rows = bt * bg
    # Measured on the H100 at 32K, T=32, G=4 (bench/tune_kernels.py): 64 keys, 4 warps, 2 stages
    # 2.95 ms; 8 warps 5.23 ms; 32 keys 3.2-3.4 ms; 128 keys 3.2-5.1 ms.
    cfg = dict(BLOCK_N=64 if rows <= 128 else 32, num_warps=4 if rows <= 128 else 8, num_stages=2)
    cfg.update(launch or {})
    _prefill_sparse_kernel[(tiles.num_tiles, hkv)](
        q, k_pool, v_pool, out, req_to_token, req_idx,
        tiles.tile_req, tiles.tile_start, tiles.tile_q_lo, tiles.tile_q_len, tiles.tile_p_lo,
        sel_slot, sel_len, head_map,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1), out.stride(0), out.stride(1),
        req_to_token.stride(0), sel_slot.stride(0), sel_slot.stride(1),
        G=g, BLOCK_G=bg, BLOCK_T=bt, D=d, DV=dv, **cfg,
    )
    return out
