"""Attention over a Kascade selection in PyTorch (CPU serving path; reference for GPU kernels).

Each query attends to the selected candidate keys of its tile (through the layer's head map, for
reuse layers) plus the tile's own keys from the tile start up to itself (the causal diagonal
block). A dense selection is plain causal attention, and so is the dense tail of an extend
(``RequestTiles.dense_from``: the selection covers the tiles before it). Work is done one block of
tiles at a time.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .selection_torch import Selection, block_bytes_for, tile_blocks
from .tiles import RequestTiles


def dense_causal_attention(q, k_all, v_all, q_pos, scale, block_bytes=None, slots=None):
    """q [n, Hq, D] at positions q_pos [n]; keys/values [S, Hkv, D] (or the pool, read at
    ``slots[position]``). Returns [n, Hq, Dv]."""
    n, hq, _ = q.shape
    s = int(q_pos[-1]) + 1
    block_bytes = block_bytes or block_bytes_for(q.device)
    if slots is None:
        kh, vh = k_all[:s], v_all[:s]
    else:  # index_select: 2x faster than advanced indexing on the CPU
        kh, vh = k_all.index_select(0, slots[:s]), v_all.index_select(0, slots[:s])
    kh = kh.float().transpose(0, 1)[None]  # [1, Hkv, S, D]
    vh = vh.float().transpose(0, 1)[None]
    out = torch.empty(n, hq, v_all.shape[-1], dtype=q.dtype, device=q.device)
    step = max(1, block_bytes // max(1, 8 * hq * s))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        qb = q[lo:hi].float().transpose(0, 1)[None]  # [1, Hq, nb, D]
        causal_ok = torch.arange(s, device=q.device)[None, :] <= q_pos[lo:hi, None]  # [nb, S]
        o = torch.nn.functional.scaled_dot_product_attention(
            qb, kh, vh, attn_mask=causal_ok, scale=scale, enable_gqa=True)
        out[lo:hi] = o[0].transpose(0, 1).to(q.dtype)
    return out


class TileBlock(NamedTuple):
    """One block of tiles [a, b), its queries and the keys each tile attends, gathered."""
    q_idx: torch.Tensor  # [nt, Tm] query rows of each tile (padding rows repeat the first)
    q_ok: torch.Tensor  # [nt, Tm] bool: a real query (not padding)
    qt: torch.Tensor  # [Hkv*nt, G*Tm, D] float32 queries, a group's heads stacked as rows
    keys: torch.Tensor  # [Hkv*nt, K+Ld, D] float32: the selection's slots, then the diagonal
    vals: Optional[torch.Tensor]  # [Hkv*nt, K+Ld, Dv] float32, or None when not asked for
    mask: torch.Tensor  # [Hkv*nt, G*Tm, K+Ld] bool: the key is selected (valid) or causal


def tile_block(q_kv, k_rows, v_rows, tiles: RequestTiles, sel: Selection, a: int, b: int,
               n_pos: int, slots=None) -> TileBlock:
    """Gathers tiles [a, b) of ``tiles`` (already ``selected()``): q_kv [n, Hkv, G, D] float32,
    k_rows / v_rows the keys / values flattened to [rows * Hkv, D] (``v_rows`` None: no values).
    Each tile's keys are its selection's K slots, then its diagonal block [start, start + Ld)."""
    dev = q_kv.device
    hkv, g = q_kv.shape[1], q_kv.shape[2]
    heads = torch.arange(hkv, device=dev)[:, None, None]
    nt = b - a
    lo_q = torch.tensor(tiles.tile_q_lo[a:b], device=dev)
    hi_q = torch.tensor(tiles.tile_q_hi[a:b], device=dev)
    tm = int((hi_q - lo_q).max())
    q_idx = lo_q[:, None] + torch.arange(tm, device=dev)  # [nt, Tm]
    q_ok = q_idx < hi_q[:, None]
    q_idx = torch.where(q_ok, q_idx, lo_q[:, None])
    pos = tiles.q_pos[q_idx]  # [nt, Tm]
    starts = tiles.tile_start[a:b]
    n_diag = max(0, int((pos - starts[:, None]).max()) + 1)
    diag_pos = starts[:, None] + torch.arange(n_diag, device=dev)  # [nt, Ld]
    key_pos = torch.cat([sel.idx[:, a:b], diag_pos.expand(hkv, -1, -1)], dim=-1)
    key_pos = key_pos.clamp(max=n_pos - 1)  # [Hkv, nt, K+Ld]
    allowed = torch.cat([  # [Hkv, nt, Tm, K+Ld]
        sel.valid[:, a:b, None, :].expand(-1, -1, tm, -1),
        (diag_pos[:, None, :] <= pos[:, :, None]).expand(hkv, -1, -1, -1),
    ], dim=-1)
    rows = (key_pos if slots is None else slots[key_pos]) * hkv + heads  # [Hkv, nt, K+Ld]
    d = k_rows.shape[-1]
    keys = k_rows.index_select(0, rows.flatten()).view(hkv * nt, -1, d).float()
    vals = None
    if v_rows is not None:
        vals = v_rows.index_select(0, rows.flatten()).view(hkv * nt, -1, v_rows.shape[-1]).float()
    qt = q_kv[q_idx].permute(2, 0, 3, 1, 4).flatten(0, 1).flatten(1, 2)
    mask = allowed.unsqueeze(2).expand(-1, -1, g, -1, -1).flatten(0, 1).flatten(1, 2)
    return TileBlock(q_idx, q_ok, qt, keys, vals, mask)


def sparse_attention(
    q: torch.Tensor,  # [n, Hq, D]
    k_all: torch.Tensor,  # [S, Hkv, D], or the KV pool [slots, Hkv, D] with ``slots``
    v_all: torch.Tensor,  # [S, Hkv, Dv], or the KV pool
    tiles: RequestTiles,
    sel: Selection,  # already mapped to this layer's KV heads; covers tiles.selected()
    scale: float,
    block_bytes: int | None = None,  # None: block_bytes_for(q.device)
    slots: torch.Tensor | None = None,  # [S] int64 pool slot of each position
) -> torch.Tensor:
    if sel.dense:
        return dense_causal_attention(q, k_all, v_all, tiles.q_pos, scale, block_bytes, slots)
    block_bytes = block_bytes or block_bytes_for(q.device)
    n, hq, _ = q.shape
    hkv = k_all.shape[1]
    n_pos = k_all.shape[0] if slots is None else slots.shape[0]  # S
    out = torch.empty(n, hq, v_all.shape[-1], dtype=q.dtype, device=q.device)
    tail = tiles.tail_q_lo  # queries from here on: the dense tail
    if tail < n:
        out[tail:] = dense_causal_attention(q[tail:], k_all, v_all, tiles.q_pos[tail:], scale,
                                            block_bytes, slots)
    tiles = tiles.selected()
    # [rows * Hkv, D] (a view of a contiguous pool): a key of head h is row slot * Hkv + h, so
    # each tile's keys are one index_select (7x faster than [heads, rows] indexing on the CPU)
    k_rows, v_rows = k_all.flatten(0, 1), v_all.flatten(0, 1)
    q_kv = q.float().unflatten(1, (hkv, -1))  # [n, Hkv, G, D]
    for a, b in tile_blocks(tiles, row_bytes=8 * hq, block_bytes=block_bytes):
        blk = tile_block(q_kv, k_rows, v_rows, tiles, sel, a, b, n_pos, slots)
        o = torch.nn.functional.scaled_dot_product_attention(
            blk.qt, blk.keys, blk.vals, attn_mask=blk.mask, scale=scale)  # [Hkv*nt, G*Tm, Dv]
        tm = blk.q_idx.shape[1]
        o = o.unflatten(0, (hkv, b - a)).unflatten(2, (hq // hkv, tm))  # [Hkv, nt, G, Tm, Dv]
        o = o.permute(1, 3, 0, 2, 4).flatten(2, 3)  # [nt, Tm, Hq, Dv]
        out[blk.q_idx[blk.q_ok]] = o[blk.q_ok].to(q.dtype)
    return out
