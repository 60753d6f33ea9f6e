"""Choosing anchor layers: a dynamic program over the layer-to-layer weight matrix W.

W[l1, l2] = imp[l2] * mean_{h2} max_{h1} sim[l1, l2, h2, h1]   (l1 <= l2; -inf otherwise):
how much of layer l2's importance-weighted Top-k mass survives if l2 reuses l1's selection,
each target head taking its best source head (the head map).

With anchors 0 = a_0 < a_1 < ... < a_{K-1} and anchor(j) the largest a_i <= j, the score is
sum_j W[anchor(j), j]. Layer 0 is always an anchor. Let C(a, b) = sum_{a <= j < b} W[a, j] (an
anchor at a serving layers a..b-1) and best[k][i] the best score of layers [0, i) with k anchors
whose last segment ends at i; then best[1][i] = C(0, i) and
best[k][i] = max_{k-1 <= l < i} best[k-1][l] + C(l, i); the answer is best[K][n]. Ties go to the
smaller l (earlier anchors). O(K n^2).

Since W[j, j] = imp[j] >= W[a, j] (sim[j, j, h, h] = 1), the best score never decreases with K;
it is at most sum_j imp[j] (every layer an anchor), so ``score / sum(imp)`` is reported as the
normalised score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def layer_weights(sim: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    """W [n, n] float64 from sim [n, n, H2, H1] and imp [n]; -inf below the diagonal."""
    n = sim.shape[0]
    w = sim.double().amax(-1).mean(-1) * imp.double()[None, :]
    lower = torch.ones(n, n, dtype=torch.bool).tril(-1)
    return w.masked_fill(lower, float("-inf"))


@dataclass(frozen=True)
class AnchorChoice:
    num_anchors: int
    anchors: tuple
    score: float


def score_of(W, anchors) -> float:
    """sum_j W[anchor(j), j] for a given anchor set (must contain 0)."""
    W = torch.as_tensor(W, dtype=torch.float64)
    anchors = sorted(anchors)
    if not anchors or anchors[0] != 0:
        raise ValueError("anchors must include layer 0")
    total, cur = 0.0, 0
    for j in range(W.shape[0]):
        if j in anchors:
            cur = j
        total += float(W[cur, j])
    return total


def choose_anchors(W, num_anchors: int) -> AnchorChoice:
    """Exactly ``num_anchors`` anchors, layer 0 included, maximising sum_j W[anchor(j), j]."""
    W = torch.as_tensor(W, dtype=torch.float64)
    n = W.shape[0]
    K = int(num_anchors)
    if not 1 <= K <= n:
        raise ValueError(f"num_anchors={K}: must be in [1, {n}] (the number of layers)")
    w = W.tolist()
    # C[a][b] = sum_{a <= j < b} W[a][j], for a < b <= n
    C = [[0.0] * (n + 1) for _ in range(n)]
    for a in range(n):
        s = 0.0
        for b in range(a + 1, n + 1):
            s += w[a][b - 1]
            C[a][b] = s
    neg = -math.inf
    best = [[neg] * (n + 1) for _ in range(K + 1)]
    back = [[-1] * (n + 1) for _ in range(K + 1)]
    for i in range(1, n + 1):
        best[1][i] = C[0][i]
        back[1][i] = 0
    for k in range(2, K + 1):
        for i in range(k, n + 1):
            for l in range(k - 1, i):
                v = best[k - 1][l] + C[l][i]
                if v > best[k][i]:
                    best[k][i], back[k][i] = v, l
    anchors, i = [], n
    for k in range(K, 0, -1):
        l = back[k][i] if k > 1 else 0
        anchors.append(l)
        i = l
    return AnchorChoice(K, tuple(sorted(anchors)), best[K][n])


def choose_all(W, counts) -> dict:
    """{K: AnchorChoice} for every K in ``counts`` (clipped to the number of layers)."""
    n = torch.as_tensor(W).shape[0]
    return {k: choose_anchors(W, k) for k in sorted(set(counts)) if 1 <= k <= n}
