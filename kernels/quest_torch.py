"""Quest page selection in PyTorch: the ``quest`` policy (Tang et al. 2024, "Quest: Query-Aware
Sparsity for Efficient Long-Context LLM Inference").

Keys are grouped in pages of ``page_size`` positions aligned to absolute positions (page p covers
``[p*P, (p+1)*P)``). For a tile with start s, a page's summary is the elementwise min and max of
its *candidate* keys (positions < s; only the page holding s-1 can be cut short). The upper bound
of a query q on a page, ``sum_d max(q_d * min_d, q_d * max_d)``, bounds ``q . k`` for every key k
of the page.

Pooling (our choice; Quest scores one decode query per attention head): the score of a page for a
(KV head, tile) is the SUM of the per-query upper bounds over the GQA group's query heads and the
tile's queries -- the same queries Kascade's selection pools over. The sum is computed exactly by
pooling the queries first: ``max(x*lo, x*hi) = relu(x)*hi - relu(-x)*lo``, so the sum over
queries i is ``Qpos . max - Qneg . min`` with ``Qpos = sum_i relu(q_i)`` and
``Qneg = sum_i relu(-q_i)``.

The Top ``ceil(k / P)`` pages among those holding a candidate are chosen and all their candidate
keys are attended (plus the causal diagonal block, as for every selection). The result is a
``Selection`` like ``select_topk``'s.
"""

from __future__ import annotations

import math

import torch

from .selection_torch import DEFAULT_BLOCK_BYTES, NEG_INF, Selection
from .tiles import RequestTiles


def select_quest(
    q: torch.Tensor,  # [n, Hq, D] queries of one request
    k_all: torch.Tensor,  # [S, Hkv, D] keys of the request in position order
    tiles: RequestTiles,
    scale: float,
    page_size: int = 16,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Selection:
    if tiles.all_dense:
        return Selection(dense=True)
    hkv, d = k_all.shape[1], k_all.shape[2]
    dev, nt, P = q.device, tiles.num_tiles, page_size
    starts = tiles.tile_start  # [nt]

    # Pooled positive and negative parts of the tile's queries: [Hkv, nt, D].
    qg = (q.float() * scale).unflatten(1, (hkv, -1))  # [n, Hkv, G, D]
    q_plus = torch.zeros(nt, hkv, d, device=dev).index_add_(0, tiles.q_tile, qg.clamp(min=0).sum(2))
    q_minus = torch.zeros(nt, hkv, d, device=dev).index_add_(
        0, tiles.q_tile, (-qg).clamp(min=0).sum(2))
    q_plus, q_minus = q_plus.transpose(0, 1), q_minus.transpose(0, 1)

    # Running min / max inside each page: run_min[j] = min of keys [page start of j, j].
    n_keys = int(starts.max())
    n_pages = math.ceil(n_keys / P)
    kf = torch.nn.functional.pad(k_all[:n_keys].float(), (0, 0, 0, 0, 0, n_pages * P - n_keys))
    kf = kf.unflatten(0, (n_pages, P))  # [pages, P, Hkv, D]; zero padding is never read (below)
    run_min = kf.cummin(dim=1).values.flatten(0, 1)  # [pages*P, Hkv, D]
    run_max = kf.cummax(dim=1).values.flatten(0, 1)
    # Whole-page summaries [Hkv, D, pages]; a page cut by a tile start is re-scored per tile.
    page_min = run_min[P - 1::P].permute(1, 2, 0)
    page_max = run_max[P - 1::P].permute(1, 2, 0)

    k_pages = (tiles.tile_k + P - 1) // P  # [nt] pages to choose
    kmax = int(k_pages.max()) * P
    idx = torch.zeros(hkv, nt, kmax, dtype=torch.int64, device=dev)
    valid = torch.zeros(hkv, nt, kmax, dtype=torch.bool, device=dev)
    page_ids = torch.arange(n_pages, device=dev)
    step = max(1, block_bytes // (16 * hkv * n_pages))  # scores + Top-k of one tile, with slack
    for a in range(0, nt, step):
        b = min(nt, a + step)
        s = starts[a:b]
        scores = (torch.bmm(q_plus[:, a:b], page_max)
                  - torch.bmm(q_minus[:, a:b], page_min))  # [Hkv, nt_b, pages]
        # The page holding s-1 when s is not a page boundary: summary over [page start, s).
        cut = torch.nonzero(s % P).flatten()
        if cut.numel():
            last = s[cut] - 1
            part = ((q_plus[:, a + cut] * run_max[last].transpose(0, 1)).sum(-1)
                    - (q_minus[:, a + cut] * run_min[last].transpose(0, 1)).sum(-1))
            scores[:, cut, last // P] = part
        eligible = page_ids[None, :] * P < s[:, None]  # [nt_b, pages]: holds a candidate
        scores.masked_fill_(~eligible, NEG_INF)
        kp = min(int(k_pages[a:b].max()), n_pages)
        if kp == 0:
            continue
        top = scores.topk(kp, dim=-1).indices  # [Hkv, nt_b, kp]
        pos = (top[..., None] * P + torch.arange(P, device=dev)).flatten(-2)  # [Hkv, nt_b, kp*P]
        rank_ok = torch.arange(kp, device=dev)[None, :] < k_pages[a:b, None]
        ok = rank_ok.repeat_interleave(P, dim=-1)[None] & (pos < s[None, :, None])
        idx[:, a:b, : kp * P] = torch.where(ok, pos, 0)
        valid[:, a:b, : kp * P] = ok
    return Selection(dense=False, idx=idx, valid=valid)
