"""Host-side pieces of the device path that need no GPU: when it applies, the prefill plan (tiles,
budgets), the graph plan (static tensors, row offsets, budgets, capacity clamp, which batches
fit), the default-on switch for decode CUDA graphs, and which prefills run dense (SGLANG_KASCADE_DENSE_PREFILL, --kascade-dense-prefill-
below)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
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
    assert not cuda.applies(False, PolicyConfig(), BudgetConfig(dense_tail=32))  # PyTorch path
    assert cuda.applies(True, PolicyConfig(), BudgetConfig(dense_tail=32))  # decode: no tail
    assert cuda.applies(False, PolicyConfig(), BudgetConfig(query_tail=32))
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


def test_plan_prefill_with_a_query_tail_matches_the_pytorch_plan():
    """The device plan tiles and budgets each request as the PyTorch path's plan does
    (plan.request_tiles), its last query_tail positions one query per tile."""
    from sglang_kascade.plan import request_tiles

    dp = DevicePath("cpu")
    budget = BudgetConfig(topk_fraction=0.25, k_min=40, tile_size=32, query_tail=5)
    prefix, ext = [0, 300, 7], [100, 20, 3]
    fwd = dp.plan_prefill([5, 2, 1], prefix, ext, budget)
    row0 = 0
    for b, (p, n) in enumerate(zip(prefix, ext)):
        one = request_tiles(budget, p, n, budget.k_for, "cpu")
        sl = slice(fwd.tiles.req_first_tile[b], fwd.tiles.req_first_tile[b + 1])
        assert fwd.tiles.tile_start[sl].tolist() == one.tile_start.tolist()
        assert fwd.tile_k[sl].tolist() == one.tile_k.tolist()
        assert (fwd.tiles.tile_q_lo[sl] - row0).tolist() == list(one.tile_q_lo)
        row0 += n
    assert fwd.tiles.tile_start.tolist()[3:9] == [95, 96, 97, 98, 99, 288]  # 95..99 alone
    assert fwd.tiles.tile_q_len.tolist()[:4] == [32, 32, 31, 1]


def test_plan_graph_fills_static_rows_and_clamps_to_capacity():
    """plan_graph gives views of the static tensors; fill_graph_rows (the in-graph plan: here
    its torch reference, decode_plan.graph_rows_torch) writes them from SGLang's static rows."""
    dp = DevicePath("cpu")
    budget = BudgetConfig(topk_fraction=0.1, k_min=16)
    dp.init_graph_state(max_bs=4, lmax=4096, tokens=6004, pad_keys=4, budget=budget)
    seq = [100, 5, 4096]
    fwd = dp.plan_graph(seq)
    g = dp.graph_state
    assert fwd.graph and not fwd.all_dense and fwd.batch == 3 and not fwd.rows_filled
    assert fwd.lmax == 4096 and fwd.kmax == g["kmax"] == 512  # k_for(4096) = 410 -> pow2 512
    assert fwd.tokens == 6004  # the captured capacity, not this step's sum
    assert fwd.req_idx.data_ptr() == g["req_idx"].data_ptr()  # views of the static tensors
    assert fwd.tok_off.data_ptr() == g["tok_off"].data_ptr()
    dp.fill_graph_rows(fwd, torch.tensor([3, 1, 2]), torch.tensor(seq))
    assert fwd.rows_filled
    assert g["req_idx"][:3].tolist() == [3, 1, 2]
    assert g["seq_lens"][:3].tolist() == seq
    assert g["tok_off"][:3].tolist() == [0, 100, 105]  # exclusive cumsum: the rows' runs
    assert g["topk"][:3].tolist() == [16, 5, 410]
    # a larger budget later (hot swap: set in place) is clamped to the captured capacity
    dp.set_budget(BudgetConfig(topk_fraction=0.5, k_min=16))
    rows, lens = torch.tensor([0]), torch.tensor([4096])
    dp.fill_graph_rows(dp.plan_graph([4096]), rows, lens)
    assert g["topk"][:1].tolist() == [512]
    # replays must hand over the row tensors the graph of that size captured
    dp.plan_graph([4000], (rows, lens))
    with pytest.raises(RuntimeError, match="other row buffers"):
        dp.plan_graph([4000], (rows, torch.tensor([4000])))


@pytest.mark.parametrize("fraction,k_min,round_to", [(0.1, 128, 1), (0.3, 16, 1), (0.07, 5, 8),
                                                     (0.25, 1, 16), (1.0, 128, 1)])
