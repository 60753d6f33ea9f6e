"""Exact per-row Top-k of non-negative fp32 scores by radix select, in Triton, with no host sync.

Reference: ``torch.topk`` (tests compare the chosen sets). Each row r = (request, KV head) has its
own length ``seq_lens[b]`` and budget ``topk[b]``; both are read on the device, so one launch
sequence serves a ragged batch and replays under a CUDA graph.

A non-negative float's bit pattern orders like the float, so the k-th largest score is found digit
by digit over its 31 bits (8 + 8 + 8 + 7): pass p histograms the digit p of the scores whose higher
digits equal the prefix chosen so far (many programs per row, one vector atomic add each), and the
next kernel descends the histograms to the threshold. The last kernel writes every position above
the threshold and as many positions equal to it as the budget still needs (ties), as positions and
as pool slots, in no set order: entries [0, topk[b]) of a row are the selection.

Collect mode (``launch={"collect": True}``, token-indexed rows; ``COLLECT`` sets the default):
after the first two digits, a third full pass writes the keys above the 16-bit prefix as
selected and collects the keys on it (the candidates: usually a small share of the row) into
the row's own output entries after them, with their bits in the slot buffer; one program per
row then finds the last two digits among the candidates and compacts the rest of the selection
in place. Three reads of the scores instead of five. A row with more than ``CAND_MAX``
candidates (nearly equal scores: a model with random weights, a long run of one repeated token)
would leave one program a serial pass over most of the row; such rows finish through chunked
passes 2 and 3 and a compaction of the candidates instead, launched after the per-row program and
skipped on the device by every other row.

Short rows (``seq_lens[b] <= short_row``, default SHORT_ROW) are selected whole by one program of
the first launch: its four passes histogram in registers (re-reading the row from L2), and it
writes the selection in position order with no atomics; the other four launches skip those rows.
Five dependent launches are pure latency on a few short rows (a 4K-context anchor at batch 1):
measured 55 us less per batch-1 decode step at 4K (docs/results/kernels-h100.md).

Rows are either uniform (``scores`` [B, Hkv, L], ``pos`` [B, Hkv, kmax]: prefill tiles) or
token-indexed (``tok_off`` given: ``scores`` and ``pos`` [Hkv, tokens], request b's row of KV head
h starting at ``[h, tok_off[b]]``: the decode buffers of decode_plan.py).

Why not torch.topk: measured on the H100 (docs/results/kernels-h100.md) it took 160 us (B=1) and
490 us (B=16) at 128K keys and k = 13,108, a third of an anchor layer; its sorted output is not
needed. FlashInfer's radix top-k takes one k for all rows, so ragged budgets would not fit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_plan import NUM_SMS_H100, sm_count

NBINS = 256  # 8-bit digits: Triton's histogram costs grow with the bins (2048 bins measured
# slower than torch.topk on the H100; see docs/results/kernels-h100.md)
SHIFTS = (23, 15, 7, 0)  # digit p covers bits [SHIFTS[p], SHIFTS[p] + WIDTHS[p])
WIDTHS = (8, 8, 8, 7)
NPASS = 4
TOPK_CHUNKS = (1024, 2048, 4096)  # positions per histogram / compaction program (topk_chunk)
NUM_SMS = NUM_SMS_H100  # topk_chunk's default; topk_select asks the device (sm_count)
SHORT_ROW = 8192  # rows up to this long: one program selects them whole (module docstring)
# Collect mode: rows with more candidates than this are finished by the chunked passes, not by
# one program (its serial cost grows with the candidates: with nearly equal scores, the row)
CAND_MAX = SHORT_ROW
# Collect mode (token-indexed rows): three full passes instead of five (module docstring). On by
# default as measured on the H100 (bench/topk_rows.py, bench/results/topk_rows_h100.json): the
# Top-k alone at 128K 306 vs 429 us at batch 16, 57 vs 65 us at batch 1; rows of nearly equal
# scores 540 vs 429 and 78 vs 65 us. launch={"collect": False} runs the five launches (the
# server: SGLANG_KASCADE_TOPK_COLLECT=0, config.DevSwitches; bench/e2e_bench.sh kascade-nocollect).
COLLECT = True


_ALWAYS: dict = {}


def topk_chunk(rows: int, lscan: int, num_sms: int = NUM_SMS) -> int:
    """Positions per program: the largest of TOPK_CHUNKS that still gives about four waves of
    programs (rows x chunks), else the smallest. 4096 was the best of 2048-16384 at batch 16,
    128K (128 rows); at batch 1 (8 rows) it leaves 256 programs, each four dependent steps."""
    for chunk in reversed(TOPK_CHUNKS):
        if rows * -(-lscan // chunk) >= 4 * num_sms:
            return chunk
    return TOPK_CHUNKS[0]


def always(device) -> torch.Tensor:
    """The open gate: [1] int32 = 1 on ``device`` (one per device, allocated once)."""
    key = str(device)
    if key not in _ALWAYS:
        _ALWAYS[key] = torch.ones(1, dtype=torch.int32, device=device)
    return _ALWAYS[key]


@triton.jit
def _descend_digit(h, prefix, k_rem, WIDTH: tl.constexpr):
    """One digit of the descent: h [256] the histogram of the digit among the keys matching
    ``prefix``; the digit holding the k_rem-th largest is appended to prefix, and k_rem loses
    the keys of larger digits."""
    bins = tl.arange(0, 256)
    count_ge = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys whose digit is >= d
    d_star = tl.sum((count_ge >= k_rem).to(tl.int32), 0) - 1
    ge_star = tl.sum(tl.where(bins == d_star, count_ge, 0), 0)
    h_star = tl.sum(tl.where(bins == d_star, h, 0), 0)
    return (prefix << WIDTH) | d_star, k_rem - (ge_star - h_star)


@triton.jit
def _descend(hist_ptr, row, n_rows, k, NPASS: tl.constexpr):
    """Threshold prefix and remaining budget after NPASS digits: (prefix, k_rem)."""
    bins = tl.arange(0, 256)
    prefix = 0
    k_rem = k
    for p in tl.static_range(NPASS):
        h = tl.load(hist_ptr + (p * n_rows + row) * 256 + bins)
        prefix, k_rem = _descend_digit(h, prefix, k_rem, 8 if p < 3 else 7)
    return prefix, k_rem


@triton.jit
def _digit_hist(score_ptr, s_base, start, end, prefix, SHIFT: tl.constexpr,
                WIDTH: tl.constexpr, HI_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """[256] histogram of digit (SHIFT, WIDTH) over keys [start, end) whose bits from HI_SHIFT
    up equal ``prefix``."""
    acc = tl.zeros([256], tl.int32)
    for j0 in range(start, end, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j < end
        key = tl.load(score_ptr + s_base + j, mask=ok, other=0).to(tl.int32, bitcast=True)
        hit = ok & ((key >> HI_SHIFT) == prefix)
        digit = tl.where(hit, (key >> SHIFT) & ((1 << WIDTH) - 1), 0)
        acc += tl.histogram(digit, 256)
        acc -= tl.where(tl.arange(0, 256) == 0, tl.sum((~hit).to(tl.int32), 0), 0)
    return acc


@triton.jit
def _against_threshold(score_ptr, s_base, j0, n, thr, BLOCK: tl.constexpr):
    """Positions j0 + [0, BLOCK) of a row of n keys: (j, key > thr, key == thr), masked by n."""
    j = j0 + tl.arange(0, BLOCK)
    ok = j < n
    key = tl.load(score_ptr + s_base + j, mask=ok, other=0.0).to(tl.int32, bitcast=True)
    return j, ok & (key > thr), ok & (key == thr)


@triton.jit
def _write_selected(r2t_ptr, r2t_base, pos_ptr, slot_ptr, p_base, j, gt, eq, r_gt, r_eq, k_rem,
                    n_gt_total):
    """Keys above the threshold go to rank r_gt, the first k_rem ties after all of them (their
    rank r_eq among the ties): position and pool slot."""
    keep = gt | (eq & (r_eq < k_rem))
    dst = tl.where(gt, r_gt, n_gt_total + r_eq)
    slot = tl.load(r2t_ptr + r2t_base + j, mask=keep, other=0)
    tl.store(pos_ptr + p_base + dst, j, mask=keep)
    tl.store(slot_ptr + p_base + dst, slot, mask=keep)


@triton.jit
def _short_row_select(score_ptr, r2t_ptr, pos_ptr, slot_ptr, s_base, p_base, r2t_base, n, k,
                      BLOCK: tl.constexpr):
    """The whole selection of one row in one program: four register histograms, then the
    positions above the threshold and the first ties in position order (no atomics)."""
    prefix, k_rem = _descend_digit(_digit_hist(score_ptr, s_base, 0, n, 0, 23, 8, 31, BLOCK),
                                   0, k, 8)
    prefix, k_rem = _descend_digit(_digit_hist(score_ptr, s_base, 0, n, prefix, 15, 8, 23,
                                               BLOCK), prefix, k_rem, 8)
    prefix, k_rem = _descend_digit(_digit_hist(score_ptr, s_base, 0, n, prefix, 7, 8, 15,
                                               BLOCK), prefix, k_rem, 8)
    thr, k_rem = _descend_digit(_digit_hist(score_ptr, s_base, 0, n, prefix, 0, 7, 7, BLOCK),
                                prefix, k_rem, 7)
    n_gt_total = k - k_rem
    seen_gt = 0
    seen_eq = 0
    for j0 in range(0, n, BLOCK):
        j, gt, eq = _against_threshold(score_ptr, s_base, j0, n, thr, BLOCK)
        gt_i, eq_i = gt.to(tl.int32), eq.to(tl.int32)
        _write_selected(r2t_ptr, r2t_base, pos_ptr, slot_ptr, p_base, j, gt, eq,
                        seen_gt + tl.cumsum(gt_i, 0) - 1, seen_eq + tl.cumsum(eq_i, 0) - 1,
                        k_rem, n_gt_total)
        seen_gt += tl.sum(gt_i, 0)
        seen_eq += tl.sum(eq_i, 0)


@triton.jit
def _row_start(tok_off_ptr, b, row, hkv, s_h, RAGGED: tl.constexpr):
    """Element offset of row (request b, KV head row % hkv): token-indexed rows start at
    tok_off[b] within their head's run of s_h entries; uniform rows at row * s_h."""
    if RAGGED:
        start = tl.load(tok_off_ptr + b).to(tl.int64) + (row % hkv).to(tl.int64) * s_h
    else:
        start = row.to(tl.int64) * s_h
    return start


