"""Head map: which anchor KV head each reuse layer's KV head reads.

For a reuse layer j with anchor a (the largest anchor <= j), KV head h2 reads anchor head
argmax_{h1} sim[a, j, h2, h1]. Ties (within ``tie_tol``) prefer h1 == h2 (the identity), then
the lowest index. Anchor and dense layers get the identity row (the profile schema requires it).

Under tensor parallelism (``--tp N``) the argmax runs over the anchor heads on h2's own rank only
(``rank_local_similarity``: the others at -inf), so the map is rank-local (sglang_kascade/tp.py).
"""

from __future__ import annotations

import torch

from ..tp import same_rank


def anchor_of(layer: int, anchors) -> int:
    return max(a for a in anchors if a <= layer)


def head_map(sim: torch.Tensor, anchors, dense_layers=(0,), tie_tol: float = 1e-9) -> list:
    """[num_layers][num_kv_heads] list of ints from sim [n, n, H2, H1]."""
    n, _, h, _ = sim.shape
    anchors = sorted(anchors)
    ident = list(range(h))
    rows = []
    for j in range(n):
        if j in anchors or j in dense_layers:
            rows.append(list(ident))
            continue
        s = sim[anchor_of(j, anchors), j].double()  # [H2, H1]
        best = s.amax(-1)
        row = []
        for h2 in range(h):
            if s[h2, h2] >= best[h2] - tie_tol:
                row.append(h2)
            else:
                row.append(int(torch.nonzero(s[h2] >= best[h2] - tie_tol)[0]))
        rows.append(row)
    return rows


def summarize(rows) -> dict:
    """How far the head map is from the identity."""
    h = len(rows[0]) if rows else 0
    remapped_rows = [i for i, r in enumerate(rows) if r != list(range(h))]
    moved = sum(1 for r in rows for h2, h1 in enumerate(r) if h1 != h2)
    return {"remapped_layers": remapped_rows, "remapped_heads": moved,
            "total_heads": len(rows) * h}


def rank_local_similarity(sim: torch.Tensor, tp_sizes) -> torch.Tensor:
    """sim [n, n, H2, H1] with every (h2, h1) that some TP size of ``tp_sizes`` puts on two
    ranks set to -inf: ``head_map`` and the DP's layer weights then see only rank-local
    choices (the identity always remains)."""
    h = sim.shape[-1]
    allowed = torch.tensor([[same_rank(h2, h1, h, tp_sizes) for h1 in range(h)]
                            for h2 in range(h)])
    return sim.masked_fill(~allowed.to(sim.device), float("-inf"))


def map_similarity(sim: torch.Tensor, anchors, rows, dense_layers=(0,)) -> float:
    """Mean over reuse layers j and KV heads h2 of sim[anchor(j), j, h2, rows[j][h2]]: the
    fraction of each reuse head's own Top-k attention mass the head map's selection recovers
    (min over query tiles, mean over samples; calibration's similarity). 1.0 without reuse
    layers."""
    vals = [float(sim[anchor_of(j, anchors), j, h2, h1])
            for j, row in enumerate(rows) if j not in anchors and j not in dense_layers
            for h2, h1 in enumerate(row)]
    return sum(vals) / len(vals) if vals else 1.0
