"""PNG comparing servers (e.g. kascade vs a dense backend) per user class; soak timeline."""

from __future__ import annotations

from pathlib import Path

GROUPS = ("chat", "agent", "rag", "all")

# (title, getter(class summary) -> value, optional getter for the whisker top)
PANELS = (
    ("TTFT (ms), p50 bar, p90 whisker",
     lambda s: s["ttft_ms"]["p50"], lambda s: s["ttft_ms"]["p90"]),
    ("inter-token latency (ms), p50 bar, p90 whisker",
     lambda s: s["itl_ms"]["p50"], lambda s: s["itl_ms"]["p90"]),
    ("decode tokens/s per request (mean)", lambda s: s["decode_tokens_per_s"]["mean"], None),
    ("output tokens/s (all requests)", lambda s: s["output_tokens_per_s"], None),
    ("failed requests / requests", lambda s: s["failures"], None),
    ("radix-cache hit rate (cached / prompt tokens)", lambda s: s["cache_hit_rate"], None),
)


def _group(run: dict, group: str):
    return run["all"] if group == "all" else run["classes"].get(group)


def compare_png(runs: dict, path, title: str = "") -> Path:
    """``runs``: {label: summary from loadtest.summary.summarize (+ 'server' metrics)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(runs)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    width = 0.8 / max(1, len(labels))
    for ax, (name, get, get_hi) in zip(axes.flat, PANELS):
        for j, label in enumerate(labels):
            xs, ys, his = [], [], []
            for i, g in enumerate(GROUPS):
                s = _group(runs[label], g)
                v = get(s) if s else None
                if v is None:
                    continue
                xs.append(i + (j - (len(labels) - 1) / 2) * width)
                ys.append(v)
                his.append(max(0.0, (get_hi(s) or v) - v) if get_hi else 0.0)
            bars = ax.bar(xs, ys, width, label=label,
                          yerr=[[0] * len(his), his] if get_hi else None, capsize=3)
            if name.startswith("failed"):
                totals = [(_group(runs[label], g) or {}).get("requests") for g in GROUPS]
                for b, t in zip(bars, [t for t in totals if t is not None]):
                    ax.annotate(f"{int(b.get_height())}/{t}", (b.get_x() + b.get_width() / 2,
                                b.get_height()), ha="center", va="bottom", fontsize=7)
            if name.startswith("radix"):
                server = runs[label].get("server", {}).get("cache_hit_rate")
                if server is not None:
                    ax.axhline(server, color=bars.patches[0].get_facecolor() if bars.patches
                               else None, ls="--", lw=1)
        ax.set_xticks(range(len(GROUPS)), GROUPS)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if name.startswith("failed"):
            ax.set_ylim(bottom=0, top=max(1, ax.get_ylim()[1]))
        if name.startswith("radix"):
            ax.set_ylim(0, 1.05)
            ax.text(0.01, 0.97, "dashed: server-wide (/metrics)", transform=ax.transAxes,
                    fontsize=7, va="top")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title or "load test: " + " vs ".join(labels))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def timeline_png(bins: list, swaps: list, path, title: str = "") -> Path:
    """Soak timeline: TTFT/ITL p50 and output tokens/s per bin, failures, swap markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(13, 8), sharex=True)
    t = [b["t_s"] for b in bins]
    a1.plot(t, [b["ttft_p50_ms"] for b in bins], marker=".", label="TTFT p50")
    a1.plot(t, [b["itl_p50_ms"] for b in bins], marker=".", label="ITL p50")
    a1.set_ylabel("ms")
    a1.set_yscale("log")
    a1.legend(fontsize=8)
    a2.plot(t, [b["output_tokens_per_s"] for b in bins], marker=".", color="tab:green")
    a2.set_ylabel("output tokens/s\n(all users)")
    a3.bar(t, [b["requests"] for b in bins], width=(t[1] - t[0]) * 0.8 if len(t) > 1 else 5,
           align="edge", label="requests", color="tab:gray")
    a3.bar(t, [b["failures"] for b in bins], width=(t[1] - t[0]) * 0.8 if len(t) > 1 else 5,
           align="edge", label="failed", color="tab:red")
    a3.set_ylabel("requests / bin")
    a3.set_xlabel("seconds since start (latency, requests: by request start; tokens/s: by arrival)")
    a3.legend(fontsize=8)
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
        for s in swaps:
            ax.axvline(s["t_s"], color="tab:purple" if s.get("ok") else "tab:red",
                       lw=0.8, alpha=0.6)
    if swaps:
        a1.text(0.01, 0.97, "vertical lines: profile swaps", transform=a1.transAxes,
                fontsize=7, va="top")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
