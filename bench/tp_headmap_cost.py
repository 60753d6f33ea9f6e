"""What rank-local head maps (tensor parallelism, sglang_kascade/tp.py) cost in attention terms.

Metric: calibration's similarity, the fraction of a reuse KV head's own Top-k attention mass
that the selection it reads recovers (min over query tiles, mean over samples), averaged over the
reuse layers' heads (``calibrate.headmap.map_similarity``); and the anchor DP's normalised score
(importance-weighted, calibrate/dp.py). Per TP size, four maps over the same statistics:

  free        the unconstrained map (argmax over every anchor head), the profile's anchors
  fit         free's crossing entries moved to the best same-rank head (calibrate.tp_fit)
  identity    every reuse head reads its own anchor head (what a server does without statistics)
  recal       calibration with --tp N: rank-local map and anchors re-chosen under it

Two sources of statistics:
  --stats STATS.pt --profile P   a calibration's --stats-out file and the profile it wrote (the
                                 embedded model: docs/calibration.md's command plus --stats-out)
  --random-llama                 a random-weight Llama of the given head layout, calibrated here
                                 on random token windows (no download)

  python bench/tp_headmap_cost.py --stats smol.pt --profile smollm2-135m-instruct --tp 3
  python bench/tp_headmap_cost.py --random-llama --kv-heads 8 --q-heads 64 --tp 2 4 8
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sglang_kascade.calibrate.dp import choose_anchors, layer_weights, score_of  # noqa: E402
from sglang_kascade.calibrate.headmap import (head_map, map_similarity,  # noqa: E402
                                              rank_local_similarity)
from sglang_kascade.calibrate.tp_fit import fit_profile  # noqa: E402
from sglang_kascade.profile import load_profile  # noqa: E402
from sglang_kascade.tp import fit_head_map  # noqa: E402


def random_llama_stats(args) -> tuple:
    """(sim, importance, anchors) of a random Llama calibrated on random token windows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sglang_kascade.calibrate.model import fingerprint
    from sglang_kascade.calibrate.pipeline import collect_statistics
    from sglang_kascade.config import BudgetConfig

    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.q_heads,
                      num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                      max_position_embeddings=args.context)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).eval()
    rng = random.Random(args.seed)
    windows = [[rng.randrange(1024) for _ in range(args.context)] for _ in range(args.samples)]
    budget = BudgetConfig(topk_fraction=0.1, k_min=16, tile_size=32)
    with torch.no_grad():
        c = collect_statistics(model, fingerprint(cfg), windows, budget)
    sim, imp = c.similarity(), c.importance()
    anchors = choose_anchors(layer_weights(sim, imp), args.anchors).anchors
    return sim, imp, tuple(anchors)


def costs(sim, imp, anchors, free_rows, tp_sizes) -> dict:
    h = sim.shape[-1]
    W = layer_weights(sim, imp)
    max_score = float(imp.sum())
    free_dp = score_of(W, anchors) / max_score
    out = {"free": {"similarity": map_similarity(sim, anchors, free_rows),
                    "dp_normalised": free_dp}}
    score = lambda j, h2, h1: float(sim[max(a for a in anchors if a <= j), j, h2, h1])  # noqa
    for n in tp_sizes:
        fit, moved = fit_head_map(free_rows, h, (n,), score)
        ident, _ = fit_head_map(free_rows, h, (n,))
        local = rank_local_similarity(sim, (n,))
        recal = choose_anchors(layer_weights(local, imp), len(anchors))
        recal_rows = head_map(local, recal.anchors, dense_layers=(0,))
        out[f"tp{n}"] = {
            "moved_entries": moved,
            "fit": map_similarity(sim, anchors, fit),
            "identity": map_similarity(sim, anchors, ident),
            "recal": map_similarity(sim, recal.anchors, recal_rows),
            "recal_anchors": list(recal.anchors),
            "recal_dp_normalised": recal.score / max_score,
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", required=True)
    ap.add_argument("--stats", type=Path, help="a calibration's --stats-out file")
    ap.add_argument("--profile", help="the profile that calibration wrote (anchors, head map)")
    ap.add_argument("--random-llama", action="store_true")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--anchors", type=int, default=5)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.random_llama:
        sim, imp, anchors = random_llama_stats(args)
        free_rows = head_map(sim, anchors, dense_layers=(0,))
        source = {k: getattr(args, k) for k in ("kv_heads", "q_heads", "head_dim", "hidden",
                                                "layers", "anchors", "context", "samples", "seed")}
    else:
        if args.stats is None or args.profile is None:
            ap.error("--stats and --profile, or --random-llama")
        saved = torch.load(args.stats, map_location="cpu")
        sim, imp = saved["sim"], saved["importance"]
        profile = load_profile(args.profile)
        fit_profile(profile, args.tp, sim)  # checks the statistics' shape against the profile
        anchors, free_rows = profile.anchor_layers, profile.head_map
        source = {"stats": str(args.stats), "profile": profile.name}
    result = {"source": source, "anchors": list(anchors),
              "costs": costs(sim, imp, anchors, free_rows, args.tp)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