def test_graph_plan_reference_matches_the_host_budget(fraction, k_min, round_to):
    """The in-graph plan's budget (float64 on the device) equals BudgetConfig.k_for on every
    length, fractions whose products land on integers included; padded rows (length 1) get 1."""
    from sglang_kascade.kernels.decode_plan import graph_rows_torch, row_offsets

    budget = BudgetConfig(topk_fraction=fraction, k_min=k_min, round_to=round_to)
    seq = list(range(1, 3001)) + [10, 20, 30, 40, 100, 1000, 8190, 65536, 131072]
    dp = DevicePath("cpu")
    dp.set_budget(budget)
    n, kmax = len(seq), 1 << 20
    out = [torch.full((n + 3,), -7, dtype=dt) for dt in (torch.int64, torch.int32, torch.int64,
                                                          torch.int32)]
    rows = torch.randperm(n)
    graph_rows_torch(rows, torch.tensor(seq, dtype=torch.int32), *out, dp.graph_budget_f,
                     dp.graph_budget_i, kmax)
    assert out[0][:n].tolist() == rows.tolist() and out[1][:n].tolist() == seq
    assert out[2][:n].tolist() == row_offsets(seq)
    assert out[3][:n].tolist() == [max(1, budget.k_for(s)) for s in seq]
    assert all(int(t[n]) == -7 for t in out)  # rows past the batch untouched


def test_graph_fits_only_batches_within_the_captured_tokens():
    """Summed lengths beyond the pool (radix-shared prefixes) or a row beyond lmax: eager."""
    dp = DevicePath("cpu")
    budget = BudgetConfig(topk_fraction=0.1, k_min=16)
    assert dp.graph_fits(10**9, 10**9)  # no graphs planned: nothing to check
    dp.init_graph_state(max_bs=4, lmax=4096, tokens=6004, pad_keys=4, budget=budget)
    assert dp.graph_fits(6000, 4096)
    assert not dp.graph_fits(6001, 4096)  # the pad rows' keys would not fit
    assert not dp.graph_fits(5000, 4097)
    seq = [4096, 4096]  # 8192 > 6004: plan_graph refuses rather than overrun the buffers
    try:
        dp.plan_graph(seq)
    except RuntimeError as e:
        assert "exceeds the CUDA-graph buffers" in str(e)
    else:
        raise AssertionError("an overflowing batch was planned")


def test_row_offsets_and_gather_rows():
    from sglang_kascade.kernels.decode_plan import gather_rows, row_offsets

    assert row_offsets([3, 1, 2]) == [0, 3, 4]
    t = torch.arange(2 * 6).view(2, 6)  # [Hkv=2, tokens=6]
    rows = gather_rows(t, torch.tensor([0, 3, 4]), 2)
    assert rows.shape == (3, 2, 2)
    assert rows[1].tolist() == [[3, 4], [9, 10]] and rows[2].tolist() == [[4, 5], [10, 11]]


def test_decode_graphs_default_on_for_cuda_only(monkeypatch):
    args = SimpleNamespace(device="cuda")
    monkeypatch.delenv("SGLANG_KASCADE_CUDA_GRAPH", raising=False)
    assert decode_graphs_wanted(args)
    assert not decode_graphs_wanted(SimpleNamespace(device="cpu"))
    assert not decode_graphs_wanted(SimpleNamespace(device="cuda", disable_cuda_graph=True))
    monkeypatch.setenv("SGLANG_KASCADE_CUDA_GRAPH", "1")
    assert decode_graphs_wanted(args)
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


def _cpu_backend(tb, scn, options=KascadeOptions(dense_prefill_below=0)):
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


def test_graphs_for_a_policy_the_triton_path_does_not_serve_are_captured_dense_and_unused(
        caplog):
    """Decode graphs are on by default on CUDA; where the device path does not apply (here: the
    CPU device; on a GPU: quest, streaming, kascade_pooled or page granularity) the backend
    captures every layer dense and tells SGLang never to replay them, with a warning."""
    import test_backend_vs_reference as tb

    class GraphDense(tb.FakeDenseBackend):
        def init_cuda_graph_state(self, max_bs, max_num_tokens):
            self.graph_state = (max_bs, max_num_tokens)

        def init_forward_metadata_out_graph(self, fb, in_capture=False):
            pass

    scn = tb.build(tb.CASES[0])
    be, _ = _cpu_backend(tb, scn)
    be.dense = GraphDense(be.req_to_token_pool, be.token_to_kv_pool)
    with caplog.at_level("WARNING", logger="sglang_kascade"):
        be.init_cuda_graph_state(4, 4)
    assert be.graphs_unused and be.device_path.graph_state is None
    assert "decode CUDA graphs unused" in caplog.text
    fb = tb.FakeForwardBatch(tb.FakeForwardMode(True), torch.tensor([0]), torch.tensor([90]),
                             torch.tensor([90]), None, None, scn.slots["A"][89:90])
    assert not be.can_run_graph(fb)
    be.init_forward_metadata_out_graph(fb, in_capture=True)
    assert be.dense_forward and be.device_fwd is None  # every layer to the dense backend


