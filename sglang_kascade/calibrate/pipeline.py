"""Statistics -> similarity / importance -> DP for each anchor count -> head map -> profile."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from ..config import BudgetConfig
from ..kernels.selection_torch import DEFAULT_BLOCK_BYTES
from ..profile import AnchorProfile, ModelFingerprint, profile_from_dict
from .dp import AnchorChoice, choose_all, layer_weights
from .headmap import head_map, rank_local_similarity
from .stats import StatsCollector, collecting, run_sample


@dataclass
class CalibrationResult:
    fingerprint: ModelFingerprint
    budget: BudgetConfig
    sim: torch.Tensor  # [n, n, Hkv, Hkv] (l1, l2, h2, h1)
    importance: torch.Tensor  # [n]
    topk_recall: torch.Tensor  # [n]
    choices: dict  # {K: AnchorChoice}
    chosen: AnchorChoice
    head_map: list
    sizes: dict = field(default_factory=dict)
    tp_sizes: tuple = (1,)  # the head map is rank-local at each (sglang_kascade/tp.py)

    @property
    def max_score(self) -> float:
        return float(self.importance.sum())


def collect_statistics(model, fp: ModelFingerprint, windows, budget: BudgetConfig,
                       device="cpu", block_bytes: int = DEFAULT_BLOCK_BYTES,
                       progress: Optional[Callable] = None,
                       score_last_tiles: Optional[int] = None,
                       score_tile_size: Optional[int] = None) -> StatsCollector:
    """Run every window through the model; ``progress(sample_index, layer)`` after each layer."""
    collector = StatsCollector(fp.num_layers, fp.num_q_heads, fp.num_kv_heads, budget,
                               device=device, block_bytes=block_bytes,
                               score_last_tiles=score_last_tiles,
                               score_tile_size=score_tile_size)
    with collecting(model, collector):
        for s, ids in enumerate(windows):
            if progress is not None:
                collector.on_layer_done = lambda layer, s=s: progress(s, layer)
            run_sample(model, collector, ids)
    return collector


def pick_count(choices: dict, choose: Union[int, str], max_score: float,
               tolerance: float) -> int:
    """``choose`` an int K, or 'auto': the smallest K whose normalised score is within
    ``tolerance`` of the best normalised score among the counts tried."""
    if choose != "auto":
        return int(choose)
    norm = {k: c.score / max_score if max_score > 0 else 1.0 for k, c in choices.items()}
    top = max(norm.values())
    return min(k for k, v in norm.items() if v >= top - tolerance)


def analyse(collector: StatsCollector, fp: ModelFingerprint, budget: BudgetConfig, counts,
            choose: Union[int, str] = 5, tolerance: float = 0.01,
            tp_sizes=(1,)) -> CalibrationResult:
    """``tp_sizes``: TP sizes the head map must be rank-local at; the anchors are chosen with
    that constraint too (layer weights from the rank-local similarity). ``sim`` in the result
    stays unconstrained (calibrate.tp_fit can fit it to other sizes later)."""
    sim = collector.similarity()
    imp = collector.importance()
    tp_sizes = tuple(sorted(set(tp_sizes) | {1}))
    local = rank_local_similarity(sim, tp_sizes)
    W = layer_weights(local, imp)
    counts = set(counts) | ({int(choose)} if choose != "auto" else set())
    if choose != "auto" and not 1 <= int(choose) <= fp.num_layers:
        raise ValueError(f"--choose {choose}: the model has {fp.num_layers} layers")
    choices = choose_all(W, counts)
    if not choices:
        raise ValueError(f"no anchor count in {sorted(counts)} fits {fp.num_layers} layers")
    k = pick_count(choices, choose, float(imp.sum()), tolerance)
    chosen = choices[k]
    rows = head_map(local, chosen.anchors, dense_layers=(0,))
    return CalibrationResult(
        fingerprint=fp, budget=budget, sim=sim, importance=imp,
        topk_recall=collector.topk_recall(), choices=choices, chosen=chosen, head_map=rows,
        sizes={"num_samples": collector.sim.num_samples,
               "tiles": collector.num_tiles, "sparse_tiles": collector.num_sparse_tiles},
        tp_sizes=tp_sizes,
    )


def build_profile(result: CalibrationResult, name: Optional[str],
                  provenance: dict) -> AnchorProfile:
    """The calibrated profile, validated like any loaded one."""
    b = result.budget
    max_score = result.max_score
    prov = dict(provenance)
    prov["dp"] = {
        str(k): {"anchors": list(c.anchors), "score": round(c.score, 6),
                 "normalized_score": round(c.score / max_score, 6) if max_score > 0 else None}
        for k, c in sorted(result.choices.items())
    }
    prov["chosen_num_anchors"] = result.chosen.num_anchors
    prov["max_score"] = round(max_score, 6)
    prov["importance"] = [round(float(x), 6) for x in result.importance]
    prov["topk_recall"] = [round(float(x), 6) for x in result.topk_recall]
    prov.setdefault("sizes", {}).update(result.sizes)
    profile = AnchorProfile(
        name=name,
        model=result.fingerprint,
        dense_layers=(0,),
        anchor_layers=tuple(result.chosen.anchors),
        head_map=tuple(tuple(row) for row in result.head_map),
        budget=b,
        provenance=prov,
        tp_sizes=result.tp_sizes,
    )
    return profile_from_dict(profile.to_json())  # the same validation as any loaded profile
