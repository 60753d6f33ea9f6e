"""python -m sglang_kascade.calibrate.tp_fit PROFILE --tp N [N ...] --out FITTED.json
[--stats STATS.pt]

Makes a profile's head map rank-local for tensor parallelism (sglang_kascade/tp.py) without a
new calibration: every head-map entry that reads an anchor KV head on another rank at one of the
TP sizes is replaced by the same-rank anchor head of the highest calibration similarity (the
``--stats-out`` file of the calibration that made the profile), or, without it, by the reuse
head's own anchor head (the identity). The anchors, the budget and the rank-local entries are
kept; ``tp_sizes`` gains the sizes. With ``--stats``, prints the attention-level cost: the mean
fraction of a reuse head's own Top-k mass its selection recovers, before and after
(``headmap.map_similarity``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..config import KascadeConfigError
from ..profile import load_profile, profile_from_dict
from ..tp import fit_head_map, tp_size_problem
from .cli import format_json
from .headmap import anchor_of, map_similarity


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_kascade.calibrate.tp_fit",
                                description=__doc__.split("\n\n")[1])
    p.add_argument("profile", help="profile JSON path or shipped profile name")
    p.add_argument("--tp", type=int, nargs="+", required=True, metavar="N",
                   help="TP sizes the head map must be rank-local at")
    p.add_argument("--out", type=Path, required=True, help="fitted profile JSON to write")
    p.add_argument("--stats", type=Path, default=None,
                   help="the calibration's --stats-out file (similarity; else the identity)")
    p.add_argument("--name", default=None, help="profile name (default: NAME-tpN)")
    return p


def fit_profile(profile, tp_sizes, sim=None):
    """(fitted profile, moved entries, similarity before, after); the similarities are None
    without ``sim`` [n, n, H2, H1]."""
    h = profile.model.num_kv_heads
    for n in tp_sizes:
        why = tp_size_problem(h, n)
        if why:
            raise KascadeConfigError(f"--tp {n}: {why}")
    anchors = profile.anchor_layers
    score = None
    if sim is not None:
        n = profile.num_layers
        if tuple(sim.shape) != (n, n, h, h):
            raise KascadeConfigError(f"--stats: similarity of shape {tuple(sim.shape)}, the "
                                     f"profile's model needs {(n, n, h, h)}")
        score = lambda j, h2, h1: float(sim[anchor_of(j, anchors), j, h2, h1])  # noqa: E731
    sizes = tuple(sorted(set(profile.tp_sizes) | set(tp_sizes)))
    rows, moved = fit_head_map(profile.head_map, h, sizes, score)
    fitted = dataclasses.replace(profile, head_map=rows, tp_sizes=sizes)
    before = after = None
    if sim is not None:
        before = map_similarity(sim, anchors, profile.head_map, profile.dense_layers)
        after = map_similarity(sim, anchors, rows, profile.dense_layers)
    return profile_from_dict(fitted.to_json()), moved, before, after


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        profile = load_profile(args.profile)
        sim = None
        if args.stats is not None:
            import torch

            sim = torch.load(args.stats, map_location="cpu")["sim"]
        fitted, moved, before, after = fit_profile(profile, args.tp, sim)
    except (KascadeConfigError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.name or f"{profile.name or args.out.stem}-tp{max(args.tp)}"
    prov = dict(fitted.provenance)
    prov["tp_fit"] = {"from": profile.name, "tp_sizes": list(fitted.tp_sizes),
                      "moved_entries": moved,
                      "rule": "same-rank anchor head of the highest similarity" if sim is not None
                      else "the identity (no similarity given)",
                      "similarity_before": before, "similarity_after": after}
    fitted = dataclasses.replace(fitted, name=name, provenance=prov)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(format_json(fitted.to_json()) + "\n", encoding="utf-8")
    cost = "" if before is None else f"; mean reuse-head similarity {before:.4f} -> {after:.4f}"
    print(f"{name}: {moved} head-map entries moved to their rank for TP "
          f"{list(fitted.tp_sizes)}{cost}; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
