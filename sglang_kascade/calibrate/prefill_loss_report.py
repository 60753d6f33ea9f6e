"""``python -m sglang_kascade.calibrate.prefill_loss_report``: tables and plots of prefill_loss runs.

Reads one or more ``prefill_loss`` JSON files (``.json.gz``: compressed; prompts of every file
pooled, per variant name) and prints a markdown table per variant: the mean over sparse layers
and prompts of the mass kept and the relative output error (body tiles, question tiles, the
prompt's last query, the first tile of an extend after a cached prefix), the share of candidate
keys read, and the first answer token's KL divergence from dense and argmax agreement.
``--plot-layers PNG`` draws mass and error per layer, ``--plot-tiles PNG`` the error per tile
against its position in the prompt, ``--plot-summary PNG`` the errors and the KL divergence per
variant.

    python -m sglang_kascade.calibrate.prefill_loss_report --in a.json --in b.json \\
        [--variants base,oracle] [--plot-layers L.png] [--plot-tiles T.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from .run_file import read_json

GROUPS = ("body", "question", "last", "first")


def load(paths) -> dict:
    """{variant: [per-prompt result with the prompt's task and length]}, in file order."""
    out: dict = {}
    for path in paths:
        data = read_json(path)
        for prompt in data["prompts"]:
            for name, res in prompt["variants"].items():
                out.setdefault(name, []).append({**res, "task": prompt["task"],
                                                 "length": prompt["length"]})
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def layer_means(results: list, key: str, roles=("anchor", "reuse")) -> dict:
    """{layer: mean over prompts of ``key``} for the layers of the given roles."""
    per: dict = {}
    for res in results:
        for row in res["layers"]:
            if row["role"] in roles and key in row:
                per.setdefault(row["layer"], []).append(row[key])
    return {layer: statistics.fmean(v) for layer, v in sorted(per.items())}


def summary(results: list) -> dict:
    """Means over prompts of the per-prompt means over sparse layers."""
    row = {"prompts": len(results)}
    for g in GROUPS:
        for m in ("mass", "err"):
            vals = [_mean([r.get(f"{g}_{m}") for r in res["layers"] if r["role"] != "dense"])
                    for res in results]
            row[f"{g}_{m}"] = _mean(vals)
    # keys read: counted end to end where the run did (``read``; a mass-following selection
    # reads fewer than its budgets' k), else the budgets' share
    row["share"] = _mean([res["budget"].get("read", res["budget"]["share"]) for res in results])
    answers = [res["answer"] for res in results if "answer" in res]
    if answers:
        row["kl_first"] = _mean([a["kl_first"] for a in answers])
        row["agree_first"] = sum(a["agree_first"] for a in answers)
        row["answers"] = len(answers)
    return row


def first_tile_vs_cold(data: dict, name: str, cold: str) -> dict | None:
    """The extend's first tile after a cached prefix (variant ``name``) against the same tile of
    a cold prefill (variant ``cold``, same prompts): mean over prompts of the per-tile relative
    error over sparse layers, and the number of prompts."""
    pairs = []
    for res, ref in zip(data[name], data[cold]):
        if not (res["prefix"] and res["tiles"] and ref["tiles"]) or (
                res["task"], res["length"]) != (ref["task"], ref["length"]):
            continue
        start = res["tiles"]["start"][0]
        j = ref["tiles"]["start"].index(start)
        if res["tiles"]["sparse"][0] and ref["tiles"]["sparse"][j]:
            pairs.append((res["tiles"]["err"][0], ref["tiles"]["err"][j]))
    if not pairs:
        return None
    return {"partial": statistics.fmean(p for p, _ in pairs),
            "cold": statistics.fmean(c for _, c in pairs), "prompts": len(pairs)}


def _f(x, digits=3):
    return "" if x is None else f"{x:.{digits}f}"


def markdown(data: dict, names) -> str:
    head = ("| variant | prompts | keys read | body mass | body err | question mass | question "
            "err | last-query err | first-tile err | KL first token | agrees with dense |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        s = summary(data[name])
        agree = f"{s['agree_first']}/{s['answers']}" if "answers" in s else ""
        lines.append(
            f"| {name} | {s['prompts']} | {_f(s['share'])} | {_f(s['body_mass'])} | "
            f"{_f(s['body_err'])} | {_f(s['question_mass'])} | {_f(s['question_err'])} | "
            f"{_f(s['last_err'])} | {_f(s['first_err'])} | {_f(s.get('kl_first'), 4)} | {agree} |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layers(data: dict, names, path: str, own_of: str | None = None) -> None:
    """Mass kept and relative error per layer (body and question tiles); ``own_of``: also that
    variant's layers' own Top-k mass (its oracle)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    for col, group in enumerate(("body", "question")):
        for row, metric in enumerate(("mass", "err")):
            ax = axes[row, col]
            for name in names:
                means = layer_means(data[name], f"{group}_{metric}")
                ax.plot(list(means), list(means.values()), marker=".", label=name)
            if own_of and metric == "mass":
                means = layer_means(data[own_of], f"{group}_own_mass", roles=("reuse",))
                ax.plot(list(means), list(means.values()), "k+", label=f"{own_of}: own Top-k")
            ax.set_title(f"{group} tiles: {'mass kept' if metric == 'mass' else 'relative error'}")
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("layer")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_tiles(data: dict, names, path: str, length: int | None = None) -> None:
    """Relative error per tile (over sparse layers) against the tile's position in the prompt
    (10 bins of its start / prompt length), prompts of ``length`` tokens (default: all)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name in names:
        bins: dict = {}
        for res in data[name]:
            if length and res["length"] != length:
                continue
            t = res["tiles"]
            for start, err, sparse in zip(t.get("start", []), t.get("err", []),
                                          t.get("sparse", [])):
                if sparse:
                    bins.setdefault(min(9, int(10 * start / res["length"])), []).append(err)
        xs = sorted(bins)
        ax.plot([(x + 0.5) / 10 for x in xs], [statistics.fmean(bins[x]) for x in xs],
                marker="o", label=name)
    ax.set_xlabel("tile start / prompt length")
    ax.set_ylabel("relative error (mean over sparse layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_summary(data: dict, names, path: str) -> None:
    """Per variant: relative error of body and question tiles and of the last query (means over
    sparse layers and prompts), and the first answer token's KL divergence from dense."""
    plt = _pyplot()
    rows = [summary(data[n]) for n in names]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.27
    for i, (key, label) in enumerate((("body_err", "body tiles"), ("question_err", "question "
                                      "tiles"), ("last_err", "last query"))):
        xs = [j + (i - 1) * width for j in range(len(names))]
        ax.bar(xs, [r.get(key) or 0 for r in rows], width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("relative error of the attention output")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax2.bar(range(len(names)), [r.get("kl_first") or 0 for r in rows], color="gray")
    ax2.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax2.set_ylabel("KL(dense || variant), first answer token")
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_kascade.calibrate.prefill_loss_report",
                                description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="inputs", action="append", required=True)
    p.add_argument("--variants", default=None, help="comma list (default: every variant)")
    p.add_argument("--plot-layers", default=None)
    p.add_argument("--plot-tiles", default=None)
    p.add_argument("--plot-summary", default=None)
    p.add_argument("--own-of", default=None, help="variant whose own Top-k mass to draw")
    p.add_argument("--length", type=int, default=None, help="--plot-tiles: this length only")
    p.add_argument("--cold", default=None,
                   help="variant without a cached prefix: compare every prefix variant's partial "
                        "first tile with the same tile of this one")
    args = p.parse_args(argv)
    data = load(args.inputs)
    names = args.variants.split(",") if args.variants else list(data)
    missing = [n for n in names if n not in data]
    if missing:
        raise SystemExit(f"no results for variant(s) {missing}; have {sorted(data)}")
    print(markdown(data, names))
    if args.cold:
        for name in names:
            cmp = first_tile_vs_cold(data, name, args.cold)
            if cmp:
                print(f"\n{name}: partial first tile after the cached prefix, relative error "
                      f"{cmp['partial']:.3f}; the same tile in {args.cold} (cold) "
                      f"{cmp['cold']:.3f} ({cmp['prompts']} prompts)")
    if args.plot_layers:
        plot_layers(data, names, args.plot_layers, args.own_of)
    if args.plot_tiles:
        plot_tiles(data, names, args.plot_tiles, args.length)
    if args.plot_summary:
        plot_summary(data, names, args.plot_summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