@triton.jit
def _chunk_program(seq_lens_ptr, gate_ptr, hkv, CHUNK):
    """Where a (chunk, row) program of the chunked launches stands: (row, request b, the row's
    length n, the chunk's first position, whether the chunk holds keys and the gate is open)."""
    c, row = tl.program_id(0), tl.program_id(1)
    b = row // hkv
    n = tl.load(seq_lens_ptr + b)
    start = c * CHUNK
    return row, b, n, start, (start < n) & (tl.load(gate_ptr) != 0)


@triton.jit
def _overflows(ctr_ptr, row, cand_max):
    """Collect mode: whether the row's candidates (the keys on the threshold's 16-bit prefix,
    counted by the collecting pass) are too many for the one program of _cand_select_kernel, so
    the chunked passes 2 and 3 and the compaction select them instead."""
    return tl.load(ctr_ptr + row * 2 + 1) > cand_max


# Not specialized on (value 1, divisibility by 16: a compiled variant each): the scratch rows
# (the step's batch, a prefill block) and the selection's row stride (a prefill batch's largest
# budget: it addresses scattered stores only); nor the alignment of the lengths, budgets, rows,
# offsets, gate and slots, which a prefill block passes as slices of its tiles' tensors at run-
# time offsets (and a captured layer its row of the gate table): scalar loads and scattered
# stores. Kept: the score rows' stride (contiguous score loads vectorize on it; prefill pads it to
# a multiple of 16) and CHUNK (a run-time value, every topk_chunk a multiple of 1024: one
# compiled kernel for every batch and length). warmup.py compiles the constexpr variants.
_NO_SPEC = dict(do_not_specialize=["n_rows", "s_pr"],
                do_not_specialize_on_alignment=["seq_lens_ptr", "tok_off_ptr", "topk_ptr",
                                                "req_idx_ptr", "slot_ptr", "gate_ptr"])


