"""Plot bench/decode_kernels.py's JSON: per-layer time of dense vs Kascade (and its layer kinds).

Usage: python bench/plot_decode.py results.json out.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    batches = sorted({r["batch"] for r in data["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rows = sorted((r for r in data["rows"] if r["batch"] == b), key=lambda r: r["context"])
        x = [r["context"] // 1024 for r in rows]
        for key, label, style in (("dense", "FlashInfer dense", "k-o"),
                                  ("anchor", "Kascade anchor", "C1-s"),
                                  ("reuse", "Kascade reuse", "C2-^"),
                                  ("kascade_avg", "Kascade per-layer average", "C0-o")):
            ax.plot(x, [r["ms"][key] * 1e3 for r in rows], style, label=label)
        for xi, r in zip(x, rows):
            ax.annotate(f"{r['speedup']:.2f}x", (xi, r["ms"]["kascade_avg"] * 1e3),
                        textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{v}K" for v in x])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("time per layer (us)")
        ax.set_title(f"decode, batch {b} ({data['meta']['device']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
