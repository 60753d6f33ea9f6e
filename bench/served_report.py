"""The served sweep's results page: ``python bench/served_report.py RESULT.json PAGE.md``.

From bench/e2e_served.py's JSON it writes PAGE.md and, beside it, PAGE's stem + ``.png``
(bench/plot_side_by_side.py's ``served`` mode), embedded in the page. The page holds the current
figures only: kascade's speedup over the baseline per cell (TTFT p50/p90, ITL p50/p90, output
tokens/s, wall time), cold server and warm; every figure behind them; the servers' start-up
times; the device, versions, commit and date; the exact benchmark and server commands.

Speedup: baseline / kascade for times, kascade / baseline for output tokens/s, so above 1 always
means kascade is better (the issue's targets are written that way).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plot_side_by_side as plots  # noqa: E402

# (column, stats key, percentile or None, lower is better)
RATIO_COLUMNS = [("TTFT p50", "ttft_s", "p50", True), ("TTFT p90", "ttft_s", "p90", True),
                 ("ITL p50", "itl_ms", "p50", True), ("ITL p90", "itl_ms", "p90", True),
                 ("output tokens/s", "output_tokens_per_s", None, False),
                 ("wall", "wall_s", None, True)]


def fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def not_run(row) -> str:
    """Why a cell has no figures: its status (and reason), or that it never ran."""
    if row is None:
        return "not run"
    return row["status"] + (f" ({row['reason']})" if row.get("reason") else "")


def ratio_table(d: dict, kas: str, base: str) -> list:
    lines = ["| cell | pass | " + " | ".join(c[0] for c in RATIO_COLUMNS) + " | status |",
             "|---|---|" + "---|" * len(RATIO_COLUMNS) + "---|"]
    for label in ("cold", "warm"):
        rk, rb = plots.served_rows(d, kas, label), plots.served_rows(d, base, label)
        for cell in d["meta"]["cells"]:
            a, b = rk.get(cell), rb.get(cell)
            ratios = [plots.served_speedup(plots.served_value(a, key, q),
                                           plots.served_value(b, key, q), lower)
                      for _, key, q, lower in RATIO_COLUMNS]
            status = "ok" if all(r and r["status"] == "ok" for r in (a, b)) else (
                f"{kas}: {not_run(a)}; {base}: {not_run(b)}")
            lines.append(f"| {cell} | {label} | "
                         + " | ".join("-" if r is None else f"{r:.2f}x" for r in ratios)
                         + f" | {status} |")
    return lines


def figures_table(d: dict, backends: list) -> list:
    lines = ["| cell | pass | backend | TTFT p50 / p90 / mean (s) | ITL p50 / p90 (ms) | "
             "decode ms/token p50 | output tokens/s | wall (s) | requests ok | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label in ("cold", "warm"):
        rows = {b: plots.served_rows(d, b, label) for b in backends}
        for cell in d["meta"]["cells"]:
            for b in backends:
                r = rows[b].get(cell)
                if r is None or "stats" not in r:
                    lines.append(f"| {cell} | {label} | {b} | - | - | - | - | - | - | "
                                 f"{not_run(r)} |")
                    continue
                s = r["stats"]
                t, i = s["ttft_s"], s["itl_ms"]
                lines.append(
                    f"| {cell} | {label} | {b} | {fmt(t['p50'])} / {fmt(t['p90'])} / "
                    f"{fmt(t['mean'])} | {fmt(i['p50'])} / {fmt(i['p90'])} | "
                    f"{fmt(s['decode_ms_per_token']['p50'])} | "
                    f"{fmt(s['output_tokens_per_s'])} | {fmt(s['wall_s'])} | "
                    f"{s['ok']} of {s['requests']} | {r['status']} |")
    return lines


def startup_lines(meta: dict, backends: list) -> list:
    lines = ["| backend | launch -> /health ready (s) |", "|---|---|"]
    for b in backends:
        info = meta["servers"].get(b, {})
        took = info.get("startup_s")
        lines.append(f"| {b} | {fmt(took, '.1f') if took is not None else 'did not start'} |")
    return lines


def command_lines(meta: dict, backends: list) -> list:
    lines = ["Benchmark:", "", "```", meta["command"], "```", ""]
    for b in backends:
        info = meta["servers"].get(b, {})
        env = " ".join(f"{k}={v}" for k, v in (info.get("env") or {}).items())
        cmd = info.get("command_line", "(the server did not start)")
        lines += [f"Server, {b} (the port is the one it got; the log: `{info.get('log')}`):", "",
                  "```", (env + " " if env else "") + cmd, "```", ""]
    return lines


def page(d: dict, result_path: str, page_path: str, png_name: str, note: str = "") -> str:
    """The results page; ``note``: hand-written analysis (PAGE.note.md beside the page: what the
    figures mean against the targets), placed under the ratio table."""
    meta = d["meta"]
    kas, base = plots.served_backends(d)
    backends = [b for b in (kas, base) if b]
    v = meta["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "sglang", "flashinfer", "triton")
                         if v.get(k))
    lines = [
        f"# Served sweep: {kas} vs {base}, {meta['device_name']}", "",
        f"Generated by `python bench/served_report.py {result_path} {page_path}` from a "
        f"bench/e2e_served.py run of {meta['date']} at commit `{meta['commit']}`.", "",
        f"Device: {meta['device_name']}; {versions}. Model: {meta['model']}. Cells are "
        f"concurrency x context (tokens of random ids, fresh per request: no radix-cache hits) "
        f"[x new tokens]; {meta['new_tokens']} new tokens per request where the cell does not "
        f"say (greedy, ignore_eos), "
        f"{meta['requests_per_client']} request(s) per client; cold = the first pass on a "
        f"freshly started server, warm = the last of {meta['warm_passes']} pass(es) after it.",
        "",
        f"Speedup of {kas} over {base}: {base} / {kas} for times (TTFT, ITL, wall), "
        f"{kas} / {base} for output tokens/s; above 1 means {kas} is better.", "",
        *ratio_table(d, kas, base), "",
        f"![served sweep]({png_name})", "",
        *([note.strip(), ""] if note.strip() else []),
        "## Figures", "",
        "ITL is per token (a streamed chunk of k tokens after a gap g counts as k tokens of "
        "g / k), pooled over the cell's requests; output tokens/s is every completion token "
        "over the cell's wall time (first request sent to last answer).", "",
        *figures_table(d, backends), "",
        "## Server start-up", "",
        *startup_lines(meta, backends), "",
        "## Commands", "",
        *command_lines(meta, backends),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", help="bench/e2e_served.py's JSON")
    ap.add_argument("page", help="the markdown page to write (its PNG goes beside it; "
                                 "PAGE.note.md beside it, if any, goes under the ratio table)")
    args = ap.parse_args(argv)
    d = json.loads(Path(args.result).read_text())
    if plots.served_backends(d)[1] is None:
        ap.error("the result has one backend: a comparison needs two")
    out = Path(args.page)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plots.served(str(png), args.result)
    note_path = out.with_suffix(".note.md")
    note = note_path.read_text() if note_path.exists() else ""
    out.write_text(page(d, args.result, args.page, png.name, note) + "\n")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
