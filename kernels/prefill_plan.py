"""Host plan of a ragged extend batch for the prefill kernels: query tiles across all requests.

Pure Python + torch, testable on the CPU. Tiles are aligned to absolute positions (tile t of a
request covers positions [t*T, (t+1)*T)), as in kernels/tiles.py, so a cached prefix or chunk
boundary inside a tile gives a first tile holding only the queries present in this extend; an
extend's query tail is one tile per query (``BudgetConfig.query_tail``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tiles import tile_bounds


@dataclass(frozen=True)
class PrefillTiles:
    """All tiles of a batch, in request order then position order (device int32 tensors)."""

    tile_req: torch.Tensor  # [nt] request index b of each tile
    tile_start: torch.Tensor  # [nt] tile start s: candidates are positions < s
    tile_q_lo: torch.Tensor  # [nt] first query row (into the flattened q [N, Hq, D])
    tile_q_len: torch.Tensor  # [nt] queries of the tile present in this extend (1..T)
    tile_p_lo: torch.Tensor  # [nt] absolute position of the first of them
    req_first_tile: list  # [B + 1] host: tiles of request b are [first[b], first[b+1])
    host_start: list  # [nt] host copy of tile_start (budgets are planned on the host)

    @property
    def num_tiles(self) -> int:
        return int(self.tile_start.numel())


def plan_prefill_tiles(prefix_lens, extend_lens, tile_size: int, device,
                       query_tail: int = 0) -> PrefillTiles:
    """Tiles of an extend batch: request b has ``extend_lens[b]`` new queries after
    ``prefix_lens[b]`` cached keys; its queries are rows qo_start[b].. of the flattened q. Each
    request is tiled as ``tiles.extend_tiles`` tiles it (``tile_bounds``: its last
    ``query_tail`` positions one query per tile)."""
    req, start, q_lo, q_len, p_lo, first = [], [], [], [], [], [0]
    row = 0
    for b, (prefix, n) in enumerate(zip(prefix_lens, extend_lens)):
        for s, lo, hi in tile_bounds(prefix, n, tile_size, query_tail):
            req.append(b)
            start.append(s)
            q_lo.append(row + lo - prefix)
            q_len.append(hi - lo)
            p_lo.append(lo)
        row += n
        first.append(len(req))

    def t(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    return PrefillTiles(t(req), t(start), t(q_lo), t(q_len), t(p_lo), first, start)
