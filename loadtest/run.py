"""One bounded, headless load run; optionally against two fresh CPU servers to compare them.

    python -m loadtest.run --url http://127.0.0.1:30000 --users 3 --duration 60 --out OUT
    python -m loadtest.run --compare --users 3 --spawn-rate 1 --duration 120 --out OUT

``--compare`` starts one server at a time (``--backends``, default kascade then torch_native,
the dense CPU backend) with ``--enable-metrics --enable-cache-report``, warms it up, runs the
same locust load against it, and stops it. Written to OUT: ``prompts.json``; per server
``LABEL/locust_stats.csv`` (and locust's other CSVs), ``LABEL/report.html`` (locust's report),
``LABEL/records.jsonl`` (one line per request), ``LABEL/server.log``; ``summary.json`` and
``compare.png``. Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import requests

from .config import parse_mix
from .prompts import build_prompts, save_prompts
from .summary import (load_window, parse_prometheus, read_records, server_cache_hit_rate,
                      summarize)

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
SERVER_FLAGS = ("--enable-metrics", "--enable-cache-report")
DENSE_CPU_BACKEND = "torch_native"


def scrape_metrics(url: str) -> dict:
    try:
        r = requests.get(url.rstrip("/") + "/metrics", timeout=30)
        return parse_prometheus(r.text) if r.status_code == 200 else {}
    except requests.RequestException:
        return {}


def flush_cache(url: str, timeout_s: float = 60.0) -> bool:
    """Empty the radix cache (SGLang answers 400 while requests are in flight: retry)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.post(url.rstrip("/") + "/flush_cache", timeout=60).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def warm_up(url: str, model: str = "default") -> None:
    """One short request so one-time start-up work does not land in the first measured TTFT."""
    body = {"model": model, "max_tokens": 4, "temperature": 0.0,
            "messages": [{"role": "user", "content": "Say hello."}]}
    requests.post(url.rstrip("/") + "/v1/chat/completions", json=body,
                  timeout=600).raise_for_status()


def locust_command(url: str, out_dir: Path, *, users: int, spawn_rate: float,
                   duration_s: int, stop_timeout_s: int) -> list:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", url, "-u", str(users), "-r", str(spawn_rate), "-t", f"{duration_s}s",
            "--stop-timeout", str(stop_timeout_s), "--csv", str(out_dir / "locust"),
            "--html", str(out_dir / "report.html"), "--only-summary",
            "--exit-code-on-error", "0"]


