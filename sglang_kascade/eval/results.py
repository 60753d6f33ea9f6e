"""The results JSON: rows of (label, policy, budget, task, context_length, score, n) and the runs
that produced them. Writing merges: a row replaces an earlier row with the same
(label, task, context_length); runs are appended. ``pool`` reads several files of other prompts
(seeds) as one."""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = "sglang-kascade-eval/1"
ROW_KEY = ("label", "task", "context_length")


def empty() -> dict:
    return {"format": FORMAT, "rows": [], "runs": []}


def load(path) -> dict:
    path = Path(path)
    if not path.exists():
        return empty()
    data = json.loads(path.read_text())
    if isinstance(data, list):  # a bare list of rows
        data = {"format": FORMAT, "rows": data, "runs": []}
    data.setdefault("rows", [])
    data.setdefault("runs", [])
    data.setdefault("format", FORMAT)
    return data


def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ROW_KEY)


def merge(data: dict, rows, run: dict | None = None, extra: dict | None = None) -> dict:
    new = {row_key(r): r for r in rows}
    kept = [r for r in data.get("rows", []) if row_key(r) not in new]
    data["rows"] = sort_rows(kept + list(new.values()))
    if run is not None:
        data.setdefault("runs", []).append(run)
    if extra:
        data.update(extra)
    return data


def pool(datas: list) -> dict:
    """Several results files of the same configurations on other prompts (other seeds) as one.

    The rows of one (label, task, context_length) become one row: outcomes concatenated in the
    order of ``datas``, ``n`` their sum, ``score`` / ``partial`` / ``spent`` shares weighted by
    samples, ``seed`` the seeds joined by "+" (so rows pool-paired with dense must pool the same
    seeds in the same order). Runs are appended. One cell with the same seed twice is refused:
    the same prompts would count twice."""
    groups: dict = {}
    for data in datas:
        for r in data.get("rows", []):
            groups.setdefault(row_key(r), []).append(r)
    rows = []
    for key, group in groups.items():
        seeds = [str(r.get("seed")) for r in group]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"cell {key}: seed {seeds} given twice (the same prompts)")
        if len(group) == 1:
            rows.append(group[0])
            continue
        n = sum(r["n"] for r in group)
        row = dict(group[0], n=n, seed="+".join(seeds))
        for field in ("score", "partial"):
            if all(field in r for r in group):
                row[field] = round(sum(r[field] * r["n"] for r in group) / n, 4)
        if all("outcomes" in r for r in group):
            row["outcomes"] = [x for r in group for x in r["outcomes"]]
        else:
            row.pop("outcomes", None)
        if all(isinstance(r.get("spent"), dict) for r in group):
            parts = set.intersection(*(set(r["spent"]) for r in group))
            row["spent"] = {k: round(sum(r["spent"][k] * r["n"] for r in group) / n, 4)
                            for k in parts if all(isinstance(r["spent"][k], (int, float))
                                                  for r in group)}
        rows.append(row)
    out = empty()
    out["rows"] = sort_rows(rows)
    out["runs"] = [run for data in datas for run in data.get("runs", [])]
    return out


def sort_rows(rows):
    from .tasks import TASKS

    order = {t: i for i, t in enumerate(TASKS)}
    return sorted(rows, key=lambda r: (
        str(r.get("policy")), r.get("budget") if r.get("budget") is not None else 9.0,
        str(r.get("label")), order.get(r.get("task"), 99), str(r.get("task")),
        r.get("context_length") or 0))


def save(data: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def merge_into_file(path, rows, run: dict | None = None, extra: dict | None = None) -> dict:
    data = merge(load(path), rows, run, extra)
    save(data, path)
    return data
