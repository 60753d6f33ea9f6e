"""A request's own budget (SGLang ``custom_params`` {"kascade": {"topk": f}} / {"dense": true}),
without a server: parsing and validation, the budget formula at a request's fraction, the device
path's plans and the decode graphs' plan (torch reference of kernels/graph_plan_triton.py) with
per-row fractions, the SGLang hooks (verify, ForwardBatch.init_new, the response's meta info),
the counters, and the backend on the scenario of test_backend_vs_reference.py with a mixed batch.

Oracles: ``BudgetConfig(topk_fraction=f).k_for`` for budgets (a server whose own fraction is f);
for the backend, the same scenario served with a uniform server budget of each request's fraction
(every request at f, itself checked against the float64 oracle here) and the oracle run at f.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import test_backend_vs_reference as tb
from sglang_kascade import sglang_adapter as sa
from sglang_kascade.backend_stats import RECENT_REQUESTS, BackendStats
from sglang_kascade.config import (BudgetConfig, KascadeConfigError, RequestBudget,
                                   budget_class, parse_request_budget)
from sglang_kascade.device_path import DevicePath
from sglang_kascade.kernels.decode_plan import graph_rows_torch, row_offsets

torch.set_num_threads(1)


# ---- parsing and validation -------------------------------------------------------------------


@pytest.mark.parametrize("params,want", [
    (None, None),
    ({}, None),
    ({"other": 1}, None),  # other custom params are not ours
    ({"kascade": None}, None),
    ({"kascade": {}}, None),
    ({"kascade": {"dense": False}}, None),
    ({"kascade": {"topk": 0.05}}, RequestBudget(0.05)),
    ({"kascade": {"topk": 1}}, RequestBudget(1.0)),  # a JSON integer
    ({"kascade": {"topk": 1e-9}}, RequestBudget(1e-9)),
    ({"kascade": {"dense": True}}, RequestBudget(1.0)),
    ({"kascade": {"topk": 0.2, "dense": False}}, RequestBudget(0.2)),
    ({"kascade": {"topk": None, "dense": True}}, RequestBudget(1.0)),
    ({"kascade": {"topk": 0.3}, "__req__": object()}, RequestBudget(0.3)),  # in the scheduler
])
def test_valid_request_budgets(params, want):
    assert parse_request_budget(params) == want


@pytest.mark.parametrize("value,message", [
    (0.1, "custom_params.kascade=0.1: must be an object"),
    ("dense", "custom_params.kascade='dense': must be an object"),
    ({"topk": 0}, "custom_params.kascade.topk=0: must be in (0, 1]"),
    ({"topk": -0.1}, "must be in (0, 1]"),
    ({"topk": 1.5}, "custom_params.kascade.topk=1.5: must be in (0, 1]"),
    ({"topk": float("nan")}, "topk=nan: must be in (0, 1]"),
    ({"topk": float("inf")}, "topk=inf: must be in (0, 1]"),
    ({"topk": 10**400}, "must be in (0, 1]"),
    ({"topk": "0.1"}, "custom_params.kascade.topk='0.1': must be a number in (0, 1]"),
    ({"topk": True}, "topk=True: must be a number"),
    ({"topk": [0.1]}, "must be a number"),
    ({"dense": "yes"}, "custom_params.kascade.dense='yes': must be true or false"),
    ({"dense": 1}, "dense=1: must be true or false"),
    ({"top_k": 0.1}, "unknown field(s) 'top_k' (allowed: topk, dense)"),
    ({"topk": 0.1, "k_min": 4}, "unknown field(s) 'k_min'"),
    ({"topk": 0.1, "dense": True}, "give topk or dense: true, not both"),
])
def test_bad_request_budgets_are_refused_with_the_field(value, message):
    with pytest.raises(KascadeConfigError) as e:
        parse_request_budget({"kascade": value})
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)  # SGLang answers a ValueError from verify with 400
    assert len(str(e.value)) < 200  # a huge client value is cut


def test_budget_classes():
    assert [budget_class(f) for f in (None, 0.05, 0.999, 1.0)] == [
        "default", "custom", "custom", "dense"]
    assert RequestBudget(1.0).budget_class == "dense"
    assert RequestBudget(0.2).budget_class == "custom"


@pytest.mark.parametrize("k_min,round_to", [(128, 1), (16, 1), (5, 8), (1, 16)])
@pytest.mark.parametrize("fraction", [0.05, 0.14, 0.2, 0.5, 1.0])
def test_k_for_at_a_request_fraction_is_a_server_at_that_fraction(fraction, k_min, round_to):
    server = BudgetConfig(topk_fraction=0.1, k_min=k_min, round_to=round_to)
    alone = BudgetConfig(topk_fraction=fraction, k_min=k_min, round_to=round_to)
    lengths = list(range(0, 3001)) + [8190, 65536, 131072]
    assert [server.k_for(v, fraction) for v in lengths] == [alone.k_for(v) for v in lengths]
    assert [server.k_for(v, None) for v in lengths] == [server.k_for(v) for v in lengths]
    if fraction == 1.0:  # dense: every visible key
        assert all(server.k_for(v, 1.0) == v for v in lengths)


# ---- device path: eager and prefill plans, decode graphs' plan --------------------------------


FRACS = [None, 0.05, 1.0, 0.2, None, 0.5]


def test_eager_decode_plan_budgets_per_request():
    dp = DevicePath("cpu")  # host arithmetic only
    budget = BudgetConfig(topk_fraction=0.1, k_min=16)
    seq = [4000, 4000, 4000, 4000, 100, 9]
    fwd = dp.plan(list(range(6)), seq, budget, FRACS)
    want = [budget.k_for(s, f) for s, f in zip(seq, FRACS)]
    assert fwd.topk.tolist() == want == [400, 200, 4000, 800, 16, 9]
    assert fwd.kmax == 4000 and not fwd.all_dense
    assert dp.plan([0], [4000], budget, [1.0]).all_dense  # a dense request alone: dense backend
    assert dp.plan([0, 1], [4000, 4000], budget).topk.tolist() == [400, 400]


def test_prefill_plan_budgets_per_request():
    dp = DevicePath("cpu")
    budget = BudgetConfig(topk_fraction=0.25, k_min=8, tile_size=32)
    prefix, extend, fracs = [0, 300, 0], [100, 20, 64], [1.0, 0.05, None]
    fwd = dp.plan_prefill([5, 2, 7], prefix, extend, budget, fracs)
    starts = fwd.tiles.tile_start.tolist()
    assert starts == [0, 32, 64, 96, 288, 0, 32]
    per_tile = [1.0] * 4 + [0.05] + [None] * 2
    assert fwd.tile_k.tolist() == [budget.k_for(s, f) for s, f in zip(starts, per_tile)]
    assert fwd.tile_k.tolist() == [0, 32, 64, 96, 15, 0, 8]
    assert fwd.kmax == 96 and not fwd.all_dense


@pytest.mark.parametrize("fraction,k_min,round_to", [(0.1, 128, 1), (0.3, 16, 1), (0.07, 5, 8),
                                                     (1.0, 16, 1)])
def test_graph_plan_reference_with_per_row_fractions(fraction, k_min, round_to):
    """Each row's k is k_for at its own fraction (a server at that fraction), the server's rows
    clamped to the captured capacity kmax, a row's own only to its length; rows past the batch
    are untouched."""
    budget = BudgetConfig(topk_fraction=fraction, k_min=k_min, round_to=round_to)
    gen = torch.Generator().manual_seed(7)
    seq = [1, 10, 1280, 3000] + torch.randint(1, 50000, (60,), generator=gen).tolist()
    n = len(seq)
    own = [None, 0.05, 1.0, 0.2, 0.14, 0.5, 1e-6, 0.999]
    fracs = [own[i % len(own)] for i in range(n)]
    dp = DevicePath("cpu")
    dp.set_budget(budget)
    kmax = 1024
    row_frac = torch.full((n + 3,), 0.77, dtype=torch.float64)  # past the batch: ignored
    row_frac[:n] = torch.tensor([0.0 if f is None else f for f in fracs], dtype=torch.float64)
    out = [torch.full((n + 3,), -7, dtype=dt) for dt in (torch.int64, torch.int32, torch.int64,
                                                          torch.int32)]
    rows = torch.randperm(n, generator=gen)
    graph_rows_torch(rows, torch.tensor(seq, dtype=torch.int32), *out, dp.graph_budget_f,
                     dp.graph_budget_i, kmax, row_frac)
    want = [max(1, budget.k_for(s, f) if f is not None else min(budget.k_for(s), kmax))
            for s, f in zip(seq, fracs)]
    assert out[3][:n].tolist() == want
    assert out[0][:n].tolist() == rows.tolist() and out[1][:n].tolist() == seq
    assert out[2][:n].tolist() == row_offsets(seq)
    assert any(w > kmax for w, f in zip(want, fracs) if f is not None)  # unclamped own rows
    assert all(int(t[n]) == -7 for t in out)
    # no row fractions: the server's budget everywhere, as before
    graph_rows_torch(rows, torch.tensor(seq, dtype=torch.int32), *out, dp.graph_budget_f,
                     dp.graph_budget_i, kmax)
    assert out[3][:n].tolist() == [max(1, min(budget.k_for(s), kmax)) for s in seq]


def test_graph_state_fractions_table_and_what_graphs_serve():
    """The row fractions travel to the in-graph plan through a static table written before a
    replay (nothing written while every row takes the server's budget); graphs captured at
    fraction 1.0 (every layer dense) do not serve a row asking for fewer keys."""
    dp = DevicePath("cpu")
    budget = BudgetConfig(topk_fraction=0.1, k_min=16)
    dp.init_graph_state(max_bs=4, lmax=8192, tokens=30000, pad_keys=4, budget=budget)
    g = dp.graph_state
    table = g["row_frac"]
    assert table.dtype == torch.float64 and table.tolist() == [0.0] * 4
    assert dp.graph_serves_fractions([0.05, None, 1.0])
    dp.set_graph_fractions([None, None])
    assert not dp.graph_fracs_set and table.tolist() == [0.0] * 4
    dp.set_graph_fractions([1.0, None, 0.05])
    assert dp.graph_fracs_set and table.tolist() == [1.0, 0.0, 0.05, 0.0]
    seq = [8000, 8000, 8000]
    fwd = dp.plan_graph(seq)
    dp.fill_graph_rows(fwd, torch.tensor([2, 0, 1]), torch.tensor(seq))
    assert g["topk"][:3].tolist() == [8000, 800, 400]  # dense beyond kmax (1024): its length
    assert g["kmax"] == 1024
    dp.set_graph_fractions([None, None, None])  # back to the server's: the table is zeroed once
    assert not dp.graph_fracs_set and table.tolist() == [0.0] * 4
    dp.fill_graph_rows(fwd, torch.tensor([2, 0, 1]), torch.tensor(seq))
    assert g["topk"][:3].tolist() == [800, 800, 800]
    dense = DevicePath("cpu")
    dense.init_graph_state(max_bs=4, lmax=8192, tokens=20000, pad_keys=4,
                           budget=BudgetConfig(topk_fraction=1.0))
    assert dense.graph_serves_fractions([None, 1.0])
    assert not dense.graph_serves_fractions([None, 0.5])


# ---- SGLang hooks ------------------------------------------------------------------------------


def test_verify_hook_refuses_bad_values_before_the_scheduler():
    from sglang.srt.sampling.sampling_params import SamplingParams

    def verified(custom):
        sp = SamplingParams(max_new_tokens=4, custom_params=custom)
        sp.normalize(None)
        return sa._after_sampling_params_verify(sp.verify(1000), sp, 1000)

    assert verified({"kascade": {"topk": 0.05}}) is None
    assert verified(None) is None
    with pytest.raises(ValueError, match=r"custom_params.kascade.topk=2: must be in \(0, 1\]"):
        verified({"kascade": {"topk": 2}})


def _req(custom):
    return SimpleNamespace(sampling_params=SimpleNamespace(custom_params=custom))


def _fb(n, decode=False):
    return SimpleNamespace(rids=[f"r{i}" for i in range(n)],
                           forward_mode=tb.FakeForwardMode(decode))


def test_forward_batch_hook_hands_each_row_its_fraction(monkeypatch):
    """The fractions ride on ForwardBatch.rids, which SGLang's runners keep when they copy a
    ForwardBatch with dataclasses.replace (an attribute of the batch would be dropped)."""
    import dataclasses

    reqs = [_req(None), _req({"kascade": {"dense": True}}), _req({"kascade": {"topk": 0.05}}),
            _req({"thinking_budget": 3})]
    fb = _fb(4)
    assert sa._after_forward_batch_init(fb, object, SimpleNamespace(reqs=reqs)) is fb
    assert fb.rids == ["r0", "r1", "r2", "r3"]
    assert sa.request_fractions(fb) == [None, 1.0, 0.05, None]
    assert reqs[2]._kascade_fraction == 0.05  # parsed once per request
    reqs[2].sampling_params.custom_params = {"kascade": {"topk": 0.9}}
    assert sa.request_fraction(reqs[2]) == 0.05

    @dataclasses.dataclass
    class Batch:  # as SGLang's eager runner copies a ForwardBatch into its static buffers
        rids: list
        input_ids: list

    copy = dataclasses.replace(Batch(fb.rids, [1]), input_ids=[2])
    assert sa.request_fractions(copy) == [None, 1.0, 0.05, None]
    plain = _fb(2)
    sa._after_forward_batch_init(plain, object, SimpleNamespace(reqs=[_req(None), _req({})]))
    assert sa.request_fractions(plain) is None  # every row at the server's budget
    assert sa.request_fractions(SimpleNamespace(rids=None)) is None  # a graph capture's batch
    # decode forwards are skipped until some request of the process asked (it asks at prefill)
    monkeypatch.setattr(sa, "_asked", False)
    asks = SimpleNamespace(reqs=[_req({"kascade": {"topk": 0.2}})])
    dec = _fb(1, decode=True)
    sa._after_forward_batch_init(dec, object, asks)
    assert sa.request_fractions(dec) is None
    ext = _fb(1)
    sa._after_forward_batch_init(ext, object, SimpleNamespace(reqs=list(asks.reqs)))
    assert sa.request_fractions(ext) == [0.2] and sa._asked
    dec = _fb(1, decode=True)
    sa._after_forward_batch_init(dec, object, asks)
    assert sa.request_fractions(dec) == [0.2]


def test_response_meta_info_names_the_budget():
    def manager(backend):
        return SimpleNamespace(server_args=SimpleNamespace(attention_backend=backend),
                               preferred_sampling_params=None)

    async def responses(n):
        for i in range(n):
            yield {"text": str(i), "meta_info": {"id": "r"}}

    def collect(backend, sampling_params):
        obj = SimpleNamespace(sampling_params=sampling_params)
        gen = sa._around_wait_one_response(lambda m, o: responses(2), manager(backend), obj)

        async def run():
            return [out async for out in gen]

        return asyncio.run(run())

    outs = collect("kascade", {"custom_params": {"kascade": {"topk": 0.05}}})
    assert [o["meta_info"]["kascade"] for o in outs] == [{"budget": "custom", "topk": 0.05}] * 2
    assert collect("kascade", {"custom_params": {"kascade": {"dense": True}}})[0][
        "meta_info"]["kascade"] == {"budget": "dense"}
    assert collect("kascade", {})[0]["meta_info"]["kascade"] == {"budget": "default"}
    assert "kascade" not in collect("flashinfer", {})[0]["meta_info"]  # not a kascade server


# ---- counters ----------------------------------------------------------------------------------


def test_requests_are_counted_once_by_budget_class():
    st = BackendStats()
    st.record_requests(["a", "b", "c", "d"], [None, 0.05, 1.0, 0.2])
    st.record_requests(["b", "e"], [0.05, None])  # b's next prefill chunk: counted already
    st.record_requests(None, [1.0])  # no ids: every row counts
    assert st.snapshot({})["request_budgets"] == {"default": 2, "custom": 2, "dense": 2}
    many = BackendStats()
    many.record_requests([str(i) for i in range(RECENT_REQUESTS + 5)],
                         [None] * (RECENT_REQUESTS + 5))
    assert len(many._recent) == RECENT_REQUESTS  # bounded memory


# ---- the backend: a mixed batch against each request served alone ------------------------------

# The scenario's requests and what each asks for (profile: fraction 0.25, k_min 4, round_to 2)
ASKS = {"A": {"dense": True}, "B": {"topk": 0.5}, "C": None, "D": {"topk": 0.1}}


def _fraction(name):
    budget = parse_request_budget({"kascade": ASKS[name]})
    return None if budget is None else budget.topk_fraction


@pytest.fixture
def mixed_batches(monkeypatch):
    """run_backend's ForwardBatch built as SGLang's init_new builds it under the plugin: each
    row's fraction from its request's custom_params (sglang_adapter's hook), and request ids."""
    case = tb.CASES[1]  # token granularity, pages of 16 slots, fp32
    scn = tb.build(case)
    by_pool = {row: name for name, row in scn.pool_index.items()}

    @dataclass
    class MixedForwardBatch(tb.FakeForwardBatch):
        def __post_init__(self):
            names = [by_pool[int(p)] for p in self.req_pool_indices.tolist()]
            self.rids = names
            reqs = [_req({"kascade": ASKS[n]} if ASKS[n] else None) for n in names]
            sa._after_forward_batch_init(self, type(self), SimpleNamespace(reqs=reqs))

    monkeypatch.setattr(tb, "FakeForwardBatch", MixedForwardBatch)
    return scn


def _uniform(scn, fraction):
    """The scenario with the server's own fraction set to ``fraction`` (None: unchanged)."""
    pd = dict(scn.profile_dict)
    if fraction is not None:
        pd["topk_fraction"] = fraction
    return tb.Scenario(scn.model, pd, scn.slot_page, scn.seed, scn.pool_index, scn.slots,
                       scn.prepooled_kv, scn.data)


def test_mixed_batch_gives_each_request_what_it_gets_alone(mixed_batches, monkeypatch):
    """Dense, 10%, 50% and default (25%) requests batched together (extend and decode forwards):
    each request's every layer equals the same request served one at a time, and equals the
    scenario served with the server's budget at that request's fraction (every request at f),
    which matches the float64 oracle at f."""
    scn = mixed_batches
    mixed = tb.run_backend(scn, batched=True)
    single = tb.run_backend(scn, batched=False)
    assert set(mixed.outputs) == set(single.outputs)
    for key in mixed.outputs:
        # The dense request alone has every selection dense, so its layers go to the dense
        # backend; batched with sparse requests, its rows run the kascade kernel over all its
        # keys: the same attention, float32 rounding apart (the oracle's tolerance).
        atol = tb.ATOL[torch.float32] if ASKS[key[1]] == {"dense": True} else 1e-6
        torch.testing.assert_close(mixed.outputs[key], single.outputs[key], atol=atol, rtol=0,
                                   msg=lambda m: f"{key}: {m}")
    monkeypatch.undo()  # plain ForwardBatches: the server's budget for every row
    for name in ASKS:
        f = _fraction(name)
        scn_f = _uniform(scn, f)
        alone = tb.run_backend(scn_f, batched=True)
        oracle = tb.run_oracle(scn_f, alone.selections)
        keys = [k for k in mixed.outputs if k[1] == name]
        assert keys
        atol = tb.ATOL[torch.float32] if f == 1.0 else 1e-6
        for key in keys:
            torch.testing.assert_close(mixed.outputs[key], alone.outputs[key], atol=atol,
                                       rtol=0, msg=lambda m: f"{name} {key}: {m}")
            torch.testing.assert_close(mixed.outputs[key].double(), oracle.outputs[key],
                                       atol=tb.ATOL[torch.float32], rtol=tb.RTOL[torch.float32],
                                       msg=lambda m: f"{name} {key} vs oracle: {m}")
            if key in mixed.selections:
                tb.assert_same_selection(mixed.selections[key], alone.selections[key])


def test_mixed_batch_budgets_really_differ(mixed_batches):
    """The requests' selections follow their own budgets: the dense request's are dense in every
    forward, the others select the keys of k_for at their fraction; classes are counted once."""
    scn = mixed_batches
    run = tb.run_backend(scn, batched=True)
    pd = scn.profile_dict
    for (f, name, lid), sel in run.selections.items():
        st = next(s for s in tb.FORWARDS[f].steps if s.name == name)
        if name == "A":
            assert sel.dense
            continue
        if sel.dense or not tb.FORWARDS[f].decode:
            continue
        frac = _fraction(name) or pd["topk_fraction"]
        want = tb.ref.budget_k(st.prefix + 1, frac, pd["k_min"], pd["round_to"])
        assert int(sel.valid[0, 0].sum()) == want, (f, name, lid)
    ks = {name: [] for name in ASKS}
    for (f, name, lid), sel in run.selections.items():
        if tb.FORWARDS[f].decode and not sel.dense:
            ks[name].append(int(sel.valid[0, 0].sum()))
    assert min(ks["B"]) > max(ks["C"]) > 0 and min(ks["C"]) > max(ks["D"]) > 0
    assert run.backend.stats.snapshot({})["request_budgets"] == {"default": 1, "custom": 2,
                                                                  "dense": 1}


def test_sidecar_exports_requests_by_budget_class():
    from sglang_kascade.server.metrics import render

    snap = BackendStats()
    snap.record_requests(["a", "b", "c"], [None, 0.05, 1.0])
    other = BackendStats()
    other.record_requests(["x"], [0.3])
    view = {"stats": {1: snap.snapshot({}), 2: other.snapshot({}), 3: {}}, "active": None,
            "schedulers": [1, 2, 3], "swaps": {}}
    text = render(lambda: view).decode()
    for line in ('kascade_requests_total{budget="default"} 1.0',
                 'kascade_requests_total{budget="custom"} 2.0',
                 'kascade_requests_total{budget="dense"} 1.0'):
        assert line in text
