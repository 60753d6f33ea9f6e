"""Plot bench/results/e2e_h100.json (bench/e2e_bench.sh runs): decode latency per token and TTFT
per context, one bar per backend variant; where the runs carry the host probe's kernel breakdown
(KASCADE_HOST_PROBE_KERNELS, bench/host_probe.py), a third panel splits the decode graph's GPU
busy time per replay into attention and the rest of the model.

Usage: python bench/plot_e2e.py bench/results/e2e_h100.json bench/results/e2e_h100.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {  # variant: (legend label, colour)
    "flashinfer": ("FlashInfer (decode graphs)", "0.55"),
    "flashinfer-nograph": ("FlashInfer, graphs off", "0.8"),
    "kascade": ("Kascade, stock command", "tab:blue"),
    "kascade-nocollect": ("Kascade, five-launch Top-k", "tab:cyan"),
    "kascade-bs1": ("Kascade, --cuda-graph-max-bs-decode 1", "tab:purple"),
}


def is_attention(name: str) -> bool:
    """A kernel of the attention step: the plugin's Triton kernels (named ``_..._kernel``) or
    FlashInfer's paged attention and its merge of partial states."""
    return name.startswith("_") or "flashinfer::Batch" in name or "MergeStates" in name


def attention_split(run: dict):
    """(attention us, rest us) of the graph's GPU busy time per replay, or None without kernels."""
    k = run.get("host_probe", {}).get("kernels")
    if not k:
        return None
    attn = sum(v["us"] for n, v in k["per_kernel"].items() if is_attention(n))
    return attn, k["busy_us"] - attn


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    by = {}  # variant -> context -> run (the last run of a pair wins)
    for r in data["runs"]:
        by.setdefault(r["run_name"], {})[r["input_len"]] = r
    names = list(by)
    contexts = sorted({c for pts in by.values() for c in pts})
    splits = {n: {c: attention_split(r) for c, r in pts.items()} for n, pts in by.items()}
    has_split = any(s for pts in splits.values() for s in pts.values())
    fig, axes = plt.subplots(1, 3 if has_split else 2, figsize=(14 if has_split else 10, 4.5))
    width = 0.8 / len(names)
    for ax, key, scale, unit in ((axes[0], "median_decode_latency", 1e3,
                                  "decode latency per token (ms, median)"),
                                 (axes[1], "prefill_latency", 1.0, "TTFT = prefill latency (s)")):
        for i, n in enumerate(names):
            label, color = STYLE.get(n, (n, None))
            xs = [j + (i - (len(names) - 1) / 2) * width for j, c in enumerate(contexts)
                  if c in by[n]]
            ys = [by[n][c][key] * scale for c in contexts if c in by[n]]
            ax.bar(xs, ys, width, label=label, color=color)
            for x, y in zip(xs, ys):
                ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(contexts)))
        ax.set_xticklabels([f"{c:,} tokens" for c in contexts])
        ax.set_ylabel(unit)
        ax.set_ylim(0, 1.3 * max(by[n][c][key] * scale for n in names for c in by[n]))
        ax.legend(fontsize=8, loc="upper left")
    if has_split:
        ax = axes[2]
        bars = [(n, c, splits[n][c]) for c in contexts for n in names if splits[n].get(c)]
        xs = range(len(bars))
        attn = [s[0] / 1e3 for _, _, s in bars]
        rest = [s[1] / 1e3 for _, _, s in bars]
        ax.bar(xs, attn, 0.6, label="attention kernels", color="tab:red")
        ax.bar(xs, rest, 0.6, bottom=attn, label="rest of the model (GEMMs, norms, rope)",
               color="0.7")
        for x, a, b in zip(xs, attn, rest):
            ax.text(x, a / 2, f"{a:.2f}", ha="center", va="center", fontsize=8)
            ax.text(x, a + b, f"{a + b:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{n}\n{c:,}" for n, c, _ in bars], fontsize=8)
        ax.set_ylabel("decode graph GPU busy time per replay (ms)")
        ax.set_ylim(0, 1.3 * max(a + b for a, b in zip(attn, rest)))
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Llama-3.1-8B (random weights), batch 1, bench_one_batch: "
                 f"{data['device'].split(' (')[0]}, {data.get('date', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
