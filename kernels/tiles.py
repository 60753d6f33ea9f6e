"""Query tiles of one request: which tile each query belongs to, and where each tile starts.

Tiles are aligned to absolute positions (tile t covers positions [t*T, (t+1)*T)), so a request
split by a cached prefix or by chunked prefill at a multiple of T is tiled exactly as a cold,
whole-prompt run. A decode query is one tile whose start is the sequence length: every key
(the new one included) is a candidate and the diagonal block is empty.

An extend's *dense tail* (``BudgetConfig.dense_tail``): the tiles holding any of its last N
positions attend every key (budget k = start) without a selection; ``RequestTiles.dense_from``
is the first of them, ``selected()`` the tiles before it, the ones a selection covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RequestTiles:
    q_pos: torch.Tensor  # [n] int64, absolute position of each query
    q_tile: torch.Tensor  # [n] int64, tile index of each query in 0..nt-1
    tile_start: torch.Tensor  # [nt] int64, first candidate-excluded position (= keys selectable)
    tile_k: torch.Tensor  # [nt] int64, Top-k budget of each tile (<= tile_start)
    tile_q_lo: list  # [nt] first query index (into q) of each tile
    tile_q_hi: list  # [nt] one past the last query index of each tile
    dense_from: int | None = None  # first tile of the dense tail (attends densely), or None

    @property
    def num_tiles(self) -> int:
        return int(self.tile_start.numel())

    @property
    def tail_q_lo(self) -> int:
        """First query (index into q) of the dense tail; the number of queries if none."""
        if self.dense_from is None:
            return int(self.q_pos.numel())
        return self.tile_q_lo[self.dense_from]

    def selected(self) -> "RequestTiles":
        """The tiles that select keys: every tile, or those before the dense tail (a selection
        of this request covers these; the tail's queries attend densely)."""
        if self.dense_from is None:
            return self
        t, n = self.dense_from, self.tail_q_lo
        return RequestTiles(q_pos=self.q_pos[:n], q_tile=self.q_tile[:n],
                            tile_start=self.tile_start[:t], tile_k=self.tile_k[:t],
                            tile_q_lo=self.tile_q_lo[:t], tile_q_hi=self.tile_q_hi[:t])

    @property
    def all_dense(self) -> bool:
        """Every tile selects all of its candidates: the result is exactly dense attention."""
        return bool((self.tile_k >= self.tile_start).all())


def tile_bounds(prefix_len: int, extend_len: int, tile_size: int, query_tail: int = 0) -> list:
    """(start, first position, end position) of each query tile of an extend, in order: tiles
    of ``tile_size`` aligned to absolute positions, then one tile per query for its last
    ``query_tail`` positions (start = the query's position). Shared by ``tile_budgets`` and the
    batch plan of the prefill kernels (``prefill_plan.plan_prefill_tiles``)."""
    end = prefix_len + extend_len
    split = max(prefix_len, end - query_tail)  # single-query tiles from here on
    bounds = []
    if split > prefix_len:
        for t in range(prefix_len // tile_size, (split - 1) // tile_size + 1):
            s = t * tile_size
            bounds.append((s, max(s, prefix_len), min(s + tile_size, split)))
    return bounds + [(p, p, p + 1) for p in range(split, end)]


def tile_budgets(prefix_len: int, extend_len: int, tile_size: int, k_for, dense_tail: int = 0,
                 query_tail: int = 0):
    """(start, budget k, first position, end position, in the dense tail) of each query tile of
    an extend (``tile_bounds``); a tile holding any of the last ``dense_tail`` positions reads
    all of its candidates (k = start). Shared by ``extend_tiles`` and ``extend_key_counts``."""
    end = prefix_len + extend_len
    for s, p0, p1 in tile_bounds(prefix_len, extend_len, tile_size, query_tail):
        tail = dense_tail > 0 and p1 > end - dense_tail
        yield s, (s if tail else k_for(s)), p0, p1, tail


def extend_key_counts(prefix_len: int, extend_len: int, tile_size: int, k_for,
                      dense_tail: int = 0, query_tail: int = 0) -> tuple[int, int]:
    """(keys read, candidate keys) summed over the queries of an extend, as ``extend_tiles``
    lays them out (each query counts its tile's ``tile_k`` and ``tile_start``; the causal
    diagonal, read by every variant, is left out). Plain integers, no tensors: the backend's
    counters call it per request per prefill forward."""
    read = cand = 0
    for s, k, p0, p1, _ in tile_budgets(prefix_len, extend_len, tile_size, k_for, dense_tail,
                                        query_tail):
        read += (p1 - p0) * k
        cand += (p1 - p0) * s
    return read, cand


def extend_tiles(prefix_len: int, extend_len: int, tile_size: int, k_for, device,
                 dense_tail: int = 0, query_tail: int = 0) -> RequestTiles:
    """Tiles for an extend of ``extend_len`` new tokens after ``prefix_len`` cached ones; the
    tiles holding any of its last ``dense_tail`` positions are its dense tail; its last
    ``query_tail`` positions are tiles of one query each (selecting per query, as decode)."""
    end = prefix_len + extend_len
    starts, ks, lo, hi = [], [], [], []
    dense_from = None
    for i, (s, k, p0, p1, tail) in enumerate(tile_budgets(prefix_len, extend_len, tile_size,
                                                          k_for, dense_tail, query_tail)):
        if tail and dense_from is None:
            dense_from = i
        starts.append(s)
        ks.append(k)
        lo.append(p0 - prefix_len)
        hi.append(p1 - prefix_len)
    counts = torch.tensor([b - a for a, b in zip(lo, hi)], device=device)
    return RequestTiles(
        q_pos=torch.arange(prefix_len, end, device=device),
        q_tile=torch.repeat_interleave(torch.arange(len(starts), device=device), counts),
        tile_start=torch.tensor(starts, dtype=torch.int64, device=device),
        tile_k=torch.tensor(ks, dtype=torch.int64, device=device),
        tile_q_lo=lo,
        tile_q_hi=hi,
        dense_from=dense_from,
    )


def decode_tiles(seq_len: int, k_for, device) -> RequestTiles:
    """One decode query at position seq_len-1; all seq_len keys are candidates."""
    return RequestTiles(
        q_pos=torch.tensor([seq_len - 1], device=device),
        q_tile=torch.zeros(1, dtype=torch.int64, device=device),
        tile_start=torch.tensor([seq_len], dtype=torch.int64, device=device),
        tile_k=torch.tensor([k_for(seq_len)], dtype=torch.int64, device=device),
        tile_q_lo=[0],
        tile_q_hi=[1],
    )
