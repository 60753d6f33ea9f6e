"""Anchor choice (sglang_kascade/calibrate/dp.py) against brute force over all anchor subsets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sglang_kascade.calibrate.dp import choose_all, choose_anchors, layer_weights, score_of
from sglang_kascade.calibrate.pipeline import pick_count


def random_w(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, n, generator=g, dtype=torch.float64)
    bonus = torch.rand(n, generator=g, dtype=torch.float64)
    # a reuse layer never beats being an anchor: W[j, j] >= W[a, j], as with real similarities
    for j in range(n):
        w[j, j] = w[: j + 1, j].max() + bonus[j]
    return w.masked_fill(torch.ones(n, n, dtype=torch.bool).tril(-1), float("-inf"))


def brute_force(w: torch.Tensor, k: int):
    n = w.shape[0]
    best, best_set = -math.inf, None
    for rest in itertools.combinations(range(1, n), k - 1):
        anchors = (0, *rest)
        s = score_of(w, anchors)
        if s > best + 1e-12:
            best, best_set = s, anchors
    return best, best_set


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_matches_brute_force(n, seed):
    w = random_w(n, seed * 100 + n)
    for k in range(1, n + 1):
        choice = choose_anchors(w, k)
        best, best_set = brute_force(w, k)
        assert choice.num_anchors == k
        assert len(choice.anchors) == k and choice.anchors[0] == 0
        assert list(choice.anchors) == sorted(set(choice.anchors))
        assert choice.score == pytest.approx(best, abs=1e-9)
        assert score_of(w, choice.anchors) == pytest.approx(choice.score, abs=1e-9)
        assert choice.anchors == best_set  # random weights: the optimum is unique


def test_dp_on_unstructured_weights():
    """Arbitrary W (no diagonal dominance): still the brute-force optimum, layer 0 forced."""
    g = torch.Generator().manual_seed(7)
    for n in (4, 6, 8):
        w = torch.randn(n, n, generator=g, dtype=torch.float64)
        for k in range(1, n + 1):
            assert choose_anchors(w, k).score == pytest.approx(brute_force(w, k)[0], abs=1e-9)


def test_dp_forces_layer_0_even_when_it_is_useless():
    n = 5
    w = torch.zeros(n, n, dtype=torch.float64)
    w[0, :] = -10.0  # layer 0 serves nobody well, not even itself
    for j in range(1, n):
        w[j, j:] = 1.0
    c = choose_anchors(w, 2)
    assert c.anchors == (0, 1)
    assert c.score == pytest.approx(-10.0 + 4.0)


def test_dp_finds_block_structure():
    """Layers in blocks {0,1,2} {3,4} {5,6,7}: selections stable within a block only."""
    blocks = [range(0, 3), range(3, 5), range(5, 8)]
    n = 8
    sim = torch.full((n, n, 2, 2), 0.2, dtype=torch.float64)
    for bl in blocks:
        for a in bl:
            for b in bl:
                sim[a, b] = 1.0
    imp = torch.ones(n, dtype=torch.float64)
    w = layer_weights(sim, imp)
    assert choose_anchors(w, 3).anchors == (0, 3, 5)
    assert choose_anchors(w, 3).score == pytest.approx(8.0)
    assert choose_anchors(w, 2).score == pytest.approx(3 + 2 * 0.2 + 3 + 0 * 1)  # (0, 5)


def test_layer_weights_formula():
    g = torch.Generator().manual_seed(3)
    n, h = 4, 3
    sim = torch.rand(n, n, h, h, generator=g, dtype=torch.float64)
    imp = torch.rand(n, generator=g, dtype=torch.float64)
    w = layer_weights(sim, imp)
    for l1 in range(n):
        for l2 in range(n):
            if l1 > l2:
                assert w[l1, l2] == float("-inf")
                continue
            expect = sum(max(float(sim[l1, l2, h2, h1]) for h1 in range(h))
                         for h2 in range(h)) / h * float(imp[l2])
            assert float(w[l1, l2]) == pytest.approx(expect)


def test_scores_never_decrease_with_more_anchors():
    w = random_w(9, 42)
    choices = choose_all(w, range(1, 12))  # counts above the layer count are dropped
    assert sorted(choices) == list(range(1, 10))
    scores = [choices[k].score for k in sorted(choices)]
    assert all(b >= a - 1e-12 for a, b in zip(scores, scores[1:]))


def test_choose_anchors_rejects_bad_counts():
    w = random_w(4, 0)
    for k in (0, 5):
        with pytest.raises(ValueError):
            choose_anchors(w, k)


def test_pick_count_auto_rule():
    w = random_w(8, 5)
    choices = choose_all(w, range(2, 7))
    total = float(torch.diagonal(w).sum())
    assert pick_count(choices, 4, total, 0.01) == 4
    k = pick_count(choices, "auto", total, 0.0)
    best = max(c.score for c in choices.values())
    assert choices[k].score == pytest.approx(best)
    assert pick_count(choices, "auto", total, 1.0) == 2  # everything is within tolerance