@triton.jit(**_NO_SPEC)
def _hist_kernel(
    score_ptr, seq_lens_ptr, tok_off_ptr, topk_ptr, hist_ptr, ctr_ptr, gate_ptr, r2t_ptr,
    req_idx_ptr, pos_ptr, slot_ptr, n_rows, hkv, s_sr, s_pr, s_r2t, short_row, cand_max,
    CHUNK, PASS: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
    HI_SHIFT: tl.constexpr, BLOCK: tl.constexpr, RAGGED: tl.constexpr, OVERFLOW: tl.constexpr,
):
    # Pass 0 also selects the short rows whole (program 0 of the row); later passes skip them.
    # OVERFLOW (collect mode, passes 2 and 3): only rows whose candidates overflow cand_max.
    row, b, n, start, active = _chunk_program(seq_lens_ptr, gate_ptr, hkv, CHUNK)
    if OVERFLOW:
        active = active & (n > short_row)
        if active:
            active = _overflows(ctr_ptr, row, cand_max)
    if active:
        k = tl.load(topk_ptr + b)
        s_base = _row_start(tok_off_ptr, b, row, hkv, s_sr, RAGGED)
        if n <= short_row:
            if PASS == 0 and start == 0:  # the row's first chunk
                req_row = tl.load(req_idx_ptr + b).to(tl.int64)
                _short_row_select(score_ptr, r2t_ptr, pos_ptr, slot_ptr, s_base,
                                  _row_start(tok_off_ptr, b, row, hkv, s_pr, RAGGED),
                                  req_row * s_r2t, n, k, BLOCK)
        else:
            prefix, k_rem = _descend(hist_ptr, row, n_rows, k, PASS)
            acc = _digit_hist(score_ptr, s_base, start, tl.minimum(start + CHUNK, n), prefix,
                              SHIFT, WIDTH, HI_SHIFT, BLOCK)
            tl.atomic_add(hist_ptr + (PASS * n_rows + row) * 256 + tl.arange(0, 256), acc,
                          sem="relaxed")


