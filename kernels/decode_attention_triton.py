"""Decode attention over a selection in Triton: split-K gather attention, merged in the kernel.

Reference: ``decode_torch.decode_sparse_attention_torch``. One program per (split, KV head,
request) walks its share of the first ``topk[b]`` selected slots of selection row ``head_map[h]``,
gathers K/V rows straight from the token-major pool (``[slots, Hkv, D]``, 2*D contiguous bytes per
row), and keeps an online softmax for the G query heads of the KV head at once (packed as rows of
one tl.dot, padded to 16). It writes its split partial; with few splits (``MERGE_MAX_SPLITS``)
the last split of a (request, KV head) to finish (a counter per pair, ``buf.attn_ctr``, reset by
that program) merges the partials into the output, which saves the reduce's launch (7-8 us alone
in a graph); with many splits one program merging them all serially is slower than
``_combine_kernel``'s program per query head, so that runs after the kernel (also for layer 0's
dense chunks and the TileLang kernel). Measured: docs/results/kernels-h100.md.

The selection and the logits are token-indexed (decode_plan.py): request b's row of KV head h
starts at ``[h, tok_off[b]]``.

Anchor layers pass ``logits`` (the scores stage's fp32 logits, [Hkv, tokens, G], log2 units):
then the kernel reads the selected logits instead of K, so an anchor reads K once (to score) and
only the selected V. Reuse layers and dense-equivalent checks pass ``logits=None`` and read K.

Why Triton: see decode_select_triton.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_plan import ATTN_BLOCK_N, DecodeBuffers, block_g
from .decode_select_triton import LOG2E

MERGE_MAX_SPLITS = 16  # merge in the kernel up to this many splits (else _combine_kernel)


@triton.jit
def _merge_group(
    po_ptr, plse_ptr, out_ptr, b, h, n_splits,
    s_ob, s_oh, s_os, s_eb, s_eh, s_outb, s_outh,
    G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr, S_CH: tl.constexpr,
):
    """out[b, h*G:(h+1)*G] = the lse-weighted merge of the n_splits partials of KV head h's G
    query heads, S_CH splits per step as one [GP, S_CH, DV] load (partials written by other
    programs of this launch: read through L2, ``.cg``)."""
    g = tl.arange(0, GP)
    heads = h * G + g
    g_ok = g < G
    dv = tl.arange(0, DV)
    m = tl.full([GP], float("-inf"), tl.float32)
    den = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DV], tl.float32)
    for s0 in range(0, n_splits, S_CH):
        sp = s0 + tl.arange(0, S_CH)
        ok = g_ok[:, None] & (sp[None, :] < n_splits)  # [GP, S_CH]
        lse = tl.load(plse_ptr + b * s_eb + heads[:, None] * s_eh + sp[None, :], mask=ok,
                      other=float("-inf"), cache_modifier=".cg")
        o = tl.load(po_ptr + b * s_ob + heads[:, None, None] * s_oh + sp[None, :, None] * s_os
                    + dv[None, None, :], mask=ok[:, :, None], other=0.0,
                    cache_modifier=".cg")  # [GP, S_CH, DV]; empty splits hold o = 0
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded heads
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe[:, None])  # [GP, S_CH]; empty splits weigh 0
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 1)
        den = den * alpha + tl.sum(w, 1)
        m = m_new
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    tl.store(out_ptr + b * s_outb + heads[:, None] * s_outh + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


@triton.jit
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, tok_off_ptr, topk_ptr, head_map_ptr, logits_ptr,
    po_ptr, plse_ptr, out_ptr, ctr_ptr,
    sm_scale_log2,
    s_qb, s_qh, s_ks, s_kh, s_vs, s_vh, s_sh,
    s_lh, s_ln, s_lg, s_ob, s_oh, s_os, s_eb, s_eh, s_outb, s_outh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    SPLITS,  # split-K factor: a runtime value (one compiled kernel for every batch size)
    BLOCK_N: tl.constexpr, USE_LOGITS: tl.constexpr, GP: tl.constexpr, S_CH: tl.constexpr,
    MERGE: tl.constexpr,
):
    sp, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_b = tl.load(topk_ptr + b)
    hs = tl.load(head_map_ptr + h)  # selection row read by this KV head
    per = tl.cdiv(tl.cdiv(k_b, SPLITS), BLOCK_N) * BLOCK_N
    lo = sp * per
    hi = tl.minimum(lo + per, k_b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    g_ok = offs_g < G
    if not USE_LOGITS:
        q = tl.load(q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :],
                    mask=g_ok[:, None], other=0.0)  # [BLOCK_G, D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, DV], tl.float32)
    off = tl.load(tok_off_ptr + b).to(tl.int64)
    sel_base = off + hs * s_sh
    for r0 in range(lo, hi, BLOCK_N):
        r = r0 + tl.arange(0, BLOCK_N)
        ok = r < hi
        slot = tl.load(slot_ptr + sel_base + r, mask=ok, other=0).to(tl.int64)
        if USE_LOGITS:
            p_idx = tl.load(pos_ptr + sel_base + r, mask=ok, other=0)
            s = tl.load(logits_ptr + h * s_lh + offs_g[:, None] * s_lg
                        + (off + p_idx[None, :].to(tl.int64)) * s_ln,
                        mask=g_ok[:, None] & ok[None, :], other=float("-inf"))
        else:
            k = tl.load(k_ptr + slot[:, None] * s_ks + h * s_kh + offs_d[None, :],
                        mask=ok[:, None], other=0.0)  # [BLOCK_N, D]
            s = tl.dot(q, tl.trans(k)) * sm_scale_log2  # [BLOCK_G, BLOCK_N]
        s = tl.where(ok[None, :], s, float("-inf"))
        v = tl.load(v_ptr + slot[:, None] * s_vs + h * s_vh + offs_dv[None, :],
                    mask=ok[:, None], other=0.0)  # [BLOCK_N, DV]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded query rows
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # An empty split writes lse = -inf and o = 0, which the reduce ignores.
    lse = m_i + tl.log2(l_i)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    heads = h * G + offs_g
    tl.store(po_ptr + b * s_ob + heads[:, None] * s_oh + sp * s_os + offs_dv[None, :], o,
             mask=g_ok[:, None])
    tl.store(plse_ptr + b * s_eb + heads * s_eh + sp, lse, mask=g_ok)
    # The last split of (b, h) to arrive merges: the barrier orders this program's partial
    # stores before its (acq_rel, GPU-scope) arrival; the merger's acquire makes every split's
    # partial visible to it.
    if MERGE:
        tl.debug_barrier()
        ctr = ctr_ptr + b * tl.num_programs(1) + h
        if tl.atomic_add(ctr, 1, sem="acq_rel") == SPLITS - 1:
            tl.atomic_xchg(ctr, 0, sem="relaxed")  # zero for the next launch (stream-ordered)
            _merge_group(po_ptr, plse_ptr, out_ptr, b, h, SPLITS, s_ob, s_oh, s_os, s_eb, s_eh,
                         s_outb, s_outh, G=G, GP=GP, DV=DV, S_CH=S_CH)


@triton.jit
def _combine_kernel(
    po_ptr, plse_ptr, out_ptr, n_splits,
    s_ob, s_oh, s_os, s_eb, s_eh, s_outb, s_outh,
    DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    h, b = tl.program_id(0), tl.program_id(1)
    offs_dv = tl.arange(0, DV)
    m = tl.full([], float("-inf"), tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(plse_ptr + b * s_eb + h * s_eh + offs_s, mask=offs_s < n_splits,
                      other=float("-inf"))
        m = tl.maximum(m, tl.max(lse, 0))
    acc = tl.zeros([DV], tl.float32)
    den = tl.zeros([], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_splits
        lse = tl.load(plse_ptr + b * s_eb + h * s_eh + offs_s, mask=s_ok, other=float("-inf"))
        w = tl.exp2(lse - m)  # [BLOCK_S]; empty splits weigh 0
        o = tl.load(po_ptr + b * s_ob + h * s_oh + offs_s[:, None] * s_os + offs_dv[None, :],
                    mask=s_ok[:, None] & (w[:, None] > 0), other=0.0)  # [BLOCK_S, DV]
        acc += tl.sum(o * w[:, None], 0)
        den += tl.sum(w, 0)
    tl.store(out_ptr + b * s_outb + h * s_outh + offs_dv, (acc / den).to(out_ptr.dtype.element_ty))


def combine_splits(po, pe, n_splits: int, out):
    """out[b, h] = the log-sum-exp-weighted merge of n_splits partials (po [B, Hq, S, Dv] fp32
    normalised outputs, pe [B, Hq, S] log2-domain lse; -inf marks an empty split)."""
    b_sz, hq = out.shape[0], out.shape[1]
    _combine_kernel[(hq, b_sz)](
        po, pe, out, n_splits,
        po.stride(0), po.stride(1), po.stride(2), pe.stride(0), pe.stride(1),
        out.stride(0), out.stride(1),
        DV=out.shape[-1], BLOCK_S=min(32, triton.next_power_of_2(n_splits)), num_warps=4,
    )
    return out


def decode_sparse_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [slots, Hkv, D]
    v_pool: torch.Tensor,  # [slots, Hkv, Dv]
    sel_slot: torch.Tensor,  # [Hkv_anchor, tokens] int32 pool slots (buf.sel_slot)
    tok_off: torch.Tensor,  # [B] int64 row starts (decode_plan.row_offsets)
    topk: torch.Tensor,  # [B] int32 valid entries of each request's rows
    head_map: torch.Tensor,  # [Hkv] int32: KV head h reads selection row head_map[h]
    scale: float,
    buf: DecodeBuffers,
    out: torch.Tensor,  # [B, Hq, Dv], written
    sel_pos: torch.Tensor | None = None,  # [Hkv, tokens] int32, with logits
    logits: torch.Tensor | None = None,  # [Hkv, tokens, G] fp32 (anchor layers: skip K)
    launch: dict | None = None,  # tuning: BLOCK_N / num_warps / num_stages / splits (<= default)
    # / merge (in the kernel: bool)
) -> torch.Tensor:
    b_sz, hq, d = q.shape
    hkv, dv = k_pool.shape[1], v_pool.shape[-1]
    g = hq // hkv
    use_logits = logits is not None
    lg = logits if use_logits else buf.logits  # unread without USE_LOGITS
    pos = sel_pos if use_logits else sel_slot
    st = buf.step(b_sz)
    po, pe = st.attn_o, st.attn_lse
    cfg = dict(BLOCK_N=ATTN_BLOCK_N, num_warps=4, num_stages=3, splits=st.splits)
    cfg.update(launch or {})
    splits = min(cfg.pop("splits"), st.splits)  # the step's scratch holds st.splits partials
    merge = cfg.pop("merge", splits <= MERGE_MAX_SPLITS)
    gp = triton.next_power_of_2(g)
    s_ch = min(max(1, 64 // gp), triton.next_power_of_2(splits))  # merge: [gp, s_ch, dv] loads
    _sparse_decode_kernel[(splits, hkv, b_sz)](
        q, k_pool, v_pool, sel_slot, pos, tok_off, topk, head_map, lg, po, pe, out, buf.attn_ctr,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1), sel_slot.stride(0),
        lg.stride(0), lg.stride(1), lg.stride(2),
        po.stride(0), po.stride(1), po.stride(2), pe.stride(0), pe.stride(1),
        out.stride(0), out.stride(1),
        G=g, BLOCK_G=block_g(g), D=d, DV=dv, SPLITS=splits, USE_LOGITS=use_logits,
        GP=gp, S_CH=s_ch, MERGE=merge, **cfg,
    )
    if not merge:
        combine_splits(po, pe, splits, out)
    return out
