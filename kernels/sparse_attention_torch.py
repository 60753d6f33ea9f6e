"""Attention over a Kascade selection in PyTorch (CPU serving path; reference for GPU kernels).

Each query attends to the selected candidate keys of its tile (through the layer's head map, for
reuse layers) plus the tile's own keys from the tile start up to itself (the causal diagonal
block). A dense selection is plain causal attention. Work is done one block of tiles at a time.
"""

from __future__ import annotations

import torch

from .selection_torch import DEFAULT_BLOCK_BYTES, NEG_INF, Selection, tile_blocks
from .tiles import RequestTiles


def dense_causal_attention(q, k_all, v_all, q_pos, scale, block_bytes=DEFAULT_BLOCK_BYTES):
    """q [n, Hq, D] at positions q_pos [n]; keys/values [S, Hkv, D]. Returns [n, Hq, D]."""
    n, hq, d = q.shape
    hkv = k_all.shape[1]
    out = torch.empty(n, hq, v_all.shape[-1], dtype=q.dtype, device=q.device)
    s = int(q_pos[-1]) + 1
    step = max(1, block_bytes // max(1, 8 * hq * s))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        pos = q_pos[lo:hi]
        n_keys = int(pos[-1]) + 1
        qb = q[lo:hi].float().unflatten(1, (hkv, -1))  # [nb, Hkv, G, D]
        logits = torch.einsum("nkgd,lkd->kgnl", qb, k_all[:n_keys].float()) * scale
        causal = torch.arange(n_keys, device=q.device)[None, :] > pos[:, None]
        probs = logits.masked_fill_(causal, NEG_INF).softmax(-1)  # [Hkv, G, nb, L]
        o = torch.einsum("kgnl,lkd->nkgd", probs, v_all[:n_keys].float())
        out[lo:hi] = o.flatten(1, 2).to(q.dtype)
    return out


def sparse_attention(
    q: torch.Tensor,  # [n, Hq, D]
    k_all: torch.Tensor,  # [S, Hkv, D]
    v_all: torch.Tensor,  # [S, Hkv, Dv]
    tiles: RequestTiles,
    sel: Selection,  # already mapped to this layer's KV heads
    scale: float,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> torch.Tensor:
    if sel.dense:
        return dense_causal_attention(q, k_all, v_all, tiles.q_pos, scale, block_bytes)
    n, hq, _ = q.shape
    hkv = k_all.shape[1]
    kh = k_all.transpose(0, 1)  # [Hkv, S, D]
    vh = v_all.transpose(0, 1)
    heads = torch.arange(hkv, device=q.device)[:, None, None]
    out = torch.empty(n, hq, v_all.shape[-1], dtype=q.dtype, device=q.device)
    kmax = sel.idx.shape[-1]
    for a, b in tile_blocks(tiles, row_bytes=8 * hq, block_bytes=block_bytes):
        lo_q = torch.tensor(tiles.tile_q_lo[a:b], device=q.device)
        hi_q = torch.tensor(tiles.tile_q_hi[a:b], device=q.device)
        tm = int((hi_q - lo_q).max())
        q_idx = lo_q[:, None] + torch.arange(tm, device=q.device)  # [nt_b, Tm]
        q_ok = q_idx < hi_q[:, None]
        q_idx = torch.where(q_ok, q_idx, lo_q[:, None])
        qt = q[q_idx].float().unflatten(2, (hkv, -1))  # [nt_b, Tm, Hkv, G, D]
        pos = tiles.q_pos[q_idx]  # [nt_b, Tm]
        starts = tiles.tile_start[a:b]

        k_sel = kh[heads, sel.idx[:, a:b]].float()  # [Hkv, nt_b, kmax, D]
        v_sel = vh[heads, sel.idx[:, a:b]].float()
        s_sel = torch.einsum("tqkgd,ktjd->kgtqj", qt, k_sel) * scale  # [Hkv,G,nt_b,Tm,kmax]
        s_sel.masked_fill_(~sel.valid[:, None, a:b, None, :], NEG_INF)

        n_diag = max(0, int((pos - starts[:, None]).max()) + 1)
        diag_pos = starts[:, None] + torch.arange(n_diag, device=q.device)  # [nt_b, Ld]
        diag_ok = diag_pos[:, None, :] <= pos[:, :, None]  # [nt_b, Tm, Ld]
        diag_pos = diag_pos.clamp(max=k_all.shape[0] - 1)
        k_diag = kh[:, diag_pos].float()  # [Hkv, nt_b, Ld, D]
        v_diag = vh[:, diag_pos].float()
        s_diag = torch.einsum("tqkgd,ktjd->kgtqj", qt, k_diag) * scale
        s_diag.masked_fill_(~diag_ok[None, None], NEG_INF)

        probs = torch.cat([s_sel, s_diag], dim=-1).softmax(-1)
        o = torch.einsum("kgtqj,ktjd->tqkgd", probs[..., :kmax], v_sel)
        o += torch.einsum("kgtqj,ktjd->tqkgd", probs[..., kmax:], v_diag)
        out[q_idx[q_ok]] = o.flatten(2, 3)[q_ok].to(q.dtype)
    return out
