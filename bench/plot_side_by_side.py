"""Side-by-side comparisons of runs on one host as bar charts.

  prefill  per-layer prefill time at one context from bench/prefill_kernels.py JSONs (one bar per
           file, e.g. the first launch settings vs tuned): the 32 layers' time split into
           layer 0's dense attention, the 5 selections' log-sum-exp pass, their pooled pass +
           Top-k, and the 31 sparse attentions; FlashInfer dense (32 layers) beside them.
  step     a decode step of bench_one_batch from an e2e JSON whose runs carry ``host_probe``
           (bench/host_probe.py): host work before the graph launch, the graph's GPU time and
           the rest of the measured step (sampling, host after the launch), one bar per run.
  served   bench/e2e_served.py's JSON (the served sweep): per cell (concurrency x context),
           kascade beside the baseline for TTFT p50, ITL p50 and output tokens/s, the speedup
           annotated; cold server and warm (two rows of panels).
  decode   per-layer decode from bench/decode_kernels.py JSONs at one batch size, the longest
           context (one bar per file, labelled by its name after the names' common start): the
           32 layers' time split into layer 0, the 4 anchors' scoring, pooling, Top-k and
           attention (the anchor's time less the three stages), and the 27 reuse layers;
           FlashInfer dense (32 layers) beside them.

Usage: python bench/plot_side_by_side.py prefill OUT.png A.json B.json ...
       python bench/plot_side_by_side.py step OUT.png E2E.json
       python bench/plot_side_by_side.py served OUT.png SERVED.json
       python bench/plot_side_by_side.py decode OUT.png BATCH A.json B.json ...
"""

from __future__ import annotations

import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402


def stacked(dst, labels, parts, colors, ylabel, title):
    """One PNG of stacked bars; parts: [(name, [value per bar])] bottom to top."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bottom = [0.0] * len(labels)
    for (name, vals), color in zip(parts, colors):
        ax.bar(labels, vals, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, total in enumerate(bottom):
        ax.text(i, total, f"{total:.0f}" if total > 100 else f"{total:.2f}", ha="center",
                va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def prefill(dst: str, srcs: list) -> None:
    labels, dense_layer0, lse, pool_topk, sparse, dense32 = [], [], [], [], [], []
    for src in srcs:
        d = json.load(open(src))
        (r,) = d["rows"]
        ms = r["ms"]
        launch = d["meta"].get("select_launch")
        labels.append("default launch of its commit" if not launch else "--select-launch given")
        dense_layer0.append(ms["dense_flashinfer"])
        lse.append(5 * ms["select_lse_stage"])
        pool_topk.append(5 * (ms["anchor_select"] - ms["select_lse_stage"]))
        sparse.append(31 * ms["reuse"])
        dense32.append(32 * ms["dense_flashinfer"])
    stacked(dst, labels + ["FlashInfer dense"],
            [("layer 0 dense (FlashInfer)", dense_layer0 + [0]),
             ("5 selections: log-sum-exp pass", lse + [0]),
             ("5 selections: pooled pass + Top-k", pool_topk + [0]),
             ("31 sparse attentions", sparse + [0]),
             ("32 dense layers", [0] * len(labels) + [dense32[0]])],
            ["0.3", "tab:orange", "tab:red", "tab:blue", "k"],
            "ms for the 32 layers of one prompt",
            f"Prefill attention, {r['context']} tokens, Llama-3.1-8B shapes, bf16, "
            f"{d['meta']['device']}")


def decode(dst: str, batch: str, srcs: list) -> None:
    labels, parts = [], {k: [] for k in ("layer0", "score", "pool", "topk", "attn", "reuse")}
    for src in srcs:
        d = json.load(open(src))
        rows = [r for r in d["rows"] if r["batch"] == int(batch)]
        if not rows:
            sys.exit(f"{src}: no row at batch {batch}")
        r = rows[-1]  # the longest context (rows run from the shortest)
        ms, n_anchor = r["ms"], d["meta"]["layers"]["anchors"]
        n_reuse = d["meta"]["layers"]["total"] - n_anchor - 1
        labels.append(src.rsplit("/", 1)[-1].removesuffix(".json"))
        parts["layer0"].append(ms["layer0"])
        for key in ("score", "pool", "topk"):
            parts[key].append(n_anchor * ms[f"stage_{key}"])
        parts["attn"].append(n_anchor * (ms["anchor"] - ms["stage_score"] - ms["stage_pool"]
                                         - ms["stage_topk"]))
        parts["reuse"].append(n_reuse * ms["reuse"])
    if len(labels) > 1:  # the names' common start said once, in the title
        cut = len(os.path.commonprefix(labels))
        labels = [name[cut:] or name for name in labels]
    n_layers = d["meta"]["layers"]["total"]
    dense = n_layers * ms["dense"]
    names = {"layer0": "layer 0 (dense + selection)", "score": f"{n_anchor} anchors: scoring",
             "pool": f"{n_anchor} anchors: pooling", "topk": f"{n_anchor} anchors: Top-k",
             "attn": f"{n_anchor} anchors: attention", "reuse": f"{n_reuse} reuse layers"}
    stacked(dst, labels + ["FlashInfer dense"],
            [(names[k], v + [0]) for k, v in parts.items()]
            + [(f"{n_layers} dense layers", [0] * len(labels) + [dense])],
            ["0.3", "tab:orange", "gold", "tab:red", "tab:purple", "tab:blue", "k"],
            f"ms for the {n_layers} layers of one decode step",
            f"Decode attention, batch {batch}, {r['context']} tokens, Llama-3.1-8B shapes, "
            f"{d['meta']['device']}")


def step(dst: str, src: str) -> None:
    d = json.load(open(src))
    labels, host, gpu, rest = [], [], [], []
    for i, r in enumerate(d["runs"]):
        p = r["host_probe"]
        total = 1e3 * r["median_decode_latency"]
        labels.append(f"{r['run_name']}\n#{i // 2 + 1}")
        host.append(p["host_prep_ms"])
        gpu.append(p["graph_gpu_ms"])
        rest.append(total - p["host_prep_ms"] - p["graph_gpu_ms"])
    stacked(dst, labels, [("host before the graph launch", host), ("graph on the GPU", gpu),
                          ("rest of the step", rest)], ["tab:orange", "tab:blue", "0.6"],
            "ms per decode step (medians)",
            f"Decode step at {d['runs'][0]['input_len']} tokens, batch 1: "
            f"{d['device'].split(' (')[0]}")


# The served sweep's headline metrics: (title, stats key, percentile or None, unit, lower is better)
SERVED_METRICS = [("TTFT p50", "ttft_s", "p50", "s", True),
                  ("ITL p50", "itl_ms", "p50", "ms", True),
                  ("output tokens/s", "output_tokens_per_s", None, "tokens/s", False)]


def minor_label(v: float, _pos) -> str:
    """Log-axis minor ticks: only 2 and 5 of each decade are labelled (all nine crowd)."""
    if v <= 0:
        return ""
    lead = round(v / 10 ** math.floor(math.log10(v)))
    return f"{v:g}" if lead in (2, 5) else ""


def served_backends(d: dict) -> tuple:
    """(kascade, baseline): kascade if it ran, else the first backend; the baseline is the first
    other one (None for a single-backend run)."""
    names = d["meta"]["backends"]
    k = "kascade" if "kascade" in names else names[0]
    others = [b for b in names if b != k]
    return k, (others[0] if others else None)


def served_rows(d: dict, backend: str, label: str) -> dict:
    """{cell: row} for one backend and pass label; for "warm", the last warm pass that ran."""
    out = {}
    for r in d["rows"]:
        if r["backend"] != backend or r["pass_label"] != label:
            continue
        prev = out.get(r["cell"])
        if prev is None or (r["status"] != "skipped"
                            and (prev["status"] == "skipped"
                                 or r["pass_index"] > prev["pass_index"])):
            out[r["cell"]] = r
    return out


def served_value(row, key: str, q):
    """A row's figure, or None where the cell did not run (skipped, no requests answered)."""
    if row is None or "stats" not in row:
        return None
    v = row["stats"][key]
    return v.get(q) if q else v


