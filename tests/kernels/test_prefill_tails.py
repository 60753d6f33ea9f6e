"""An extend's tails (BudgetConfig.query_tail, dense_tail) on the PyTorch path against the float64
oracle of reference.py: the tiles, the selection and attention of one layer, and the backend end
to end (every layer of the scenario of test_backend_vs_reference.py, chunked prefill and cached
prefixes included) with a query tail."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from sglang_kascade.config import BudgetConfig, PolicyConfig
from sglang_kascade.kernels.sparse_attention_torch import sparse_attention
from sglang_kascade.kernels.tiles import extend_key_counts, extend_tiles
from sglang_kascade.plan import request_tiles
from sglang_kascade.policies import POLICY_TABLE
from test_backend_vs_reference import build, run_backend, run_oracle

TAILS = [  # (prefix, extend, tile, query_tail, dense_tail)
    (0, 45, 8, 5, 0), (13, 40, 8, 16, 0), (0, 33, 8, 40, 0), (3, 1, 8, 4, 0),
    (0, 45, 8, 0, 5), (13, 40, 8, 0, 9), (21, 30, 4, 3, 7), (0, 20, 8, 0, 50)]


@pytest.mark.parametrize("prefix, extend, tile, qt, dt", TAILS)
def test_tiles_match_the_oracle(prefix, extend, tile, qt, dt):
    b = BudgetConfig(topk_fraction=0.3, k_min=2, tile_size=tile, dense_tail=dt, query_tail=qt)
    got = request_tiles(b, prefix, extend, b.k_for, "cpu")
    want = ref.oracle_extend_tiles(prefix, extend, tile, b.k_for, qt, dt)
    assert got.q_pos.tolist() == want.q_pos and got.q_tile.tolist() == want.q_tile
    assert got.tile_start.tolist() == want.starts and got.tile_k.tolist() == want.ks
    assert [hi - lo for lo, hi in zip(got.tile_q_lo, got.tile_q_hi)] == [
        want.q_tile.count(t) for t in range(want.nt)]
    end = prefix + extend
    tail = [t for t in range(want.nt) if max(p for p, x in zip(want.q_pos, want.q_tile)
                                              if x == t) >= end - dt] if dt else []
    assert got.dense_from == (tail[0] if tail else None)
    body = got.selected()
    assert body.num_tiles == (tail[0] if tail else want.nt)
    assert body.q_pos.tolist() == want.q_pos[:got.tail_q_lo]


@pytest.mark.parametrize("prefix, extend, tile, qt, dt", TAILS + [(0, 1000, 32, 0, 0),
                                                                  (517, 300, 16, 7, 33)])
def test_key_counts_are_the_tiles_sums(prefix, extend, tile, qt, dt):
    """The backend's counters (extend_key_counts: plain integers) sum the plan's tiles."""
    b = BudgetConfig(topk_fraction=0.3, k_min=2, tile_size=tile, dense_tail=dt, query_tail=qt)
    t = request_tiles(b, prefix, extend, b.k_for, "cpu")
    n = torch.tensor([hi - lo for lo, hi in zip(t.tile_q_lo, t.tile_q_hi)])
    want = (int((n * t.tile_k).sum()), int((n * t.tile_start).sum()))
    assert extend_key_counts(prefix, extend, tile, b.k_for, dt, qt) == want
    assert want[0] < want[1] or all(k == s for k, s in zip(t.tile_k, t.tile_start))


def test_query_tail_tiles_select_like_decode():
    """A query-tail tile starts at its query: its candidates are every earlier key, its budget
    k_for(position), its diagonal itself alone."""
    tiles = extend_tiles(0, 100, 32, lambda s: max(4, s // 10), "cpu", query_tail=3)
    assert tiles.tile_start.tolist()[-4:] == [96, 97, 98, 99]
    assert tiles.tile_k.tolist()[-3:] == [9, 9, 9]
    assert [hi - lo for lo, hi in zip(tiles.tile_q_lo, tiles.tile_q_hi)][-4:] == [1, 1, 1, 1]


@pytest.mark.parametrize("prefix, extend, tile, qt, dt", TAILS)
@pytest.mark.parametrize("policy", ["kascade", "quest", "streaming"])
def test_attention_with_tails_matches_the_oracle(prefix, extend, tile, qt, dt, policy):
    """The selection covers the tiles before the dense tail and is a valid Top-k of them
    (kascade); attention with the head map of a reuse layer equals the oracle's, whose dense
    tail tiles select every candidate."""
    g = torch.Generator().manual_seed(prefix * 1000 + extend * 10 + qt + dt)
    hq, hkv, d, s = 6, 3, 16, prefix + extend
    q = torch.randn(extend, hq, d, generator=g)
    k = torch.randn(s, hkv, d, generator=g)
    v = torch.randn(s, hkv, d, generator=g)
    b = BudgetConfig(topk_fraction=0.3, k_min=2, tile_size=tile, dense_tail=dt, query_tail=qt,
                     page_tile_size=4)
    tiles = request_tiles(b, prefix, extend, b.k_for, "cpu")
    ot = ref.oracle_extend_tiles(prefix, extend, tile, b.k_for, qt, dt)
    sel = POLICY_TABLE[policy].select(q, k, tiles, 0.25, b, PolicyConfig(policy))
    head_map = torch.tensor([2, 0, 0])
    out = sparse_attention(q, k, v, tiles, sel.for_heads(head_map), 0.25)
    if sel.dense:
        mask = ref.candidate_mask(ot, s)[None].expand(hkv, -1, -1)
    else:
        body = ref.OracleTiles(ot.q_pos[:tiles.tail_q_lo], ot.q_tile[:tiles.tail_q_lo],
                               ot.starts[:tiles.selected().num_tiles],
                               ot.ks[:tiles.selected().num_tiles])
        got = ref.mask_from_kernel(sel, body, hkv, s)
        if policy == "kascade":
            _, scores = ref.select(q, k, ot, 0.25)
            assert not ref.topk_violations(got, scores[:, :body.nt], body)
        mask = ref.candidate_mask(ot, s)[None].repeat(hkv, 1, 1)  # the tail: every candidate
        mask[:, :body.nt] = got
    want = ref.sparse_attention(q, k, v, ot, mask, 0.25, head_map=head_map.tolist())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_backend_with_a_query_tail_matches_the_oracle():
    """The backend's PyTorch path with query_tail from the profile: every layer of every
    forward (chunked prefill, a radix-cache hit, decode steps) equals the oracle's, which tiles
    the extends' last positions one query each; with the tail, some tiles do select per query."""
    case = ("a024", "token", 8, 16, 8, 2, 64, torch.float32)
    scn = build(case)
    scn.profile_dict["query_tail"] = 6
    backend = run_backend(scn, batched=True)
    oracle = run_oracle(scn, backend.selections)
    for key, want in oracle.outputs.items():
        torch.testing.assert_close(backend.outputs[key].double(), want, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{key}: {m}")
    assert len(oracle.ties) <= max(1, oracle.n_selections // 20)
    plan_tiles = [r.tiles for r in backend.backend.plan.requests]
    assert any(int(t.tile_q_hi[-1] - t.tile_q_lo[-1]) == 1 and t.num_tiles > 1
               for t in plan_tiles)


def test_backend_counts_the_tail_query_selection():
    """The backend's counters (the sidecar's metrics) take a prefill's last query as its own
    tile under a query tail, and as reading every candidate under a dense tail."""
    case = ("a024", "token", 8, 16, 8, 2, 64, torch.float32)
    scn = build(case)
    scn.profile_dict["query_tail"] = 6
    be = run_backend(scn, batched=True).backend
    stats = be.stats
    before = (stats.selection_sum, stats.visible_sum)
    keys = list(stats.keys["extend"])
    be._count(False, [100], None, [20], [80])  # 80 new tokens after a cached prefix of 20
    assert (stats.selection_sum - before[0], stats.visible_sum - before[1]) == (
        be.budget.k_for(99), 99)
    b = be.budget
    assert [x - y for x, y in zip(stats.keys["extend"], keys)] == list(extend_key_counts(
        20, 80, b.tile_size, b.k_for, b.dense_tail, 6))
    be.budget = BudgetConfig(topk_fraction=0.25, k_min=4, tile_size=16, dense_tail=3)
    before = (stats.selection_sum, stats.visible_sum)
    keys = list(stats.keys["extend"])
    be._count(False, [100], None, [0], [100])
    assert (stats.selection_sum - before[0], stats.visible_sum - before[1]) == (96, 96)
    read, cand = (x - y for x, y in zip(stats.keys["extend"], keys))
    assert (read, cand) == extend_key_counts(0, 100, 16, be.budget.k_for, 3)
    assert read < cand  # the body tiles select, the tail tile (4 queries) reads all 96
