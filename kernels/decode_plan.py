"""Host-side plan of the batched decode kernels: static buffers and split heuristics.

Pure Python and torch (no Triton), testable on the CPU. ``DecodeBuffers`` is allocated once for a
capacity (max batch, max context, max Top-k, summed context) and reused by every layer and every
step, so the decode path allocates nothing per step and replays under a CUDA graph: kernels only
read ``seq_lens`` / ``tok_off`` / ``topk`` from device memory and size their loops from them.

Token-indexed (ragged) buffers: the per-key buffers (logits, pooled scores, the selection) hold
one run of ``seq_lens[b]`` entries per request, starting at ``tok_off[b]`` (the exclusive cumsum
of the step's lengths, ``row_offsets``), within each KV head's row of ``tokens`` entries. They
are sized by the batch's summed context (for CUDA graphs: the KV pool), not by rows x longest
context: at 128K on Llama-3.1-8B shapes 224 bytes per token of the pool instead of ~22 MiB per
captured request row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

SCORE_CHUNKS = (256, 512, 1024, 2048)  # keys per scoring program: one (m, l) partial each
ATTN_BLOCK_N = 64  # keys per inner step of the sparse attention
NUM_SMS_H100 = 132  # the planning default off CUDA (CPU tests): an H100 SXM


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device``: the split and chunk rules size their grids by
    it (H100 SXM 132, H100 PCIe 114); NUM_SMS_H100 off CUDA."""
    dev = torch.device(device)
    return _sm_count(str(dev)) if dev.type == "cuda" else NUM_SMS_H100


def block_g(group: int) -> int:
    """Query heads of one KV head padded to a tl.dot row block (>= 16, power of two)."""
    return max(16, 1 << (group - 1).bit_length())


