"""Plot bench/results/prefill_kernels_h100.json (bench/prefill_kernels.py): per-layer prefill time
of FlashInfer dense and of Kascade's layer kinds, and the per-layer-average speedup, per context.

Usage: python bench/plot_prefill.py bench/results/prefill_kernels_h100.json OUT.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [("dense_flashinfer", "FlashInfer dense", "k", "o-"),
          ("anchor_select", "Kascade anchor selection", "tab:orange", "s--"),
          ("reuse", "Kascade reuse layer", "tab:blue", "s-"),
          ("layer_avg", "Kascade per-layer average (1 dense + 4 anchors + 27 reuse)",
           "tab:red", "D-")]


def main(src: str, dst: str) -> None:
    rows = json.load(open(src))["rows"]
    xs = [r["context"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, color, fmt in SERIES:
        a.plot(xs, [r["ms"][key] for r in rows], fmt, color=color, label=label)
    b.plot(xs, [r["layer_avg_speedup"] for r in rows], "D-", color="tab:red",
           label="per-layer average")
    b.plot(xs, [r["speedup"] for r in rows], "s-", color="tab:blue", label="reuse layer")
    b.axhline(2.5, color="0.5", ls=":", label="target 2.5x at 128K")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a.set_yscale("log")
    a.set_ylabel("time per layer (ms, median)")
    b.set_ylabel("speedup over FlashInfer dense")
    b.set_ylim(bottom=0)
    fig.suptitle("Prefill attention per layer, Llama-3.1-8B shapes, bf16, batch 1, H100")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
