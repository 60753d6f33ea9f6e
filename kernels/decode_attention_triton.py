"""Decode attention over a selection in Triton: split-K gather attention, merged in the kernel.

Reference: ``decode_torch.decode_sparse_attention_torch``. One program per (split, KV head,
request) walks its share of the first ``topk[b]`` selected slots of selection row ``head_map[h]``,
gathers K/V rows straight from the token-major pool (``[slots, Hkv, D]``, 2*D contiguous bytes per
row), and keeps an online softmax for the G query heads of the KV head at once (packed as rows of
one tl.dot, padded to 16). It writes its split partial; with few splits (``MERGE_MAX_SPLITS``)
the last split of a (request, KV head) to finish (a counter per pair, ``buf.attn_ctr``, reset by
that program) merges the partials into the output, which saves the reduce's launch (7-8 us alone
in a graph); with many splits one program merging them all serially is slower than
``_combine_kernel``'s program per query head (one round trip for up to 64 partials), so that
runs after the kernel (also for layer 0's dense chunks and the TileLang kernel). Measured:
docs/results/kernels-h100.md.

The selection and the logits are token-indexed (decode_plan.py): request b's row of KV head h
starts at ``[h, tok_off[b]]``.

Anchor layers pass ``logits`` (the scores stage's fp32 logits, [Hkv, tokens, G], log2 units):
then the kernel reads the selected logits instead of K, so an anchor reads K once (to score) and
only the selected V. Reuse layers and dense-equivalent checks pass ``logits=None`` and read K.
A captured decode graph serves every profile, so its sparse layers pass ``logits`` and the
layer's selection gate (``logits_gate``): the kernel takes the logits path where the gate is
open (the layer selected in this step) and the K path elsewhere, decided on the device.

Why Triton: see decode_select_triton.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_plan import ATTN_BLOCK_N, DecodeBuffers, block_g
from .decode_select_triton import LOG2E
from .softmax_triton import online_softmax_step

MERGE_MAX_SPLITS = 16  # merge in the kernel up to this many splits (else _combine_kernel)
# Launch defaults, measured (docs/results/kernels-h100.md, bench/tune_kernels.py prefetch): the K
# path in 64-entry tiles left to Triton's pipelining (num_stages), the logits path in 32-entry
# tiles with the register prefetch (Triton does not pipeline loads that feed no tl.dot).
LAUNCH = dict(BLOCK_N=ATTN_BLOCK_N, PREFETCH=False, BLOCK_NL=32, PREFETCH_L=True, num_warps=4,
              num_stages=3)
COMBINE_BLOCK_S = 64  # _combine_kernel: partials per step (one step for every split count
# of the sparse attention, num_splits <= 64; layer 0's score chunks may take more)


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
def _tile_index(slot_ptr, pos_ptr, sel_base, r, hi, USE_LOGITS: tl.constexpr):
    """Pool slots (and, with logits, key positions) of selection entries r (< hi)."""
    ok = r < hi
    slot = tl.load(slot_ptr + sel_base + r, mask=ok, other=0).to(tl.int64)
    if USE_LOGITS:
        p_idx = tl.load(pos_ptr + sel_base + r, mask=ok, other=0).to(tl.int64)
    else:
        p_idx = slot  # unused
    return slot, p_idx, ok


@triton.jit
def _tile_rows(k_ptr, v_ptr, logits_ptr, slot, p_idx, ok, h, off, offs_g, g_ok, offs_d, offs_dv,
               s_ks, s_kh, s_vs, s_vh, s_lh, s_ln, s_lg, USE_LOGITS: tl.constexpr):
    """Issue the loads of one tile: (the selected logits [BLOCK_G, BLOCK_N] fp32, or the
    selected K rows [BLOCK_N, D]) and the selected V rows [BLOCK_N, DV]."""
    if USE_LOGITS:
        kk = tl.load(logits_ptr + h * s_lh + offs_g[:, None] * s_lg + (off + p_idx[None, :]) * s_ln,
                     mask=g_ok[:, None] & ok[None, :], other=float("-inf"))
    else:
        kk = tl.load(k_ptr + slot[:, None] * s_ks + h * s_kh + offs_d[None, :],
                     mask=ok[:, None], other=0.0)
    v = tl.load(v_ptr + slot[:, None] * s_vs + h * s_vh + offs_dv[None, :],
                mask=ok[:, None], other=0.0)
    return kk, v


@triton.jit
def _tile_update(q, kk, v, ok, m_i, l_i, acc, sm_scale_log2, USE_LOGITS: tl.constexpr):
    """Online-softmax step of the G query heads over one tile: (m, l, acc)."""
    if USE_LOGITS:
        s = kk
    else:
        s = tl.dot(q, tl.trans(kk)) * sm_scale_log2  # [BLOCK_G, BLOCK_N]
    s = tl.where(ok[None, :], s, float("-inf"))
    return online_softmax_step(s, v, m_i, l_i, acc)


@triton.jit
def _attend(q, k_ptr, v_ptr, slot_ptr, pos_ptr, logits_ptr, sel_base, off, k_b, sp, SPLITS, h,
            offs_g, g_ok, offs_d, offs_dv, sm_scale_log2,
            s_ks, s_kh, s_vs, s_vh, s_lh, s_ln, s_lg,
            BLOCK_G: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
            USE_LOGITS: tl.constexpr, PREFETCH: tl.constexpr):
    """(m, l, acc) of split sp's share of the first k_b selected entries: the online softmax
    of the G query heads over BLOCK_N-entry tiles."""
    per = tl.cdiv(tl.cdiv(k_b, SPLITS), BLOCK_N) * BLOCK_N
    lo = sp * per
    hi = tl.minimum(lo + per, k_b)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, DV], tl.float32)
    if PREFETCH:
        # Software pipeline in registers: the loads of tile i+1 and the indices of tile i+2 are
        # in flight while tile i is computed (loads past hi are masked off: no traffic). Pays
        # where Triton's own pipelining does not reach: the logits loads feed no tl.dot.
        slot, p_idx, ok = _tile_index(slot_ptr, pos_ptr, sel_base, lo + offs_n, hi, USE_LOGITS)
        kk, v = _tile_rows(k_ptr, v_ptr, logits_ptr, slot, p_idx, ok, h, off, offs_g, g_ok,
                           offs_d, offs_dv, s_ks, s_kh, s_vs, s_vh, s_lh, s_ln, s_lg, USE_LOGITS)
        slot1, p_idx1, ok1 = _tile_index(slot_ptr, pos_ptr, sel_base, lo + BLOCK_N + offs_n, hi,
                                         USE_LOGITS)
        for r0 in range(lo, hi, BLOCK_N):
            slot2, p_idx2, ok2 = _tile_index(slot_ptr, pos_ptr, sel_base,
                                             r0 + 2 * BLOCK_N + offs_n, hi, USE_LOGITS)
            kk1, v1 = _tile_rows(k_ptr, v_ptr, logits_ptr, slot1, p_idx1, ok1, h, off, offs_g,
                                 g_ok, offs_d, offs_dv, s_ks, s_kh, s_vs, s_vh, s_lh, s_ln, s_lg,
                                 USE_LOGITS)
            m_i, l_i, acc = _tile_update(q, kk, v, ok, m_i, l_i, acc, sm_scale_log2, USE_LOGITS)
            kk, v, ok = kk1, v1, ok1
            slot1, p_idx1, ok1 = slot2, p_idx2, ok2
    else:
        for r0 in range(lo, hi, BLOCK_N):
            slot, p_idx, ok = _tile_index(slot_ptr, pos_ptr, sel_base, r0 + offs_n, hi,
                                          USE_LOGITS)
            kk, v = _tile_rows(k_ptr, v_ptr, logits_ptr, slot, p_idx, ok, h, off, offs_g, g_ok,
                               offs_d, offs_dv, s_ks, s_kh, s_vs, s_vh, s_lh, s_ln, s_lg,
                               USE_LOGITS)
            m_i, l_i, acc = _tile_update(q, kk, v, ok, m_i, l_i, acc, sm_scale_log2, USE_LOGITS)
    return m_i, l_i, acc


# Run-time values are not specialized on (value 1, divisibility by 16: a compiled variant each):
# the split count, the token-indexed rows' stride (the buffers' capacity) and the partials' lse
# strides (splits per row); the head map and the gate are scalar loads read at any offset (a
# layer's row of the profile tables). Their addresses follow run-time row starts or are scalar,
# so nothing vectorizes on them. warmup.py compiles every remaining variant at start-up.
@triton.jit(do_not_specialize=["SPLITS", "s_sh", "s_lh", "s_eb", "s_eh"],
            do_not_specialize_on_alignment=["head_map_ptr", "gate_ptr"])
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, tok_off_ptr, topk_ptr, head_map_ptr, logits_ptr,
    po_ptr, plse_ptr, out_ptr, ctr_ptr, gate_ptr,
    sm_scale_log2,
    s_qb, s_qh, s_ks, s_kh, s_vs, s_vh, s_sh,
    s_lh, s_ln, s_lg, s_ob, s_oh, s_os, s_eb, s_eh, s_outb, s_outh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    SPLITS,  # split-K factor: a runtime value (one compiled kernel for every batch size)
    LOGITS: tl.constexpr,  # 0: K and V; 1: stored logits and V; 2: 1 if gate_ptr[0] else 0
    BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,  # tiles of the K path
    BLOCK_NL: tl.constexpr, PREFETCH_L: tl.constexpr,  # tiles of the logits path
    GP: tl.constexpr, S_CH: tl.constexpr, MERGE: tl.constexpr,
):
    sp, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_b = tl.load(topk_ptr + b)
    hs = tl.load(head_map_ptr + h)  # selection row read by this KV head
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    g_ok = offs_g < G
    off = tl.load(tok_off_ptr + b).to(tl.int64)
    sel_base = off + hs * s_sh
    if LOGITS == 1:
        q = tl.zeros([BLOCK_G, D], q_ptr.dtype.element_ty)  # unused: the logits are stored
    else:
        q = tl.load(q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :],
                    mask=g_ok[:, None], other=0.0)  # [BLOCK_G, D]
    use_logits = LOGITS == 1
    if LOGITS == 2:
        use_logits = tl.load(gate_ptr) != 0  # this layer selected in this step (its logits)
    if use_logits:
        m_i, l_i, acc = _attend(q, k_ptr, v_ptr, slot_ptr, pos_ptr, logits_ptr, sel_base, off,
                                k_b, sp, SPLITS, h, offs_g, g_ok, offs_d, offs_dv,
                                sm_scale_log2, s_ks, s_kh, s_vs, s_vh, s_lh, s_ln, s_lg,
                                BLOCK_G=BLOCK_G, DV=DV, BLOCK_N=BLOCK_NL, USE_LOGITS=True,
                                PREFETCH=PREFETCH_L)
    else:
        m_i, l_i, acc = _attend(q, k_ptr, v_ptr, slot_ptr, pos_ptr, logits_ptr, sel_base, off,
                                k_b, sp, SPLITS, h, offs_g, g_ok, offs_d, offs_dv,
                                sm_scale_log2, s_ks, s_kh, s_vs, s_vh, s_lh, s_ln, s_lg,
                                BLOCK_G=BLOCK_G, DV=DV, BLOCK_N=BLOCK_N, USE_LOGITS=False,
                                PREFETCH=PREFETCH)
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


@triton.jit(do_not_specialize=["n_splits", "s_eb", "s_eh"])  # as _sparse_decode_kernel
def _combine_kernel(
    po_ptr, plse_ptr, out_ptr, n_splits,
    s_ob, s_oh, s_os, s_eb, s_eh, s_outb, s_outh,
    DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (query head, request): online merge, BLOCK_S partials per step. The
    partials' lse and o are loaded together (one round trip per step, one step up to BLOCK_S
    splits); every split writes o (0 when empty), so o needs no mask by weight."""
    h, b = tl.program_id(0), tl.program_id(1)
    offs_dv = tl.arange(0, DV)
    m = tl.full([], float("-inf"), tl.float32)
    acc = tl.zeros([DV], tl.float32)
    den = tl.zeros([], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_splits
        lse = tl.load(plse_ptr + b * s_eb + h * s_eh + offs_s, mask=s_ok, other=float("-inf"))
        o = tl.load(po_ptr + b * s_ob + h * s_oh + offs_s[:, None] * s_os + offs_dv[None, :],
                    mask=s_ok[:, None], other=0.0)  # [BLOCK_S, DV]
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)  # [BLOCK_S]; empty splits weigh 0
        acc = acc * alpha + tl.sum(tl.where(w[:, None] > 0, o * w[:, None], 0.0), 0)
        den = den * alpha + tl.sum(w, 0)
        m = m_new
    tl.store(out_ptr + b * s_outb + h * s_outh + offs_dv, (acc / den).to(out_ptr.dtype.element_ty))


