"""A captured decode graph's plan, computed inside the graph: one tiny Triton program.

Reference: ``decode_plan.graph_rows_torch``. SGLang's graph runner copies each step's
``req_pool_indices`` and ``seq_lens`` into its static buffers before a replay; this kernel, captured
at the head of the graph (the backend's ``init_forward_metadata_in_graph``), reads them there and
writes the kernels' static plan: the rows (copied), ``tok_off`` (exclusive cumsum of the lengths:
the token-indexed buffers' row starts) and ``topk`` (the budget's ``k_for`` per row, clamped to
the captured Top-k capacity). The budget is device data (``budget_f``: the fraction and
``BudgetConfig.k_for``'s slack ``config.K_FOR_SLACK``, float64, so that ``ceil`` rounds exactly as
the host's Python floats do; ``budget_i``: k_min and round_to), updated in place by a hot swap.
A row may carry its request's own fraction (``row_frac``, float64, 0: the server's; written by the
host before a replay): its ``k_for`` uses it instead, clamped to the row's length only (the
token-indexed buffers hold ``seq_lens[b]`` selected entries per row), not to the capacity.
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
                       budget_i, row_frac, bs, kmax, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < bs
    s = tl.load(seq_src + i, mask=ok, other=0).to(tl.int64)
    r = tl.load(req_src + i, mask=ok, other=0).to(tl.int64)
    off = tl.cumsum(s, 0) - s
    own = tl.load(row_frac + i, mask=ok, other=0.0)  # a request's own fraction, or 0
    custom = own > 0
    frac = tl.where(custom, own, tl.load(budget_f))
    slack = tl.load(budget_f + 1)
    k_min = tl.load(budget_i)
    round_to = tl.load(budget_i + 1)
    k = tl.ceil(frac * s.to(tl.float64) - slack).to(tl.int64)  # BudgetConfig.k_for
    k = tl.maximum(k, k_min)
    k = (k + round_to - 1) // round_to * round_to
    k = tl.minimum(k, s)
    k = tl.where(custom, k, tl.minimum(k, kmax))  # the server's: within the captured capacity
    k = tl.maximum(k, 1)  # >= 1 (padded rows)
    tl.store(req_dst + i, r, mask=ok)
    tl.store(seq_dst + i, s.to(tl.int32), mask=ok)
    tl.store(off_dst + i, off, mask=ok)
    tl.store(topk_dst + i, k.to(tl.int32), mask=ok)


def graph_rows(req_src: torch.Tensor,  # [bs] int (SGLang's static req_pool_indices)
               seq_src: torch.Tensor,  # [bs] int (SGLang's static seq_lens)
               req_dst: torch.Tensor,  # [>= bs] int64 out
               seq_dst: torch.Tensor,  # [>= bs] int32 out
               off_dst: torch.Tensor,  # [>= bs] int64 out: exclusive cumsum of seq_src
               topk_dst: torch.Tensor,  # [>= bs] int32 out: k_for(seq) (module docstring)
               budget_f: torch.Tensor,  # [2] float64: fraction, slack
               budget_i: torch.Tensor,  # [2] int64: k_min, round_to
               kmax: int,
               row_frac: torch.Tensor | None = None,  # [>= bs] float64: each row's own
               # fraction, 0: budget_f's; None: budget_f's for all (allocates: not in a capture)
               ) -> None:
    bs = seq_src.shape[0]
    if row_frac is None:
        row_frac = torch.zeros(max(1, bs), dtype=torch.float64, device=seq_src.device)
    _graph_plan_kernel[(1,)](req_src, seq_src, req_dst, seq_dst, off_dst, topk_dst, budget_f,
                             budget_i, row_frac, bs, kmax,
                             BLOCK=max(16, triton.next_power_of_2(bs)),
                             num_warps=1)
