"""Plot a bench/cpu_long_prompt.py result: TTFT and decode time per token by prompt length, one
bar per backend (medians, the repeats as dots).

Usage: python bench/plot_cpu.py bench/results/cpu_long_prompt.json bench/results/cpu_long_prompt.png
"""

from __future__ import annotations

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("ttft_s", "time to first token (s)", 1.0), ("decode_s", "decode (ms per token)", 1e3))


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    results = data["results"]
    backends = list(results)
    lengths = sorted({int(n) for r in results.values() for n in r["lengths"]})
    width = 0.8 / len(backends)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, ylabel, unit) in zip(axes, PANELS):
        for i, b in enumerate(backends):
            rows = results[b]["lengths"]
            xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(lengths))]
            vals = [[v * unit for v in rows[str(n)][key]] for n in lengths]
            ax.bar(xs, [statistics.median(v) for v in vals], width, label=b)
            for x, v in zip(xs, vals):
                ax.plot([x] * len(v), v, "k.", ms=4)
        ax.set_xticks(range(len(lengths)), [f"{n} tokens" for n in lengths])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M-Instruct on the CPU, one request at a time "
                 f"({data['repeats']} repeats, {data['new_tokens']} new tokens)")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
