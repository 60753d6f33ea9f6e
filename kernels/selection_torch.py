"""Anchor-layer Top-k selection in PyTorch (CPU serving path; reference for GPU kernels).

For each query: exact post-softmax probabilities over its whole causal row. They are pooled per
KV head (sum over the GQA group's query heads) and per tile (sum over the tile's queries), and
the Top-k keys are chosen among the tile's candidates (positions < tile_start). Scores are
computed one block of tiles at a time, so memory is bounded by ``block_bytes``, never L x L.

``pool_all_heads`` (the ``kascade_pooled`` policy) also sums the pooled probabilities over the KV
heads: one selection per tile, shared by every KV head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .tiles import RequestTiles

NEG_INF = float("-inf")
DEFAULT_BLOCK_BYTES = 256 << 20  # scores of one block of tiles on a GPU: few, large launches
# On the CPU: blocks that stay in cache and skip most of the causal upper triangle. Measured on
# the development machine (SmolLM2-135M shapes, one request): an anchor's selection at 2K / 8K
# tokens 195 / 1566 ms with 256 MiB blocks, 39 / 687 ms with 8 MiB (docs/results/cpu-serving.md).
CPU_BLOCK_BYTES = 8 << 20


def block_bytes_for(device) -> int:
    """Default bound on the scores of one block of tiles on ``device``."""
    return CPU_BLOCK_BYTES if torch.device(device).type == "cpu" else DEFAULT_BLOCK_BYTES


@dataclass(frozen=True)
class Selection:
    """One anchor's choice for one request. ``dense`` means every candidate was chosen."""

    dense: bool
    idx: Optional[torch.Tensor] = None  # [Hkv, nt, kmax] int64 key positions (unspecified where ~valid)
    valid: Optional[torch.Tensor] = None  # [Hkv, nt, kmax] bool

    def for_heads(self, head_map: torch.Tensor) -> "Selection":
        """The selection seen by a reuse layer: its KV head h reads anchor head head_map[h]."""
        if self.dense:
            return self
        return Selection(False, self.idx[head_map], self.valid[head_map])

    def narrow(self, tile_k: torch.Tensor) -> "Selection":
        """The first ``tile_k`` [nt] slots of each tile: its tile_k highest keys where the slots
        are in rank order (``select_topk`` at token granularity, ``rerank_selection``)."""
        if self.dense:
            return self
        rank = torch.arange(self.idx.shape[-1], device=self.idx.device)
        return Selection(False, self.idx, self.valid & (rank < tile_k[:, None]))


def wide_k(tile_k: torch.Tensor, widen: float) -> torch.Tensor:
    """ceil(widen * tile_k) [nt]: the candidates an anchor keeps for its reuse layers to re-rank
    (policy kascade_rerank). The slack keeps an exact product (2.0 * 64) from gaining a key."""
    return torch.ceil(tile_k.double() * widen - 1e-9).long()


def tile_blocks(tiles: RequestTiles, row_bytes: int, block_bytes: int) -> Iterator[tuple]:
    """Consecutive tile ranges [a, b) whose queries' score rows fit in ``block_bytes``.

    ``row_bytes`` is the cost of one query's scores over one key (all heads together).
    """
    nt = tiles.num_tiles
    a = 0
    while a < nt:
        b = a + 1
        while b < nt:
            n_q = tiles.tile_q_hi[b] - tiles.tile_q_lo[a]
            n_keys = int(tiles.q_pos[tiles.tile_q_hi[b] - 1]) + 1
            if n_q * n_keys * row_bytes > block_bytes:
                break
            b += 1
        yield a, b
        a = b


def query_probs(q, k_all, tiles: RequestTiles, a: int, b: int, scale: float, k_t=None):
    """Post-softmax probabilities of the queries of tiles [a, b) over their causal rows:
    [Hkv, G, n, L] float32, n = those queries in order, L = the last one's position + 1.

    ``k_t`` optionally passes ``k_all`` already as float32 [Hkv, D, S] (reused across blocks).
    """
    lo, hi = tiles.tile_q_lo[a], tiles.tile_q_hi[b - 1]
    q_pos = tiles.q_pos[lo:hi]
    n, n_keys = hi - lo, int(q_pos[-1]) + 1
    hkv = k_all.shape[1]
    if k_t is None:
        k_t = k_all.float().permute(1, 2, 0)  # [Hkv, D, S]
    # [Hkv, G*n, D]: a group's query heads stacked as rows, so one bmm per KV head.
    qb = (q[lo:hi].float() * scale).unflatten(1, (hkv, -1)).permute(1, 2, 0, 3).flatten(1, 2)
    logits = torch.bmm(qb, k_t[:, :, :n_keys])  # [Hkv, G*n, L]
    causal = torch.arange(n_keys, device=q.device)[None, :] > q_pos[:, None]  # [n, L]
    logits = logits.unflatten(1, (-1, n)).masked_fill_(causal, NEG_INF)  # [Hkv, G, n, L]
    return torch.softmax(logits, dim=-1)


def pooled_tile_probs(q, k_all, tiles: RequestTiles, a: int, b: int, scale: float,
                      k_t=None):
    """Pooled probabilities of tiles [a, b): [Hkv, b-a, L] with L = last query position + 1:
    ``query_probs`` summed over each GQA group's heads and each tile's queries."""
    lo, hi = tiles.tile_q_lo[a], tiles.tile_q_hi[b - 1]
    pooled_q = query_probs(q, k_all, tiles, a, b, scale, k_t).sum(1)  # [Hkv, n, L]
    pooled = pooled_q.new_zeros(k_all.shape[1], b - a, pooled_q.shape[-1])
    pooled.index_add_(1, tiles.q_tile[lo:hi] - a, pooled_q)
    return pooled


