"""Tensor parallelism without a server: KV-head layouts, rank-local head maps, the profile's
``tp_sizes``, the start-up fit, and the backend on one rank's heads equal to TP 1's.

The backend under ``--tp-size N`` gets from SGLang only its rank's query and KV heads (q, k, v
and the KV pool) and slices the profile's head map to them (tp.py). So rank r's outputs must be
TP 1's outputs of the query heads rank r holds, for every layer, forward and request: checked
here on the fake scenario of test_backend_vs_reference.py (prefill with cached prefixes and
chunks, decode, shared slots), head for head.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

from sglang_kascade.config import KascadeConfigError, KascadeOptions, PolicyConfig
from sglang_kascade.profile import profile_from_dict
from sglang_kascade.resolve import fit_profile_to_tp, tp_problem
from sglang_kascade.tp import TPLayout, fit_head_map, head_map_problem, same_rank
from test_backend_vs_reference import CASES, Model, build, run_backend
from test_profile import valid_profile_dict, with_


# ---- layouts --------------------------------------------------------------------------------

@pytest.mark.parametrize("hkv, size, firsts, local", [
    (8, 1, [0], 8), (8, 2, [0, 4], 4), (8, 8, list(range(8)), 1),
    (4, 8, [0, 0, 1, 1, 2, 2, 3, 3], 1),  # replicated: rank r holds head r // 2
    (3, 3, [0, 1, 2], 1), (1, 4, [0, 0, 0, 0], 1),
])
def test_layout_matches_sglang_head_split(hkv, size, firsts, local):
    layouts = [TPLayout(r, size, hkv) for r in range(size)]
    assert [t.first_head for t in layouts] == firsts
    assert all(t.local_kv_heads == local for t in layouts)


@pytest.mark.parametrize("hkv, size", [(8, 3), (3, 2), (4, 6), (8, 0), (8, 2048)])
def test_layout_refuses_sizes_sglang_cannot_split(hkv, size):
    with pytest.raises(ValueError, match="TP size"):
        TPLayout(0, size, hkv)


def test_same_rank_blocks():
    assert same_rank(0, 3, 8, (2,)) and not same_rank(3, 4, 8, (2,))
    assert not same_rank(0, 1, 8, (8,)) and not same_rank(0, 1, 4, (8,))  # 1 head a rank
    assert not same_rank(1, 2, 6, (2, 3))  # {0,1,2} at TP 2 but {0,1},{2,3} at TP 3


def test_local_head_map_slices_and_renumbers():
    rows = ((0, 1, 2, 3), (1, 0, 3, 2), (1, 1, 2, 2))
    assert TPLayout(0, 2, 4).local_head_map(rows) == ((0, 1), (1, 0), (1, 1))
    assert TPLayout(1, 2, 4).local_head_map(rows) == ((0, 1), (1, 0), (0, 0))
    with pytest.raises(ValueError, match=r"head_map\[1\]\[0\]=1 .* TP 4"):
        TPLayout(0, 4, 4).local_head_map(rows)


def test_problem_names_the_first_crossing_entry():
    why = head_map_problem(((0, 1, 2, 3), (0, 3, 2, 1)), 4, 2)
    assert why.startswith("head_map[1][1]=3 reads KV head 3") and "heads 0..1 share" in why


def test_fit_keeps_local_entries_and_uses_the_similarity_for_the_others():
    rows = ((0, 1, 2, 3), (3, 0, 1, 2))
    fitted, moved = fit_head_map(rows, 4, (2,))
    assert fitted == ((0, 1, 2, 3), (0, 0, 2, 2)) and moved == 2  # identity for crossings
    score = {(1, 0, 1): 0.9, (1, 2, 3): 0.8}  # (layer, h2, h1) -> similarity
    fitted, _ = fit_head_map(rows, 4, (2,), lambda l, h2, h1: score.get((l, h2, h1), 0.5))
    assert fitted == ((0, 1, 2, 3), (1, 0, 3, 2))
    assert head_map_problem(fitted, 4, 2) is None


# ---- the profile field ------------------------------------------------------------------------
# test_profile.py's model: 3 KV heads, a head map that crosses ranks at TP 3.

def test_tp_sizes_is_validated_against_the_head_map():
    assert profile_from_dict(with_("tp_sizes", [1])).tp_sizes == (1,)
    with pytest.raises(KascadeConfigError, match=r"tp_sizes.*head_map\[1\]\[0\]=2"):
        profile_from_dict(with_("tp_sizes", [1, 3]))
    d = valid_profile_dict()
    d["head_map"] = [list(range(3))] * len(d["head_map"])
    d["tp_sizes"] = [1, 3, 6]
    assert profile_from_dict(d).tp_sizes == (1, 3, 6)


@pytest.mark.parametrize("value, words", [
    ([], "non-empty list"), ([3, 1], "sorted"), ([1, 1], "sorted"), ([True], "integers"),
    ([2], "neither divides"), ([0], "1..1024"), ("1", "list"),
])
def test_tp_sizes_bad_values(value, words):
    with pytest.raises(KascadeConfigError, match=words):
        profile_from_dict(with_("tp_sizes", value))


# ---- start-up: fit or refuse ----------------------------------------------------------------

def test_explicit_profile_that_crosses_ranks_is_refused_with_the_way_out():
    p = profile_from_dict(valid_profile_dict())
    with pytest.raises(KascadeConfigError) as e:
        fit_profile_to_tp(p, PolicyConfig(), TPLayout(0, 3, 3), explicit=True)
    msg = str(e.value)
    assert "does not fit --tp-size 3" in msg and "head_map[1][0]=2" in msg
    assert "--tp 3" in msg and "sglang_kascade.calibrate.tp_fit" in msg


def test_shipped_or_derived_profile_is_fitted_with_a_warning(caplog):
    p = profile_from_dict(valid_profile_dict())
    with caplog.at_level(logging.WARNING, logger="sglang_kascade"):
        fitted = fit_profile_to_tp(p, PolicyConfig(), TPLayout(0, 3, 3), explicit=False)
    assert fitted.head_map == tuple((tuple(range(3)),) * p.num_layers)  # one head a rank
    assert fitted.tp_sizes == (1, 3) and fitted.anchor_layers == p.anchor_layers
    assert "crosses ranks at --tp-size 3" in caplog.text
    assert fit_profile_to_tp(fitted, PolicyConfig(), TPLayout(2, 3, 3), explicit=True) is fitted


def test_policies_under_tp():
    p = profile_from_dict(valid_profile_dict())
    layout = TPLayout(0, 3, 3)
    assert tp_problem(p, PolicyConfig("kascade_identity"), layout) is None  # identity map
    assert tp_problem(p, PolicyConfig("oracle"), layout) is None
    assert "pools the scores of every KV head" in tp_problem(p, PolicyConfig("kascade_pooled"),
                                                             layout)
    with pytest.raises(KascadeConfigError, match="pools"):
        fit_profile_to_tp(p, PolicyConfig("kascade_pooled"), layout, explicit=False)
    assert tp_problem(p, PolicyConfig("kascade_pooled"), TPLayout(0, 1, 3)) is None


# ---- the backend on one rank's heads --------------------------------------------------------

def rank_view(scn, layout: TPLayout):
    """The scenario as rank ``layout.rank`` sees it: its query heads (SGLang splits them in N
    equal blocks) and its KV heads; the profile stays the model's."""
    m = scn.model
    q = slice(layout.rank * m.hq // layout.size, (layout.rank + 1) * m.hq // layout.size)
    kv = slice(layout.first_head, layout.first_head + layout.local_kv_heads)
    data = {key: (a[:, q], b[:, kv], c[:, kv]) for key, (a, b, c) in scn.data.items()}
    pre = {name: [(k[:, kv], v[:, kv]) for k, v in layers]
           for name, layers in scn.prepooled_kv.items()}
    model = Model(q.stop - q.start, layout.local_kv_heads, m.d, m.dtype)
    return dataclasses.replace(scn, model=model, data=data, prepooled_kv=pre), q


# (CASES index, TP size, fraction); None: the scenario's sparse budget. Replicated KV heads
# (case 1 at TP 4: 2 KV heads, 4 ranks) only at fraction 1.0: each replica pools the anchor
# scores of its own query heads, half of the GQA group, so its sparse selections are not TP 1's
# (docs/design.md, "Tensor parallelism").
TP_CASES = [(c, n, f) for c, n in [(4, 2), (4, 4), (2, 2), (5, 2)] for f in (None, 1.0)] + [
    (1, 4, 1.0)]


@pytest.mark.parametrize("case, size, fraction", TP_CASES,
                         ids=[f"case{c}-tp{n}-{f or 'sparse'}" for c, n, f in TP_CASES])
def test_each_rank_computes_its_heads_of_tp1(case, size, fraction):
    scn = build(CASES[case])
    pd = copy.deepcopy(scn.profile_dict)
    hkv = scn.model.hkv
    pd["head_map"] = [list(r) for r in fit_head_map(pd["head_map"], hkv, (size,))[0]]
    if fraction is not None:
        pd["topk_fraction"] = fraction
    scn = dataclasses.replace(scn, profile_dict=pd)
    whole = run_backend(scn, batched=True)
    if fraction is None:
        assert any(not s.dense for s in whole.selections.values())  # sparse layers ran
    remapped = [r for r in pd["head_map"] if r != list(range(hkv))]
    assert remapped or hkv <= size  # a map with something to slice where ranks share heads
    for rank in range(size):
        layout = TPLayout(rank, size, hkv)
        part, q = rank_view(scn, layout)
        run = run_backend(part, batched=True, tp=layout)
        assert run.backend.head_maps[1].shape == (layout.local_kv_heads,)
        assert set(run.outputs) == set(whole.outputs)
        for key, out in run.outputs.items():
            torch.testing.assert_close(out, whole.outputs[key][:, q], atol=1e-6, rtol=0,
                                       msg=lambda m: f"rank {rank} {key}: {m}")


def test_hot_swap_to_a_profile_that_crosses_ranks_is_refused():
    scn = build(CASES[4])
    layout = TPLayout(0, 2, 4)
    pd = copy.deepcopy(scn.profile_dict)
    pd["head_map"] = [list(r) for r in fit_head_map(pd["head_map"], 4, (2,))[0]]
    part, _ = rank_view(dataclasses.replace(scn, profile_dict=pd), layout)
    be = run_backend(part, batched=True, tp=layout).backend
    assert be.hot_swap_problem(profile_from_dict(pd)) is None
    crossing = profile_from_dict(scn.profile_dict)  # HEAD_MAPS[4] crosses ranks at TP 2
    assert "does not fit --tp-size 2" in be.hot_swap_problem(crossing)
    assert be.options == KascadeOptions(dense_prefill_below=0)
