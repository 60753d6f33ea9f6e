"""Host-side pieces of the device path that need no GPU: when it applies, the prefill plan (tiles,
budgets), the graph plan (static tensors, budgets, capacity clamp), the opt-in switch for decode
CUDA graphs, and which prefills run dense (SGLANG_KASCADE_DENSE_PREFILL, --kascade-dense-prefill-
below)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sglang_kascade.config import BudgetConfig, KascadeOptions, PolicyConfig
from sglang_kascade.device_path import DevicePath
from sglang_kascade.sglang_adapter import decode_graphs_wanted


def test_applies_only_to_cuda_token_topk():
    budget = BudgetConfig()
    cpu = DevicePath("cpu")
    assert not cpu.applies(True, PolicyConfig(), budget)
    assert not cpu.applies(False, PolicyConfig(), budget)
    cuda = DevicePath("cuda")  # no CUDA needed: applies() only reads the device type
    assert cuda.applies(True, PolicyConfig(), budget)
    assert cuda.applies(False, PolicyConfig(), budget)  # prefill too
    assert not cuda.applies(False, PolicyConfig(name="kascade_pooled"), budget)
    assert not cuda.applies(True, PolicyConfig(name="quest"), budget)
    assert not cuda.applies(True, PolicyConfig(), BudgetConfig(granularity="page"))
    cuda.enabled = False
    assert not cuda.applies(True, PolicyConfig(), budget)


def test_plan_prefill_tiles_budgets_and_rows():
    dp = DevicePath("cpu")  # host arithmetic only
    budget = BudgetConfig(topk_fraction=0.25, k_min=40, tile_size=32)
    # request 0: 100 new tokens after 0 cached; request 1: 20 new after 300 cached (tile 9 holds
    # positions 288..319, of which 300..319 are new)
    fwd = dp.plan_prefill([5, 2], [0, 300], [100, 20], budget)
    assert fwd.tiles.tile_start.tolist() == [0, 32, 64, 96, 288]
    assert fwd.tile_k.tolist() == [0, 32, 40, 40, 72]  # min(start, max(ceil(s/4), 40))
    assert fwd.tile_row.tolist() == [5, 5, 5, 5, 2]
    assert fwd.tiles.tile_q_lo.tolist() == [0, 32, 64, 96, 100]
    assert fwd.kmax == 72 and fwd.max_start == 288 and fwd.batch == 2 and not fwd.all_dense
    assert dp.plan_prefill([0], [0], [64], budget).all_dense  # starts 0, 32 <= k_min


def test_plan_graph_fills_static_rows_and_clamps_to_capacity():
    dp = DevicePath("cpu")
    budget = BudgetConfig(topk_fraction=0.1, k_min=16)
    dp.init_graph_state(max_bs=4, lmax=4096, budget=budget)
    seq = [100, 5, 4096]
    fwd = dp.plan_graph(torch.tensor([3, 1, 2]), torch.tensor(seq), seq, budget)
    g = dp.graph_state
    assert fwd.graph and not fwd.all_dense and fwd.batch == 3
    assert fwd.lmax == 4096 and fwd.kmax == g["kmax"] == 512  # k_for(4096) = 410 -> pow2 512
    assert fwd.req_idx.data_ptr() == g["req_idx"].data_ptr()  # views of the static tensors
    assert g["req_idx"][:3].tolist() == [3, 1, 2]
    assert g["seq_lens"][:3].tolist() == seq
    assert g["topk"][:3].tolist() == [16, 5, 410]
    # a larger budget later (hot swap) is clamped to the captured capacity
    fwd = dp.plan_graph(torch.tensor([0]), torch.tensor([4096]), [4096], BudgetConfig(
        topk_fraction=0.5, k_min=16))
    assert fwd.topk.tolist() == [512]


def test_decode_graphs_are_opt_in_and_cuda_only(monkeypatch):
    args = SimpleNamespace(device="cuda")
    monkeypatch.delenv("SGLANG_KASCADE_CUDA_GRAPH", raising=False)
    assert not decode_graphs_wanted(args)
    monkeypatch.setenv("SGLANG_KASCADE_CUDA_GRAPH", "1")
    assert decode_graphs_wanted(args)
    assert not decode_graphs_wanted(SimpleNamespace(device="cpu"))
    monkeypatch.setenv("SGLANG_KASCADE_CUDA_GRAPH", "0")
    assert not decode_graphs_wanted(args)


def test_dense_prefill_knob_sends_every_extend_layer_to_the_dense_backend(monkeypatch):
    import test_backend_vs_reference as tb

    monkeypatch.setenv("SGLANG_KASCADE_DENSE_PREFILL", "1")
    scn = tb.build(tb.CASES[0])
    be, dense = _cpu_backend(tb, scn)
    assert be.dense_prefill
    _prefill(be, tb, scn, 90)
    assert [c[0] for c in dense.calls] == list(range(tb.NUM_LAYERS))
    assert all(c[2] for c in dense.calls)  # the dense backend wrote the KV
    assert be.plan is None


def _cpu_backend(tb, scn, options=KascadeOptions()):
    """(backend, its fake dense backend) on the CPU for scenario ``scn``'s request A."""
    from sglang_kascade.backend import KascadeAttnBackend
    from sglang_kascade.profile import profile_from_dict

    m = scn.model
    profile = profile_from_dict(scn.profile_dict)
    r2t = tb.FakeReqToTokenPool(8, tb.MAX_CTX)
    r2t.req_to_token[0] = scn.slots["A"].to(torch.int32)
    kv = tb.FakeKVPool(tb.NUM_LAYERS, scn.num_slots, m.hkv, m.d, m.dtype)
    dense = tb.FakeDenseBackend(r2t, kv)
    be = KascadeAttnBackend(dense, r2t, kv, profile, profile.budget, torch.device("cpu"),
                            options=options)
    return be, dense


def _prefill(be, tb, scn, n):
    m = scn.model
    fb = tb.FakeForwardBatch(tb.FakeForwardMode(False), torch.tensor([0]), torch.tensor([n]),
                             torch.tensor([n]), [0], [n], scn.slots["A"][:n])
    be.init_forward_metadata(fb)
    for lid in range(tb.NUM_LAYERS):
        layer = tb.FakeLayer(lid, m.hq, m.hkv, m.hkv, m.d, m.d, m.scale)
        q = torch.randn(n, m.hq * m.d).to(m.dtype)
        k = torch.randn(n, m.hkv, m.d).to(m.dtype)
        be.forward(q, k, k, layer, fb)


def test_dense_prefill_below_sends_short_prefills_dense_and_long_ones_sparse(monkeypatch):
    import test_backend_vs_reference as tb

    monkeypatch.delenv("SGLANG_KASCADE_DENSE_PREFILL", raising=False)
    scn = tb.build(tb.CASES[0])
    be, dense = _cpu_backend(tb, scn, KascadeOptions(dense_prefill_below=80))
    assert be.dense_prefill_below == 80
    _prefill(be, tb, scn, 79)  # shorter than 80: every layer dense
    assert [c[0] for c in dense.calls] == list(range(tb.NUM_LAYERS))
    assert be.stats.dense_fallback_forwards == 1
    dense.calls.clear()
    _prefill(be, tb, scn, 80)  # 80: the profile's roles (sparse layers skip the dense backend)
    assert len(dense.calls) < tb.NUM_LAYERS and be.plan is not None
