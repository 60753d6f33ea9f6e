"""Random batched-decode inputs on a paged, token-major pool (shared by the decode kernel tests)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DecodeBatch:
    q: torch.Tensor  # [B, Hq, D]
    k_pool: torch.Tensor  # [slots, Hkv, D]
    v_pool: torch.Tensor  # [slots, Hkv, Dv]
    req_to_token: torch.Tensor  # [R, C] int32
    req_idx: torch.Tensor  # [B] int32
    seq_lens: torch.Tensor  # [B] int32
    topk: torch.Tensor  # [B] int32
    tok_off: torch.Tensor  # [B] int64 row starts in token-indexed buffers (ROW_GAP apart)
    tokens: int  # token-indexed buffer length that holds every row and gap


ROW_GAP = 3  # unused entries between the rows' runs: kernels writing past a row's end show up


def make_decode_batch(seq_lens, topk, hkv, g, d, dtype, page, device, seed, q_scale=3.0):
    """Requests of ``seq_lens`` keys scattered over shuffled pages of ``page`` slots.

    Rows of req_to_token are shuffled too (request b lives in row req_idx[b]); slots past a
    request's length hold -1 in req_to_token and garbage keys in the pool, so reading past the
    end shows up. Token-indexed rows start ROW_GAP entries after the previous row's end.
    ``q_scale`` sharpens the softmax (real attention is peaky; near-ties rarer).
    """
    gen = torch.Generator().manual_seed(seed)
    b_sz = len(seq_lens)
    pages_per = [math.ceil(n / page) for n in seq_lens]
    n_pages = sum(pages_per) + 3
    perm = torch.randperm(n_pages, generator=gen)
    cols = max(pages_per) * page + 5
    rows = b_sz + 2
    r2t = torch.full((rows, cols), -1, dtype=torch.int32)
    req_idx = torch.randperm(rows, generator=gen)[:b_sz].to(torch.int32)
    used = 0
    for b, n in enumerate(seq_lens):
        pg = perm[used:used + pages_per[b]]
        used += pages_per[b]
        slots = (pg[:, None] * page + torch.arange(page)[None, :]).flatten()[:n]
        r2t[req_idx[b], :n] = slots.to(torch.int32)
    slots_total = n_pages * page
    k_pool = torch.randn(slots_total, hkv, d, generator=gen).to(dtype)
    v_pool = torch.randn(slots_total, hkv, d, generator=gen).to(dtype)
    q = (torch.randn(b_sz, hkv * g, d, generator=gen) * q_scale).to(dtype)  # logits ~ N(0, q_scale^2)
    offs, total = [], ROW_GAP
    for n in seq_lens:
        offs.append(total)
        total += n + ROW_GAP
    return DecodeBatch(
        tok_off=torch.tensor(offs, dtype=torch.int64, device=device), tokens=total,
        q=q.to(device), k_pool=k_pool.to(device), v_pool=v_pool.to(device),
        req_to_token=r2t.to(device), req_idx=req_idx.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        topk=torch.tensor(topk, dtype=torch.int32, device=device))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN stays NaN)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())
