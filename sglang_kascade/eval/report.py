"""``python -m sglang_kascade.eval.report``: results JSON -> markdown page and PNG plot.

    python -m sglang_kascade.eval.report --in docs/results/accuracy.json \\
        --out docs/results/accuracy.md            # also writes docs/results/accuracy.png

The page has the average score per policy and budget (per task, averaged over context lengths,
and over all cells), each row paired sample by sample with the dense baseline where the
results hold per-sample outcomes, the average per context length, every (task, length) cell,
the plot of the average score against the budget (one line per policy; non-sparse baselines
such as dense as horizontal lines), and the commands that produced the numbers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import shlex
import sys
from pathlib import Path

from . import results as results_io
from .tasks import DESCRIPTIONS, TASKS


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def _budget(b):
    return "-" if b is None else f"{b:g}"


class Table:
    """Scores indexed by label, with the label's policy and budget."""

    def __init__(self, rows):
        self.rows = results_io.sort_rows(rows)
        self.labels = []
        self.meta = {}
        for r in self.rows:
            if r["label"] not in self.meta:
                self.labels.append(r["label"])
                self.meta[r["label"]] = (r.get("policy"), r.get("budget"))
        present = {r["task"] for r in self.rows}
        self.tasks = [t for t in TASKS if t in present] + sorted(present - set(TASKS))
        self.lengths = sorted({r["context_length"] for r in self.rows})
        self.cell = {(r["label"], r["task"], r["context_length"]): r for r in self.rows}

    def score(self, label, task=None, length=None):
        return _mean(r["score"] for (lab, t, n), r in self.cell.items()
                     if lab == label and (task is None or t == task)
                     and (length is None or n == length))

    def task_score(self, label, task):
        """Mean over lengths of the task's cells."""
        return self.score(label, task=task)

    def average(self, label):
        """Mean over tasks of the per-task means (each task weighs the same)."""
        return _mean(s for s in (self.task_score(label, t) for t in self.tasks) if s is not None)

    def complete(self, label) -> bool:
        return all((label, t, n) in self.cell for t in self.tasks for n in self.lengths)

    def samples(self):
        return sorted({r.get("n") for r in self.rows if r.get("n") is not None})


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test on the discordant pairs (McNemar's exact test): the chance of
    a split at least this uneven if either side were equally likely to win each pair."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(tab: Table, base: str, label: str) -> dict | None:
    """Sample-by-sample comparison of ``label`` with ``base`` over the cells both hold with
    per-sample outcomes of the same prompts (same model, seed, sample count, prompt format)."""
    both = wins = losses = neither = cells = 0
    for (lab, t, n), r in tab.cell.items():
        b = tab.cell.get((base, t, n))
        if lab != label or b is None or "outcomes" not in r or "outcomes" not in b:
            continue
        same = ("model", "seed", "prompt_format")
        if [r.get(k) for k in same] + [len(r["outcomes"])] != (
                [b.get(k) for k in same] + [len(b["outcomes"])]):
            continue
        cells += 1
        for x, y in zip(r["outcomes"], b["outcomes"]):
            x, y = x >= 1, y >= 1
            both += x and y
            neither += not x and not y
            wins += x and not y
            losses += y and not x
    if not cells:
        return None
    n = both + wins + losses + neither
    lo, hi = difference_interval(wins, losses, n)
    return dict(cells=cells, samples=n, both=both, neither=neither, wins=wins, losses=losses,
                p=sign_test_p(wins, losses), diff=(wins - losses) / n, lo=lo, hi=hi)


def difference_interval(wins: int, losses: int, n: int, z: float = 1.96) -> tuple:
    """95% interval of the paired difference in the share answered, (wins - losses) / n: the
    normal approximation for paired proportions (the sample variance of the per-sample
    differences, each +1, -1 or 0). With every cell the same size this is the difference of
    the rows' averages; its lower end above -0.02 says "not 2 points below" at 97.5%."""
    d = (wins - losses) / n
    var = max(0.0, (wins + losses) / n - d * d) / n
    return d - z * math.sqrt(var), d + z * math.sqrt(var)


def paired_section(tab: Table) -> list:
    bases = [lab for lab in tab.labels if tab.meta[lab][0] == "dense"]
    if not bases:
        return []
    base = bases[0]
    lines = []
    for lab in tab.labels:
        if lab == base:
            continue
        c = paired(tab, base, lab)
        if c:
            lines.append(f"| {lab} | {c['cells']} | {c['samples']} | {c['both']} | "
                         f"{c['neither']} | {c['wins']} | {c['losses']} | {c['p']:.3f} | "
                         f"{100 * c['diff']:+.1f} ({100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}) |")
    if not lines:
        return []
    return [f"## Paired against {base}", "",
            f"The same prompts, sample by sample (cells where both rows hold per-sample outcomes "
            f"with the same model, seed, sample count and prompt format). *Only this row* / *only "
            f"{base}*: samples one answered exactly and the other did not; *p*: two-sided exact "
            "sign test on those (a small p says the difference is unlikely to be chance); "
            "*difference*: (only this row - only "
            f"{base}) / samples in points, with its 95% interval (normal approximation for "
            "paired proportions; a lower end above -2 says the row is not 2 points below "
            f"{base} at 97.5%).", "",
            f"| label | cells | samples | both right | both wrong | only this row | only {base} "
            "| p | difference (95%) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *lines, ""]


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def spent_section(tab: Table) -> list:
    """The budget each kascade row actually spent (eval.sweep's ``spent``: keys the sparse
    layers read over the keys they could have read, over all of the row's requests)."""
    lines = []
    for lab in tab.labels:
        spent = next((r["spent"] for r in tab.rows if r["label"] == lab and r.get("spent")),
                     None)
        if spent:
            lines.append(f"| {lab} | {_budget(tab.meta[lab][1])} | {_pct(spent.get('extend'))} "
                         f"| {_pct(spent.get('decode'))} | {_pct(spent.get('all'))} |")
    if not lines:
        return []
    return ["## Budget actually spent", "",
            "Keys the sparse layers read over the keys they could have read (the causal "
            "diagonal left out), summed over every query of the row's requests, from the "
            "server's own counters (`kascade_keys_read_total` / `kascade_keys_candidate_total`). "
            "It exceeds the nominal budget wherever `--kascade-k-min` rules (short contexts and "
            "the early tiles of every prompt) or a prefill runs dense.", "",
            "| label | nominal | prefill | decode | all |", "|---|---:|---:|---:|---:|"] + \
        lines + [""]


def markdown(data: dict, source: str, plot_name: str | None, command: str,
             title: str | None = None, note: str | None = None) -> str:
    tab = Table(data.get("rows", []))
    out = [f"# {title or 'Long-context accuracy through the SGLang server'}", ""]
    if note:
        out += [note, ""]
    out.append(f"Rendered by `{command}` from `{source}` "
               f"({_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}). Suite and scoring: "
               "[docs/evaluation.md](../evaluation.md).")
    out.append("")
    models = sorted({str(r.get("model")) for r in tab.rows if r.get("model")})
    seeds = sorted({r.get("seed") for r in tab.rows if r.get("seed") is not None}, key=str)
    out.append(f"Model: {', '.join(models) or '-'}. Samples per (task, length) cell: "
               f"{', '.join(map(str, tab.samples())) or '-'}. Seed: "
               f"{', '.join(map(str, seeds)) or '-'}. Score: fraction of samples answered "
               "exactly (0-1); *average* = mean over tasks of the per-task mean over lengths.")
    out.append("")
    if not tab.rows:
        out.append("No results.")
        return "\n".join(out) + "\n"

    out += ["## Average score by policy and budget", ""]
    head = ["policy", "budget", "label"] + tab.tasks + ["average"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(tab.tasks) + 1)) + "|")
    for lab in tab.labels:
        pol, bud = tab.meta[lab]
        cells = [_fmt(tab.task_score(lab, t)) for t in tab.tasks]
        avg = f"**{_fmt(tab.average(lab), 3)}**" + ("" if tab.complete(lab) else " \\*")
        out.append(f"| {pol} | {_budget(bud)} | {lab} | " + " | ".join(cells) + f" | {avg} |")
    if not all(tab.complete(lab) for lab in tab.labels):
        out += ["", "\\* some (task, length) cells are missing for this label; its averages "
                "are over the cells present."]
    out.append("")
    if plot_name:
        out += [f"![average score against budget]({plot_name})", ""]

    out += spent_section(tab)
    out += paired_section(tab)

    out += ["## Average over tasks, by context length", ""]
    out.append("| label | " + " | ".join(str(n) for n in tab.lengths) + " |")
    out.append("|---|" + "|".join(["---:"] * len(tab.lengths)) + "|")
    for lab in tab.labels:
        per = []
        for n in tab.lengths:
            s = _mean(x for x in (tab.score(lab, t, n) for t in tab.tasks) if x is not None)
            per.append(_fmt(s))
        out.append(f"| {lab} | " + " | ".join(per) + " |")
    out.append("")

    out += ["## Every cell", "", "Score (n samples) per task and context length (tokens).", ""]
    out.append("| task | label | " + " | ".join(str(n) for n in tab.lengths) + " |")
    out.append("|---|---|" + "|".join(["---:"] * len(tab.lengths)) + "|")
    for t in tab.tasks:
        for lab in tab.labels:
            cells = []
            for n in tab.lengths:
                r = tab.cell.get((lab, t, n))
                cells.append("-" if r is None else f"{r['score']:.2f} ({r.get('n', '?')})")
            out.append(f"| {t} | {lab} | " + " | ".join(cells) + " |")
    out.append("")

    out += ["## Tasks", ""]
    for t in tab.tasks:
        out.append(f"- `{t}`: {DESCRIPTIONS.get(t, '')}")
    out.append("")

    out += ["## Commands that produced these numbers", ""]
    sweep = data.get("sweep")
    if sweep and sweep.get("command"):
        out += [f"Sweep ({sweep.get('date', '')}):", "", "```", sweep["command"], "```", ""]
    runs = [r for r in data.get("runs", []) if r.get("label") in tab.meta]
    if runs:
        out.append("| label | date | requests | time (s) | eval command | server launch command |")
        out.append("|---|---|---:|---:|---|---|")
        for r in runs:
            out.append(f"| {r.get('label')} | {r.get('date', '')} | {r.get('requests', '')} | "
                       f"{r.get('elapsed_s', '')} | `{r.get('command', '')}` | "
                       f"`{_short_launch(r.get('server_launch_command'))}` |")
        out.append("")
    return "\n".join(out) + "\n"


