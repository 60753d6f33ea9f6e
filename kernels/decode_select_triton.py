"""Decode anchor selection in Triton: scores, group pooling and Top-k, with no host sync.

Stages (reference: ``decode_torch.decode_select_torch``):
  1. ``_score_kernel``  one pass over K from the token-major pool: logits of the G query heads of
     each KV head (stored, fp32, log2 units: 16 B per key and KV head at G=4 against 256 B of K)
     and per-chunk running max / sum of each head.
  2. ``_pool_kernel``   per-head log-sum-exp from the chunk partials; pooled probabilities
     ``sum_g exp2(logit_g - lse_g)``.
  3. ``topk_select``    (topk_triton.py) exact Top-topk[b] per (request, KV head) by radix select,
     written as positions and pool slots (int32), once per anchor; every reuse layer then
     gathers K/V straight from the slots. Budgets and lengths are read on the device.
Logits, pooled scores and the selection are token-indexed (decode_plan.py): request b's run of
KV head h starts at ``[h, tok_off[b]]``, so the buffers are sized by the summed context.
(torch.topk + a slot lookup was the measured alternative to stage 3, removed with the ragged
layout: docs/results/kernels-h100.md keeps its figures.)

Why Triton: the work is a memory-bound gather (rows of the pool chosen through req_to_token),
Triton 3.6 ships on the GPU hosts with no build step, and its interpreter lets the kernels be
developed and unit-tested on a CPU. TileLang was measured on the reuse kernel
(decode_attention_tilelang.py): equal to Triton within 2% on the H100, so Triton stays (one
toolchain, no compile step on the host, the CPU interpreter); see docs/results/kernels-h100.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_plan import DecodeBuffers, block_g
from .topk_triton import NPASS, always, topk_select

LOG2E = 1.4426950408889634


# Run-time values are not specialized on (value 1, divisibility by 16: a compiled variant each):
# the Top-k scratch rows (grown with the eager buffers), the token-indexed row stride (the
# buffers' capacity) and the per-chunk partials' strides (chunks per row: batch and context). The
# gate is one scalar load, read at any offset (a captured layer's row of the profile table). The
# stores these strides address are scalar or follow a run-time row start, so nothing vectorizes
# on them. warmup.py compiles every remaining variant at start-up.
@triton.jit(do_not_specialize=["n_hist_rows", "s_lh", "s_pb", "s_ph", "s_pg", "s_eb", "s_eh"],
            do_not_specialize_on_alignment=["gate_ptr"])
def _score_kernel(
    q_ptr, k_ptr, r2t_ptr, req_idx_ptr, seq_lens_ptr, tok_off_ptr, logits_ptr, pm_ptr, pl_ptr,
    v_ptr, o_ptr, lse_ptr, gate_ptr, hist_ptr, ctr_ptr,
    sm_scale_log2, n_hist_rows,
    s_qb, s_qh, s_ks, s_kh, s_r2t,
    s_lh, s_ln, s_lg, s_pb, s_ph, s_pg,
    s_vs, s_vh, s_ob, s_oh, s_oc, s_eb, s_eh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    CHUNK,  # keys per program: a runtime value (one compiled kernel for every batch size)
    BLOCK_N: tl.constexpr, WITH_V: tl.constexpr, NPASS: tl.constexpr,
):
    # WITH_V (layer 0: dense and selecting): also the chunk's attention partial over V, so one
    # pass over K and V gives both the dense output (after the split-K reduce) and the logits.
    # gate 0: this layer does not select (a CUDA graph serving any profile): nothing to do.
    if tl.load(gate_ptr) != 0:
        c, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if c == 0:  # this row's radix-select histograms and counters start at zero (no memsets:
            # two fewer graph nodes per layer; topk_select runs after this kernel)
            r = b * tl.num_programs(1) + h
            bins = tl.arange(0, 256)
            for p in tl.static_range(NPASS):
                tl.store(hist_ptr + (p * n_hist_rows + r) * 256 + bins, tl.zeros([256], tl.int32))
            tl.store(ctr_ptr + r * 2 + tl.arange(0, 2), tl.zeros([2], tl.int32))
        seq_len = tl.load(seq_lens_ptr + b)
        row = tl.load(req_idx_ptr + b).to(tl.int64)
        lg_base = h * s_lh + tl.load(tok_off_ptr + b).to(tl.int64) * s_ln  # this row's logits
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, D)
        g_ok = offs_g < G
        q = tl.load(q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :],
                    mask=g_ok[:, None], other=0.0)  # [BLOCK_G, D]
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        offs_dv = tl.arange(0, DV)
        acc = tl.zeros([BLOCK_G, DV], tl.float32)
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, seq_len)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            ok = pos < end
            slot = tl.load(r2t_ptr + row * s_r2t + pos, mask=ok, other=0).to(tl.int64)
            k = tl.load(k_ptr + slot[:, None] * s_ks + h * s_kh + offs_d[None, :],
                        mask=ok[:, None], other=0.0)  # [BLOCK_N, D]
            s = tl.dot(q, tl.trans(k)) * sm_scale_log2  # [BLOCK_G, BLOCK_N]
            s = tl.where(ok[None, :], s, float("-inf"))
            tl.store(logits_ptr + lg_base + offs_g[:, None] * s_lg + pos[None, :] * s_ln,
                     s, mask=g_ok[:, None] & ok[None, :])
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every step holds a key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            if WITH_V:
                v = tl.load(v_ptr + slot[:, None] * s_vs + h * s_vh + offs_dv[None, :],
                            mask=ok[:, None], other=0.0)  # [BLOCK_N, DV]
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        # An empty chunk (past the request's end) leaves m = -inf, l = 0.
        tl.store(pm_ptr + b * s_pb + h * s_ph + offs_g * s_pg + c, m_i, mask=g_ok)
        tl.store(pl_ptr + b * s_pb + h * s_ph + offs_g * s_pg + c, l_i, mask=g_ok)
        if WITH_V:
            heads = h * G + offs_g
            o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(o_ptr + b * s_ob + heads[:, None] * s_oh + c * s_oc + offs_dv[None, :], o,
                     mask=g_ok[:, None])
            tl.store(lse_ptr + b * s_eb + heads * s_eh + c, m_i + tl.log2(l_i), mask=g_ok)


@triton.jit(do_not_specialize=["n_chunks", "s_lh", "s_pb", "s_ph", "s_pg", "s_oh"],
            do_not_specialize_on_alignment=["gate_ptr"])  # as _score_kernel
def _pool_kernel(
    logits_ptr, pm_ptr, pl_ptr, seq_lens_ptr, tok_off_ptr, pooled_ptr, gate_ptr,
    n_chunks,
    s_lh, s_ln, s_lg, s_pb, s_ph, s_pg, s_oh,
    G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    if tl.load(gate_ptr) != 0:
        j, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b)
        off = tl.load(tok_off_ptr + b).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        # Log-sum-exp of each query head from the chunk partials: [BLOCK_G].
        m_run = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_G], tl.float32)
        for c0 in range(0, n_chunks, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            msk = g_ok[:, None] & (offs_c[None, :] < n_chunks)
            base = b * s_pb + h * s_ph + offs_g[:, None] * s_pg + offs_c[None, :]
            pm = tl.load(pm_ptr + base, mask=msk, other=float("-inf"))
            pl = tl.load(pl_ptr + base, mask=msk, other=0.0)
            m_new = tl.maximum(m_run, tl.max(pm, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_run = l_run * tl.exp2(m_run - m_safe) + tl.sum(pl * tl.exp2(pm - m_safe[:, None]), 1)
            m_run = m_new
        lse = tl.where(g_ok, m_run + tl.log2(l_run), float("inf"))  # padded heads add exp2(-inf) = 0
        pos = j * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = pos < seq_len
        lg = tl.load(logits_ptr + h * s_lh + (off + pos[None, :]) * s_ln + offs_g[:, None] * s_lg,
                     mask=g_ok[:, None] & ok[None, :], other=float("-inf"))
        pooled = tl.sum(tl.exp2(lg - lse[:, None]), 0)  # [BLOCK_P]
        # Only this row's run: the next request's run starts at its end.
        tl.store(pooled_ptr + h * s_oh + off + pos, pooled, mask=ok)
        # (Adding the first radix-select histogram here was measured slower on the H100: +156 us
        # in this kernel against -74 us saved in topk_select at B=16, 128K.)


def decode_select(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [slots, Hkv, D]
    req_to_token: torch.Tensor,  # [R, C] int32
    req_idx: torch.Tensor,  # [B] int
    seq_lens: torch.Tensor,  # [B] int32
    tok_off: torch.Tensor,  # [B] int64 row starts in the token-indexed buffers (row_offsets)
    topk: torch.Tensor,  # [B] int32 budgets, 1 <= topk[b] <= min(seq_lens[b], buf.kmax)
    scale: float,
    buf: DecodeBuffers,
    lscan: int | None = None,
    gate: torch.Tensor | None = None,
    launch: dict | None = None,
) -> None:
    """Fill buf.logits / pooled / sel_pos / sel_slot (and the step's scratch) for this step: entries
    [tok_off[b], tok_off[b] + topk[b]) of each KV head's row of sel_pos / sel_slot are request
    b's Top-k. Rows must not overlap: tok_off[b] + seq_lens[b] <= tok_off[b + 1], and the last
    row ends within buf.tokens (the caller checks: device_path.py).

    ``lscan`` (host int, kmax <= lscan <= buf.lmax): longest row (grid size); the graph path
    keeps the capacity ``buf.lmax``, eager callers may pass the batch's longest context.
    ``gate`` ([1] int32 on the device, default open): 0 makes every kernel return at once, so a
    captured CUDA graph runs or skips the selection by profile data (device_path.py).
    ``launch``: as select_stages' (the device path's Top-k switches: config.DevSwitches).
    """
    for stage in select_stages(q, k_pool, req_to_token, req_idx, seq_lens, tok_off, topk, scale,
                               buf, lscan, gate=gate, launch=launch).values():
        stage()


def select_stages(q, k_pool, req_to_token, req_idx, seq_lens, tok_off, topk, scale, buf,
                  lscan=None, v_pool=None, gate=None, launch=None):
    """The stages of ``decode_select`` as closures, in order (benchmarks time each; the score
    stage zeroes the Top-k's histograms, so ``topk`` alone must follow a score or a zeroing).

    ``v_pool`` given (layer 0): the score stage also writes dense split-K partials into the
    step's dense_o / dense_lse (buf.step(B); see decode_dense_triton.py).
    ``launch`` (tuning): {"score": {BLOCK_N, num_warps, num_stages}, "topk": {...}} overrides."""
    b_sz, hq, d = q.shape
    hkv = k_pool.shape[1]
    g = hq // hkv
    lscan, n_chunks = buf.scan(b_sz, lscan)
    st = buf.step(b_sz)
    lg, pm, pl = buf.logits, st.part_m, st.part_l
    gate = always(q.device) if gate is None else gate
    launch = launch or {}
    score_cfg = dict(BLOCK_N=128, num_warps=4 if v_pool is None else 8, num_stages=3)
    score_cfg.update(launch.get("score", {}))
    hist, ctr = buf.topk_hist, buf.topk_ctr

    def score():
        vp = k_pool if v_pool is None else v_pool  # anchor: logits only (V pointers unused)
        o, e = st.dense_o, st.dense_lse
        _score_kernel[(n_chunks, hkv, b_sz)](
            q, k_pool, req_to_token, req_idx, seq_lens, tok_off, lg, pm, pl, vp, o, e, gate,
            hist, ctr, scale * LOG2E, hist.shape[1],
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), req_to_token.stride(0),
            lg.stride(0), lg.stride(1), lg.stride(2),
            pm.stride(0), pm.stride(1), pm.stride(2),
            vp.stride(0), vp.stride(1), o.stride(0), o.stride(1), o.stride(2),
            e.stride(0), e.stride(1),
            G=g, BLOCK_G=block_g(g), D=d, DV=vp.shape[-1], CHUNK=st.chunk,
            WITH_V=v_pool is not None, NPASS=NPASS, **score_cfg,
        )

    def pool():
        block_p = 1024
        _pool_kernel[(triton.cdiv(lscan, block_p), hkv, b_sz)](
            lg, pm, pl, seq_lens, tok_off, buf.pooled, gate, n_chunks,
            lg.stride(0), lg.stride(1), lg.stride(2),
            pm.stride(0), pm.stride(1), pm.stride(2), buf.pooled.stride(0),
            G=g, BLOCK_G=triton.next_power_of_2(g), BLOCK_C=64, BLOCK_P=block_p, num_warps=4,
        )

    def radix_topk():
        topk_select(buf.pooled, seq_lens, topk, req_to_token, req_idx, hist, ctr, buf.sel_pos,
                    buf.sel_slot, lscan, launch=launch.get("topk"), gate=gate, tok_off=tok_off,
                    zeroed=True)

    return dict(score=score, pool=pool, topk=radix_topk)
