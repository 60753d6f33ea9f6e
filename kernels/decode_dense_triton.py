"""Layer 0 of the decode step in Triton: dense attention AND the selection for layer 1, one pass.

Layer 0 is dense (the method) and also selects Top-k for the next layer. Run separately that
reads K twice (dense attention, then scoring); here the scoring kernel also accumulates each
chunk's attention over V (``WITH_V``), so K and V are read once: the chunk partials are the
split-K partials of dense flash-decoding, merged by the same reduce as the sparse attention.
Reference: ``decode_torch`` (dense = sparse attention with every key selected) and the oracle.
"""

from __future__ import annotations

import torch

from .decode_attention_triton import combine_splits
from .decode_plan import DecodeBuffers
from .decode_select_triton import select_stages


def decode_dense_select(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [slots, Hkv, D]
    v_pool: torch.Tensor,  # [slots, Hkv, Dv]
    req_to_token: torch.Tensor,  # [R, C] int32
    req_idx: torch.Tensor,  # [B] int
    seq_lens: torch.Tensor,  # [B] int32
    tok_off: torch.Tensor,  # [B] int64 row starts (decode_plan.row_offsets)
    topk: torch.Tensor,  # [B] int32
    scale: float,
    buf: DecodeBuffers,
    out: torch.Tensor,  # [B, Hq, Dv], written: dense attention
    lscan: int | None = None,
    launch: dict | None = None,
) -> torch.Tensor:
    """Dense decode attention into ``out`` and the selection into buf (as decode_select)."""
    stages = select_stages(q, k_pool, req_to_token, req_idx, seq_lens, tok_off, topk, scale, buf,
                           lscan, v_pool=v_pool, launch=launch)
    stages["score"]()
    st = buf.step(q.shape[0])
    _, n_chunks = buf.scan(q.shape[0], lscan)  # the chunks the score stage wrote
    combine_splits(st.dense_o, st.dense_lse, n_chunks, out)
    stages["pool"]()
    stages["topk"]()
    return out