def combine_block(n_splits: int) -> int:
    """_combine_kernel's BLOCK_S for ``n_splits`` partials (a constexpr: warmup.py compiles each
    value it can take)."""
    return min(COMBINE_BLOCK_S, triton.next_power_of_2(n_splits))


def merge_chunk(group: int, splits: int) -> int:
    """_sparse_decode_kernel's S_CH for ``splits``: splits merged per step, one
    [GP, S_CH, DV] load (a constexpr: warmup.py compiles each value it can take)."""
    return min(max(1, 64 // triton.next_power_of_2(group)), triton.next_power_of_2(splits))


def combine_splits(po, pe, n_splits: int, out):
    """out[b, h] = the log-sum-exp-weighted merge of n_splits partials (po [B, Hq, S, Dv] fp32
    normalised outputs, pe [B, Hq, S] log2-domain lse; -inf marks an empty split)."""
    b_sz, hq = out.shape[0], out.shape[1]
    _combine_kernel[(hq, b_sz)](
        po, pe, out, n_splits,
        po.stride(0), po.stride(1), po.stride(2), pe.stride(0), pe.stride(1),
        out.stride(0), out.stride(1),
        DV=out.shape[-1], BLOCK_S=combine_block(n_splits),
        num_warps=4,
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
    logits_gate: torch.Tensor | None = None,  # [1] int32 on the device, with logits: read the
    # logits only where it is non-zero (a captured layer that selects or not by profile)
    launch: dict | None = None,  # tuning: LAUNCH's keys / splits (<= default) / merge (bool)
) -> torch.Tensor:
    """Attention of each request's query over its selection (see the module docstring). With
    ``logits`` the scores come from the anchor's stored logits (sel_pos: their positions, and
    ``head_map`` must be the identity: the logits are this layer's own); with ``logits_gate``
    too, the kernel picks that or the K path on the device at each launch."""
    b_sz, hq, d = q.shape
    hkv, dv = k_pool.shape[1], v_pool.shape[-1]
    g = hq // hkv
    use_logits = logits is not None
    lg = logits if use_logits else buf.logits  # unread without logits
    pos = sel_pos if use_logits else sel_slot
    mode = 0 if not use_logits else (1 if logits_gate is None else 2)
    gate = logits_gate if mode == 2 else topk  # unread unless mode 2
    st = buf.step(b_sz)
    po, pe = st.attn_o, st.attn_lse
    cfg = dict(LAUNCH, splits=st.splits)
    cfg.update(launch or {})
    splits = min(cfg.pop("splits"), st.splits)  # the step's scratch holds st.splits partials
    merge = cfg.pop("merge", splits <= MERGE_MAX_SPLITS)
    gp = triton.next_power_of_2(g)
    s_ch = merge_chunk(g, splits)  # merge: [gp, s_ch, dv] loads
    _sparse_decode_kernel[(splits, hkv, b_sz)](
        q, k_pool, v_pool, sel_slot, pos, tok_off, topk, head_map, lg, po, pe, out, buf.attn_ctr,
        gate, scale * LOG2E,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1), sel_slot.stride(0),
        lg.stride(0), lg.stride(1), lg.stride(2),
        po.stride(0), po.stride(1), po.stride(2), pe.stride(0), pe.stride(1),
        out.stride(0), out.stride(1),
        G=g, BLOCK_G=block_g(g), D=d, DV=dv, SPLITS=splits, LOGITS=mode,
        GP=gp, S_CH=s_ch, MERGE=merge, **cfg,
    )
    if not merge:
        combine_splits(po, pe, splits, out)
    return out
