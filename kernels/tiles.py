"""Query tiles of one request: which tile each query belongs to, and where each tile starts.

Tiles are aligned to absolute positions (tile t covers positions [t*T, (t+1)*T)), so a request
split by a cached prefix or by chunked prefill at a multiple of T is tiled exactly as a cold,
whole-prompt run. A decode query is one tile whose start is the sequence length: every key
(the new one included) is a candidate and the diagonal block is empty.
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

    @property
    def num_tiles(self) -> int:
        return int(self.tile_start.numel())

    @property
    def all_dense(self) -> bool:
        """Every tile selects all of its candidates: the result is exactly dense attention."""
        return bool((self.tile_k >= self.tile_start).all())


def extend_tiles(prefix_len: int, extend_len: int, tile_size: int, k_for, device) -> RequestTiles:
    """Tiles for an extend of ``extend_len`` new tokens after ``prefix_len`` cached ones."""
    first = prefix_len // tile_size
    last = (prefix_len + extend_len - 1) // tile_size
    starts, ks, lo, hi = [], [], [], []
    for t in range(first, last + 1):
        s = t * tile_size
        q0 = max(s, prefix_len) - prefix_len
        q1 = min(s + tile_size, prefix_len + extend_len) - prefix_len
        starts.append(s)
        ks.append(k_for(s))
        lo.append(q0)
        hi.append(q1)
    q_pos = torch.arange(prefix_len, prefix_len + extend_len, device=device)
    return RequestTiles(
        q_pos=q_pos,
        q_tile=q_pos // tile_size - first,
        tile_start=torch.tensor(starts, dtype=torch.int64, device=device),
        tile_k=torch.tensor(ks, dtype=torch.int64, device=device),
        tile_q_lo=lo,
        tile_q_hi=hi,
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