def _tile_mass(tiles: RequestTiles, a: int, b: int, heads: int) -> torch.Tensor:
    """[b-a] float32: the pooled probability of tiles [a, b) over their whole causal rows
    (each query's row sums to 1 in each of the ``heads`` pooled query heads)."""
    n_q = [hi - lo for lo, hi in zip(tiles.tile_q_lo[a:b], tiles.tile_q_hi[a:b])]
    return torch.tensor(n_q, dtype=torch.float32, device=tiles.tile_start.device) * heads


def select_topk(
    q: torch.Tensor,  # [n, Hq, D] queries of one request
    k_all: torch.Tensor,  # [S, Hkv, D] keys of the request in position order
    tiles: RequestTiles,
    scale: float,
    granularity: str = "token",
    page_tile_size: int = 16,
    block_bytes: int | None = None,  # None: block_bytes_for(q.device)
    pool_all_heads: bool = False,
    mass: float = 1.0,
    mass_floor: int = 0,
    widen: float = 1.0,
) -> Selection:
    """Each (KV head, tile) keeps its tile_k highest pooled scores, highest first at token
    granularity. ``widen`` > 1 (token granularity) keeps ceil(widen * tile_k) of them (at most
    the tile's candidates): the candidates a reuse layer re-ranks (``rerank_selection``);
    ``narrow(tiles.tile_k)`` is then the anchor's own Top-k. ``mass`` < 1 (token
    granularity only) follows the attention mass instead, with tile_k as the cap: a tile keeps
    its fewest top keys that, with the causal diagonal (always read), hold ``mass`` of the
    pooled probability of its queries, and at least its ``mass_floor`` top keys; the rest of
    the slots are left invalid."""
    if tiles.all_dense:
        return Selection(dense=True)
    block_bytes = block_bytes or block_bytes_for(q.device)
    hkv_all, hq = k_all.shape[1], q.shape[1]
    hkv = 1 if pool_all_heads else hkv_all  # heads with their own selection
    page = page_tile_size if granularity == "page" else 1
    if widen != 1.0 and (page != 1 or mass < 1.0):
        raise ValueError("widen applies to token granularity without mass")
    k_units = (tiles.tile_k + page - 1) // page  # [nt] tokens, or key tiles in page mode
    if widen != 1.0:
        k_units = torch.minimum(wide_k(tiles.tile_k, widen), tiles.tile_start)
    kmax = int(k_units.max()) * page
    nt = tiles.num_tiles
    idx = torch.zeros(hkv, nt, kmax, dtype=torch.int64, device=q.device)
    valid = torch.zeros(hkv, nt, kmax, dtype=torch.bool, device=q.device)
    k_t = k_all.float().permute(1, 2, 0)  # [Hkv, D, S]
    for a, b in tile_blocks(tiles, row_bytes=8 * hq, block_bytes=block_bytes):
        pooled = pooled_tile_probs(q, k_all, tiles, a, b, scale, k_t)  # [Hkv, nt_b, L]
        if pool_all_heads:
            pooled = pooled.sum(0, keepdim=True)  # [1, nt_b, L]
        n_keys = pooled.shape[-1]
        starts = tiles.tile_start[a:b]
        key_pos = torch.arange(n_keys, device=q.device)
        candidate = key_pos[None, :] < starts[:, None]  # [nt_b, L]
        if page == 1:
            if mass < 1.0:  # what the candidates must cover: [Hkv, nt_b]
                need = ((pooled * candidate).sum(-1)
                        - (1.0 - mass) * _tile_mass(tiles, a, b, hq // hkv))
            scores = pooled.masked_fill_(~candidate, NEG_INF)
            kb = min(int(k_units[a:b].max()), n_keys)
            top = scores.topk(kb, dim=-1)  # [Hkv, nt_b, kb], highest first
            rank_ok = torch.arange(kb, device=q.device)[None, :] < k_units[a:b, None]
            if mass < 1.0:
                got = top.values.clamp(min=0.0)
                floor = torch.arange(kb, device=q.device) < mass_floor
                rank_ok = rank_ok & (((got.cumsum(-1) - got) < need[..., None]) | floor)
            idx[:, a:b, :kb] = top.indices
            valid[:, a:b, :kb] = rank_ok.expand(hkv, -1, -1)
        else:
            n_pages = math.ceil(n_keys / page)
            padded = pooled.masked_fill_(~candidate, 0.0)
            padded = torch.nn.functional.pad(padded, (0, n_pages * page - n_keys))
            page_scores = padded.unflatten(-1, (n_pages, page)).sum(-1)  # [Hkv, nt_b, P]
            page_start = torch.arange(n_pages, device=q.device) * page
            page_candidate = page_start[None, :] < starts[:, None]
            page_scores.masked_fill_(~page_candidate, NEG_INF)
            kp = min(int(k_units[a:b].max()), n_pages)
            top_pages = page_scores.topk(kp, dim=-1).indices  # [Hkv, nt_b, kp]
            pos = (top_pages[..., None] * page + torch.arange(page, device=q.device)).flatten(-2)
            rank_ok = torch.arange(kp, device=q.device)[None, :] < k_units[a:b, None]
            ok = rank_ok.repeat_interleave(page, dim=-1)[None] & (pos < starts[None, :, None])
            idx[:, a:b, : kp * page] = torch.where(ok, pos, 0)
            valid[:, a:b, : kp * page] = ok
    if pool_all_heads:  # one selection, seen by every KV head
        idx, valid = idx.expand(hkv_all, -1, -1), valid.expand(hkv_all, -1, -1)
    return Selection(dense=False, idx=idx, valid=valid)
