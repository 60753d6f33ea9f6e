"""TileLang decode reuse kernel (kernels/decode_attention_tilelang.py) against the float64 oracle,
on the CASES of test_decode_kernels_gpu.py with its bounds (REL): ragged rows with gaps, paged
and shuffled pools (page 1/16/32/64), bf16/fp16, head dim 64/128, group sizes 1..8 (G = 1 and
G = 3 are padded to 16 GEMM rows like the others), identity and random head maps. No case shape
is skipped.

The selection is the PyTorch reference's (decode_torch.decode_select_torch), shuffled within each
row (gather order must not matter) and written into the token-indexed buffer at tok_off; entries
outside the runs hold -7, outputs and split partials are NaN before each run. Each case runs at
two buffer capacities: kmax = max(topk), one split (as in the Triton test), and kmax = lmax, 2 to
11 splits in the four longer cases (43 empty (request, split) pairs among them, and a split of one
key): the split ranges, empty splits (o = 0, lse = -inf) and the merge.

Marker ``gpu``; skipped unless CUDA is available and ``import tilelang`` succeeds. The first run
compiles one kernel per (Hkv, G, D, dtype): ten, ~12 s each (TileLang caches them on disk).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from decode_checks import oracle_sparse_out
from decode_inputs import make_decode_batch, rel_err
from test_decode_kernels_gpu import CASES, REL


def _tilelang_ok() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import tilelang  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install skips like a missing one
        return False
    return True


DEVICE = "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _tilelang_ok(),
                                                  reason="needs a CUDA GPU and tilelang")]
DTYPES = [torch.bfloat16, torch.float16]
NAN = float("nan")


def _selection(batch, kmax):
    """Reference Top-k of each (request, KV head): pos [B, Hkv, kmax] int64 and valid."""
    from sglang_kascade.kernels.decode_torch import decode_select_torch

    scale = batch.q.shape[-1] ** -0.5
    return decode_select_torch(batch.q, batch.k_pool, batch.req_to_token, batch.req_idx,
                               batch.seq_lens, batch.topk, scale, kmax)


def _write_selection(sel_slot, batch, pos, seed):
    """Slots of the selected positions into the token-indexed rows (request b's run at
    tok_off[b]), each row's first topk[b] entries shuffled; everything else -7."""
    gen = torch.Generator().manual_seed(seed)
    hkv = pos.shape[1]
    rows = batch.req_to_token[batch.req_idx.long()]  # [B, C]
    slots = torch.gather(rows[:, None].expand(-1, hkv, -1), 2, pos)  # [B, Hkv, kmax]
    sel_slot.fill_(-7)
    for b, (off, k) in enumerate(zip(batch.tok_off.tolist(), batch.topk.tolist(), strict=True)):
        perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(hkv)])  # [Hkv, k]
        sel_slot[:, off:off + k] = torch.gather(slots[b, :, :k], 1, perm.to(sel_slot.device))


def _attend(batch, buf, head_map, scale):
    from sglang_kascade.kernels.decode_attention_tilelang import decode_sparse_attention_tilelang

    out = torch.full_like(batch.q, NAN)
    buf.scratch["attn_o"].fill_(NAN)
    buf.scratch["attn_lse"].fill_(NAN)
    decode_sparse_attention_tilelang(batch.q, batch.k_pool, batch.v_pool, buf.sel_slot,
                                     batch.tok_off, batch.topk, head_map, scale, buf, out)
    return out


def _empty_splits(topk, splits, block_n):
    """[B, splits] bool: splits that own no entry of the row (Triton's split ranges)."""
    out = torch.zeros(len(topk), splits, dtype=torch.bool)
    for b, k in enumerate(topk):
        per = math.ceil(math.ceil(k / splits) / block_n) * block_n
        out[b] = torch.arange(splits) * per >= k
    return out