def run_locust(url: str, out_dir, *, users: int, spawn_rate: float, duration_s: int,
               mix: str, prompts_path, max_tokens: int = 32, think_s: str = "0.2,1.0",
               stop_timeout_s: int = 120, model: str = "default", extra_env=None) -> dict:
    """Run locust headless against ``url``; return the run's summary (records + /metrics)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = out_dir / "records.jsonl"
    records_path.unlink(missing_ok=True)
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               LOADTEST_PROMPTS=str(prompts_path), LOADTEST_RECORDS=str(records_path),
               LOADTEST_MIX=mix, LOADTEST_MAX_TOKENS=str(max_tokens), LOADTEST_THINK_S=think_s,
               LOADTEST_MODEL=model, **(extra_env or {}))
    cmd = locust_command(url, out_dir, users=users, spawn_rate=spawn_rate,
                         duration_s=duration_s, stop_timeout_s=stop_timeout_s)
    before = scrape_metrics(url)
    t0 = time.time()
    with open(out_dir / "locust.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(REPO)).returncode
    t1 = time.time()
    after = scrape_metrics(url)
    records = read_records(records_path)
    window = load_window(records, t1 - t0)
    summary = summarize(records, window)
    summary.update({"url": url, "locust_returncode": rc, "window_s": window,
                    "wall_s": t1 - t0, "t0": t0, "server": server_cache_hit_rate(before, after),
                    "files": sorted(p.name for p in out_dir.iterdir())})
    return summary


def _f(x, fmt="{:.0f}"):
    return "-" if x is None else fmt.format(x)


def report_md(summary: dict, png_name: str, notes=()) -> str:
    cfg = summary["config"]
    lines = [f"# Load test: {' vs '.join(summary['runs'])}", "",
             f"Generated by `{summary['command']}` on {summary['date']}.", "",
             f"{cfg['users']} users (mix {cfg['mix']}), {cfg['duration_s']} s of load per server, "
             f"max_tokens {cfg['max_tokens']}, think time {cfg['think_s']} s, RAG documents "
             f"~{cfg['rag_doc_tokens']} tokens. Metrics are defined in docs/loadtest.md.", "",
             "| server | class | requests | failed | cut at end | TTFT p50 / p90 (ms) | "
             "ITL p50 / p90 (ms) | decode tok/s | output tok/s | cache hit (usage) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, run in summary["runs"].items():
        for cls, s in list(run["classes"].items()) + [("all", run["all"])]:
            lines.append(
                f"| {label} | {cls} | {s['requests']} | {s['failures']} | {s['interrupted']} | "
                f"{_f(s['ttft_ms']['p50'])} / {_f(s['ttft_ms']['p90'])} | "
                f"{_f(s['itl_ms']['p50'])} / {_f(s['itl_ms']['p90'])} | "
                f"{_f(s['decode_tokens_per_s']['mean'], '{:.2f}')} | "
                f"{_f(s['output_tokens_per_s'], '{:.2f}')} | "
                f"{_f(s['cache_hit_rate'], '{:.2f}')} |")
    lines += ["", "Server-wide radix-cache hit rate (`/metrics`): " + ", ".join(
        f"{label} {_f(run['server']['cache_hit_rate'], '{:.2f}')}"
        for label, run in summary["runs"].items()) + ".", "", f"![comparison]({png_name})"]
    la = summary.get("load_average")
    notes = list(notes) + ([f"machine: {os.cpu_count()} CPUs shared with other work; load "
                            f"average at the end {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} "
                            "(1/5/15 min)"] if la else [])
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _server(backend: str, out_dir: Path, server_args: list, max_total_tokens: int):
    from sglang_kascade.eval import launch

    return launch.running_server(backend, [*SERVER_FLAGS, *server_args],
                                 max_total_tokens=max_total_tokens,
                                 log_path=out_dir / "server.log")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="an already running server (start it with "
                       "--enable-metrics --enable-cache-report for cache hit rates)")
    where.add_argument("--compare", action="store_true",
                       help="start each of --backends in turn on the CPU and compare them")
    ap.add_argument("--backends", default=f"kascade,{DENSE_CPU_BACKEND}")
    ap.add_argument("--label", default="server", help="name of the --url run")
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--spawn-rate", type=float, default=1.0)
    ap.add_argument("--duration", type=int, default=60, help="seconds of load per server")
    ap.add_argument("--mix", default="chat=1,agent=1,rag=1",
                    help="user-class weights; at least one user per positive weight is needed")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--think", default="0.2,1.0", help="min,max seconds between tasks")
    ap.add_argument("--stop-timeout", type=int, default=120,
                    help="seconds users get to finish in-flight requests at the end")
    ap.add_argument("--seed", type=int, default=0, help="prompt generation seed")
    ap.add_argument("--rag-doc-tokens", type=int, default=1200,
                    help="approximate size of each shared RAG document")
    ap.add_argument("--rag-documents", type=int, default=2)
    ap.add_argument("--max-total-tokens", type=int, default=24000)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra launcher argument for --compare servers (repeatable)")
    ap.add_argument("--no-flush", action="store_true", help="keep the radix cache of --url")
    ap.add_argument("--out", default="loadtest-out")
    ap.add_argument("--report", help="also write REPORT.md, REPORT.json (the summary) and "
                    "REPORT.png (the comparison), e.g. docs/results/loadtest-cpu")
    ap.add_argument("--note", action="append", default=[], help="a line for REPORT.md")
    args = ap.parse_args(argv)

    mix = parse_mix(args.mix)
    active = sum(1 for w in mix.values() if w > 0)
    if args.users < active:
        print(f"[loadtest] warning: {args.users} users for {active} classes: "
              f"some classes get no user", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts_path = save_prompts(build_prompts(args.seed, rag_doc_tokens=args.rag_doc_tokens,
                                              rag_documents=args.rag_documents),
                                out / "prompts.json")
    load = dict(users=args.users, spawn_rate=args.spawn_rate, duration_s=args.duration,
                mix=args.mix, prompts_path=prompts_path, max_tokens=args.max_tokens,
                think_s=args.think, stop_timeout_s=args.stop_timeout)

    targets = ([(args.label, None)] if args.url
               else [(b, b) for b in args.backends.split(",") if b])
    runs = {}
    for label, backend in targets:
        run_dir = out / label
        run_dir.mkdir(parents=True, exist_ok=True)
        ctx = (_server(backend, run_dir, args.server_arg, args.max_total_tokens) if backend
               else nullcontext(None))
        print(f"[loadtest] {label}: " + (f"starting {backend} server" if backend
                                          else f"using {args.url}"), flush=True)
        with ctx as server:
            url = server.url if server else args.url
            warm_up(url)
            if backend or not args.no_flush:
                flush_cache(url)
            runs[label] = run_locust(url, run_dir, **load)
            runs[label]["backend"] = backend
        a = runs[label]["all"]
        print(f"[loadtest] {label}: {a['requests']} requests, {a['failures']} failed "
              f"({a['interrupted']} cut at the end), "
              f"TTFT p50 {a['ttft_ms']['p50'] or 0:.0f} ms, ITL p50 {a['itl_ms']['p50'] or 0:.0f} ms, "
              f"{a['output_tokens_per_s'] or 0:.1f} output tokens/s, cache hit "
              f"{runs[label]['server']['cache_hit_rate'] or 0:.2f}", flush=True)

    from .plot import compare_png

    summary = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in load.items()}
               | {"seed": args.seed, "rag_doc_tokens": args.rag_doc_tokens,
                  "rag_documents": args.rag_documents,
                  "server_args": args.server_arg, "max_total_tokens": args.max_total_tokens},
               "runs": runs}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    compare_png(runs, out / "compare.png",
                title=f"{args.users} users, {args.duration} s, mix {args.mix}: "
                      + " vs ".join(runs))
    print(f"[loadtest] wrote {out}/summary.json, {out}/compare.png", flush=True)
    if args.report:
        import shutil

        rep = Path(args.report)
        rep.parent.mkdir(parents=True, exist_ok=True)
        summary["command"] = "python -m loadtest.run " + shlex.join(
            argv if argv is not None else sys.argv[1:])
        summary["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        summary["load_average"] = list(os.getloadavg())
        rep.with_suffix(".json").write_text(json.dumps(summary, indent=1))
        shutil.copyfile(out / "compare.png", rep.with_suffix(".png"))
        rep.with_suffix(".md").write_text(report_md(summary, rep.with_suffix(".png").name,
                                                    args.note))
    return 1 if any(r["all"]["failures"] for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
