"""Triton decode kernels (kernels/decode_*_triton.py) against the PyTorch reference and the
float64 oracle, on fresh random inputs: ragged batches, paged and shuffled pools (page 1/16/32/64),
bf16/fp16, head dim 64/128, group sizes 1..8, head maps. The token-indexed buffers hold the rows
with gaps between them (decode_inputs.ROW_GAP): entries outside every row must stay poisoned.

Marker ``gpu``: runs on CUDA; without one it is skipped, unless TRITON_INTERPRET=1 (Triton's CPU
interpreter; small cases only). Buffers and outputs are poisoned with NaN before each run.
Bounds: pooled scores (fp32 from 16-bit inputs, fp32 accumulation) atol 1e-5 + rtol 1e-3 against
the fp32 reference; outputs ||out - oracle|| / ||oracle|| < 1e-2 (bf16; output rounding is
~4e-3) and < 2e-3 (fp16), the oracle in float64 on the same 16-bit inputs.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from decode_checks import assert_valid_topk, oracle_sparse_out
from decode_inputs import make_decode_batch, rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRET), reason="needs a CUDA GPU (or TRITON_INTERPRET=1)")]

REL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (seq_lens, topk, hkv, g, d, page): ragged, k == L (dense-equivalent), long rows crossing chunks.
CASES = [
    ([37, 300, 5], [8, 30, 5], 2, 4, 128, 1),
    ([1000, 64, 2100], [100, 64, 210], 2, 8, 64, 16),
    ([3000], [300], 4, 1, 128, 32),
    ([129, 700], [129, 70], 1, 3, 64, 64),
    ([5000, 1500, 2048, 1], [500, 150, 205, 1], 8, 4, 128, 16),
]
DTYPES = [torch.bfloat16, torch.float16]
if INTERPRET:  # the interpreter is slow and mis-reads bf16: small fp16 cases only
    CASES = CASES[:1] + [([60, 9], [12, 9], 1, 2, 64, 16)]
    DTYPES = [torch.float16]


def _run(case, dtype, seed, gate=None, kmax=None):
    from sglang_kascade.kernels.decode_attention_triton import decode_sparse_attention
    from sglang_kascade.kernels.decode_plan import DecodeBuffers
    from sglang_kascade.kernels.decode_select_triton import select_stages

    seq_lens, topk, hkv, g, d, page = case
    batch = make_decode_batch(seq_lens, topk, hkv, g, d, dtype, page, DEVICE, seed)
    scale = d ** -0.5
    buf = DecodeBuffers(batch=len(seq_lens) + 1, q_heads=hkv * g, kv_heads=hkv, head_dim=d,
                        lmax=max(seq_lens) + 3, kmax=kmax or max(topk), device=torch.device(DEVICE),
                        tokens=batch.tokens + 5)
    for t in (buf.logits, buf.pooled, *buf.scratch.values()):
        t.fill_(float("nan"))
    buf.sel_slot.fill_(-7)
    buf.sel_pos.fill_(-7)
    buf.topk_hist.fill_(-7)  # the score kernel zeroes its rows' histograms and counters
    buf.topk_ctr.fill_(-7)
    for stage in select_stages(batch.q, batch.k_pool, batch.req_to_token, batch.req_idx,
                               batch.seq_lens, batch.tok_off, batch.topk, scale, buf,
                               gate=gate).values():
        stage()
    return batch, buf, scale, decode_sparse_attention


def _rows(buf_tensor, batch, width):
    """[B, Hkv, width] runs of a token-indexed buffer (entries past a row's length: not its)."""
    from sglang_kascade.kernels.decode_plan import gather_rows

    return gather_rows(buf_tensor, batch.tok_off, width)


def _outside_rows(batch, tokens):
    """[tokens] bool: entries of no request's run (the gaps and the tail)."""
    out = torch.ones(tokens, dtype=torch.bool)
    for off, n in zip(batch.tok_off.tolist(), batch.seq_lens.tolist()):
        out[off:off + n] = False
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}-h{c[2]}g{c[3]}d{c[4]}p{c[5]}")
def test_decode_select_and_attention(case, dtype):
    from sglang_kascade.kernels.decode_torch import decode_pooled_scores_torch

    seed = zlib.crc32(f"{case}{dtype}".encode()) % 1000
    batch, buf, scale, attend = _run(case, dtype, seed)
    b_sz, hq, d = batch.q.shape
    hkv = batch.k_pool.shape[1]
    lmax = max(case[0])
    # Stage 2 against the reference: pooled probabilities within each request's run.
    want = decode_pooled_scores_torch(batch.q, batch.k_pool, batch.req_to_token, batch.req_idx,
                                      batch.seq_lens, scale, lmax)
    inside = (torch.arange(lmax, device=DEVICE)[None, None] < batch.seq_lens[:, None, None])
    inside = inside.expand(b_sz, hkv, lmax)
    got = _rows(buf.pooled, batch, lmax)
    torch.testing.assert_close(got[inside], want[inside], atol=1e-5, rtol=1e-3)
    outside = _outside_rows(batch, buf.tokens).to(DEVICE)
    for t in (buf.pooled, buf.logits):  # nothing written outside the rows' runs
        assert t[:, outside].isnan().all()
    # Stage 3: a valid Top-k under the float64 oracle, slots that match the positions.
    kmax = buf.kmax
    valid = torch.arange(kmax, device=DEVICE)[None, None] < batch.topk[:, None, None]
    valid = valid.expand(b_sz, hkv, kmax)
    pos = _rows(buf.sel_pos, batch, kmax)
    assert_valid_topk(pos, valid, batch, scale)
    rows = batch.req_to_token[batch.req_idx.long()]  # [B, C]
    want_slots = torch.gather(rows[:, None].expand(-1, hkv, -1), 2, pos.long().clamp(min=0))
    assert bool((_rows(buf.sel_slot, batch, kmax) == want_slots)[valid].all())
    assert bool((buf.sel_pos[:, outside] == -7).all())
    oracle = oracle_sparse_out(batch, pos, valid, scale)
    gen = torch.Generator().manual_seed(3)
    head_map = torch.randint(0, hkv, (hkv,), generator=gen).to(torch.int32).to(DEVICE)
    ident = torch.arange(hkv, dtype=torch.int32, device=DEVICE)
    for use_logits in (True, False):  # anchor (stored logits, V only) and reuse (K and V)
        out = torch.full_like(batch.q, float("nan"))
        buf.scratch["attn_o"].fill_(float("nan"))
        attend(batch.q, batch.k_pool, batch.v_pool, buf.sel_slot, batch.tok_off, batch.topk,
               ident, scale, buf, out, sel_pos=buf.sel_pos if use_logits else None,
               logits=buf.logits if use_logits else None)
        assert not out.isnan().any()
        assert rel_err(out.cpu(), oracle) < REL[dtype], f"use_logits={use_logits}"
    # Reuse through a head map: KV head h attends at the positions chosen for head head_map[h].
    out = torch.full_like(batch.q, float("nan"))
    attend(batch.q, batch.k_pool, batch.v_pool, buf.sel_slot, batch.tok_off, batch.topk,
           head_map, scale, buf, out)
    assert rel_err(out.cpu(), oracle_sparse_out(batch, pos, valid, scale, head_map)) < REL[dtype]
    assert not buf.attn_ctr.any()  # the merging split leaves its counter at zero for the next