@pytest.mark.parametrize("capacity", ["topk", "lmax"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}-h{c[2]}g{c[3]}d{c[4]}p{c[5]}")
def test_reuse_attention_matches_oracle(case, dtype, capacity):
    from sglang_kascade.kernels.decode_plan import ATTN_BLOCK_N, DecodeBuffers

    seq_lens, topk, hkv, g, d, page = case
    seed = zlib.crc32(f"{case}{dtype}".encode()) % 1000
    batch = make_decode_batch(seq_lens, topk, hkv, g, d, dtype, page, DEVICE, seed)
    scale = d ** -0.5
    lmax = max(seq_lens)
    buf = DecodeBuffers(batch=len(seq_lens) + 1, q_heads=hkv * g, kv_heads=hkv, head_dim=d,
                        lmax=lmax, kmax=max(topk) if capacity == "topk" else lmax,
                        device=torch.device(DEVICE), tokens=batch.tokens + 5)
    pos, valid = _selection(batch, max(topk))
    _write_selection(buf.sel_slot, batch, pos, seed)
    st = buf.step(len(seq_lens))
    empty = _empty_splits(topk, st.splits, ATTN_BLOCK_N)
    if capacity == "lmax" and lmax >= 2 * 4 * ATTN_BLOCK_N:
        assert st.splits > 1  # the case exercises what it claims to
    gen = torch.Generator().manual_seed(3)
    head_map = torch.randint(0, hkv, (hkv,), generator=gen).to(torch.int32).to(DEVICE)
    ident = torch.arange(hkv, dtype=torch.int32, device=DEVICE)
    for hm in (ident, head_map):
        out = _attend(batch, buf, hm, scale)
        assert not out.isnan().any()
        err = rel_err(out.cpu(), oracle_sparse_out(batch, pos, valid, scale, hm))
        assert err < REL[dtype], f"head_map={hm.tolist()} splits={st.splits}: {err:.2e}"
        # Every (request, head, split) partial is written; empty splits hold o = 0, lse = -inf.
        lse, o = st.attn_lse.cpu(), st.attn_o.cpu()  # [B, Hq, S], [B, Hq, S, D]
        assert not lse.isnan().any() and not o.isnan().any()
        gone = empty[:, None, :].expand_as(lse)
        assert bool((lse[gone] == -math.inf).all()) and bool(lse[~gone].isfinite().all())
        assert bool((o[gone] == 0).all())


def test_replays_under_a_cuda_graph_with_new_lengths():
    """Capture once; change q, tok_off, topk, head_map and the selection in place (static
    buffers, as a serving step would) and replay: outputs follow the new inputs, so nothing
    was read on the host at capture time."""
    from sglang_kascade.kernels.decode_attention_tilelang import decode_sparse_attention_tilelang
    from sglang_kascade.kernels.decode_plan import DecodeBuffers
    from sglang_kascade.kernels.decode_torch import decode_sparse_attention_torch

    hkv, g, d, dtype = 2, 4, 128, torch.bfloat16
    runs = [(make_decode_batch([900, 300], [90, 30], hkv, g, d, dtype, 16, DEVICE, 1), [1, 0]),
            (make_decode_batch([1200, 64], [120, 64], hkv, g, d, dtype, 16, DEVICE, 2), [0, 0])]
    slots = max(batch.k_pool.shape[0] for batch, _ in runs)
    k_pool = torch.zeros(slots, hkv, d, dtype=dtype, device=DEVICE)
    v_pool = torch.zeros_like(k_pool)
    first = runs[0][0]
    q, tok_off, topk = first.q.clone(), first.tok_off.clone(), first.topk.clone()
    head_map = torch.zeros(hkv, dtype=torch.int32, device=DEVICE)
    scale = d ** -0.5
    buf = DecodeBuffers(batch=2, q_heads=hkv * g, kv_heads=hkv, head_dim=d, lmax=1300,
                        kmax=1300, device=torch.device(DEVICE), tokens=2 * 1300)
    out = torch.empty_like(q)

    def load(batch, hm):
        q.copy_(batch.q)
        tok_off.copy_(batch.tok_off)
        topk.copy_(batch.topk)
        head_map.copy_(torch.tensor(hm, dtype=torch.int32))
        k_pool[:batch.k_pool.shape[0]].copy_(batch.k_pool)
        v_pool[:batch.v_pool.shape[0]].copy_(batch.v_pool)
        pos, valid = _selection(batch, int(batch.topk.max()))
        _write_selection(buf.sel_slot, batch, pos, 0)
        return pos, valid

    def step():
        decode_sparse_attention_tilelang(q, k_pool, v_pool, buf.sel_slot, tok_off, topk,
                                         head_map, scale, buf, out)

    load(*runs[0])
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for batch, hm in (runs[1], runs[0]):
        pos, valid = load(batch, hm)
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        hm_t = torch.tensor(hm, device=DEVICE)
        want = decode_sparse_attention_torch(batch.q, batch.k_pool, batch.v_pool,
                                             batch.req_to_token, batch.req_idx, pos, valid,
                                             scale, hm_t)
        assert rel_err(out, want) < REL[dtype]
        assert rel_err(out.cpu(), oracle_sparse_out(batch, pos, valid, scale, hm)) < REL[dtype]
