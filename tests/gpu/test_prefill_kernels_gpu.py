"""Triton prefill attention over a selection (kernels/prefill_attention_triton.py) against the
float64 oracle (tests/helpers/reference.py::sparse_attention), on fresh random inputs: ragged extend
batches with cached prefixes (aligned to the tile or not), shuffled paged pools, bf16/fp16, head
dim 64/128, group sizes 1..8, random selections and head maps, dense tiles.

Marker ``gpu``; runs under TRITON_INTERPRET=1 without a GPU (fp16 only: the interpreter mis-reads
bf16). Output poisoned with NaN first. Bound: ||out - oracle|| / ||oracle|| < 1e-2 (bf16),
< 2e-3 (fp16).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import reference as ref
from decode_checks import request_kv
from decode_inputs import make_decode_batch, rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRET), reason="needs a CUDA GPU (or TRITON_INTERPRET=1)")]

REL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]

# (prefix_lens, extend_lens, tile, hkv, g, d, page)
CASES = [
    ([0, 45, 64], [100, 70, 1], 32, 2, 4, 128, 16),
    ([0], [300], 32, 1, 8, 64, 1),
    ([31, 0, 200], [33, 17, 129], 16, 4, 1, 128, 64),
    ([100], [50], 32, 2, 3, 64, 32),
]
if INTERPRET:
    CASES = [([0, 45], [70, 20], 32, 2, 2, 64, 16)]


@pytest.mark.parametrize("query_tail", [0, 7], ids=["tiles", "query-tail"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"p{c[0]}-n{c[1]}-T{c[2]}-h{c[3]}g{c[4]}")
def test_prefill_sparse_attention_matches_oracle(case, dtype, query_tail):
    """``query_tail``: each request's last positions are tiles of one query (start = its
    position), planned by plan_prefill_tiles as BudgetConfig.query_tail asks."""
    from sglang_kascade.kernels.prefill_attention_triton import prefill_sparse_attention
    from sglang_kascade.kernels.prefill_plan import plan_prefill_tiles

    prefix, ext, tile, hkv, g, d, page = case
    seq = [p + n for p, n in zip(prefix, ext)]
    batch = make_decode_batch(seq, [1] * len(seq), hkv, g, d, dtype, page, DEVICE, seed=sum(seq))
    gen = torch.Generator().manual_seed(len(seq) * 31 + tile)
    n_all = sum(ext)
    q = (torch.randn(n_all, hkv * g, d, generator=gen) * 1.5).to(dtype).to(DEVICE)
    tiles = plan_prefill_tiles(prefix, ext, tile, DEVICE, query_tail)
    starts = tiles.tile_start.cpu().tolist()
    reqs = tiles.tile_req.cpu().tolist()
    kmax = max(1, max(starts))
    sel_slot = torch.full((tiles.num_tiles, hkv, kmax), -1, dtype=torch.int32)
    sel_len = torch.zeros(tiles.num_tiles, dtype=torch.int32)
    masks = []  # oracle selection [Hkv, nt, S] per tile, filled below
    r2t = batch.req_to_token.cpu()
    for t, (s, b) in enumerate(zip(starts, reqs)):
        k_t = s if s <= 24 else math.ceil(0.25 * s)  # small starts: dense tiles
        sel_len[t] = k_t
        row = int(batch.req_idx[b])
        m = torch.zeros(hkv, seq[b], dtype=torch.bool)
        for h in range(hkv):
            pos = torch.randperm(s, generator=gen)[:k_t]
            sel_slot[t, h, :k_t] = r2t[row, pos]
            m[h, pos] = True
        masks.append(m)
    head_map = torch.randint(0, hkv, (hkv,), generator=gen).to(torch.int32)
    out = torch.full_like(q, float("nan"))
    prefill_sparse_attention(q, batch.k_pool, batch.v_pool, batch.req_to_token, batch.req_idx,
                             tiles, tile, sel_slot.to(DEVICE), sel_len.to(DEVICE),
                             head_map.to(DEVICE), d ** -0.5, out)
    assert not out.isnan().any()
    row0 = 0
    for b in range(len(seq)):
        k, v = request_kv(batch, b)
        ot = ref.oracle_extend_tiles(prefix[b], ext[b], tile, lambda s: s, query_tail)
        first, last = tiles.req_first_tile[b], tiles.req_first_tile[b + 1]
        assert len(ot.starts) == last - first and ot.starts == starts[first:last]
        sel = torch.stack(masks[first:last], dim=1)  # [Hkv, nt_b, S]
        want = ref.sparse_attention(q[row0:row0 + ext[b]].cpu(), k, v, ot, sel, d ** -0.5,
                                    head_map=head_map.tolist())
        assert rel_err(out[row0:row0 + ext[b]].cpu(), want) < REL[dtype], f"request {b}"
        row0 += ext[b]

