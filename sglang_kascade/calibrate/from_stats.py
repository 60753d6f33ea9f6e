"""``python -m sglang_kascade.calibrate.from_stats``: a profile from saved calibration statistics.

Re-derives anchors and head map from the ``--stats-out`` file of a calibration run (``sim``,
``W``) without running the model again: ``--anchors K`` runs the anchor DP for K anchors,
``--anchors A,B,..`` keeps those anchors (layer 0 added) and only computes their head map. The
budget, fingerprint and name come from ``--base`` (a profile of the same model), so profiles that
differ only in anchors or head map (e.g. statistics scored on every tile, on the question tiles
or per query) can be compared.

    python -m sglang_kascade.calibrate.from_stats --stats S.pt --base profiles/x.json \\
        --anchors 8 --out /tmp/x-k8.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from ..profile import AnchorProfile, load_profile, profile_from_dict
from .dp import choose_anchors
from .headmap import head_map


def derive(stats: dict, base: AnchorProfile, anchors: str, source: str) -> AnchorProfile:
    """``base`` with the anchors ``anchors`` (a count for the DP, or a comma list) and their head
    map from ``stats['sim']``."""
    if "," in anchors or anchors == "0":
        chosen = tuple(sorted({0, *(int(x) for x in anchors.split(","))}))
    else:
        chosen = tuple(choose_anchors(stats["W"], int(anchors)).anchors)
    rows = head_map(stats["sim"], chosen, dense_layers=(0,))
    prov = {"tool": "sglang_kascade.calibrate.from_stats", "stats": source, "anchors": anchors,
            "base": base.name, "stats_command": stats.get("command")}
    profile = dataclasses.replace(base, anchor_layers=chosen,
                                  head_map=tuple(tuple(r) for r in rows), provenance=prov)
    return profile_from_dict(profile.to_json())  # validated like any loaded profile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_kascade.calibrate.from_stats",
                                description=__doc__.splitlines()[0])
    p.add_argument("--stats", required=True, help="a calibration run's --stats-out file")
    p.add_argument("--base", required=True, help="profile giving the model and the budget")
    p.add_argument("--anchors", required=True, help="K (the DP) or A,B,.. (fixed anchors)")
    p.add_argument("--name", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    stats = torch.load(args.stats)
    profile = derive(stats, load_profile(args.base), args.anchors, args.stats)
    if args.name:
        profile = dataclasses.replace(profile, name=args.name)
    with open(args.out, "w") as f:
        json.dump(profile.to_json(), f, indent=1)
    print(f"{args.out}: anchors {list(profile.anchor_layers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
