"""The batched decode reference (kernels/decode_torch.py) against the float64 oracle, on the CPU.

Paged, shuffled pools and ragged batches (tests/helpers/decode_inputs.py). The reference is what the
Triton decode kernels are tested against on a GPU (test_decode_kernels_gpu.py). Tolerances:
fp32 pooled scores rtol 1e-5; outputs rel. error 1e-5 (fp32), 1e-2 (bf16, output rounded).
"""

from __future__ import annotations

import pytest
import torch

from decode_checks import assert_valid_topk, oracle_pooled, oracle_sparse_out
from decode_inputs import make_decode_batch, rel_err
from sglang_kascade.kernels.decode_torch import (decode_pooled_scores_torch, decode_select_torch,
                                                 decode_sparse_attention_torch)

torch.set_num_threads(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g,hkv,d,page", [(4, 2, 64, 1), (1, 3, 32, 16), (8, 1, 64, 4)])
def test_decode_reference_matches_oracle(dtype, g, hkv, d, page):
    seq_lens, topk = [37, 200, 5], [8, 20, 5]
    batch = make_decode_batch(seq_lens, topk, hkv, g, d, dtype, page, "cpu", seed=g * 7 + page)
    scale = d ** -0.5
    pooled = decode_pooled_scores_torch(batch.q, batch.k_pool, batch.req_to_token,
                                        batch.req_idx, batch.seq_lens, scale, max(seq_lens))
    for b, n in enumerate(seq_lens):
        torch.testing.assert_close(pooled[b, :, :n].double(), oracle_pooled(batch, b, scale),
                                   rtol=1e-5, atol=1e-6)
        assert bool((pooled[b, :, n:] == -1).all())
    pos, valid = decode_select_torch(batch.q, batch.k_pool, batch.req_to_token, batch.req_idx,
                                     batch.seq_lens, batch.topk, scale, kmax=max(topk))
    assert_valid_topk(pos, valid, batch, scale)
    head_map = torch.randint(0, hkv, (hkv,), generator=torch.Generator().manual_seed(1))
    out = decode_sparse_attention_torch(batch.q, batch.k_pool, batch.v_pool, batch.req_to_token,
                                        batch.req_idx, pos, valid, scale, head_map)
    want = oracle_sparse_out(batch, pos, valid, scale, head_map)
    assert rel_err(out, want) < (1e-5 if dtype == torch.float32 else 1e-2)