@triton.jit(**_NO_SPEC)
def _compact_kernel(
    score_ptr, seq_lens_ptr, tok_off_ptr, topk_ptr, hist_ptr, ctr_ptr, r2t_ptr, req_idx_ptr,
    pos_ptr, slot_ptr, gate_ptr, n_rows, hkv, s_sr, s_pr, s_r2t, short_row, cand_max,
    CHUNK, BLOCK: tl.constexpr, RAGGED: tl.constexpr, OVERFLOW: tl.constexpr,
):
    # OVERFLOW (collect mode): rows whose candidates overflow cand_max. The collecting pass
    # wrote the keys above the 16-bit prefix to [0, n_gt16) and left the counters at
    # (n_gt16, candidates): keys above the threshold among the candidates continue after
    # n_gt16, and a tie's rank is its counter value less the candidates (the pass-1 histogram's
    # bin of the prefix, which every program reads alike).
    row, b, n, start, active = _chunk_program(seq_lens_ptr, gate_ptr, hkv, CHUNK)
    active = active & (n > short_row)
    if OVERFLOW:
        if active:
            active = _overflows(ctr_ptr, row, cand_max)
    if active:
        k = tl.load(topk_ptr + b)
        thr, k_rem = _descend(hist_ptr, row, n_rows, k, 4)  # threshold key, ties still needed
        n_gt_total = k - k_rem
        eq_base = 0
        if OVERFLOW:
            bins = tl.arange(0, 256)
            h1 = tl.load(hist_ptr + (n_rows + row) * 256 + bins)
            eq_base = tl.sum(tl.where(bins == ((thr >> 15) & 255), h1, 0), 0)
        req_row = tl.load(req_idx_ptr + b).to(tl.int64)
        s_base = _row_start(tok_off_ptr, b, row, hkv, s_sr, RAGGED)
        p_base = _row_start(tok_off_ptr, b, row, hkv, s_pr, RAGGED)
        for j0 in range(start, tl.minimum(start + CHUNK, n), BLOCK):
            j, gt, eq = _against_threshold(score_ptr, s_base, j0, n, thr, BLOCK)
            if OVERFLOW:  # keys above the 16-bit prefix: already written by the collecting pass
                key = tl.load(score_ptr + s_base + j, mask=j < n, other=0.0).to(tl.int32,
                                                                                bitcast=True)
                gt = gt & ((key >> 15) == (thr >> 15))
            gt_i, eq_i = gt.to(tl.int32), eq.to(tl.int32)
            base_gt = tl.atomic_add(ctr_ptr + row * 2, tl.sum(gt_i, 0), sem="relaxed")
            base_eq = tl.atomic_add(ctr_ptr + row * 2 + 1, tl.sum(eq_i, 0),
                                    sem="relaxed") - eq_base
            _write_selected(r2t_ptr, req_row * s_r2t, pos_ptr, slot_ptr, p_base, j, gt, eq,
                            base_gt + tl.cumsum(gt_i, 0) - 1, base_eq + tl.cumsum(eq_i, 0) - 1,
                            k_rem, n_gt_total)