def served_speedup(k, b, lower_better: bool):
    """Above 1: kascade better (baseline / kascade for times, kascade / baseline for rates)."""
    if k is None or b is None or k <= 0 or b <= 0:
        return None
    return b / k if lower_better else k / b


def served(dst: str, src: str) -> None:
    """bench/e2e_served.py's JSON: per cell, kascade beside the baseline for TTFT p50, ITL p50
    and output tokens/s (log scale: cells span orders of magnitude), the speedup above each
    pair; one row of panels for the cold server, one for the warm."""
    d = json.load(open(src))
    meta, (kas, base) = d["meta"], served_backends(d)
    backends = [b for b in (kas, base) if b]
    cells = meta["cells"]
    fig, axes = plt.subplots(2, len(SERVED_METRICS), figsize=(4.6 * len(SERVED_METRICS), 7.5),
                             squeeze=False)
    width = 0.8 / len(backends)
    colors = {kas: "tab:blue", base: "0.55"}
    for row_axes, label in zip(axes, ("cold", "warm")):
        rows = {b: served_rows(d, b, label) for b in backends}
        for ax, (title, key, q, unit, lower) in zip(row_axes, SERVED_METRICS):
            vals = {b: [served_value(rows[b].get(c), key, q) for c in cells] for b in backends}
            for i, b in enumerate(backends):
                xs = [n + (i - (len(backends) - 1) / 2) * width for n in range(len(cells))]
                ax.bar([x for x, v in zip(xs, vals[b]) if v], [v for v in vals[b] if v], width,
                       label=b, color=colors[b])
            ax.set_yscale("log")
            present_all = [v for b in backends for v in vals[b] if v] or [1.0]
            top = max(present_all)
            ax.set_ylim(min(present_all) / 2, top * 4)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(minor_label))
            for n in range(len(cells)):
                ratio = served_speedup(vals[kas][n], vals[base][n], lower) if base else None
                present = [vals[b][n] for b in backends if vals[b][n]]
                text = (f"{ratio:.2f}x" if ratio else "") if present else "not run"
                ax.text(n, max(present) * 1.25 if present else top, text, ha="center",
                        va="bottom", fontsize=8, weight="bold" if ratio else "normal")
            ax.set_xticks(range(len(cells)))
            ax.set_xticklabels(cells, fontsize=8)
            ax.set_title(f"{label}: {title}", fontsize=9)
            ax.set_ylabel(unit)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Served sweep, {meta['device_name']}, {meta['model'].split('/')[-1]}, "
                 f"{meta['new_tokens']} new tokens per request (xN: N); "
                 f"cells: concurrency x context; "
                 f"above the bars: kascade's speedup over {base} (>1: kascade better)\n"
                 f"{meta['date']}, commit {meta['commit'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    what, out, *files = sys.argv[1:]
    {"prefill": lambda: prefill(out, files), "step": lambda: step(out, files[0]),
     "served": lambda: served(out, files[0]),
     "decode": lambda: decode(out, files[0], files[1:])}[what]()