def _short_launch(cmd) -> str:
    """SGLang records the launcher's arguments only: show them as a command line."""
    if not cmd:
        return "-"
    if cmd.lstrip().startswith("-"):
        cmd = "python -m sglang.launch_server " + cmd.strip()
    return cmd.replace("|", "\\|")


def plot(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tab = Table(data.get("rows", []))
    by_policy: dict = {}
    flat = []
    for lab in tab.labels:
        pol, bud = tab.meta[lab]
        avg = tab.average(lab)
        if avg is None:
            continue
        if pol == "dense" or bud is None:
            flat.append((lab, avg))
        else:
            by_policy.setdefault(pol, []).append((bud, avg, lab))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    budgets = sorted({b for pts in by_policy.values() for b, _a, _l in pts})
    for pol, pts in sorted(by_policy.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol)
    styles = ["--", ":", "-."]
    for i, (lab, avg) in enumerate(flat):
        ax.axhline(avg, linestyle=styles[i % len(styles)], color="gray" if i == 0 else None,
                   label=lab)
    if budgets:
        ax.set_xticks(budgets)
        ax.set_xticklabels([f"{b:g}" for b in budgets])
        pad = max(0.01, (budgets[-1] - budgets[0]) * 0.05)
        ax.set_xlim(budgets[0] - pad, budgets[-1] + pad)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("Top-k budget (fraction of visible keys)")
    ax.set_ylabel("average exact-match score")
    ax.set_title(f"Long-context accuracy ({len(tab.tasks)} tasks, "
                 f"{', '.join(str(n) for n in tab.lengths)} tokens)", fontsize=9)
    ax.grid(True, alpha=0.3)
    if by_policy or flat:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m sglang_kascade.eval.report",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--in", dest="inp", type=Path, action="append", required=True,
                   help="results JSON; given again, files of other seeds pooled cell by cell "
                        "(results.pool)")
    p.add_argument("--out", type=Path, required=True, help="markdown page to write")
    p.add_argument("--title", default=None, help="page title")
    p.add_argument("--note-file", type=Path, default=None,
                   help="markdown file whose text goes under the title")
    p.add_argument("--only", default=None,
                   help="comma list of labels: render these rows only (default: every row)")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG to write (default: --out with .png); 'none' for no plot")
    args = p.parse_args(argv)
    missing = [str(p) for p in args.inp if not p.exists()]
    if missing:
        print(f"error: {', '.join(missing)} does not exist", file=sys.stderr)
        return 2
    try:
        data = (results_io.load(args.inp[0]) if len(args.inp) == 1
                else results_io.pool([results_io.load(p) for p in args.inp]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.only:
        keep = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = sorted(set(keep) - {r["label"] for r in data["rows"]})
        if unknown:
            print(f"error: --only: no rows labelled {unknown}", file=sys.stderr)
            return 2
        data = dict(data, rows=[r for r in data["rows"] if r["label"] in keep],
                    runs=[r for r in data["runs"] if r.get("label") in keep])
    plot_path = None
    if args.plot is None or str(args.plot).lower() != "none":
        plot_path = args.plot or args.out.with_suffix(".png")
        plot(data, plot_path)
    try:
        plot_rel = plot_path and str(Path(plot_path).resolve().relative_to(
            args.out.resolve().parent))
    except ValueError:
        plot_rel = str(Path(plot_path).resolve()) if plot_path else None
    command = "python -m sglang_kascade.eval.report " + shlex.join(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(data, " + ".join(map(str, args.inp)), plot_rel, command,
                                 args.title,
                                 args.note_file.read_text().strip() if args.note_file else None))
    print(f"wrote {args.out}" + (f" and {plot_path}" if plot_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
