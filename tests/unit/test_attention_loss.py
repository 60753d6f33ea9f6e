"""The prefill-loss analysis (calibrate/attention_loss.py, calibrate/prefill_loss.py): mass kept
and output error against a hand-computed case and the float64 oracle of tests/helpers/reference.py,
the per-tile aggregation, the cached-prefix rule and the layer walk."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import reference as ref
from sglang_kascade.calibrate.attention_loss import (budget_share, layer_loss, mass_kept,
                                                     output_error)
from sglang_kascade.calibrate.prefill_loss import (CapturedLayer, Variant, parse_variant,
                                                   prefix_length, summarize, walk)
from sglang_kascade.config import BudgetConfig, PolicyConfig
from sglang_kascade.kernels.selection_torch import Selection, select_topk
from sglang_kascade.kernels.tiles import extend_tiles
from sglang_kascade.profile import AnchorProfile, ModelFingerprint


def _hand_case():
    """4 positions, one head, tiles of 2; q = 0: every causal row is uniform. Tile 0 (start 0)
    has no candidates; tile 1 (start 2) selects key 0 only."""
    q = torch.zeros(4, 1, 2)
    k = torch.randn(4, 1, 2)
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 0.0]], [[0.0, 2.0]]])
    tiles = extend_tiles(0, 4, 2, lambda s: min(s, 1), "cpu")
    sel = Selection(False, idx=torch.tensor([[[0], [0]]]), valid=torch.tensor([[[False], [True]]]))
    return q, k, v, tiles, sel


def test_mass_kept_by_hand():
    q, k, _, tiles, sel = _hand_case()
    # pos 0, 1: the diagonal only (all of the row); pos 2: key 0 + key 2 of 3; pos 3: key 0 +
    # keys 2, 3 of 4
    want = torch.tensor([[1.0, 1.0, 2 / 3, 3 / 4]])
    assert torch.allclose(mass_kept(q, k, tiles, sel, 1.0), want)
    assert torch.equal(mass_kept(q, k, tiles, Selection(dense=True), 1.0), torch.ones(1, 4))


def test_layer_loss_by_hand():
    q, k, v, tiles, sel = _hand_case()
    loss = layer_loss("anchor", q, k, v, tiles, sel, 1.0)
    assert torch.allclose(loss.mass, torch.tensor([1.0, (2 / 3 + 3 / 4) / 2], dtype=torch.float64))
    # pos 2 attends keys 0, 2 (uniform): (1.5, 0); dense (1, 1, 2, 0) / 3 = (1, 1/3)
    # pos 3 attends keys 0, 2, 3: (1, 2/3); dense (3/4, 3/4)
    err2_t1 = (0.5 ** 2 + (1 / 3) ** 2) + (0.25 ** 2 + (1 / 12) ** 2)
    ref2_t1 = (1 + 1 / 9) + (2 * 0.75 ** 2)
    assert loss.err2[0] == pytest.approx(0.0, abs=1e-12)
    assert loss.err2[1] == pytest.approx(err2_t1)
    assert loss.ref2[1] == pytest.approx(ref2_t1)
    assert loss.last_mass == pytest.approx(3 / 4)
    assert loss.last_err == pytest.approx(((0.25 ** 2 + (1 / 12) ** 2) / (2 * 0.75 ** 2)) ** 0.5)
    # tile 1 reads 1 of its 2 candidates for each of its 2 queries; tile 0 has none
    assert budget_share(tiles) == 0.5


@pytest.mark.parametrize("prefix, extend, tile, hq, hkv", [
    (0, 37, 8, 4, 2), (13, 29, 8, 6, 3), (21, 9, 4, 2, 1)])
def test_mass_and_error_match_the_oracle(prefix, extend, tile, hq, hkv):
    """Random inputs, a reuse layer's head map and a partial first tile after a cached prefix:
    mass kept = sum of float64 causal probabilities over the oracle's attended mask, error =
    sparse vs dense attention of the oracle."""
    g = torch.Generator().manual_seed(prefix * 100 + extend)
    s, d = prefix + extend, 8
    q = torch.randn(extend, hq, d, generator=g)
    k = torch.randn(s, hkv, d, generator=g)
    v = torch.randn(s, hkv, d, generator=g)
    budget = BudgetConfig(topk_fraction=0.3, k_min=2, tile_size=tile)
    tiles = extend_tiles(prefix, extend, tile, budget.k_for, "cpu")
    head_map = torch.tensor([hkv - 1 - h for h in range(hkv)])
    sel = select_topk(q, k, tiles, 0.5).for_heads(head_map)
    ot = ref.oracle_extend_tiles(prefix, extend, tile, budget.k_for)
    mask = ref.attend_mask(ref.mask_from_kernel(sel, ot, hkv, s), ot, hq)  # [Hq, n, S]
    probs = ref.causal_probs(q, k, ot.q_pos, 0.5)
    want = (probs * mask).sum(-1).unflatten(0, (hkv, -1)).mean(1)  # [Hkv, n]
    assert torch.allclose(mass_kept(q, k, tiles, sel, 0.5).double(), want, atol=1e-5)

    loss = layer_loss("reuse", q, k, v, tiles, sel, 0.5)
    err2, ref2 = output_error(ref.masked_attention(q, k, v, mask, 0.5),
                              ref.dense_attention(q, k, v, ot.q_pos, 0.5), hkv)
    for t, (lo, hi) in enumerate(zip(tiles.tile_q_lo, tiles.tile_q_hi)):
        assert float(loss.err2[t]) == pytest.approx(float(err2[:, lo:hi].sum()), rel=1e-3,
                                                    abs=1e-6)
        assert float(loss.ref2[t]) == pytest.approx(float(ref2[:, lo:hi].sum()), rel=1e-4)
        assert float(loss.mass[t]) == pytest.approx(float(want[:, lo:hi].mean()), abs=1e-5)


def test_prefix_rule():
    assert prefix_length("0", 1024, 32) == 0
    assert prefix_length("0.5", 1000, 32) == 480  # tile boundary at or below 500
    assert prefix_length("0.5+17", 1000, 32) == 497
    with pytest.raises(ValueError):
        prefix_length("0.99+64", 1000, 32)


def _tiny_model(layers=4, hkv=2, hq=4, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    fp = ModelFingerprint("Toy", layers, hq, hkv, 8)
    cap = [CapturedLayer(torch.randn(length, hq, 8, generator=g),
                         torch.randn(length, hkv, 8, generator=g),
                         torch.randn(length, hkv, 8, generator=g), 0.35) for _ in range(layers)]
    return fp, cap


def _profile(fp, anchors, head_map):
    return AnchorProfile(name="toy", model=fp, dense_layers=(0,), anchor_layers=anchors,
                         head_map=head_map, budget=BudgetConfig(0.25, 2, 4))


def test_walk_roles_own_oracle_and_dense_budget():
    fp, cap = _tiny_model()
    ident = ((0, 1),) * 4
    prof = _profile(fp, (0, 2), ((0, 1), (1, 1), (0, 1), (0, 0)))
    losses = walk(cap, Variant("v", prof, prof.budget, PolicyConfig()))
    assert losses[0] is None and [x.role for x in losses[1:]] == ["reuse", "anchor", "reuse"]
    # an anchor keeps what its own Top-k keeps; a reuse layer never beats its own Top-k by
    # more than ties allow (both select the same number of keys from the same pooled scores)
    assert torch.equal(losses[2].mass, losses[2].own_mass)
    for li in (1, 3):
        assert bool((losses[li].own_mass >= losses[li].mass - 1e-6).all())
    # every layer an anchor: the reuse gap is gone
    oracle = _profile(fp, (0, 1, 2, 3), ident)
    for x in walk(cap, Variant("o", oracle, oracle.budget, PolicyConfig()))[1:]:
        assert torch.equal(x.mass, x.own_mass)
    # a budget of every key: dense everywhere
    full = dataclasses.replace(prof.budget, topk_fraction=1.0)
    for x in walk(cap, Variant("d", prof, full, PolicyConfig()), own=False)[1:]:
        assert torch.allclose(x.mass, torch.ones_like(x.mass).double())
        assert float(x.err2.sum()) < 1e-10 * float(x.ref2.sum())


def test_walk_rerank_sits_between_reuse_and_oracle():
    """policy kascade_rerank in the walk: anchors keep their own Top-k; a reuse layer re-ranking
    every candidate (C large) keeps what its own Top-k keeps, as under the oracle."""
    fp, cap = _tiny_model()
    prof = _profile(fp, (0, 2), ((0, 1), (1, 1), (0, 1), (0, 0)))
    plain = walk(cap, Variant("k", prof, prof.budget, PolicyConfig()))
    every = walk(cap, Variant("r", prof, prof.budget, PolicyConfig("kascade_rerank", rerank=64)))
    assert torch.allclose(every[2].mass, plain[2].mass)  # the anchor attends its own Top-k
    for li in (1, 3):
        assert torch.allclose(every[li].mass, every[li].own_mass, atol=1e-6)
        assert float(every[li].mass.sum()) >= float(plain[li].mass.sum()) - 1e-6
    v = parse_variant("name=r policy=kascade_rerank rerank=3", prof)
    assert v.policy == PolicyConfig("kascade_rerank", rerank=3.0)


def test_summarize_groups_and_prefix_tiles():
    fp, cap = _tiny_model()
    prof = _profile(fp, (0, 2), ((0, 1),) * 4)
    tiles = extend_tiles(10, 14, 4, prof.budget.k_for, "cpu")  # first tile holds 2 of 4 queries
    losses = walk(cap, Variant("v", prof, prof.budget, PolicyConfig()), prefix=10)
    res = summarize(losses, tiles, question_from=20, prefix=10)
    assert res["tiles"]["start"] == [8, 12, 16, 20]
    assert res["tiles"]["queries"] == [2, 4, 4, 4]
    assert res["tiles"]["question"] == [False, False, False, True]
    assert res["layers"][0] == {"layer": 0, "role": "dense"}
    row = res["layers"][1]
    assert row["question_mass"] == pytest.approx(float(losses[1].mass[3]), abs=1e-5)
    assert row["first_mass"] == pytest.approx(float(losses[1].mass[0]), abs=1e-5)
    assert res["budget"]["share"] == round(budget_share(tiles), 5) < 1


def test_variant_mass_key_parsed_and_refused_where_it_does_not_apply():
    fp, _ = _tiny_model()
    prof = _profile(fp, (0, 2), ((0, 1),) * 4)
    v = parse_variant("name=m mass=0.9 topk=0.2", prof)
    assert v.mass == 0.9 and v.budget.topk_fraction == 0.2
    assert parse_variant("name=d", prof).mass == 1.0
    for bad in ("mass=0.9 policy=quest", "mass=0", "mass=1.5"):
        with pytest.raises(SystemExit):
            parse_variant(bad, prof)


def test_probe_counts_the_keys_a_selection_reads():
    """probe.read_share over a fixed Top-k selection is the budgets' share (budget_share); a
    mass-following one reads fewer keys, never more."""
    from sglang_kascade.calibrate import probe

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(70, 4, 8, generator=g) * 2, torch.randn(70, 2, 8, generator=g)
    budget = BudgetConfig(0.25, 4, 8)
    tiles = extend_tiles(0, 70, 8, budget.k_for, "cpu")
    for mass in (1.0, 0.8):
        probe.use_profile(None, budget)
        probe._count_keys(tiles, select_topk(q, k, tiles, 0.35, mass=mass, mass_floor=2))
        if mass == 1.0:
            assert probe.read_share() == pytest.approx(budget_share(tiles))
        else:
            assert 0 < probe.read_share() < budget_share(tiles)
