"""Plot bench/results/e2e_h100.json (bench/e2e_bench.sh runs): decode latency per token and
TTFT per context, per backend variant.

Usage: python bench/plot_e2e.py bench/results/e2e_h100.json bench/results/e2e_h100.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "flashinfer": ("FlashInfer (decode graphs)", "k", "o-"),
    "flashinfer-nograph": ("FlashInfer, graphs off", "0.5", "o--"),
    "kascade": ("Kascade, stock command (decode graphs, SGLang's default capture)", "tab:purple",
                "*-"),
    "kascade-nograph": ("Kascade, graphs off", "tab:orange", "s--"),
    "kascade-bs1": ("Kascade, stock command with --cuda-graph-max-bs-decode 1", "tab:cyan", "v-"),
    "kascade-graph": ("Kascade, decode graphs for batch 1 only", "tab:blue", "s-"),
    "kascade-graph-dp": ("Kascade, graphs for batch 1, dense prefill", "tab:green", "^-"),
    "kascade-graph-sp": ("Kascade, graphs for batch 1, sparse prefill at every length",
                         "tab:red", "D-"),
}


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    by = {}
    for r in data["runs"]:
        if r.get("superseded"):  # measured code that no longer exists (kept in the JSON)
            continue
        # latest run of a (variant, context) wins (flashinfer was measured in both sessions)
        by.setdefault(r["run_name"], {})[r["input_len"]] = r
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, pts in by.items():
        label, color, fmt = STYLE.get(name, (name, None, "x-"))
        xs = sorted(pts)
        a.plot(xs, [pts[x]["median_decode_latency"] * 1e3 for x in xs], fmt, color=color,
               label=label)
        b.plot(xs, [pts[x]["prefill_latency"] for x in xs], fmt, color=color, label=label)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    a.set_ylabel("decode latency per token (ms, median)")
    a.set_ylim(bottom=0)
    b.set_ylabel("TTFT = prefill latency (s)")
    b.set_yscale("log")
    a.legend(fontsize=8)
    fig.suptitle("Llama-3.1-8B (random weights), batch 1, H100, bench_one_batch")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
