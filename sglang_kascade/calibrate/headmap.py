"""Head map: which anchor KV head each reuse layer's KV head reads.

For a reuse layer j with anchor a (the largest anchor <= j), KV head h2 reads anchor head
argmax_{h1} sim[a, j, h2, h1]. Ties (within ``tie_tol``) prefer h1 == h2 (the identity), then
the lowest index. Anchor and dense layers get the identity row (the profile schema requires it).
"""

from __future__ import annotations

import torch


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