def test_graph_runner_hook_asks_the_kascade_backend():
    """sglang_adapter's AROUND hook on DecodeCudaGraphRunner.can_run_graph: SGLang's answer,
    narrowed by the kascade backend's (a batch beyond the captured buffers runs eagerly)."""
    from sglang_kascade.sglang_adapter import _around_decode_graph_can_run

    class Kascade:
        kascade_backend = True

        def __init__(self, fits):
            self.fits, self.asked = fits, 0

        def can_run_graph(self, fb):
            self.asked += 1
            return self.fits

    def runner(backend):
        return SimpleNamespace(attn_backend=backend)

    yes, no = (lambda r, fb: True), (lambda r, fb: False)
    fits, full = Kascade(True), Kascade(False)
    assert _around_decode_graph_can_run(yes, runner(fits), "fb") is True
    assert _around_decode_graph_can_run(yes, runner(full), "fb") is False
    assert _around_decode_graph_can_run(no, runner(fits), "fb") is False
    assert fits.asked == 1  # not asked when SGLang already said no
    other = SimpleNamespace(can_run_graph=lambda fb: False)  # not kascade: SGLang decides
    assert _around_decode_graph_can_run(yes, runner(other), "fb") is True
    via_model_runner = SimpleNamespace(model_runner=SimpleNamespace(attn_backend=full))
    assert _around_decode_graph_can_run(yes, via_model_runner, "fb") is False


def test_step_layouts_fit_the_flat_scratch_and_follow_the_batch_size():
    """Each batch size gets its own score chunk and split count (a graph captured for 1 row
    splits its attention wide; one for 256 rows does not), as views of one flat storage."""
    from sglang_kascade.kernels.decode_plan import DecodeBuffers

    buf = DecodeBuffers(batch=64, q_heads=32, kv_heads=8, head_dim=128, lmax=131072,
                        kmax=16384, device=torch.device("cpu"), tokens=4096)
    one, many = buf.step(1), buf.step(64)
    assert one.splits == 33 and many.splits == 1  # about two waves of programs (132 SMs)
    assert (one.chunk, many.chunk) == (1024, 2048)  # about four waves of scoring programs
    for n in (1, 2, 3, 17, 64):
        lay = buf.step(n)
        assert lay.attn_o.shape == (n, 32, lay.splits, 128)
        assert lay.dense_o.shape == (n, 32, lay.chunks, 128)
        assert lay.part_m.shape == (n, 8, 4, lay.chunks)
        for t in (lay.attn_o, lay.dense_o, lay.part_m, lay.part_l, lay.attn_lse, lay.dense_lse):
            base = t.untyped_storage().data_ptr()
            assert base in {x.untyped_storage().data_ptr() for x in buf.scratch.values()}
    assert buf.step(5) is buf.step(5)  # cached: graphs keep the same addresses
    assert buf.scan(1, None) == (131072, 128)  # the capacity, 1024-key chunks
    assert buf.scan(1, 5000) == (16384, 16)  # never below kmax (Top-k scans that many)
    assert buf.scan(64, 40000) == (40000, 20)  # 2048-key chunks, rounded up
    try:
        buf.step(65)
    except ValueError as e:
        assert "1..64" in str(e)
    else:
        raise AssertionError("a step beyond the capacity")


def test_topk_chunk_rule_gives_about_four_waves():
    """The decode Top-k's positions per program: 4096 where the rows already give many
    programs (batch 16 at 128K: the measured best there), smaller chunks for few rows."""
    pytest.importorskip("triton")
    from sglang_kascade.kernels import topk_triton as tt

    assert tt.topk_chunk(16 * 8, 131072) == 4096
    assert tt.topk_chunk(1 * 8, 131072) == 1024  # 2048 would give 512 programs, < 4 x 132
    assert tt.topk_chunk(2 * 8, 131072) == 2048
    assert tt.topk_chunk(8, 20000) == 1024  # too few either way: the smallest
    assert tt.topk_chunk(2 * 8, 131072, num_sms=114) == 4096  # an H100 PCIe: fewer waves wanted
