"""A reuse layer's own Top-k among its anchor's candidates, in PyTorch (policy ``kascade_rerank``).

The anchor keeps ceil(C * k) keys per (KV head, tile) instead of k (``select_topk(widen=C)``);
a reuse layer reads them through its head map and keeps the k that its own queries weigh most:
each query's softmax over (the candidates + the tile's causal diagonal), summed over the GQA
group's heads and the tile's queries, as an anchor pools its scores over the whole row. So a
reuse layer attends k keys as before, chosen by its own attention among C * k; it scores
C * k keys per tile (an anchor scores all of them). C = 1 is plain reuse.

Reference: ``tests/helpers/reference.py::rerank`` (float64 loops).
"""

from __future__ import annotations

import torch

from .selection_torch import NEG_INF, Selection, block_bytes_for, tile_blocks
from .sparse_attention_torch import tile_block
from .tiles import RequestTiles


def rerank_selection(
    q: torch.Tensor,  # [n, Hq, D] queries of the reuse layer (one request)
    k_all: torch.Tensor,  # [S, Hkv, D], or the KV pool [slots, Hkv, D] with ``slots``
    tiles: RequestTiles,
    sel: Selection,  # the anchor's candidates mapped to this layer's KV heads; covers
                     # tiles.selected(), at least tile_k valid slots where the tile has them
    scale: float,
    block_bytes: int | None = None,
    slots: torch.Tensor | None = None,  # [S] int64 pool slot of each position
) -> Selection:
    """Each (KV head, tile) of ``tiles.selected()`` keeps its tile_k candidates of highest
    pooled probability, highest first: [Hkv, nt, max tile_k]."""
    if sel.dense:
        return sel
    tiles = tiles.selected()
    block_bytes = block_bytes or block_bytes_for(q.device)
    hq, hkv = q.shape[1], k_all.shape[1]
    n_pos = k_all.shape[0] if slots is None else slots.shape[0]
    n_cand = sel.idx.shape[-1]
    kout = min(int(tiles.tile_k.max()), n_cand)
    idx = torch.zeros(hkv, tiles.num_tiles, kout, dtype=torch.int64, device=q.device)
    valid = torch.zeros(hkv, tiles.num_tiles, kout, dtype=torch.bool, device=q.device)
    k_rows = k_all.flatten(0, 1)
    q_kv = q.float().unflatten(1, (hkv, -1))  # [n, Hkv, G, D]
    for a, b in tile_blocks(tiles, row_bytes=8 * hq, block_bytes=block_bytes):
        blk = tile_block(q_kv, k_rows, None, tiles, sel, a, b, n_pos, slots)
        logits = torch.bmm(blk.qt, blk.keys.transpose(1, 2)) * scale  # [Hkv*nt, G*Tm, K+Ld]
        probs = torch.softmax(logits.masked_fill_(~blk.mask, NEG_INF), dim=-1)
        real = blk.q_ok[None, :, None, :].expand(hkv, -1, hq // hkv, -1).flatten(0, 1)
        pooled = (probs[..., :n_cand] * real.flatten(1)[..., None]).sum(1)  # [Hkv*nt, K]
        pooled = pooled.view(hkv, b - a, n_cand).masked_fill_(~sel.valid[:, a:b], NEG_INF)
        kb = min(int(tiles.tile_k[a:b].max()), n_cand)
        top = pooled.topk(kb, dim=-1).indices  # [Hkv, nb, kb], highest first
        rank_ok = torch.arange(kb, device=q.device) < tiles.tile_k[a:b, None]
        idx[:, a:b, :kb] = torch.gather(sel.idx[:, a:b], 2, top)
        valid[:, a:b, :kb] = torch.gather(sel.valid[:, a:b], 2, top) & rank_ok
    return Selection(False, idx, valid)