def score_chunk(batch: int, kv_heads: int, lmax: int, num_sms: int = NUM_SMS_H100) -> int:
    """Largest chunk that still gives about four waves of scoring programs for ``batch`` rows of
    ``lmax`` keys."""
    for chunk in reversed(SCORE_CHUNKS):
        if batch * kv_heads * -(-lmax // chunk) >= 4 * num_sms:
            return chunk
    return SCORE_CHUNKS[0]


def num_splits(batch: int, kv_heads: int, kmax: int, num_sms: int = NUM_SMS_H100) -> int:
    """Split-K factor of the sparse attention: about two waves of programs, each >= 4 steps.

    Four waves and >= 2 steps was measured too (H100, docs/results/kernels-h100.md): 8% slower
    reuse layers at batch 16, 128K, and no gain at batch 1, 128K.

    A function of the batch size and the Top-k capacity (not of this step's lengths), so a
    graph captured for ``batch`` rows keeps it (a runtime kernel argument: no recompilation).
    """
    want = max(1, (2 * num_sms + batch * kv_heads - 1) // (batch * kv_heads))
    most = max(1, kmax // (4 * ATTN_BLOCK_N))
    return max(1, min(want, most, 64))


def row_offsets(seq_lens: list) -> list:
    """Start of each request's run in the token-indexed buffers: exclusive cumsum of seq_lens."""
    out, total = [], 0
    for n in seq_lens:
        out.append(total)
        total += int(n)
    return out


def graph_rows_torch(req_src, seq_src, req_dst, seq_dst, off_dst, topk_dst, budget_f,
                     budget_i, kmax: int, row_frac=None) -> None:
    """Reference of graph_plan_triton.graph_rows (also the CPU path: no graphs there): a
    captured graph's static plan from SGLang's static rows, with the budget as device data
    (``budget_f`` [fraction, slack] float64, ``budget_i`` [k_min, round_to] int64) and each
    row's own fraction (``row_frac`` [>= bs] float64, 0: the server's; None: all the server's).
    The server's k is clamped to ``kmax`` (the captured capacity), a row's own only to its
    length."""
    bs = seq_src.shape[0]
    s = seq_src.to(torch.int64)
    frac, slack = budget_f.to(torch.float64)
    k_min, round_to = budget_i.to(torch.int64)
    own = (torch.zeros(bs, dtype=torch.float64, device=s.device) if row_frac is None
           else row_frac[:bs].to(torch.float64))
    custom = own > 0
    f = torch.where(custom, own, frac)
    k = torch.ceil(f * s.to(torch.float64) - slack).to(torch.int64).clamp(min=k_min)
    k = torch.minimum((k + round_to - 1) // round_to * round_to, s)
    k = torch.where(custom, k, k.clamp(max=kmax)).clamp(min=1)
    req_dst[:bs].copy_(req_src)
    seq_dst[:bs].copy_(s)
    off_dst[:bs].copy_(torch.cumsum(s, 0) - s)
    topk_dst[:bs].copy_(k)


def gather_rows(t: torch.Tensor, tok_off: torch.Tensor, width: int) -> torch.Tensor:
    """[B, Hkv, width] view (a copy) of a token-indexed buffer ``t`` [Hkv, tokens, ...]: request
    b's run from ``tok_off[b]``; entries past the buffer's end repeat its last one (callers mask
    by length). For tests and inspection, not for the step."""
    idx = (tok_off.long()[:, None] + torch.arange(width, device=t.device)[None, :])
    idx = idx.clamp(max=t.shape[1] - 1)  # [B, width]
    return t[:, idx].transpose(0, 1)


@dataclass
class StepLayout:
    """Per-row scratch of a step of ``batch`` requests: views of DecodeBuffers' flat storage,
    with the score chunk and split counts chosen for that batch size (a CUDA graph captured for
    it keeps them; eager steps get them per step)."""

    chunk: int  # keys per scoring program
    chunks: int  # scoring programs per row: ceil(lmax / chunk)
    splits: int  # split-K factor of the sparse attention
    part_m: torch.Tensor  # [B, Hkv, G, chunks] running max per score chunk
    part_l: torch.Tensor  # [B, Hkv, G, chunks] running sum per score chunk
    dense_o: torch.Tensor  # [B, Hq, chunks, D] fp32 layer-0 split partials
    dense_lse: torch.Tensor  # [B, Hq, chunks] fp32, log2 units
    attn_o: torch.Tensor  # [B, Hq, splits, D] fp32 split partials
    attn_lse: torch.Tensor  # [B, Hq, splits] fp32, log2 units


@dataclass
class DecodeBuffers:
    """Static device buffers of decode steps for a capacity (batch, lmax, kmax, tokens)."""

    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    lmax: int  # longest context served (keys, the new one included)
    kmax: int  # largest Top-k served
    device: torch.device
    tokens: int = 0  # summed context of a batch (token-indexed buffers; 0: batch * lmax)
    num_sms: int = 0  # the device's (sm_count) for the split and chunk rules; 0: ask the device
    # Token-indexed: request b's entries of KV head h at [h, tok_off[b] + i], i < seq_lens[b].
    logits: torch.Tensor = field(init=False)  # [Hkv, tokens, G] fp32, log2 units (G-minor:
    # the anchor's attention reads a selected key's G logits from one 32-byte sector)
    pooled: torch.Tensor = field(init=False)  # [Hkv, tokens] fp32 pooled probabilities
    sel_pos: torch.Tensor = field(init=False)  # [Hkv, tokens] int32 positions, i < topk[b]
    sel_slot: torch.Tensor = field(init=False)  # [Hkv, tokens] int32 pool slots, i < topk[b]
    # Per request row:
    topk_hist: torch.Tensor = field(init=False)  # [4, B*Hkv, 256] int32 radix-select scratch
    topk_ctr: torch.Tensor = field(init=False)  # [B*Hkv, 2] int32 compaction counters
    attn_ctr: torch.Tensor = field(init=False)  # [B*Hkv] int32 splits arrived; 0 between launches
    # Flat storage of the StepLayout views (sized for the worst batch size up to ``batch``):
    scratch: dict = field(init=False)  # name -> 1-D fp32 tensor
    _layouts: dict = field(init=False, repr=False)  # batch size -> StepLayout

    def __post_init__(self):
        b, hkv, g, dev = self.batch, self.kv_heads, self.q_heads // self.kv_heads, self.device
        if self.kmax > self.lmax:
            raise ValueError(f"kmax {self.kmax} > lmax {self.lmax}")
        if not self.tokens:
            self.tokens = b * self.lmax
        if not self.num_sms:
            self.num_sms = sm_count(dev)
        f32 = dict(dtype=torch.float32, device=dev)
        t = self.tokens
        self.logits = torch.empty(hkv, t, g, **f32)
        self.pooled = torch.empty(hkv, t, **f32)
        self.sel_pos = torch.empty(hkv, t, dtype=torch.int32, device=dev)
        self.sel_slot = torch.empty(hkv, t, dtype=torch.int32, device=dev)
        self.topk_hist = torch.empty(4, b * hkv, 256, dtype=torch.int32, device=dev)
        self.topk_ctr = torch.empty(b * hkv, 2, dtype=torch.int32, device=dev)
        self.attn_ctr = torch.zeros(b * hkv, dtype=torch.int32, device=dev)
        chunk_rows = max(n * self._chunks(n)[1] for n in range(1, b + 1))
        split_rows = max(n * num_splits(n, hkv, self.kmax, self.num_sms) for n in range(1, b + 1))
        hq, d = self.q_heads, self.head_dim
        sizes = dict(part_m=chunk_rows * hkv * g, part_l=chunk_rows * hkv * g,
                     dense_o=chunk_rows * hq * d, dense_lse=chunk_rows * hq,
                     attn_o=split_rows * hq * d, attn_lse=split_rows * hq)
        self.scratch = {name: torch.empty(n, **f32) for name, n in sizes.items()}
        self._layouts = {}

    def _chunks(self, batch: int) -> tuple:
        chunk = score_chunk(batch, self.kv_heads, self.lmax, self.num_sms)
        return chunk, -(-self.lmax // chunk)

    def step(self, batch: int) -> StepLayout:
        """The scratch views of a step of ``batch`` rows (1 <= batch <= self.batch)."""
        if not 1 <= batch <= self.batch:
            raise ValueError(f"a step of {batch} rows; the buffers hold 1..{self.batch}")
        lay = self._layouts.get(batch)
        if lay is None:
            hkv, hq, d = self.kv_heads, self.q_heads, self.head_dim
            g = hq // hkv
            chunk, chunks = self._chunks(batch)
            splits = num_splits(batch, hkv, self.kmax, self.num_sms)
            sc = self.scratch

            def view(name, *shape):
                n = 1
                for x in shape:
                    n *= x
                return sc[name][:n].view(*shape)

            lay = self._layouts[batch] = StepLayout(
                chunk=chunk, chunks=chunks, splits=splits,
                part_m=view("part_m", batch, hkv, g, chunks),
                part_l=view("part_l", batch, hkv, g, chunks),
                dense_o=view("dense_o", batch, hq, chunks, d),
                dense_lse=view("dense_lse", batch, hq, chunks),
                attn_o=view("attn_o", batch, hq, splits, d),
                attn_lse=view("attn_lse", batch, hq, splits))
        return lay

    def scan(self, batch: int, lscan: int | None) -> tuple:
        """(keys scanned, score chunks launched) by a step of ``batch`` rows: ``lscan`` (a host
        bound on the longest row; None: the capacity) clamped to [kmax, lmax]."""
        lscan = self.lmax if lscan is None else max(min(lscan, self.lmax), self.kmax)
        st = self.step(batch)
        return lscan, min(st.chunks, -(-lscan // st.chunk))

    def nbytes(self) -> int:
        """Device bytes held by the buffers (logged for the CUDA-graph capacity)."""
        tensors = [t for t in vars(self).values() if isinstance(t, torch.Tensor)]
        tensors += list(self.scratch.values())
        return sum(t.numel() * t.element_size() for t in tensors)
