"""Selection policies (``--kascade-policy``): one record each.

A policy is what changes between the method and its baselines at an equal budget: a profile
transformation (e.g. every layer an anchor), the selection function an anchor layer calls on the
PyTorch path, what an anchor and a reuse layer attend of that selection, and whether the batched
Triton path (device_path.py) serves it. Everything else
(tiles, budgets ``BudgetConfig.k_for``, paging, the causal diagonal, the attention kernel, dense
delegation) is shared, so policies are compared on the same code. The names (and their order) are
``config.POLICIES``, the option's allowed values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .config import POLICIES
from .kernels.quest_torch import select_quest
from .kernels.rerank_torch import rerank_selection
from .kernels.selection_torch import Selection, select_topk
from .kernels.streaming_torch import select_streaming
from .profile import AnchorProfile


def identity_head_map(profile: AnchorProfile) -> AnchorProfile:
    """Same anchors; every reuse KV head reads the same-numbered anchor head."""
    ident = tuple(range(profile.model.num_kv_heads))
    return dataclasses.replace(profile, head_map=(ident,) * profile.num_layers)


def every_layer_selects(profile: AnchorProfile) -> AnchorProfile:
    """Every layer is an anchor (identity head map): no layer reuses another's selection."""
    return dataclasses.replace(identity_head_map(profile),
                               anchor_layers=tuple(range(profile.num_layers)))


def _unchanged(profile: AnchorProfile) -> AnchorProfile:
    return profile


# Selection of an anchor layer on the PyTorch path: (q [n, Hq, D], k_all [S, Hkv, D], tiles,
# scale, budget, policy config) -> Selection, at the budget k of each tile; it covers
# tiles.selected() (the tiles before an extend's dense tail, whose queries attend densely).
# The Top-k policies also take select_topk's offline ``mass`` / ``mass_floor`` (the probe's).
# kascade_rerank's anchors keep ceil(rerank * k) candidates per tile, highest first.
def _topk(q, k_all, tiles, scale, budget, policy, mass=1.0, mass_floor=0):
    return select_topk(q[:tiles.tail_q_lo], k_all, tiles.selected(), scale, budget.granularity,
                       budget.page_tile_size, pool_all_heads=policy.name == "kascade_pooled",
                       mass=mass, mass_floor=mass_floor,
                       widen=policy.rerank if policy.name == "kascade_rerank" else 1.0)


def _quest(q, k_all, tiles, scale, budget, policy):  # pages of page_tile_size keys
    return select_quest(q[:tiles.tail_q_lo], k_all, tiles.selected(), scale,
                        budget.page_tile_size)


def _streaming(q, k_all, tiles, scale, budget, policy):
    return select_streaming(tiles.selected(), k_all.shape[1], policy.sink_tokens)


# What a selecting layer attends of its own selection: (selection, tiles) -> Selection.
def _all_of(sel: Selection, tiles) -> Selection:
    return sel


def _its_top_k(sel: Selection, tiles) -> Selection:  # the wide selection's first k slots
    return sel.narrow(tiles.selected().tile_k)


# What a reuse layer attends: (the selection mapped to its heads, q [n, Hq, D], keys
# [S, Hkv, D] or the pool with slots, tiles, scale, slots) -> Selection.
def _as_read(sel: Selection, q, k_all, tiles, scale, slots=None) -> Selection:
    return sel


def _reranked(sel: Selection, q, k_all, tiles, scale, slots=None) -> Selection:
    return rerank_selection(q[:tiles.tail_q_lo], k_all, tiles, sel, scale, slots=slots)


@dataclass(frozen=True)
class Policy:
    name: str
    transform: Callable[[AnchorProfile], AnchorProfile]  # idempotent; dense layers kept
    select: Callable  # an anchor layer's selection on the PyTorch path
    on_device: bool  # the Triton path serves it (token granularity, per-KV-head pooled Top-k)
    # a KV head's selection depends on that head's queries and keys only, so TP ranks, each
    # holding some of the heads, select as TP 1 does (tp.py)
    per_kv_head: bool = True
    attend: Callable = _all_of  # what a selecting layer attends of its selection
    reuse: Callable = _as_read  # what a reuse layer attends of the selection it reads


POLICY_TABLE = {p.name: p for p in (
    Policy("kascade", _unchanged, _topk, on_device=True),
    Policy("kascade_identity", identity_head_map, _topk, on_device=True),
    Policy("kascade_pooled", _unchanged, _topk, on_device=False,
           per_kv_head=False),  # pooled over all heads
    # anchors keep rerank * k candidates, reuse layers attend their own k of them
    Policy("kascade_rerank", _unchanged, _topk, on_device=False, attend=_its_top_k,
           reuse=_reranked),
    Policy("oracle", every_layer_selects, _topk, on_device=True),  # exact Top-k in every layer
    Policy("quest", every_layer_selects, _quest, on_device=False),  # own pages in every layer
    Policy("streaming", every_layer_selects, _streaming, on_device=False),  # sinks + window
)}
assert tuple(POLICY_TABLE) == POLICIES
DEVICE_POLICIES = tuple(name for name, p in POLICY_TABLE.items() if p.on_device)


def budget_problem(policy, budget) -> str | None:
    """Why ``policy`` (a PolicyConfig) cannot select at ``budget``, or None: kascade_rerank
    re-ranks single keys, so it needs token granularity. Asked at start-up and before a hot swap
    (backend.serve_problem)."""
    if policy.name == "kascade_rerank" and budget.granularity != "token":
        return (f"policy kascade_rerank re-ranks single keys: granularity must be 'token', "
                f"not {budget.granularity!r}")
    return None


def apply_policy(profile: AnchorProfile, policy: str) -> AnchorProfile:
    """The profile a policy runs with."""
    return POLICY_TABLE[policy].transform(profile)
