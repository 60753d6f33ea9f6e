"""Plot decode benchmark JSON: bench/decode_kernels.py's per-layer times (dense vs Kascade and
its layer kinds) or bench/decode_step.py's whole-step times (FlashInfer, Kascade's graph path,
the eager path captured); the file's rows say which.

Usage: python bench/plot_decode.py results.json out.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


LAYER = (("dense", "FlashInfer dense", "k-o"), ("anchor", "Kascade anchor", "C1-s"),
         ("reuse", "Kascade reuse", "C2-^"), ("kascade_avg", "Kascade per-layer average", "C0-o"))
STEP = (("flashinfer", "FlashInfer, every layer", "k-o"),
        ("kascade", "Kascade graph path (as served)", "C0-o"),
        ("kascade_gated", "Kascade graph path, selection gated only (node switch off)", "C1-.s"),
        ("kascade_exact", "Kascade, only anchors select (no hot swap)", "C2--^"))


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    step = "kascade_exact" in data["rows"][0]["ms"]
    series, main_key = (STEP, "kascade") if step else (LAYER, "kascade_avg")
    scale, unit = (1.0, "ms per step (32 layers)") if step else (1e3, "time per layer (us)")
    batches = sorted({r["batch"] for r in data["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rows = sorted((r for r in data["rows"] if r["batch"] == b), key=lambda r: r["context"])
        if step:  # one run per point: the last one measured
            rows = list({r["context"]: r for r in rows}.values())
        x = [r["context"] // 1024 for r in rows]
        for key, label, style in series:
            if key not in rows[0]["ms"]:  # older files: no gated variant
                continue
            ax.plot(x, [r["ms"][key] * scale for r in rows], style, label=label)
        for xi, r in zip(x, rows):
            sp = r["speedup"][main_key] if step else r["speedup"]
            ax.annotate(f"{sp:.2f}x", (xi, r["ms"][main_key] * scale),
                        textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{v}K" for v in x])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(f"decode{' step' if step else ''}, batch {b} ({data['meta']['device']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
