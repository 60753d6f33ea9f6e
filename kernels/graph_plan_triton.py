"""A captured decode graph's plan, computed inside the graph: one tiny Triton program.

Reference: ``decode_plan.graph_rows_torch``. SGLang's graph runner copies each step's
``req_pool_indices`` and ``seq_lens`` into its static buffers before a replay; this kernel, captured
at the head of the graph (the backend's ``init_forward_metadata_in_graph``), reads them there and
writes the kernels' static plan: the rows (copied), ``tok_off`` (exclusive cumsum of the lengths:
the token-indexed buffers' row starts) and ``topk`` (the budget's ``k_for`` per row, clamped to
the captured Top-k capacity). The budget is device data (``budget_f``: the fraction and
``BudgetConfig.k_for``'s slack ``config.K_FOR_SLACK``, float64, so that ``ceil`` rounds exactly as
the host's Python floats do; ``budget_i``: k_min and round_to), updated in place by a hot swap.
Replays then do no host planning (measured before: ~0.2 ms of host time per step, four copies of
lists into the graph's tensors; docs/results/e2e-h100.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# bs and kmax are not specialized on (value 1, divisibility by 16): one variant per BLOCK, i.e.
# per power of two of the captured batch sizes.
@triton.jit(do_not_specialize=["bs", "kmax"])
def _graph_plan_kernel(req_src, seq_src, req_dst, seq_dst, off_dst, topk_dst, budget_f,
                       budget_i, bs, kmax, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < bs
    s = tl.load(seq_src + i, mask=ok, other=0).to(tl.int64)
    r = tl.load(req_src + i, mask=ok, other=0).to(tl.int64)
    off = tl.cumsum(s, 0) - s
    frac = tl.load(budget_f)
    slack = tl.load(budget_f + 1)
    k_min = tl.load(budget_i)
    round_to = tl.load(budget_i + 1)
    k = tl.ceil(frac * s.to(tl.float64) - slack).to(tl.int64)  # BudgetConfig.k_for
    k = tl.maximum(k, k_min)
    k = (k + round_to - 1) // round_to * round_to
    k = tl.minimum(k, s)
    k = tl.maximum(tl.minimum(k, kmax), 1)  # within the captured buffers; >= 1 (padded rows)
    tl.store(req_dst + i, r, mask=ok)
    tl.store(seq_dst + i, s.to(tl.int32), mask=ok)
    tl.store(off_dst + i, off, mask=ok)
    tl.store(topk_dst + i, k.to(tl.int32), mask=ok)


def graph_rows(req_src: torch.Tensor,  # [bs] int (SGLang's static req_pool_indices)
               seq_src: torch.Tensor,  # [bs] int (SGLang's static seq_lens)
               req_dst: torch.Tensor,  # [>= bs] int64 out
               seq_dst: torch.Tensor,  # [>= bs] int32 out
               off_dst: torch.Tensor,  # [>= bs] int64 out: exclusive cumsum of seq_src
               topk_dst: torch.Tensor,  # [>= bs] int32 out: clamp(k_for(seq), 1, kmax)
               budget_f: torch.Tensor,  # [2] float64: fraction, slack
               budget_i: torch.Tensor,  # [2] int64: k_min, round_to
               kmax: int) -> None:
    bs = seq_src.shape[0]
    _graph_plan_kernel[(1,)](req_src, seq_src, req_dst, seq_dst, off_dst, topk_dst, budget_f,
                             budget_i, bs, kmax, BLOCK=max(16, triton.next_power_of_2(bs)),
                             num_warps=1)
