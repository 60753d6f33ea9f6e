"""Selection policies (``--kascade-policy``): options, profile transformations, the Quest and
StreamingLLM kernels and the pooled Top-k against the float64 oracles in reference.py, the equal
budget of every policy, and whole backend runs (the fakes of test_backend_vs_reference.py) against
a policy-aware oracle run.

Tolerances as in test_kernels_vs_reference.py (fp32 atol/rtol 1e-5). Scored selections (Top-k,
pooled Top-k, Quest) must be valid under the oracle's float64 scores and are in practice equal to
the oracle's; the parameter-free StreamingLLM selection must be equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math

import pytest
import torch

import reference as ref
import test_backend_vs_reference as tb
from sglang_kascade.config import (DEFAULT_POLICY, DEFAULT_RERANK, DEFAULT_SINK_TOKENS, OPTION_TABLE,
                                   POLICIES, KascadeConfigError, KascadeOptions, PolicyConfig)
from sglang_kascade.kernels.quest_torch import select_quest
from sglang_kascade.kernels.selection_torch import select_topk
from sglang_kascade.kernels.sparse_attention_torch import sparse_attention
from sglang_kascade.kernels.streaming_torch import select_streaming
from sglang_kascade.profile import ModelFingerprint, derived_default_profile, profile_from_dict
from sglang_kascade.policies import (DEVICE_POLICIES, POLICY_TABLE, apply_policy,
                                     every_layer_selects, identity_head_map)
from sglang_kascade.resolve import resolve_policy
from sglang_kascade.sglang_adapter import add_kascade_flags, options_from_namespace
from test_kernels_vs_reference import (SMALL, TINY, Case, kernel_tiles, make_inputs, oracle_tiles,
                                       seed_of)

# Tiny tensors: OpenMP threads only add synchronisation cost (10-40x slower on 2 busy cores).
torch.set_num_threads(1)

ENV = {name: s.env for name, s in OPTION_TABLE.items()}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for env in ENV.values():
        monkeypatch.delenv(env, raising=False)


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


def test_policy_tables_cover_every_policy():
    assert POLICIES == ("kascade", "kascade_identity", "kascade_pooled", "kascade_rerank",
                        "oracle", "quest", "streaming")
    assert tuple(POLICY_TABLE) == POLICIES
    assert DEVICE_POLICIES == ("kascade", "kascade_identity", "oracle")
    assert DEFAULT_POLICY == "kascade" and DEFAULT_SINK_TOKENS == 4
    assert OPTION_TABLE["policy"][:3] == ("--kascade-policy", "SGLANG_KASCADE_POLICY", str)
    assert OPTION_TABLE["policy"].allowed == POLICIES
    assert OPTION_TABLE["sink_tokens"][:3] == ("--kascade-sink-tokens",
                                               "SGLANG_KASCADE_SINK_TOKENS", int)
    assert OPTION_TABLE["rerank"][:3] == ("--kascade-rerank", "SGLANG_KASCADE_RERANK", float)
    assert OPTION_TABLE["rerank"].default == DEFAULT_RERANK == 2.0


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_a_valid_option(policy):
    assert KascadeOptions(policy=policy).policy == policy
    assert resolve_policy(KascadeOptions(policy=policy)) == PolicyConfig(policy, 4)


@pytest.mark.parametrize("field,value", [
    ("policy", "Kascade"), ("policy", "h2o"), ("policy", ""), ("policy", 1),
    ("sink_tokens", -1), ("sink_tokens", 1.5), ("sink_tokens", True), ("sink_tokens", "4"),
    ("rerank", 0.5), ("rerank", 65.0), ("rerank", float("nan")), ("rerank", True),
    ("rerank", "2"),
])
def test_bad_policy_options_are_refused(field, value):
    with pytest.raises(KascadeConfigError) as ei:
        KascadeOptions(**{field: value})
    assert str(ei.value).startswith(f"option {field}="), str(ei.value)
    with pytest.raises(KascadeConfigError):
        PolicyConfig(**{"name" if field == "policy" else field: value})


def test_resolved_policy_needs_values():
    """None means "not given" in options; a resolved PolicyConfig must be complete."""
    with pytest.raises(KascadeConfigError, match="name=None"):
        PolicyConfig(name=None)
    with pytest.raises(KascadeConfigError, match="sink_tokens=None"):
        PolicyConfig(sink_tokens=None)
    with pytest.raises(KascadeConfigError, match="rerank=None"):
        PolicyConfig(rerank=None)


def test_policy_defaults_and_overrides():
    assert KascadeOptions().policy is None and KascadeOptions().sink_tokens is None
    assert resolve_policy(KascadeOptions()) == PolicyConfig() == PolicyConfig("kascade", 4)
    assert resolve_policy(KascadeOptions(policy="streaming", sink_tokens=0)) == \
        PolicyConfig("streaming", 0)
    assert resolve_policy(KascadeOptions(policy="kascade_rerank", rerank=3)) == \
        PolicyConfig("kascade_rerank", rerank=3.0)
    assert KascadeOptions.from_env({ENV["rerank"]: "1.5"}).rerank == 1.5


def test_an_option_of_another_policy_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sglang_kascade"):
        assert resolve_policy(KascadeOptions(rerank=3.0)) == PolicyConfig()
        assert resolve_policy(KascadeOptions(policy="quest", sink_tokens=2)).name == "quest"
        resolve_policy(KascadeOptions(policy="kascade_rerank", rerank=3.0))
    said = [r.getMessage() for r in caplog.records]
    assert any("--kascade-rerank is ignored" in m and "runs kascade)" in m for m in said)
    assert any("--kascade-sink-tokens is ignored" in m and "runs quest)" in m for m in said)
    assert len(said) == 2


def test_policy_from_env_and_flags_over_env():
    env = {ENV["policy"]: "quest", ENV["sink_tokens"]: "8"}
    assert KascadeOptions.from_env(env) == KascadeOptions(policy="quest", sink_tokens=8)
    with pytest.raises(KascadeConfigError, match="SGLANG_KASCADE_SINK_TOKENS='x'"):
        KascadeOptions.from_env({ENV["sink_tokens"]: "x"})
    with pytest.raises(KascadeConfigError, match="option policy='bogus'"):
        KascadeOptions.from_env({ENV["policy"]: "bogus"})
    parser = argparse.ArgumentParser()
    add_kascade_flags(parser)
    flags = options_from_namespace(parser.parse_args(["--kascade-policy", "streaming",
                                                      "--kascade-sink-tokens", "2"]))
    assert flags == KascadeOptions(policy="streaming", sink_tokens=2)
    assert flags.merged_over(KascadeOptions.from_env(env)) == flags
    assert KascadeOptions(k_min=3).merged_over(KascadeOptions.from_env(env)).policy == "quest"
    with pytest.raises(KascadeConfigError, match="policy"):
        options_from_namespace(parser.parse_args(["--kascade-policy", "bogus"]))


# ------------------------------------------------------------------------------------------------
# Profile transformations
# ------------------------------------------------------------------------------------------------


def mapped_profile():
    """A 6-layer profile with dense layers 0 and 3, anchors 0 and 2, remapped reuse heads."""
    pd = tb.make_profile_dict(4, [0, 3], [0, 2], tb.HEAD_MAPS[4], "token", 8)
    pd["model"].update(num_q_heads=8, head_dim=32)
    return profile_from_dict(pd)


@pytest.mark.parametrize("profile", [mapped_profile(),
                                     derived_default_profile(
                                         ModelFingerprint("LlamaForCausalLM", 30, 9, 3, 64))],
                         ids=["mapped", "derived"])
def test_profile_transformations(profile):
    ident = tuple(range(profile.model.num_kv_heads))
    n = profile.num_layers
    same = identity_head_map(profile)
    assert same.head_map == (ident,) * n
    assert (same.anchor_layers, same.dense_layers, same.budget, same.model) == \
        (profile.anchor_layers, profile.dense_layers, profile.budget, profile.model)
    every = every_layer_selects(profile)
    assert every.anchor_layers == tuple(range(n)) and every.head_map == (ident,) * n
    assert every.dense_layers == profile.dense_layers and every.budget == profile.budget
    assert [every.role(i) for i in range(n)] == [
        "dense_anchor" if i in profile.dense_layers else "anchor" for i in range(n)]
    for policy in POLICIES:
        p = apply_policy(profile, policy)
        assert profile_from_dict(p.to_json()) == p  # still a valid profile
        assert apply_policy(p, policy) == p  # idempotent
        assert p.dense_layers == profile.dense_layers
    assert apply_policy(profile, "kascade") == profile == apply_policy(profile, "kascade_pooled")
    assert apply_policy(profile, "kascade_identity") == same
    assert apply_policy(profile, "oracle") == every == apply_policy(profile, "quest") == \
        apply_policy(profile, "streaming")


def test_mapped_profile_really_remaps():
    p = mapped_profile()
    assert identity_head_map(p) != p and every_layer_selects(p).anchor_layers != p.anchor_layers


# ------------------------------------------------------------------------------------------------
# Kernels against the oracles
# ------------------------------------------------------------------------------------------------

KERNEL_CASES = [
    # GQA groups 1/3/4, odd sizes, cached prefixes (aligned or not), one-tile blocks, decode
    Case(64, 1, 2, 0, 97, tile=16, fraction=0.25, k_min=4),
    Case(64, 3, 2, 17, 83, tile=16, k_min=4, round_to=3, block_bytes=TINY),
    Case(128, 4, 2, 45, 97, tile=16, fraction=0.1, k_min=12),
    Case(64, 4, 1, 0, 300, tile=32, fraction=0.1, k_min=8, block_bytes=SMALL),
    Case(64, 3, 3, 32, 33, tile=8, k_min=5),
    Case(64, 4, 2, 96, 1, decode=True, k_min=5),  # L = 97
    Case(64, 1, 4, 299, 1, decode=True, fraction=0.1, k_min=16),  # L = 300
    Case(64, 3, 2, 60, 1, decode=True, k_min=5, round_to=3),  # L = 61
    Case(64, 4, 2, 0, 20, tile=8, k_min=32),  # every tile dense
]
PAGES = [5, 16]


def quest_case_params():
    params = [(c, p) for c in KERNEL_CASES for p in PAGES]
    params.append((KERNEL_CASES[4], 1))  # one-key pages: the bound is q . k itself
    params.append((KERNEL_CASES[2], 3))
    return params


@pytest.mark.parametrize("case,page", quest_case_params(),
                         ids=lambda x: str(x) if isinstance(x, Case) else f"P{x}")
def test_quest_matches_oracle(case, page):
    q, k, v, scale = make_inputs(case, seed_of(case, 11))
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    sel = select_quest(q, k, kt, scale, page, block_bytes=case.block_bytes)
    assert sel.dense == kt.all_dense
    got = ref.mask_from_kernel(sel, ot, case.hkv, case.seq)
    want, scores = ref.quest_select(q, k, ot, scale, page)
    assert not ref.quest_violations(want, scores, ot, page)  # the checker accepts the oracle
    bad = ref.quest_violations(got, scores, ot, page)  # ceil(k/P) whole pages, the best ones
    assert not bad, bad[:5]
    same = (got == want).all(-1).float().mean().item()
    assert same >= 0.95, f"only {same:.0%} of (head, tile) selections equal the oracle's"
    out = sparse_attention(q, k, v, kt, sel, scale, block_bytes=case.block_bytes)
    torch.testing.assert_close(out.double(), ref.sparse_attention(q, k, v, ot, got, scale),
                               atol=1e-5, rtol=1e-5)


def test_quest_bound_is_an_upper_bound():
    """Sanity of the oracle: a page's score >= the sum over its queries of the best logit."""
    case = KERNEL_CASES[1]
    q, k, _, scale = make_inputs(case, seed_of(case, 12))
    ot = oracle_tiles(case)
    page = 5
    scores = ref.quest_page_scores(q, k, ot, scale, page)
    logits = ref.logits64(q, k, scale)  # [Hq, n, S]
    g = case.g
    checked = 0
    for h in range(case.hkv):
        for t in range(ot.nt):
            rows = [i for i, tt in enumerate(ot.q_tile) if tt == t]
            for p in range(scores.shape[2]):
                keys = [j for j in range(p * page, (p + 1) * page) if j < ot.starts[t]]
                if not keys:
                    assert math.isnan(scores[h, t, p].item())
                    continue
                best = logits[h * g:(h + 1) * g][:, rows][..., keys].amax(-1).sum()
                assert scores[h, t, p] >= best - 1e-9
                checked += 1
    assert checked > 20


