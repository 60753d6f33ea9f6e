"""Similarity, head map and importance (sglang_kascade/calibrate/{similarity,headmap,stats}.py)
on hand-made cases, and the streamed similarity against a naive per-tile reference."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_kascade.calibrate.headmap import head_map, summarize
from sglang_kascade.calibrate.similarity import SimilarityAccumulator
from sglang_kascade.calibrate.stats import StatsCollector, token_importance_sum
from sglang_kascade.config import BudgetConfig

torch.set_num_threads(1)


def pad(A, L):
    """[H, nt, n] -> [H, nt, L+1] with zeros (column L is the sentinel)."""
    return torch.nn.functional.pad(A, (0, L + 1 - A.shape[-1]))


# ------------------------------------------------------------------------------------------
# Hand-made cases: L = 8, tiles of 4 -> tile 0 (start 0, no candidates) and tile 1 (start 4)
# ------------------------------------------------------------------------------------------
L = 8
SPARSE = torch.tensor([False, True])


def layer(candidate_mass, diag, chosen):
    """One KV head. Tile 1: mass on keys 0..3 and its diagonal (keys 4..7); chosen key ids."""
    A = torch.zeros(1, 2, L)
    A[0, 0, 0] = 1.0  # tile 0: only its diagonal
    A[0, 1, :4] = torch.tensor(candidate_mass)
    A[0, 1, 4] = diag
    D = torch.tensor([[1.0, diag]])
    idx = torch.full((1, 2, 1), L)
    idx[0, 1, 0] = chosen
    return pad(A, L), D, idx


def run_layers(layers, n_heads=1):
    acc = SimilarityAccumulator(len(layers), n_heads)
    acc.begin_sample(num_tiles=2, kmax=1, sentinel=L)
    for i, (A, D, idx) in enumerate(layers):
        acc.add_block(i, 0, 2, A, D, idx, SPARSE)
    acc.end_sample()
    return acc.result()


def test_identical_layers_give_one():
    l0 = layer([0.5, 0.1, 0.1, 0.1], 0.2, 0)
    sim = run_layers([l0, l0])
    assert sim[0, 1, 0, 0].item() == pytest.approx(1.0)
    assert sim[0, 0, 0, 0].item() == sim[1, 1, 0, 0].item() == 1.0
    assert math.isnan(sim[1, 0, 0, 0].item())  # l1 > l2 is undefined


def test_disjoint_selections_give_the_diagonal_only_ratio():
    l0 = layer([0.5, 0.1, 0.1, 0.1], 0.2, 0)
    l1 = layer([0.0, 0.6, 0.1, 0.1], 0.2, 1)  # no mass where layer 0 chose
    sim = run_layers([l0, l1])
    # only the target layer's own diagonal mass is recovered
    assert sim[0, 1, 0, 0].item() == pytest.approx(0.2 / (0.6 + 0.2))


def test_partial_overlap_ratio():
    l0 = layer([0.3, 0.0, 0.0, 0.0], 0.1, 2)  # layer 0 chose key 2
    l1 = layer([0.0, 0.5, 0.2, 0.0], 0.1, 1)  # layer 1 prefers key 1, has 0.2 on key 2
    sim = run_layers([l0, l1])
    assert sim[0, 1, 0, 0].item() == pytest.approx((0.2 + 0.1) / (0.5 + 0.1))


def test_min_over_tiles_and_mean_over_samples():
    acc = SimilarityAccumulator(2, 1)
    ratios = []
    for sample_masses in ([(0.2, 0.6), (0.4, 0.4)], [(0.1, 0.1), (0.3, 0.5)]):
        # two sparse tiles (starts 4 and 8) in a 12-token sample; layer 0 always picks key 0,
        # layer 1 picks key 1; mass of layer 1 on key 0 / key 1 per tile given
        Lx = 12
        acc.begin_sample(num_tiles=3, kmax=1, sentinel=Lx)
        sparse = torch.tensor([False, True, True])
        for lyr in (0, 1):
            A = torch.zeros(1, 3, Lx + 1)
            D = torch.tensor([[1.0, 0.1, 0.1]])
            idx = torch.full((1, 3, 1), Lx)
            for t, (m0, m1) in enumerate(sample_masses, start=1):
                A[0, t, 0], A[0, t, 1] = m0, m1
                idx[0, t, 0] = 0 if lyr == 0 else (1 if m1 >= m0 else 0)
            acc.add_block(lyr, 0, 3, A, D, idx, sparse)
        acc.end_sample()
        per_tile = [(m0 + 0.1) / (max(m0, m1) + 0.1) for m0, m1 in sample_masses]
        ratios.append(min(per_tile))
    assert acc.result()[0, 1, 0, 0].item() == pytest.approx(sum(ratios) / 2)


def test_sample_without_sparse_tiles_counts_as_one():
    acc = SimilarityAccumulator(2, 1)
    acc.begin_sample(num_tiles=1, kmax=1, sentinel=4)
    for lyr in (0, 1):
        acc.add_block(lyr, 0, 1, torch.zeros(1, 1, 5), torch.ones(1, 1),
                      torch.full((1, 1, 1), 4), torch.tensor([False]))
    acc.end_sample()
    assert acc.result()[0, 1, 0, 0].item() == 1.0


def test_layers_out_of_order_are_refused():
    acc = SimilarityAccumulator(3, 1)
    acc.begin_sample(num_tiles=2, kmax=1, sentinel=L)
    A, D, idx = layer([0.5, 0.1, 0.1, 0.1], 0.2, 0)
    with pytest.raises(RuntimeError):
        acc.add_block(1, 0, 2, A, D, idx, SPARSE)


# ------------------------------------------------------------------------------------------
# Streamed accumulator against a naive reference, random data, blocks of varying size
# ------------------------------------------------------------------------------------------
def naive_sim(As, Ds, Is, sparse):
    """As[l] [H, nt, L+1], Ds[l] [H, nt], Is[l] list of sets per (h, t) -> sim[l1, l2, h2, h1]."""
    n, H, nt = len(As), As[0].shape[0], As[0].shape[1]
    sim = torch.full((n, n, H, H), float("nan"), dtype=torch.float64)
    for l1 in range(n):
        for l2 in range(l1, n):
            for h2 in range(H):
                for h1 in range(H):
                    vals = []
                    for t in range(nt):
                        if not sparse[t]:
                            continue
                        a = As[l2][h2, t].double()
                        d = float(Ds[l2][h2, t])
                        num = sum(float(a[j]) for j in Is[l1][h1][t]) + d
                        den = sum(float(a[j]) for j in Is[l2][h2][t]) + d
                        vals.append(num / den)
                    sim[l1, l2, h2, h1] = min(vals) if vals else 1.0
    return sim


@pytest.mark.parametrize("blocks", [[(0, 6)], [(0, 2), (2, 3), (3, 6)]])
def test_accumulator_matches_naive_reference(blocks):
    g = torch.Generator().manual_seed(11)
    n, H, T, nt = 3, 2, 4, 6
    Lx = T * nt
    starts = torch.arange(nt) * T
    ks = torch.tensor([min(max(1, s // 3), s) for s in starts.tolist()])
    sparse = ks < starts
    kmax = int(ks.max())
    As, Ds, Idx, Is = [], [], [], []
    for _ in range(n):
        A = torch.rand(H, nt, Lx, generator=g)
        A = A * (torch.arange(Lx)[None] < (starts[:, None] + T))  # causal-ish
        D = (A * (torch.arange(Lx)[None] >= starts[:, None])).sum(-1)
        idx = torch.full((H, nt, kmax), Lx)
        sets = [[set() for _ in range(nt)] for _ in range(H)]
        for h in range(H):
            for t in range(nt):
                cand = A[h, t, : starts[t]]
                top = cand.topk(int(ks[t])).indices
                idx[h, t, : len(top)] = top
                sets[h][t] = set(top.tolist())
        As.append(pad(A, Lx)), Ds.append(D), Idx.append(idx), Is.append(sets)
    acc = SimilarityAccumulator(n, H, gather_bytes=64)  # tiny: exercise the chunking
    acc.begin_sample(nt, kmax, sentinel=Lx)
    for l in range(n):
        for a, b in blocks:
            acc.add_block(l, a, b, As[l][:, a:b], Ds[l][:, a:b], Idx[l][:, a:b], sparse[a:b])
    acc.end_sample()
    got, want = acc.result(), naive_sim(As, Ds, Is, sparse)
    assert torch.allclose(got, want, atol=1e-6, equal_nan=True)


# ------------------------------------------------------------------------------------------
# Head permutation through the whole statistics path (q/k -> pooled -> selection -> sim)
# ------------------------------------------------------------------------------------------
def test_head_permutation_is_recovered_by_the_head_map():
    g = torch.Generator().manual_seed(5)
    Lx, Hkv, G, Dh = 192, 3, 2, 16
    perm = [2, 0, 1]  # layer 1's KV head h is layer 0's KV head perm[h]
    budget = BudgetConfig(topk_fraction=0.1, k_min=8, tile_size=16)
    col = StatsCollector(2, Hkv * G, Hkv, budget)
    col.begin_sample(Lx)
    q0 = torch.randn(1, Hkv * G, Lx, Dh, generator=g) * 2
    k0 = torch.randn(1, Hkv, Lx, Dh, generator=g) * 2
    qperm = torch.tensor([perm[h] * G + i for h in range(Hkv) for i in range(G)])
    col.on_attention(0, q0, k0, 0.25)
    col.on_attention(1, q0[:, qperm], k0[:, perm], 0.25)
    col.end_sample()
    sim = col.similarity()
    for h2 in range(Hkv):
        assert sim[0, 1, h2, perm[h2]].item() == pytest.approx(1.0, abs=1e-6)
        others = [sim[0, 1, h2, h1].item() for h1 in range(Hkv) if h1 != perm[h2]]
        assert max(others) < 0.99
    rows = head_map(sim, anchors=[0])
    assert rows == [[0, 1, 2], perm]
    assert summarize(rows) == {"remapped_layers": [1], "remapped_heads": 3, "total_heads": 6}
    # with layer 1 as an anchor its row is the identity
    assert head_map(sim, anchors=[0, 1]) == [[0, 1, 2], [0, 1, 2]]


def test_head_map_ties_prefer_identity():
    sim = torch.ones(3, 3, 2, 2)
    assert head_map(sim, anchors=[0]) == [[0, 1]] * 3
    sim[0, 2, 1, 0] = 2.0  # head 1 of layer 2 clearly prefers anchor head 0
    assert head_map(sim, anchors=[0]) == [[0, 1], [0, 1], [0, 0]]


# ------------------------------------------------------------------------------------------
# Importance: 1 - cos(x, x + attn_out)
# ------------------------------------------------------------------------------------------
def test_importance_on_hand_made_vectors():
    x = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    assert token_importance_sum(x, torch.zeros_like(x)) == (pytest.approx(0.0), 2)
    assert token_importance_sum(x, 5 * x)[0] == pytest.approx(0.0, abs=1e-6)
    orth = torch.tensor([[0.0, 3.0], [-2.0, 0.0]])  # same norm, orthogonal: 45 degrees
    assert token_importance_sum(x, orth)[0] == pytest.approx(2 * (1 - 1 / math.sqrt(2)))
    assert token_importance_sum(x, -2 * x)[0] == pytest.approx(4.0)  # cos = -1 each
    # mixed: one token unchanged, one reversed -> mean 1
    s, n = token_importance_sum(x, torch.stack([torch.zeros(2), -2 * x[1]]))
    assert (s / n) == pytest.approx(1.0)


def test_importance_is_averaged_over_tokens_and_samples():
    col = StatsCollector(1, 1, 1, BudgetConfig())
    x = torch.tensor([[[1.0, 0.0]]])
    col.on_importance(0, x, torch.zeros_like(x))  # 0
    col.on_importance(0, torch.cat([x, x], 1), torch.cat([-2 * x, -2 * x], 1))  # 2, 2
    assert col.importance()[0].item() == pytest.approx(4.0 / 3)


# ------------------------------------------------------------------------------------------
# --score-tiles last:N: only the last N tiles count, and earlier blocks are skipped
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_bytes", [1 << 30, 4096])
def test_score_last_tiles_equals_masking_earlier_tiles(block_bytes):
    g = torch.Generator().manual_seed(11)
    Lx, Hkv, G, Dh, n_layers, last = 200, 3, 2, 16, 3, 2
    budget = BudgetConfig(topk_fraction=0.1, k_min=8, tile_size=16)
    qs = [torch.randn(1, Hkv * G, Lx, Dh, generator=g) * 2 for _ in range(n_layers)]
    ks = [torch.randn(1, Hkv, Lx, Dh, generator=g) * 2 for _ in range(n_layers)]

    def run(score_last, mask_by_hand):
        col = StatsCollector(n_layers, Hkv * G, Hkv, budget, block_bytes=block_bytes,
                             score_last_tiles=score_last)
        col.begin_sample(Lx)
        if mask_by_hand:  # reference: every block computed, earlier tiles just not counted
            col._sparse[: col._tiles.num_tiles - last] = False
        for i in range(n_layers):
            col.on_attention(i, qs[i], ks[i], 0.25)
        col.end_sample()
        return col

    fast, ref, full = run(last, False), run(None, True), run(None, False)
    assert fast.num_sparse_tiles == last
    assert torch.allclose(fast.similarity(), ref.similarity(), atol=1e-9, equal_nan=True)
    assert torch.allclose(fast.topk_recall(), ref.topk_recall(), atol=1e-9)
    # the full minimum over every sparse tile is lower (more tiles), never higher
    s_fast, s_full = fast.similarity(), full.similarity()
    ok = ~torch.isnan(s_full)
    assert bool((s_full[ok] <= s_fast[ok] + 1e-9).all())
    assert not torch.allclose(s_full[ok], s_fast[ok])


def test_score_last_tiles_must_be_positive():
    with pytest.raises(ValueError):
        StatsCollector(1, 1, 1, BudgetConfig(), score_last_tiles=0)
