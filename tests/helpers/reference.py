"""Independent plain oracle of Kascade attention (float64, full matrices, explicit boolean masks).

Written from the method description only; it deliberately imports nothing from
``sglang_kascade.kernels``. Everything works on ONE request at a time with keys in position order:

  q      [n, Hq, D]   queries of this forward (extend: positions prefix..prefix+n-1; decode: L-1)
  k, v   [S, Hkv, D]  all keys/values of the request, positions 0..S-1 (S >= last query pos + 1)

Conventions:
  * query head h belongs to KV head h // G, G = Hq // Hkv;
  * every query has a "tile start" s: prefill s = (pos // T) * T, decode s = L (= pos + 1).
    Candidates of the tile are keys at positions < s; the query additionally attends, densely and
    causally, to the tile's own keys s..pos (the diagonal block; empty for decode);
  * selections are boolean masks ``sel [Hkv, nt, S]`` over key positions, one row per (KV head,
    tile); tile ``t`` of a request is the t-th distinct tile touched by this forward, in order.

Nothing here is optimised: sizes in tests are small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch


# ------------------------------------------------------------------------------------------------
# Budget and tiles
# ------------------------------------------------------------------------------------------------


def budget_k(visible: int, fraction: float, k_min: int, round_to: int) -> int:
    """k = clamp(ceil(fraction * visible), k_min, visible), rounded up to round_to, clamped again.

    Uses exact rational arithmetic on the decimal spelling of ``fraction`` (so 0.1 * 30 == 3).
    """
    if visible <= 0:
        return 0
    k = math.ceil(Fraction(repr(float(fraction))) * visible)
    k = max(k, k_min)
    k = ((k + round_to - 1) // round_to) * round_to
    return min(k, visible)


@dataclass
class OracleTiles:
    q_pos: list  # [n] absolute position of each query
    q_tile: list  # [n] tile index (0..nt-1) of each query
    starts: list  # [nt] tile start s (= number of candidate keys)
    ks: list  # [nt] Top-k budget of the tile

    @property
    def nt(self) -> int:
        return len(self.starts)


def oracle_extend_tiles(prefix: int, extend: int, tile_size: int, kfn, query_tail: int = 0,
                        dense_tail: int = 0) -> OracleTiles:
    """Tiles for an extend of ``extend`` new tokens after ``prefix`` cached ones. A query among
    the last ``query_tail`` is a tile of its own (start = its position); a tile holding any of
    the last ``dense_tail`` positions selects every candidate (k = start)."""
    end = prefix + extend
    q_pos = list(range(prefix, end))
    starts, q_tile, ks = [], [], []
    for p in q_pos:
        s = p if p >= end - query_tail else (p // tile_size) * tile_size
        if not starts or starts[-1] != s:
            starts.append(s)
            ks.append(kfn(s))
        if p >= end - dense_tail:
            ks[-1] = s
        q_tile.append(len(starts) - 1)
    return OracleTiles(q_pos, q_tile, starts, ks)


def oracle_decode_tiles(seq_len: int, kfn) -> OracleTiles:
    """One decode query at seq_len-1; candidates are all seq_len keys; no diagonal."""
    return OracleTiles([seq_len - 1], [0], [seq_len], [kfn(seq_len)])


# ------------------------------------------------------------------------------------------------
# Scores and masks
# ------------------------------------------------------------------------------------------------


def causal_mask(q_pos, S: int) -> torch.Tensor:
    """[n, S] bool: key j visible to query at position p iff j <= p."""
    pos = torch.tensor(q_pos, dtype=torch.int64)[:, None]
    return torch.arange(S)[None, :] <= pos


def logits64(q, k, scale) -> torch.Tensor:
    """[Hq, n, S] float64 logits q_h . k_{h//G} * scale."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    k_rep = k.double().repeat_interleave(g, dim=1)  # [S, Hq, D]
    return torch.einsum("nhd,shd->hns", q.double(), k_rep) * scale


def masked_attention(q, k, v, mask_q, scale) -> torch.Tensor:
    """Attention with an explicit mask. mask_q [Hq, n, S] bool. Returns [n, Hq, Dv] float64."""
    hq = q.shape[1]
    g = hq // k.shape[1]
    logits = logits64(q, k, scale).masked_fill(~mask_q, float("-inf"))  # [Hq, n, S]
    probs = logits.softmax(-1)
    v_rep = v.double().repeat_interleave(g, dim=1)  # [S, Hq, Dv]
    return torch.einsum("hns,shd->nhd", probs, v_rep)


def dense_attention(q, k, v, q_pos, scale) -> torch.Tensor:
    """Dense causal attention (keys 0..pos for each query). Returns [n, Hq, Dv] float64."""
    hq = q.shape[1]
    mask = causal_mask(q_pos, k.shape[0])[None].expand(hq, -1, -1)  # [Hq, n, S]
    return masked_attention(q, k, v, mask, scale)


def causal_probs(q, k, q_pos, scale) -> torch.Tensor:
    """P[h, q, j]: softmax over the full causal row. [Hq, n, S] float64 (0 beyond the query)."""
    mask = causal_mask(q_pos, k.shape[0])[None]  # [1, n, S]
    return logits64(q, k, scale).masked_fill(~mask, float("-inf")).softmax(-1)


def pooled_scores(q, k, tiles: OracleTiles, scale, pool_all_heads=False) -> torch.Tensor:
    """S[kvh, t, j] = sum over the group's query heads and the tile's queries of P. [Hkv, nt, S].

    ``pool_all_heads`` (policy kascade_pooled): the sum runs over ALL query heads, and every KV
    head gets that same row.
    """
    hkv = k.shape[1]
    hq = q.shape[1]
    g = hq // hkv
    P = causal_probs(q, k, tiles.q_pos, scale)  # [Hq, n, S]
    out = torch.zeros(hkv, tiles.nt, k.shape[0], dtype=torch.float64)
    for h in range(hq):
        for i, t in enumerate(tiles.q_tile):
            for kvh in (range(hkv) if pool_all_heads else [h // g]):
                out[kvh, t] += P[h, i]
    return out


def candidate_mask(tiles: OracleTiles, S: int) -> torch.Tensor:
    """[nt, S] bool: key j is a candidate of tile t iff j < start[t]."""
    starts = torch.tensor(tiles.starts, dtype=torch.int64)[:, None]
    return torch.arange(S)[None, :] < starts


def page_scores(scores_row, cand_row, page: int):
    """Key-tile scores for one (kvh, tile): (list of eligible page ids, dict page -> score)."""
    S = scores_row.shape[0]
    eligible, score = [], {}
    for p in range(math.ceil(S / page)):
        keys = [j for j in range(p * page, min(S, (p + 1) * page)) if cand_row[j]]
        if keys:
            eligible.append(p)
            score[p] = float(sum(scores_row[j].item() for j in keys))
    return eligible, score


def select(q, k, tiles: OracleTiles, scale, granularity="token", page=16, pool_all_heads=False):
    """The oracle selection: (sel [Hkv, nt, S] bool, pooled scores [Hkv, nt, S] float64).

    token: Top-k candidates by pooled score. page: Top-ceil(k/P) key tiles (among those holding at
    least one candidate) by the summed pooled score of their candidates; all candidates of the
    chosen key tiles are selected. Ties are broken by lower position (any tie order is a valid
    Top-k; tests check validity, not a tie order). ``pool_all_heads``: see ``pooled_scores``.
    """
    scores = pooled_scores(q, k, tiles, scale, pool_all_heads)
    hkv, nt, S = scores.shape
    cand = candidate_mask(tiles, S)
    sel = torch.zeros(hkv, nt, S, dtype=torch.bool)
    for h in range(hkv):
        for t in range(nt):
            kk = tiles.ks[t]
            if granularity == "token":
                order = sorted((j for j in range(S) if cand[t, j]),
                               key=lambda j: (-scores[h, t, j].item(), j))
                for j in order[:kk]:
                    sel[h, t, j] = True
            else:
                eligible, ps = page_scores(scores[h, t], cand[t], page)
                chosen = sorted(eligible, key=lambda p: (-ps[p], p))[: math.ceil(kk / page)]
                for p in chosen:
                    for j in range(p * page, min(S, (p + 1) * page)):
                        if cand[t, j]:
                            sel[h, t, j] = True
    return sel, scores


def select_mass(scores, tiles: OracleTiles, heads: int, mass: float, floor: int):
    """Mass-following token selection: [Hkv, nt, S] bool. Per (KV head, tile), candidates by
    pooled score (ties by lower position) are taken while fewer than ``floor`` are taken or the
    taken ones hold less than ``need`` = candidate mass - (1 - mass) x the tile's whole mass
    (``heads`` pooled heads x its queries, each row summing to 1), never more than the tile's k.
    """
    hkv, nt, S = scores.shape
    cand = candidate_mask(tiles, S)
    sel = torch.zeros(hkv, nt, S, dtype=torch.bool)
    for t in range(nt):
        whole = heads * tiles.q_tile.count(t)
        for h in range(hkv):
            order = sorted((j for j in range(S) if cand[t, j]),
                           key=lambda j: (-scores[h, t, j].item(), j))
            need = sum(scores[h, t, j].item() for j in order) - (1 - mass) * whole
            taken = 0.0
            for rank, j in enumerate(order[:tiles.ks[t]]):
                if rank >= floor and taken >= need:
                    break
                sel[h, t, j] = True
                taken += scores[h, t, j].item()
    return sel


def rerank(q, k, tiles: OracleTiles, scale, cand_sel):
    """A reuse layer's own Top-k among its candidates (policy kascade_rerank): [Hkv, nt, S] bool.

    ``cand_sel`` [Hkv, nt, S] bool: each (KV head, tile)'s candidate keys. Every query of the
    tile and every query head of the group takes its softmax over (the candidates + its causal
    diagonal keys start..pos) only; the candidates' probabilities are summed over those queries
    and heads, and the tile's k highest sums are kept (ties by lower position)."""
    hkv, hq = k.shape[1], q.shape[1]
    g = hq // hkv
    S = k.shape[0]
    logits = logits64(q, k, scale)  # [Hq, n, S]
    sel = torch.zeros(hkv, tiles.nt, S, dtype=torch.bool)
    for kvh in range(hkv):
        for t in range(tiles.nt):
            score = torch.zeros(S, dtype=torch.float64)
            for i, (pos, qt) in enumerate(zip(tiles.q_pos, tiles.q_tile)):
                if qt != t:
                    continue
                keys = cand_sel[kvh, t].clone()
                keys[tiles.starts[t]:pos + 1] = True
                for h in range(kvh * g, (kvh + 1) * g):
                    p = logits[h, i].masked_fill(~keys, float("-inf")).softmax(-1)
                    score += p * cand_sel[kvh, t]
            order = sorted((j for j in range(S) if cand_sel[kvh, t, j]),
                           key=lambda j: (-score[j].item(), j))
            for j in order[:tiles.ks[t]]:
                sel[kvh, t, j] = True
    return sel


# ------------------------------------------------------------------------------------------------
# Baseline policies: Quest and StreamingLLM (same budget k per tile as Kascade)
# ------------------------------------------------------------------------------------------------


def quest_page_scores(q, k, tiles: OracleTiles, scale, page: int) -> torch.Tensor:
    """Quest scores [Hkv, nt, pages] float64; NaN where the page holds no candidate of the tile.

    Page p holds positions p*page .. p*page+page-1. Its summary for tile t is the elementwise min
    and max over its CANDIDATE keys (positions < start[t]). A query's upper bound on the page is
    sum_d max(q_d * min_d, q_d * max_d) * scale; the page's score for (KV head, tile) is the sum of
    those upper bounds over the group's query heads and the tile's queries, each computed
    separately here (no algebra).
    """
    hkv, S = k.shape[1], k.shape[0]
    g = q.shape[1] // hkv
    n_pages = math.ceil(S / page)
    out = torch.full((hkv, tiles.nt, n_pages), float("nan"), dtype=torch.float64)
    for h in range(hkv):
        for t in range(tiles.nt):
            s = tiles.starts[t]
            rows = [i for i, tt in enumerate(tiles.q_tile) if tt == t]
            queries = q[rows, h * g:(h + 1) * g].double().reshape(-1, q.shape[2])  # [m, D]
            for p in range(n_pages):
                keys = [j for j in range(p * page, min(S, (p + 1) * page)) if j < s]
                if not keys:
                    continue
                kk = k[keys, h].double()  # [m, D]
                lo, hi = kk.min(0).values, kk.max(0).values
                bounds = torch.maximum(queries * lo, queries * hi).sum(1) * scale  # per query
                out[h, t, p] = bounds.sum()
    return out


def quest_select(q, k, tiles: OracleTiles, scale, page: int):
    """Quest's choice: (sel [Hkv, nt, S] bool, page scores). The Top ceil(k/page) pages holding a
    candidate, by score (ties: lower page); every candidate key of a chosen page is selected."""
    scores = quest_page_scores(q, k, tiles, scale, page)
    hkv, nt, n_pages = scores.shape
    S = k.shape[0]
    sel = torch.zeros(hkv, nt, S, dtype=torch.bool)
    for h in range(hkv):
        for t in range(nt):
            eligible = [p for p in range(n_pages) if not math.isnan(scores[h, t, p].item())]
            chosen = sorted(eligible, key=lambda p: (-scores[h, t, p].item(), p))
            for p in chosen[: math.ceil(tiles.ks[t] / page)]:
                for j in range(p * page, min(S, (p + 1) * page)):
                    if j < tiles.starts[t]:
                        sel[h, t, j] = True
    return sel, scores


def quest_violations(mask, scores, tiles: OracleTiles, page: int, rel=1e-6):
    """Why ``mask`` [Hkv, nt, S] is not a valid Quest choice under float64 page ``scores``."""
    hkv, nt, S = mask.shape
    cand = candidate_mask(tiles, S)
    bad = []
    for h in range(hkv):
        for t in range(nt):
            m, where = mask[h, t], f"kvh={h} tile={t} start={tiles.starts[t]} k={tiles.ks[t]}"
            if bool((m & ~cand[t]).any()):
                bad.append(f"{where}: non-candidate selected")
                continue
            eligible = [p for p in range(scores.shape[2]) if not math.isnan(scores[h, t, p].item())]
            chosen = [p for p in eligible if bool(m[p * page:(p + 1) * page].any())]
            for p in chosen:
                if not torch.equal(m[p * page:(p + 1) * page], cand[t, p * page:(p + 1) * page]):
                    bad.append(f"{where}: page {p} partially selected")
            if len(chosen) != math.ceil(tiles.ks[t] / page):
                bad.append(f"{where}: {len(chosen)} pages chosen")
                continue
            rest = [p for p in eligible if p not in chosen]
            if chosen and rest:
                got = min(scores[h, t, p].item() for p in chosen)
                best_rest = max(scores[h, t, p].item() for p in rest)
                top = max(abs(scores[h, t, p].item()) for p in eligible)
                if got < best_rest - rel * top:
                    bad.append(f"{where}: min chosen {got} < max unchosen {best_rest}")
    return bad


def streaming_select(tiles: OracleTiles, hkv: int, S: int, sink: int) -> torch.Tensor:
    """StreamingLLM's choice [Hkv, nt, S]: for a tile with start s and budget k, the first
    min(sink, k) positions and the most recent k - min(sink, k) candidates (s - that .. s-1)."""
    sel = torch.zeros(hkv, tiles.nt, S, dtype=torch.bool)
    for t, (s, kk) in enumerate(zip(tiles.starts, tiles.ks)):
        n_sink = min(sink, kk)
        for j in list(range(n_sink)) + list(range(s - (kk - n_sink), s)):
            sel[:, t, j] = True
    return sel


def attend_mask(sel, tiles: OracleTiles, hq: int) -> torch.Tensor:
    """Per query head: union(selected keys of the query's tile, diagonal s..pos). [Hq, n, S]."""
    hkv, _, S = sel.shape
    g = hq // hkv
    n = len(tiles.q_pos)
    mask = torch.zeros(hq, n, S, dtype=torch.bool)
    for h in range(hq):
        for i, (p, t) in enumerate(zip(tiles.q_pos, tiles.q_tile)):
            mask[h, i] = sel[h // g, t]
            s = tiles.starts[t]
            mask[h, i, s: p + 1] = True  # diagonal block (empty when s > p, i.e. decode)
    return mask


def sparse_attention(q, k, v, tiles: OracleTiles, sel, scale, head_map=None) -> torch.Tensor:
    """Kascade attention given a selection [Hkv_anchor, nt, S]. Returns [n, Hq, Dv] float64.

    ``head_map`` (reuse layers): KV head h of this layer uses the anchor's KV head head_map[h].
    """
    if head_map is not None:
        sel = torch.stack([sel[int(a)] for a in head_map])  # [Hkv, nt, S]
    return masked_attention(q, k, v, attend_mask(sel, tiles, q.shape[1]), scale)


# ------------------------------------------------------------------------------------------------
# Checks used by the tests
# ------------------------------------------------------------------------------------------------


def mask_from_kernel(sel_obj, tiles: OracleTiles, hkv: int, S: int) -> torch.Tensor:
    """Turn a kernel Selection (duck-typed: .dense, .idx [Hkv, nt, kmax], .valid) into [Hkv, nt, S].

    Asserts that no key is listed twice among the valid entries (it would be counted twice).
    """
    if sel_obj.dense:
        return candidate_mask(tiles, S)[None].expand(hkv, -1, -1).clone()
    idx, valid = sel_obj.idx.cpu(), sel_obj.valid.cpu()
    assert idx.shape[:2] == (hkv, tiles.nt), (idx.shape, hkv, tiles.nt)
    mask = torch.zeros(hkv, tiles.nt, S, dtype=torch.bool)
    for h in range(hkv):
        for t in range(tiles.nt):
            pos = idx[h, t][valid[h, t]]
            assert pos.unique().numel() == pos.numel(), f"duplicate keys in head {h} tile {t}"
            assert bool((pos >= 0).all()) and bool((pos < S).all())
            mask[h, t, pos] = True
    return mask


def topk_violations(mask, scores, tiles: OracleTiles, granularity="token", page=16, rel=1e-6):
    """Why ``mask`` [Hkv, nt, S] is not a valid Top-k under float64 ``scores``; [] if it is.

    Valid means: only candidates; the right size (k keys, or ceil(k/P) key tiles and all their
    candidates); and min chosen score >= max unchosen eligible score - rel * max eligible score.
    """
    hkv, nt, S = mask.shape
    cand = candidate_mask(tiles, S)
    bad = []
    for h in range(hkv):
        for t in range(nt):
            kk, m, sc = tiles.ks[t], mask[h, t], scores[h, t]
            where = f"kvh={h} tile={t} start={tiles.starts[t]} k={kk}"
            if bool((m & ~cand[t]).any()):
                bad.append(f"{where}: non-candidate selected")
                continue
            if granularity == "token":
                chosen = [sc[j].item() for j in range(S) if m[j]]
                rest = [sc[j].item() for j in range(S) if cand[t, j] and not m[j]]
                want = kk
            else:
                eligible, ps = page_scores(sc, cand[t], page)
                chosen_pages = [p for p in eligible if bool(m[p * page:(p + 1) * page].any())]
                for p in chosen_pages:
                    full = cand[t, p * page:(p + 1) * page]
                    if not torch.equal(m[p * page:(p + 1) * page], full):
                        bad.append(f"{where}: key tile {p} partially selected")
                chosen = [ps[p] for p in chosen_pages]
                rest = [ps[p] for p in eligible if p not in chosen_pages]
                want = math.ceil(kk / page)
            if len(chosen) != want:
                bad.append(f"{where}: {len(chosen)} chosen, want {want}")
                continue
            if chosen and rest:
                top = max(chosen + rest)
                if min(chosen) < max(rest) - rel * top:
                    bad.append(f"{where}: min chosen {min(chosen)} < max unchosen {max(rest)}")
    return bad