@pytest.mark.parametrize("sink", [0, 3, 4, 7, 1000])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_streaming_matches_oracle(case, sink):
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    sel = select_streaming(kt, case.hkv, sink)
    assert sel.dense == kt.all_dense
    got = ref.mask_from_kernel(sel, ot, case.hkv, case.seq)
    assert torch.equal(got, ref.streaming_select(ot, case.hkv, case.seq, sink))
    for t, (s, kk) in enumerate(zip(ot.starts, ot.ks)):
        assert int(got[0, t].sum()) == kk  # exactly the Kascade budget
        assert bool(got[0, t, :min(sink, kk)].all())  # the sinks
        assert bool(got[0, t, s - (kk - min(sink, kk)):s].all())  # the recent window
    if not sel.dense:
        q, k, v, scale = make_inputs(case, seed_of(case, 13))
        out = sparse_attention(q, k, v, kt, sel, scale)
        torch.testing.assert_close(out.double(), ref.sparse_attention(q, k, v, ot, got, scale),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gran,page", [("token", 16), ("page", 5), ("page", 16)])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_pooled_selection_is_shared_by_all_heads(case, gran, page):
    case = dataclasses.replace(case, gran=gran, page=page)
    q, k, _, scale = make_inputs(case, seed_of(case, 14))
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    sel = select_topk(q, k, kt, scale, gran, page, block_bytes=case.block_bytes,
                      pool_all_heads=True)
    assert sel.dense == kt.all_dense
    got = ref.mask_from_kernel(sel, ot, case.hkv, case.seq)
    assert all(torch.equal(got[0], got[h]) for h in range(case.hkv))
    if not sel.dense:
        assert sel.idx.shape[0] == case.hkv
        assert all(torch.equal(sel.idx[0][sel.valid[0]], sel.idx[h][sel.valid[h]])
                   for h in range(case.hkv))
    want, scores = ref.select(q, k, ot, scale, gran, page, pool_all_heads=True)
    bad = ref.topk_violations(got, scores, ot, gran, page)
    assert not bad, bad[:5]
    assert (got == want).all(-1).float().mean() >= 0.95


def test_pooling_over_all_heads_changes_selections():
    """The pooled selection is not the per-head one (the test above has teeth)."""
    differ = 0
    cases = [c for c in KERNEL_CASES if c.hkv > 1 and not kernel_tiles(c).all_dense]
    for case in cases:
        q, k, _, scale = make_inputs(case, seed_of(case, 14))
        kt = kernel_tiles(case)
        pooled = select_topk(q, k, kt, scale, pool_all_heads=True)
        own = select_topk(q, k, kt, scale)
        differ += int(not torch.equal(pooled.idx.sort(-1).values, own.idx.sort(-1).values))
    assert differ >= len(cases) - 1 >= 4


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_every_policy_selects_the_kascade_budget(case):
    """Through each policy's selection, what a selecting layer attends: k keys per (KV head,
    tile), or ceil(k/P) pages (Quest); kascade_rerank's anchors keep ceil(C * k) for reuse."""
    q, k, _, scale = make_inputs(case, seed_of(case, 15))
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    budget = dataclasses.replace(case.budget, page_tile_size=5)
    for policy in POLICIES:
        pol = POLICY_TABLE[policy]
        read = pol.select(q, k, kt, scale, budget, PolicyConfig(policy))
        sel = pol.attend(read, kt)
        assert sel.dense == kt.all_dense, policy
        if policy == "kascade_rerank" and not read.dense:
            wide = [min(math.ceil(DEFAULT_RERANK * kk), s) for s, kk in zip(ot.starts, ot.ks)]
            assert read.valid.sum(-1).tolist() == [wide] * case.hkv
        mask = ref.mask_from_kernel(sel, ot, case.hkv, case.seq)
        for t, (s, kk) in enumerate(zip(ot.starts, ot.ks)):
            for h in range(case.hkv):
                row = mask[h, t]
                if policy == "quest":
                    pages = {int(j) // 5 for j in row.nonzero().flatten()}
                    assert len(pages) == math.ceil(kk / 5), (policy, h, t)
                    assert int(row.sum()) <= min(s, len(pages) * 5)
                else:
                    assert int(row.sum()) == kk, (policy, h, t)


# ------------------------------------------------------------------------------------------------
# The backend with each policy against a policy-aware oracle run
# ------------------------------------------------------------------------------------------------

EVERY_LAYER = ("oracle", "quest", "streaming")  # no reuse: every non-dense layer selects
SINK = 3  # not the default, so the option is seen to reach the kernel

BACKEND_CASES = [
    # (profile, granularity, page_tile, slot_page, Hq, Hkv, D, dtype); page_tile 5 does not divide
    # T = 16, so Quest pages are cut by tile starts
    ("a024", "token", 5, 16, 12, 4, 32, torch.float32),
    ("a02d3", "page", 4, 1, 8, 2, 64, torch.float32),
    ("a024", "token", 8, 1, 4, 4, 32, torch.float32),  # GQA group 1
]


RERANK = 2.5  # kascade_rerank's candidates per key here: not the default, so it is seen to reach


def policy_config(policy: str) -> PolicyConfig:
    return PolicyConfig(policy, SINK, rerank=RERANK)


def serves(case, policy: str) -> bool:
    """kascade_rerank re-ranks single keys: a page-granularity profile is refused at start-up."""
    return not (policy == "kascade_rerank" and case[1] == "page")


def run_policy_oracle(scn: tb.Scenario, policy: str, backend_sel: dict):
    """The policies as described in docs/profiles.md, written with reference.py only."""
    m, pd = scn.model, scn.profile_dict
    kfn = lambda s: ref.budget_k(s, pd["topk_fraction"], pd["k_min"], pd["round_to"])  # noqa: E731
    gran, page = pd["granularity"], pd["page_tile_size"]
    ident = list(range(m.hkv))
    head_maps = [ident] * tb.NUM_LAYERS if policy in EVERY_LAYER + ("kascade_identity",) \
        else pd["head_map"]
    store = {name: [[k.clone(), v.clone()] for k, v in layers]
             for name, layers in scn.prepooled_kv.items()}
    outputs, masks, ties = {}, {}, []
    for f, fwd in enumerate(tb.FORWARDS):
        for st in fwd.steps:
            if st.name not in store:
                if st.name in tb.SHARED:
                    src, upto = tb.SHARED[st.name]
                    store[st.name] = [[k[:upto].clone(), v[:upto].clone()] for k, v in store[src]]
                else:
                    store[st.name] = [[torch.zeros(0, m.hkv, m.d, dtype=m.dtype)] * 2
                                      for _ in range(tb.NUM_LAYERS)]
            S = st.prefix + st.n
            tiles = (ref.oracle_decode_tiles(S, kfn) if fwd.decode else
                     ref.oracle_extend_tiles(st.prefix, st.n, pd["tile_size"], kfn))
            sel = None
            for lid in range(tb.NUM_LAYERS):
                q, k_new, v_new = scn.data[f, st.name, lid]
                kv = store[st.name][lid]
                kv[0], kv[1] = torch.cat([kv[0], k_new]), torch.cat([kv[1], v_new])
                K, V = kv
                dense = lid in pd["dense_layers"]
                selects = (not dense) if policy in EVERY_LAYER else lid in pd["anchor_layers"]
                if selects:
                    got = ref.mask_from_kernel(backend_sel[f, st.name, lid], tiles, m.hkv, S)
                    if policy == "quest":
                        sel, scores = ref.quest_select(q, K, tiles, m.scale, page)
                        bad = ref.quest_violations(got, scores, tiles, page)
                    elif policy == "streaming":
                        sel = ref.streaming_select(tiles, m.hkv, S, SINK)
                        bad = [] if torch.equal(got, sel) else ["streaming selection differs"]
                    elif policy == "kascade_rerank":  # C * k candidates, then the top k
                        wide = ref.OracleTiles(tiles.q_pos, tiles.q_tile, tiles.starts, [
                            min(math.ceil(RERANK * kk - 1e-9), s)
                            for kk, s in zip(tiles.ks, tiles.starts)])
                        sel, scores = ref.select(q, K, wide, m.scale)
                        bad = ref.topk_violations(got, scores, wide)
                    else:
                        sel, scores = ref.select(q, K, tiles, m.scale, gran, page,
                                                 pool_all_heads=policy == "kascade_pooled")
                        bad = ref.topk_violations(got, scores, tiles, gran, page)
                    assert not bad, (policy, f, st, lid, bad[:3])
                    if not torch.equal(got, sel):
                        ties.append((f, st.name, lid))
                        sel = got
                    masks[f, st.name, lid] = sel
                if dense:
                    out = ref.dense_attention(q, K, V, tiles.q_pos, m.scale)
                elif policy == "kascade_rerank":
                    if selects:  # its own top k of its candidates
                        attended, _ = ref.select(q, K, tiles, m.scale)
                        attended &= sel
                    else:
                        cand = torch.stack([sel[int(a)] for a in head_maps[lid]])
                        attended = ref.rerank(q, K, tiles, m.scale, cand)
                    out = ref.sparse_attention(q, K, V, tiles, attended, m.scale)
                else:
                    out = ref.sparse_attention(q, K, V, tiles, sel, m.scale,
                                               head_map=head_maps[lid])
                outputs[f, st.name, lid] = out
    return outputs, masks, ties


_POLICY_RUNS = {}


def policy_runs(case, policy):
    if not serves(case, policy):
        with pytest.raises(KascadeConfigError, match="kascade_rerank re-ranks single keys"):
            tb.run_backend(tb.build(case), batched=True, policy=policy_config(policy))
        pytest.skip("refused at start-up (checked)")
    key = (tb.case_id(case), policy)
    if key not in _POLICY_RUNS:
        scn = tb.build(case)
        run = tb.run_backend(scn, batched=True, policy=policy_config(policy))
        _POLICY_RUNS[key] = (scn, run, *run_policy_oracle(scn, policy, run.selections))
    return _POLICY_RUNS[key]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", BACKEND_CASES, ids=tb.case_id)
def test_backend_policy_matches_oracle(case, policy):
    scn, run, outputs, masks, ties = policy_runs(case, policy)
    assert set(run.outputs) == set(outputs)
    for key, want in outputs.items():
        torch.testing.assert_close(run.outputs[key].double(), want, atol=1e-5, rtol=1e-5,
                                   msg=lambda msg: f"{policy} {key}: {msg}")
    assert len(ties) <= max(1, len(masks) // 20), ties
    # every selection has the Kascade budget: k keys per (head, tile), or ceil(k/P) key pages
    pd = scn.profile_dict
    page = pd["page_tile_size"]
    by_pages = policy == "quest" or (pd["granularity"] == "page" and policy not in ("streaming",))
    widen = RERANK if policy == "kascade_rerank" else 1.0  # what anchors keep for reuse layers
    kfn = lambda s: ref.budget_k(s, pd["topk_fraction"], pd["k_min"], pd["round_to"])  # noqa: E731
    n_sparse = 0
    for (f, name, lid), mask in masks.items():
        st = next(s for s in tb.FORWARDS[f].steps if s.name == name)
        tiles = (ref.oracle_decode_tiles(st.prefix + 1, kfn) if tb.FORWARDS[f].decode else
                 ref.oracle_extend_tiles(st.prefix, st.n, pd["tile_size"], kfn))
        n_sparse += int(not run.selections[f, name, lid].dense)
        for t, kk in enumerate(tiles.ks):
            for h in range(scn.model.hkv):
                row = mask[h, t]
                if by_pages:
                    pages = {int(j) // page for j in row.nonzero().flatten()}
                    assert len(pages) == math.ceil(kk / page)
                else:
                    assert int(row.sum()) == min(math.ceil(widen * kk - 1e-9), tiles.starts[t])
        if policy == "kascade_pooled" or policy == "streaming":
            assert all(torch.equal(mask[0], mask[h]) for h in range(scn.model.hkv))
    assert n_sparse >= len(masks) // 2


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", BACKEND_CASES, ids=tb.case_id)
def test_backend_policy_roles_and_dense_delegation(case, policy):
    """Which layers select, and that only profile dense layers (or all-dense batches) go to the
    dense backend."""
    scn, run, *_ = policy_runs(case, policy)
    pd = scn.profile_dict
    dense, anchors = set(pd["dense_layers"]), set(pd["anchor_layers"])
    if policy in EVERY_LAYER:
        want = [lid not in dense for lid in range(tb.NUM_LAYERS)]
    else:
        want = [lid in anchors for lid in range(tb.NUM_LAYERS)]
    assert list(run.backend.layers.selects) == want
    assert run.backend.policy == policy_config(policy)
    for f, delegated in enumerate(run.dense_layers_per_forward):
        assert dense <= delegated
        for lid in delegated - dense:
            src = lid if policy in EVERY_LAYER else max(a for a in anchors if a <= lid)
            assert all(run.selections[f, st.name, src].dense for st in tb.FORWARDS[f].steps)


@pytest.mark.parametrize("case", BACKEND_CASES, ids=tb.case_id)
def test_policies_give_different_outputs(case):
    """Each pair of policies differs somewhere; where two policies must agree, they do."""
    served = [p for p in POLICIES if serves(case, p)]
    runs = {p: policy_runs(case, p) for p in served}
    scn = runs["kascade"][0]
    pd = scn.profile_dict
    ident = list(range(scn.model.hkv))
    keys = [key for key in runs["kascade"][1].outputs if key[2] not in pd["dense_layers"]]

    def diff(a, b, layers):
        return max((runs[a][1].outputs[key] - runs[b][1].outputs[key]).abs().max().item()
                   for key in keys if key[2] in layers)

    non_dense = {key[2] for key in keys}
    for a, b in itertools.combinations(served, 2):
        if {a, b} == {"kascade", "kascade_identity"} and all(
                pd["head_map"][lid] == ident for lid in non_dense):
            continue
        assert diff(a, b, non_dense) > 1e-3, (a, b)
    # anchors select the same keys under kascade, kascade_identity and oracle
    anchors = set(pd["anchor_layers"]) - set(pd["dense_layers"])
    assert diff("kascade", "oracle", anchors) < 1e-6
    assert diff("kascade", "kascade_identity", anchors) < 1e-6
    if "kascade_rerank" in served:  # an anchor attends its own top k of its C * k
        assert diff("kascade", "kascade_rerank", anchors) < 1e-6
    # reuse layers with an identity head map are the same under kascade and kascade_identity
    same_map = {lid for lid in non_dense - anchors if pd["head_map"][lid] == ident}
    if same_map:
        assert diff("kascade", "kascade_identity", same_map) < 1e-6


def test_default_policy_is_kascade():
    case = BACKEND_CASES[0]
    scn = tb.build(case)
    default = tb.run_backend(scn, batched=True)
    explicit = policy_runs(case, "kascade")[1]
    for key, out in default.outputs.items():
        assert torch.equal(out, explicit.outputs[key])


def test_set_profile_keeps_the_policy_unless_given():
    profile = mapped_profile()
    r2t = tb.FakeReqToTokenPool(8, tb.MAX_CTX)
    kv = tb.FakeKVPool(tb.NUM_LAYERS, 16, 4, 32, torch.float32)
    be = tb.KascadeAttnBackend(tb.FakeDenseBackend(r2t, kv), r2t, kv, profile, profile.budget,
                               "cpu", policy=PolicyConfig("quest"))
    assert be.profile == every_layer_selects(profile)
    be.set_profile(profile, profile.budget)
    assert be.policy.name == "quest" and be.profile == every_layer_selects(profile)
    be.set_profile(profile, profile.budget, PolicyConfig("kascade_identity"))
    assert be.policy.name == "kascade_identity" and be.profile == identity_head_map(profile)