@pytest.mark.parametrize("prefetch", [False, True], ids=["loop", "prefetch"])
@pytest.mark.parametrize("merge", [True, False], ids=["in-kernel", "reduce-launch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}-h{c[2]}g{c[3]}d{c[4]}p{c[5]}")
def test_split_merge_in_kernel_and_by_reduce(case, merge, prefetch):
    """Buffers sized for Top-k up to the longest context (2 to 11 splits in the longer cases,
    empty ones for the short rows): the last split's in-kernel merge and the reduce launch both
    match the oracle, with the plain loop and the register-prefetching one, for reuse layers (K
    and V) and anchors (stored logits and V); the arrival counters end at zero."""
    from sglang_kascade.kernels.decode_plan import ATTN_BLOCK_N

    dtype = DTYPES[-1]
    lmax = max(case[0])
    batch, buf, scale, attend = _run(case, dtype, 17, kmax=lmax)
    splits = buf.step(len(case[0])).splits
    if lmax >= 8 * ATTN_BLOCK_N:
        assert splits > 1  # the case exercises what it claims to
    kmax = max(case[1])
    valid = (torch.arange(kmax, device=DEVICE)[None, None] < batch.topk[:, None, None])
    valid = valid.expand(len(case[0]), batch.k_pool.shape[1], kmax)
    pos = _rows(buf.sel_pos, batch, kmax)
    hm = torch.arange(batch.k_pool.shape[1], dtype=torch.int32, device=DEVICE).flip(0)
    launch = {"merge": merge, "PREFETCH": prefetch, "PREFETCH_L": prefetch}
    out = torch.full_like(batch.q, float("nan"))
    attend(batch.q, batch.k_pool, batch.v_pool, buf.sel_slot, batch.tok_off, batch.topk, hm,
           scale, buf, out, launch=launch)
    assert not out.isnan().any()
    assert rel_err(out.cpu(), oracle_sparse_out(batch, pos, valid, scale, hm)) < REL[dtype]
    assert not buf.attn_ctr.any()
    ident = torch.arange(batch.k_pool.shape[1], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(batch.q, float("nan"))
    attend(batch.q, batch.k_pool, batch.v_pool, buf.sel_slot, batch.tok_off, batch.topk, ident,
           scale, buf, out, sel_pos=buf.sel_pos, logits=buf.logits, launch=launch)
    assert rel_err(out.cpu(), oracle_sparse_out(batch, pos, valid, scale)) < REL[dtype]
    assert not buf.attn_ctr.any()
    # A captured layer (logits_gate): closed, the K path through the head map; open, the
    # logits path, which reads no K (a pool of NaN keys leaves the output finite).
    for gate, k_pool, heads in ((0, batch.k_pool, hm),
                                (1, torch.full_like(batch.k_pool, float("nan")), ident)):
        out = torch.full_like(batch.q, float("nan"))
        attend(batch.q, k_pool, batch.v_pool, buf.sel_slot, batch.tok_off, batch.topk, heads,
               scale, buf, out, sel_pos=buf.sel_pos, logits=buf.logits, launch=launch,
               logits_gate=torch.full((1,), gate, dtype=torch.int32, device=DEVICE))
        want = oracle_sparse_out(batch, pos, valid, scale, heads)
        assert rel_err(out.cpu(), want) < REL[dtype], f"gate {gate}"
    assert not buf.attn_ctr.any()


def test_closed_gate_selects_nothing():
    """gate = 0 (a layer that does not select, in a graph captured for any profile): the
    selection kernels write nothing; the open gate selects as usual."""
    case = CASES[0]
    closed = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _, buf, _, _ = _run(case, torch.float16, 5, gate=closed)
    for t in (buf.logits, buf.pooled, buf.scratch["part_m"], buf.scratch["part_l"]):
        assert t.isnan().all()
    assert bool((buf.sel_slot == -7).all()) and bool((buf.sel_pos == -7).all())
    _, buf, _, _ = _run(case, torch.float16, 5, gate=closed + 1)
    assert not bool((buf.sel_pos == -7).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_everything_selected_is_dense_attention(dtype):
    """topk == seq_len: the sparse path must equal dense decode attention (oracle, float64)."""
    import reference as ref

    from decode_checks import request_kv

    seq_lens = [700, 33, 1500] if not INTERPRET else [70, 9]
    case = (seq_lens, seq_lens, 2, 4, 128, 16)
    batch, buf, scale, attend = _run(case, dtype, seed=11)
    out = torch.full_like(batch.q, float("nan"))
    ident = torch.arange(2, dtype=torch.int32, device=DEVICE)
    attend(batch.q, batch.k_pool, batch.v_pool, buf.sel_slot, batch.tok_off, batch.topk, ident,
           scale, buf, out, sel_pos=buf.sel_pos, logits=buf.logits)
    for b, n in enumerate(seq_lens):
        k, v = request_kv(batch, b)
        want = ref.dense_attention(batch.q[b:b + 1].cpu(), k, v, [n - 1], scale)
        assert rel_err(out[b:b + 1].cpu(), want) < REL[dtype]


@pytest.mark.parametrize("short_row", [None, 0], ids=["short-rows-whole", "all-multipass"])
@pytest.mark.parametrize("ragged", [False, True, "collect", "overflow"],
                         ids=["uniform", "token-indexed", "token-indexed-collect",
                              "token-indexed-collect-overflow"])
@pytest.mark.parametrize("n,k", [(5000, 500), (3000, 3000), (9000, 1), (20000, 2001)])
def test_radix_topk_with_ties_matches_torch_topk(n, k, ragged, short_row):
    """Scores with many exact ties (and zeros): the chosen set holds every score above the k-th
    largest and exactly enough of the ties, like torch.topk; ragged lengths; slots looked up.
    Rows uniform ([B, Hkv, L]: prefill tiles) or token-indexed ([Hkv, T] from tok_off: decode),
    the latter also in collect mode (three full passes, then the candidates per row). Rows up to
    SHORT_ROW keys are selected whole by one program (the lengths here mix both kinds in one
    launch); ``short_row=0`` sends every row through the passes. ``overflow``: collect mode with
    ``cand_max=0``, so every long row's candidates finish through the chunked passes."""
    from sglang_kascade.kernels.topk_triton import topk_select

    launch = {} if short_row is None else {"short_row": short_row}
    launch["collect"] = ragged in ("collect", "overflow")  # both paths, whatever the default
    if ragged == "overflow":
        launch["cand_max"] = 0
    if INTERPRET:
        n, k = min(n, 300), min(k, 300)
    gen = torch.Generator().manual_seed(n + k)
    lens = [n, max(1, n // 3), k]
    budgets = [k, min(k, lens[1]), k]
    hkv, lmax = 2, n + 7
    scores = torch.full((3, hkv, lmax), float("nan"))
    for b, m in enumerate(lens):
        vals = torch.randint(0, 50, (hkv, m), generator=gen).float() / 7  # ties, and 0.0
        scores[b, :, :m] = vals
    r2t = torch.randperm(3 * lmax, generator=gen).to(torch.int32).view(3, lmax)
    req_idx = torch.tensor([2, 0, 1], dtype=torch.int32)
    dev = DEVICE
    hist = torch.empty(4, 3 * hkv, 256, dtype=torch.int32, device=dev)
    ctr = torch.empty(3 * hkv, 2, dtype=torch.int32, device=dev)
    offs = [5, 5 + lens[0] + 2, 5 + lens[0] + lens[1] + 4]  # runs with gaps between them
    if ragged:
        total = offs[-1] + lens[-1] + 3
        flat = torch.full((hkv, total), float("nan"))
        for b, m in enumerate(lens):
            flat[:, offs[b]:offs[b] + m] = scores[b, :, :m]
        pos = torch.full((hkv, total), -7, dtype=torch.int32, device=dev)
        src, tok_off = flat.to(dev), torch.tensor(offs, dtype=torch.int64, device=dev)
    else:
        pos = torch.full((3, hkv, k), -7, dtype=torch.int32, device=dev)
        src, tok_off = scores.to(dev), None
    slot = torch.full_like(pos, -7)
    topk_select(src, torch.tensor(lens, dtype=torch.int32, device=dev),
                torch.tensor(budgets, dtype=torch.int32, device=dev), r2t.to(dev),
                req_idx.to(dev), hist, ctr, pos, slot, lmax, tok_off=tok_off,
                launch=launch)
    pos, slot = pos.cpu().long(), slot.cpu()
    for b, (m, kb) in enumerate(zip(lens, budgets)):
        for h in range(hkv):
            row = scores[b, h, :m]
            if ragged:
                got, got_slot = pos[h, offs[b]:offs[b] + kb], slot[h, offs[b]:offs[b] + kb]
            else:
                got, got_slot = pos[b, h, :kb], slot[b, h, :kb]
            assert got.unique().numel() == kb and int(got.min()) >= 0 and int(got.max()) < m
            kth = row.topk(kb).values[-1]
            assert bool((row[got] >= kth).all())
            assert int((row > kth).sum()) == int((row[got] > kth).sum())
            assert bool((got_slot == r2t[int(req_idx[b]), got]).all())
    if ragged:  # entries between and after the runs' selections stay untouched (collect mode:
        # the candidates use the rest of the row's own run, [k, length), as scratch)
        for h in range(hkv):
            written = torch.zeros(pos.shape[1], dtype=torch.bool)
            for b, (m, kb) in enumerate(zip(lens, budgets)):
                written[offs[b]:offs[b] + (kb if ragged is True else m)] = True
            assert bool((pos[h, ~written] == -7).all())


@pytest.mark.parametrize("collect", [True, False], ids=["collect", "five-launches"])
@pytest.mark.parametrize("n,k", [(20000, 2000), (12000, 11999), (9000, 1)])
def test_radix_topk_of_nearly_equal_scores(n, k, collect):
    """Rows whose scores all share one 16-bit prefix (nearly equal, as with random weights):
    in collect mode every key is a candidate, more than CAND_MAX, so the chunked overflow passes
    select; the set must still be exact (every score above the k-th largest, enough ties)."""
    from sglang_kascade.kernels.topk_triton import topk_select

    launch = {"collect": collect}
    if INTERPRET:  # small rows: lower the thresholds so the same path runs
        n, k = min(n, 300), min(k, 299)
        launch.update(short_row=0, cand_max=16)
    gen = torch.Generator().manual_seed(n + k)
    hkv, dev = 2, DEVICE
    # about 1/n, bit patterns on one 16-bit prefix, some exact ties
    base = (torch.tensor([1.0 / n]).view(torch.int32) & ~0x7FFF) | 0x1000
    bits = base + torch.randint(0, 400, (hkv, n), generator=gen, dtype=torch.int32)
    scores = bits.view(torch.float32)
    r2t = torch.randperm(n, generator=gen).to(torch.int32).view(1, n)
    hist = torch.empty(4, hkv, 256, dtype=torch.int32, device=dev)
    ctr = torch.empty(hkv, 2, dtype=torch.int32, device=dev)
    pos = torch.full((hkv, n), -7, dtype=torch.int32, device=dev)
    slot = torch.full_like(pos, -7)
    topk_select(scores.to(dev), torch.tensor([n], dtype=torch.int32, device=dev),
                torch.tensor([k], dtype=torch.int32, device=dev), r2t.to(dev),
                torch.zeros(1, dtype=torch.int32, device=dev), hist, ctr, pos, slot, n,
                tok_off=torch.zeros(1, dtype=torch.int64, device=dev), launch=launch)
    pos, slot = pos.cpu().long(), slot.cpu()
    for h in range(hkv):
        got, row = pos[h, :k], scores[h]
        assert got.unique().numel() == k and int(got.min()) >= 0 and int(got.max()) < n
        kth = row.topk(k).values[-1]
        assert bool((row[got] >= kth).all())
        assert int((row > kth).sum()) == int((row[got] > kth).sum())
        assert bool((slot[h, :k] == r2t[0, got]).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer0_dense_output_and_selection_in_one_pass(dtype):
    """decode_dense_select: dense attention (oracle, float64) and the same Top-k as decode_select
    (valid under the float64 pooled scores), from one pass over K and V."""
    import reference as ref

    from decode_checks import request_kv
    from sglang_kascade.kernels.decode_dense_triton import decode_dense_select

    case = ([700, 33, 2500], [70, 33, 250], 2, 4, 128, 16)
    if INTERPRET:
        case = ([300, 9], [30, 9], 1, 2, 64, 16)
    batch, buf, scale, _ = _run(case, dtype, seed=5)
    for t in (buf.scratch["dense_o"], buf.scratch["dense_lse"], buf.pooled):
        t.fill_(float("nan"))
    buf.sel_pos.fill_(-7)
    out = torch.full_like(batch.q, float("nan"))
    decode_dense_select(batch.q, batch.k_pool, batch.v_pool, batch.req_to_token, batch.req_idx,
                        batch.seq_lens, batch.tok_off, batch.topk, scale, buf, out)
    for b, n in enumerate(case[0]):
        k, v = request_kv(batch, b)
        want = ref.dense_attention(batch.q[b:b + 1].cpu(), k, v, [n - 1], scale)
        assert rel_err(out[b:b + 1].cpu(), want) < REL[dtype]
    b_sz, kmax = len(case[0]), buf.kmax
    valid = (torch.arange(kmax, device=DEVICE)[None, None] < batch.topk[:, None, None])
    assert_valid_topk(_rows(buf.sel_pos, batch, kmax), valid.expand(b_sz, case[2], kmax), batch,
                      scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_step_replays_under_a_cuda_graph_with_new_lengths():
    """Capture layer 0 + anchor + reuse once; change q, seq_lens, topk and req_to_token in place
    (static buffers, as a serving step would) and replay: outputs follow the new inputs."""
    from sglang_kascade.kernels.decode_attention_triton import decode_sparse_attention
    from sglang_kascade.kernels.decode_dense_triton import decode_dense_select
    from sglang_kascade.kernels.decode_plan import DecodeBuffers
    from sglang_kascade.kernels.decode_select_triton import decode_select
    from sglang_kascade.kernels.decode_torch import decode_sparse_attention_torch

    hkv, g, d = 2, 4, 128
    first = make_decode_batch([900, 300], [90, 30], hkv, g, d, torch.bfloat16, 16, DEVICE, 1)
    second = make_decode_batch([1200, 64], [120, 64], hkv, g, d, torch.bfloat16, 16, DEVICE, 2)
    pool_slots = max(first.k_pool.shape[0], second.k_pool.shape[0])
    static = {}
    for name in ("q", "req_idx", "seq_lens", "tok_off", "topk"):
        static[name] = getattr(first, name).clone()
    k_pool = torch.zeros(pool_slots, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    v_pool = torch.zeros_like(k_pool)
    r2t = torch.zeros(4, 1300, dtype=torch.int32, device=DEVICE)

    def load(batch):
        for name, t in static.items():
            t.copy_(getattr(batch, name))
        k_pool[:batch.k_pool.shape[0]].copy_(batch.k_pool)
        v_pool[:batch.v_pool.shape[0]].copy_(batch.v_pool)
        r2t.zero_()
        r2t[:batch.req_to_token.shape[0], :batch.req_to_token.shape[1]].copy_(
            batch.req_to_token.clamp(min=0))

    scale = d ** -0.5
    buf = DecodeBuffers(batch=2, q_heads=hkv * g, kv_heads=hkv, head_dim=d, lmax=1300,
                        kmax=128, device=torch.device(DEVICE), tokens=1300 * 2)
    head_map = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    ident = torch.arange(hkv, dtype=torch.int32, device=DEVICE)
    outs = [torch.empty_like(static["q"]) for _ in range(3)]
    a = static

    def step():
        decode_dense_select(a["q"], k_pool, v_pool, r2t, a["req_idx"], a["seq_lens"],
                            a["tok_off"], a["topk"], scale, buf, outs[0])
        decode_select(a["q"], k_pool, r2t, a["req_idx"], a["seq_lens"], a["tok_off"], a["topk"],
                      scale, buf)
        decode_sparse_attention(a["q"], k_pool, v_pool, buf.sel_slot, a["tok_off"], a["topk"],
                                ident, scale, buf, outs[1], sel_pos=buf.sel_pos,
                                logits=buf.logits)
        decode_sparse_attention(a["q"], k_pool, v_pool, buf.sel_slot, a["tok_off"], a["topk"],
                                head_map, scale, buf, outs[2])

    load(first)
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for batch in (second, first):
        load(batch)
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        b_sz, kmax = 2, buf.kmax
        valid = (torch.arange(kmax, device=DEVICE)[None, None] < batch.topk[:, None, None])
        valid = valid.expand(b_sz, hkv, kmax)
        pos = _rows(buf.sel_pos, batch, kmax)
        assert_valid_topk(pos, valid, batch, scale)
        for o, hm in ((outs[1], None), (outs[2], head_map)):
            want = decode_sparse_attention_torch(batch.q, batch.k_pool, batch.v_pool,
                                                 batch.req_to_token, batch.req_idx, pos.long(),
                                                 valid, scale, hm)
            assert rel_err(o, want) < REL[torch.bfloat16]
        import reference as ref

        from decode_checks import request_kv
        for b in range(b_sz):
            k, v = request_kv(batch, b)
            n = int(batch.seq_lens[b])
            dense = ref.dense_attention(batch.q[b:b + 1].cpu(), k, v, [n - 1], scale)
            assert rel_err(outs[0][b:b + 1].cpu(), dense) < REL[torch.bfloat16]


@pytest.mark.parametrize("row_fractions", [False, True], ids=["server-budget", "own-fractions"])
@pytest.mark.parametrize("fraction,k_min,round_to,kmax", [(0.1, 128, 1, 1024), (0.3, 7, 8, 64),
                                                          (1.0, 16, 1, 4096)])
def test_graph_plan_kernel_matches_reference(fraction, k_min, round_to, kmax, row_fractions):
    """The plan kernel captured at a decode graph's head (graph_plan_triton) against its torch
    reference on a random ragged batch: rows, lengths, exclusive cumsum, clamped budgets; the
    outputs' entries past the batch stay poisoned. ``own-fractions``: rows with their own Top-k
    fraction (a request's custom_params; 0 = the server's), bounded by their length only."""
    from sglang_kascade.config import BudgetConfig
    from sglang_kascade.device_path import DevicePath
    from sglang_kascade.kernels.decode_plan import graph_rows_torch
    from sglang_kascade.kernels.graph_plan_triton import graph_rows

    gen = torch.Generator().manual_seed(zlib.crc32(f"{fraction}{kmax}".encode()))
    bs = 37
    seq = torch.randint(1, 20000, (bs,), generator=gen, dtype=torch.int32)
    seq[:5] = torch.tensor([1, 10, 1280, 3000, 19999], dtype=torch.int32)  # padded row, exact
    rows = torch.randperm(200, generator=gen)[:bs]
    own = [0.0, 0.05, 1.0, 0.2, 0.14, 0.5, 1e-6, 0.999]  # 0: the server's fraction
    row_frac = torch.full((bs + 5,), 0.33, dtype=torch.float64)  # past the batch: not read
    row_frac[:bs] = torch.tensor([own[i % len(own)] for i in range(bs)], dtype=torch.float64)
    extra = (row_frac.to(DEVICE),) if row_fractions else ()
    dp = DevicePath(DEVICE)
    dp.set_budget(BudgetConfig(topk_fraction=fraction, k_min=k_min, round_to=round_to))
    outs = []
    for fn in (graph_rows, graph_rows_torch):
        out = [torch.full((bs + 5,), -7, dtype=dt, device=DEVICE)
               for dt in (torch.int64, torch.int32, torch.int64, torch.int32)]
        fn(rows.to(DEVICE), seq.to(DEVICE), *out, dp.graph_budget_f, dp.graph_budget_i, kmax,
           *extra)
        outs.append([t.cpu() for t in out])
    for got, want in zip(*outs):
        assert torch.equal(got, want)
    topk = outs[0][3][:bs]
    custom = row_frac[:bs] > 0 if row_fractions else torch.zeros(bs, dtype=torch.bool)
    assert (topk >= 1).all() and (topk[~custom] <= kmax).all() and (topk <= seq).all()
    if row_fractions:
        assert (topk[custom] > kmax).any()  # a row's own fraction is bounded by its length only
