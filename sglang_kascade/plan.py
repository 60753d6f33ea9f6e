"""Per-forward planning on the host: which queries, keys and tiles belong to each request.

Built once per forward pass in ``init_forward_metadata`` and read by every layer. Holds the
per-request selections of the most recent anchor layer (they live for this forward only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import BudgetConfig
from .kernels.selection_torch import Selection
from .kernels.tiles import RequestTiles, decode_tiles, extend_key_counts, extend_tiles


@dataclass
class RequestPlan:
    q_lo: int  # rows [q_lo, q_hi) of this request in the batch's q tensor
    q_hi: int
    slots: torch.Tensor  # [S] int64 KV-pool slots of positions 0..S-1 (from req_to_token)
    tiles: RequestTiles


@dataclass
class ForwardPlan:
    requests: list
    selections: list = field(default_factory=list)  # [num requests] Selection of the last anchor


def request_k_for(budget: BudgetConfig, fraction: float | None):
    """``visible -> k`` of one request: the server's budget at the request's own fraction
    (``RequestBudget``; None: the server's)."""
    if fraction is None:
        return budget.k_for
    return lambda visible: budget.k_for(visible, fraction)


def request_tiles(budget: BudgetConfig, prefix: int, extend: int, k_for, device):
    """The query tiles of one request's extend under ``budget`` (tile size, tails)."""
    return extend_tiles(prefix, extend, budget.tile_size, k_for, device, budget.dense_tail,
                        budget.query_tail)


def prefill_key_counts(budget: BudgetConfig, prefix_lens, extend_lens, fractions=None,
                       dense: bool = False) -> tuple[int, int]:
    """(keys a sparse layer reads, candidate keys) over every query of one extend forward, as
    its plan lays them out (``extend_key_counts``). ``dense``: a prefill served by the dense
    backend (it reads every candidate). Decode counts come from its rows' budgets directly."""
    read = cand = 0
    fractions = fractions or [None] * len(extend_lens)
    for prefix, extend, frac in zip(prefix_lens, extend_lens, fractions):
        k_for = (lambda v: v) if dense else request_k_for(budget, frac)
        r, c = extend_key_counts(prefix, extend, budget.tile_size, k_for, budget.dense_tail,
                                 budget.query_tail)
        read += r
        cand += c
    return read, cand


def plan_forward(req_to_token, pools, prefix_lens, extend_lens, seq_lens, is_decode: bool,
                 budget: BudgetConfig, fractions=None) -> ForwardPlan:
    """``fractions``: [B] each request's own Top-k fraction or None (the server's); None: the
    server's for all. A request's tiles, selections and attention depend only on its own
    budget, so it is served as it would be alone whatever the batch holds."""
    device = req_to_token.device
    plans, q_lo = [], 0
    fractions = fractions or [None] * len(pools)
    for pool, prefix, extend, seq, frac in zip(pools, prefix_lens, extend_lens, seq_lens,
                                               fractions):
        k_for = request_k_for(budget, frac)
        if is_decode:
            tiles = decode_tiles(seq, k_for, device)
        else:
            tiles = request_tiles(budget, prefix, extend, k_for, device)
        slots = req_to_token[pool, :seq].to(torch.int64)
        plans.append(RequestPlan(q_lo, q_lo + extend, slots, tiles))
        q_lo += extend
    return ForwardPlan(plans, [Selection(dense=True)] * len(plans))