@triton.jit(**_NO_SPEC)
def _collect_kernel(
    score_ptr, seq_lens_ptr, tok_off_ptr, topk_ptr, hist_ptr, ctr_ptr, r2t_ptr, req_idx_ptr,
    pos_ptr, slot_ptr, gate_ptr, n_rows, hkv, s_sr, s_pr, s_r2t, short_row,
    CHUNK, BLOCK: tl.constexpr,
):
    """Collect mode, third full pass (token-indexed rows only): after two digits (16 bits) a
    key above the prefix is selected (its position and slot go to [0, n_gt) of the row, in no
    set order); a key on the prefix is a candidate: its position and its bits (in the slot
    buffer) go to [n_gt, n_gt + candidates), for _cand_select_kernel."""
    row, b, n, start, active = _chunk_program(seq_lens_ptr, gate_ptr, hkv, CHUNK)
    if active & (n > short_row):
        k = tl.load(topk_ptr + b)
        prefix, k_rem = _descend(hist_ptr, row, n_rows, k, 2)  # bits 15..30 of the threshold
        n_gt = k - k_rem
        req_row = tl.load(req_idx_ptr + b).to(tl.int64)
        s_base = _row_start(tok_off_ptr, b, row, hkv, s_sr, True)
        p_base = _row_start(tok_off_ptr, b, row, hkv, s_pr, True)
        for j0 in range(start, tl.minimum(start + CHUNK, n), BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            ok = j < n
            key = tl.load(score_ptr + s_base + j, mask=ok, other=0.0).to(tl.int32, bitcast=True)
            gt = ok & ((key >> 15) > prefix)
            cand = ok & ((key >> 15) == prefix)
            gt_i, cand_i = gt.to(tl.int32), cand.to(tl.int32)
            base_gt = tl.atomic_add(ctr_ptr + row * 2, tl.sum(gt_i, 0), sem="relaxed")
            base_c = tl.atomic_add(ctr_ptr + row * 2 + 1, tl.sum(cand_i, 0), sem="relaxed")
            dst = tl.where(gt, base_gt + tl.cumsum(gt_i, 0) - 1,
                           n_gt + base_c + tl.cumsum(cand_i, 0) - 1)
            put = gt | cand
            slot = tl.load(r2t_ptr + req_row * s_r2t + j, mask=gt, other=0)
            tl.store(pos_ptr + p_base + dst, j, mask=put)
            tl.store(slot_ptr + p_base + dst, tl.where(gt, slot, key), mask=put)


@triton.jit(**_NO_SPEC)
def _cand_select_kernel(
    seq_lens_ptr, tok_off_ptr, topk_ptr, hist_ptr, ctr_ptr, r2t_ptr, req_idx_ptr, pos_ptr,
    slot_ptr, gate_ptr, n_rows, hkv, s_pr, s_r2t, short_row, cand_max, BLOCK: tl.constexpr,
):
    """Collect mode, one program per row: the last two digits over the candidates only (two
    register histograms), then the candidates above the threshold and the first ties still
    needed, compacted in place in candidate order (a kept entry moves to an index no later than
    its own, so no entry is overwritten before it is read), with their pool slots."""
    row = tl.program_id(0)
    b = row // hkv
    n = tl.load(seq_lens_ptr + b)
    go = (n > short_row) & (tl.load(gate_ptr) != 0)
    if go:
        go = tl.load(ctr_ptr + row * 2 + 1) <= cand_max  # else: the OVERFLOW launches select
    if go:
        k = tl.load(topk_ptr + b)
        prefix, k_rem = _descend(hist_ptr, row, n_rows, k, 2)
        n_gt = k - k_rem
        n_cand = tl.load(ctr_ptr + row * 2 + 1)
        base = _row_start(tok_off_ptr, b, row, hkv, s_pr, True) + n_gt
        prefix, k_rem = _descend_digit(
            _digit_hist(slot_ptr, base, 0, n_cand, prefix, 7, 8, 15, BLOCK), prefix, k_rem, 8)
        thr, ties = _descend_digit(
            _digit_hist(slot_ptr, base, 0, n_cand, prefix, 0, 7, 7, BLOCK), prefix, k_rem, 7)
        req_row = tl.load(req_idx_ptr + b).to(tl.int64)
        seen_eq = 0
        seen_keep = 0
        for j0 in range(0, n_cand, BLOCK):
            i = j0 + tl.arange(0, BLOCK)
            ok = i < n_cand
            key = tl.load(slot_ptr + base + i, mask=ok, other=0)
            p = tl.load(pos_ptr + base + i, mask=ok, other=0)
            eq = ok & (key == thr)
            eq_i = eq.to(tl.int32)
            keep = (ok & (key > thr)) | (eq & (seen_eq + tl.cumsum(eq_i, 0) - 1 < ties))
            keep_i = keep.to(tl.int32)
            dst = seen_keep + tl.cumsum(keep_i, 0) - 1  # <= i: in place, in order
            slot = tl.load(r2t_ptr + req_row * s_r2t + p, mask=keep, other=0)
            tl.debug_barrier()  # every lane's loads of this block before any store
            tl.store(pos_ptr + base + dst, p, mask=keep)
            tl.store(slot_ptr + base + dst, slot, mask=keep)
            seen_eq += tl.sum(eq_i, 0)
            seen_keep += tl.sum(keep_i, 0)


def topk_select(
    scores: torch.Tensor,  # [B, Hkv, L] fp32 >= 0 where position < seq_lens[b]; [Hkv, T] ragged
    seq_lens: torch.Tensor,  # [B] int32
    topk: torch.Tensor,  # [B] int32, 1 <= topk[b] <= seq_lens[b]
    req_to_token: torch.Tensor,  # [R, C] int32
    req_idx: torch.Tensor,  # [B] int
    hist: torch.Tensor,  # [4, >= B*Hkv, 256] int32 scratch
    ctr: torch.Tensor,  # [>= B*Hkv, 2] int32 scratch
    pos: torch.Tensor,  # [B, Hkv, kmax] ([Hkv, T] ragged) int32 out: positions, topk[b] valid
    slot: torch.Tensor,  # pos's shape, int32 out: pool slots of those positions
    lscan: int,  # host bound on seq_lens (grid size)
    launch: dict | None = None,  # override CHUNK / BLOCK / num_warps / short_row / collect /
    # cand_max
    gate: torch.Tensor | None = None,  # [1] int32 on the device: 0 = do nothing (CUDA graphs)
    tok_off: torch.Tensor | None = None,  # [B] int64: token-indexed rows (module docstring)
    zeroed: bool = False,  # hist / ctr rows already zero (decode: the score kernel zeroes them)
) -> None:
    ragged = tok_off is not None
    b_sz = seq_lens.shape[0]
    hkv = scores.shape[0] if ragged else scores.shape[1]
    rows = b_sz * hkv
    gate = always(scores.device) if gate is None else gate
    if ragged:
        assert scores.dim() == 2 and pos.shape == scores.shape and slot.shape == scores.shape
        s_sr, s_pr = scores.stride(0), pos.stride(0)
    else:
        assert scores.stride(1) * hkv == scores.stride(0) and pos.stride(1) * hkv == pos.stride(0)
        s_sr, s_pr = scores.stride(1), pos.stride(1)
    off = tok_off if ragged else seq_lens  # unread when uniform
    n_rows = hist.shape[1]
    if not zeroed:
        hist[:, :rows].zero_()  # this step's rows only (graph buffers hold many more)
        ctr[:rows].zero_()
    cfg = dict(CHUNK=topk_chunk(rows, lscan, sm_count(scores.device)), BLOCK=1024, num_warps=4, short_row=SHORT_ROW)
    cfg.update(launch or {})
    short_row = cfg.pop("short_row")
    collect = cfg.pop("collect", COLLECT) and ragged
    cand_max = cfg.pop("cand_max", CAND_MAX)
    grid = (triton.cdiv(lscan, cfg["CHUNK"]), rows)
    common = (n_rows, hkv, s_sr, s_pr, req_to_token.stride(0), short_row, cand_max)

    def hist_pass(p, overflow):
        _hist_kernel[grid](
            scores, seq_lens, off, topk, hist, ctr, gate, req_to_token, req_idx, pos, slot,
            *common, PASS=p, SHIFT=SHIFTS[p], WIDTH=WIDTHS[p], HI_SHIFT=SHIFTS[p] + WIDTHS[p],
            RAGGED=ragged, OVERFLOW=overflow, **cfg,
        )

    def compact(overflow):
        _compact_kernel[grid](
            scores, seq_lens, off, topk, hist, ctr, req_to_token, req_idx, pos, slot, gate,
            *common, RAGGED=ragged, OVERFLOW=overflow, **cfg,
        )

    if not collect:
        for p in range(NPASS):
            hist_pass(p, False)
        compact(False)
        return
    # collect mode: two full histogram passes, one collecting pass, the candidates per row;
    # rows with more than CAND_MAX candidates (nearly equal scores) finish through the chunked
    # passes 2 and 3 and the compaction instead (launched always: no host sync in a graph)
    hist_pass(0, False)
    hist_pass(1, False)
    _collect_kernel[grid](
        scores, seq_lens, off, topk, hist, ctr, req_to_token, req_idx, pos, slot, gate,
        n_rows, hkv, s_sr, s_pr, req_to_token.stride(0), short_row, **cfg,
    )
    _cand_select_kernel[(rows,)](
        seq_lens, off, topk, hist, ctr, req_to_token, req_idx, pos, slot, gate,
        n_rows, hkv, s_pr, req_to_token.stride(0), short_row, cand_max, BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"],
    )
    hist_pass(2, True)
    hist_pass(3, True)
    compact(True)
