"""Triton prefill anchor selection (kernels/prefill_select_triton.py) against the float64 oracle
(tests/helpers/reference.py::select, pooled post-softmax probabilities over each query's causal row)
on fresh random inputs: ragged extend batches with cached prefixes (aligned to the tile or not),
shuffled paged pools (page 1/16/64), bf16/fp16, head dim 64/128, group sizes 1..8, dense and
sparse tiles, and tile blocks smaller than the batch (the pooled-score buffer is reused).

Marker ``gpu``; runs under TRITON_INTERPRET=1 without a GPU (fp16 only). ``sel_slot`` is poisoned
(-7) first. Checks per (request, tile, KV head): exactly tile_k distinct candidate keys, a valid
Top-k of the float64 pooled scores up to 1e-4 of the row's largest score (float near-ties), as
the decode selection tests; and the log-sum-exp stage against float64.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import reference as ref
from decode_checks import request_kv
from decode_inputs import make_decode_batch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRET), reason="needs a CUDA GPU (or TRITON_INTERPRET=1)")]

DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
TIE_REL = 1e-4

# (prefix_lens, extend_lens, tile, hkv, g, d, page, block_bytes)
CASES = [
    ([0, 45, 64], [300, 70, 1], 32, 2, 4, 128, 16, 256 << 20),
    ([0], [700], 32, 1, 8, 64, 1, 4 * 700 * 3),  # blocks of 3 tiles
    ([31, 0, 200], [33, 17, 129], 16, 4, 1, 128, 64, 256 << 20),
    ([100, 1500], [50, 80], 32, 2, 3, 64, 16, 4 * 2 * 1600 * 2),  # blocks of 2 tiles
]
if INTERPRET:
    CASES = [([0, 45], [150, 40], 32, 2, 4, 64, 16, 4 * 2 * 200 * 2)]  # 128 rows: tuned launch


def budget(start: int) -> int:
    return min(start, max(8, math.ceil(0.2 * start)))  # small starts: dense tiles


@pytest.mark.parametrize("query_tail", [0, 6], ids=["tiles", "query-tail"])
@pytest.mark.parametrize("keys_major", [False, True], ids=["queries-major", "keys-major"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"p{c[0]}-n{c[1]}-T{c[2]}-h{c[3]}g{c[4]}")
def test_prefill_select_is_valid_topk(case, dtype, keys_major, query_tail):
    """Both layouts of the pooled pass (the logits tile or its transpose); ``query_tail``:
    each request's last positions selecting one query per tile (BudgetConfig.query_tail)."""
    from sglang_kascade.kernels.prefill_plan import plan_prefill_tiles
    from sglang_kascade.kernels.prefill_select_triton import prefill_lse, prefill_select

    prefix, ext, tile, hkv, g, d, page, block_bytes = case
    seq = [p + n for p, n in zip(prefix, ext)]
    batch = make_decode_batch(seq, [1] * len(seq), hkv, g, d, dtype, page, DEVICE, seed=sum(seq))
    gen = torch.Generator().manual_seed(len(seq) * 17 + tile)
    q = (torch.randn(sum(ext), hkv * g, d, generator=gen) * 2.0).to(dtype).to(DEVICE)
    scale = d ** -0.5
    tiles = plan_prefill_tiles(prefix, ext, tile, DEVICE, query_tail)
    starts = tiles.tile_start.cpu().tolist()
    ks = [budget(s) for s in starts]
    tile_k = torch.tensor(ks, dtype=torch.int32, device=DEVICE)
    tile_row = batch.req_idx.long()[tiles.tile_req.long()]
    kmax = max(1, max(ks))
    sel_slot = torch.full((tiles.num_tiles, hkv, kmax), -7, dtype=torch.int32, device=DEVICE)
    prefill_select(q, batch.k_pool, batch.req_to_token, batch.req_idx, tiles, tile, tile_k,
                   tile_row, max(starts), scale, sel_slot, block_bytes=block_bytes,
                   launch=dict(pool=dict(KEYS_MAJOR=keys_major)))
    lse = prefill_lse(q, batch.k_pool, batch.req_to_token, batch.req_idx, tiles, tile, scale,
                      torch.full((q.shape[0], q.shape[1]), float("nan"), device=DEVICE))

    sel_slot, lse = sel_slot.cpu(), lse.cpu()
    r2t = batch.req_to_token.cpu()
    row0 = 0
    for b in range(len(seq)):
        k, _ = request_kv(batch, b)
        ot = ref.oracle_extend_tiles(prefix[b], ext[b], tile, budget, query_tail)
        first, last = tiles.req_first_tile[b], tiles.req_first_tile[b + 1]
        assert ot.starts == starts[first:last]
        qb = q[row0:row0 + ext[b]].cpu()
        # log-sum-exp (log2 units) of each query's causal row
        logits = ref.logits64(qb, k, scale)  # [Hq, n, S]
        mask = ref.causal_mask(ot.q_pos, k.shape[0])[None]
        want_lse = logits.masked_fill(~mask, float("-inf")).logsumexp(-1).T / math.log(2)
        assert torch.allclose(lse[row0:row0 + ext[b]].double(), want_lse, atol=2e-2, rtol=1e-3)
        # selections: slots back to positions through the request's row
        slot_to_pos = {int(s): j for j, s in enumerate(r2t[int(batch.req_idx[b]), :seq[b]])}
        _, scores = ref.select(qb, k, ot, scale)
        chosen = torch.zeros(hkv, last - first, seq[b], dtype=torch.bool)
        for i, t in enumerate(range(first, last)):
            for h in range(hkv):
                picked = [slot_to_pos[int(s)] for s in sel_slot[t, h, :ks[t]]]
                assert len(set(picked)) == ks[t], f"request {b} tile {t} head {h}: duplicates"
                chosen[h, i, picked] = True
        bad = ref.topk_violations(chosen, scores, ot, rel=TIE_REL)
        assert not bad, f"request {b}: {bad[:3]}"
        row0 += ext[b]
