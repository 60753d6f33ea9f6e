"""Soak: mixed load for a long time while the admin sidecar swaps the anchor profile.

    python -m loadtest.soak --duration 600 --swap-every 30 --users 3 --report docs/results/soak-cpu

Starts a kascade CPU server (``--kascade-profile smollm2-135m-instruct``) and the admin sidecar
(``python -m sglang_kascade.server --server-url ... --port ... --token-file ...``), or uses
``--url``/``--admin-url``/``--token-file`` of running ones. Registers a second profile for the
same model (the derived-default anchors, renamed), then runs locust (all three user classes)
for ``--duration`` seconds and activates the two profiles in turn every ``--swap-every`` seconds.
``--no-swap`` runs the same load without a sidecar. Writes REPORT.md, REPORT.json, REPORT.png
(timeline with swap markers) and, under ``--out``, locust's CSVs, HTML report and records.
Exit status 1 if any request or swap failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Optional

import requests

from .prompts import build_prompts, save_prompts
from .run import SERVER_FLAGS, flush_cache, run_locust, warm_up
from .stream import Record
from .summary import in_flight_at, parse_prometheus, percentile, read_records, timeline

PROFILE_A = "smollm2-135m-instruct"
GENERATION = re.compile(r"generation (\d+)\b")  # how the sidecar's audit lines name one


def derived_name(base: str) -> str:
    """The name second_profile gives the swap partner of shipped profile ``base``."""
    return f"{base}-derived-anchors"


PROFILE_B = derived_name(PROFILE_A)


def second_profile(base: str = PROFILE_A, name: Optional[str] = None) -> dict:
    """Same model fingerprint as ``base``, different anchors: the derived-default layout."""
    from sglang_kascade.profile import derived_default_profile, load_profile

    fp = load_profile(base).model
    data = derived_default_profile(fp).to_json()
    data["name"] = name or derived_name(base)
    data["provenance"] = {"source": "loadtest.soak: derived-default anchors for the model of "
                                    f"shipped profile {base!r} (uncalibrated, for swap tests)"}
    return data


class Admin:
    """The sidecar's HTTP API (bearer token)."""

    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, path: str):
        return requests.get(self.url + path, headers=self.headers, timeout=60)

    def post(self, path: str, body=None):
        return requests.post(self.url + path, json=body, headers=self.headers, timeout=300)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while True:
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"admin sidecar at {self.url} not ready in {timeout_s:.0f}s")
            time.sleep(1)

    def ensure_profile(self, profile: dict) -> int:
        names = [p["name"] for p in self.get("/v1/profiles").json()["profiles"]]
        if profile["name"] in names:
            return 200
        r = self.post("/v1/profiles", profile)
        if r.status_code not in (200, 201):
            raise RuntimeError(f"POST /v1/profiles: HTTP {r.status_code}: {r.text[:500]}")
        return r.status_code


@contextmanager
def sidecar_process(server_url: str, port: int, token_file: Path, log_path: Path,
                    audit_log: Optional[Path] = None):
    """``python -m sglang_kascade.server`` in its own process group, stopped afterwards
    (``audit_log``: its ``--audit-log``, default <control dir>/audit.log)."""
    from sglang_kascade.eval import launch

    cmd = [sys.executable, "-m", "sglang_kascade.server", "--server-url", server_url,
           "--port", str(port), "--token-file", str(token_file)]
    if audit_log is not None:
        cmd += ["--audit-log", str(audit_log)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            launch.stop(proc)


def sidecar_problem() -> Optional[str]:
    """Why ``python -m sglang_kascade.server`` could not start in this environment (a missing
    dependency such as prometheus_client), or None: checked before a long server start."""
    out = subprocess.run([sys.executable, "-c", "import sglang_kascade.server.app"],
                         capture_output=True, text=True, timeout=120)
    return None if out.returncode == 0 else (out.stderr.strip().splitlines() or ["?"])[-1]


def start_admin(stack: ExitStack, server_url: str, out: Path, names: list,
                admin_url: Optional[str] = None, token_file: Optional[str] = None) -> Admin:
    """The admin sidecar of ``server_url``, ready: a running one (``admin_url`` with its
    ``token_file``) or one started here on a free port, with a fresh random token in a private
    temporary file and its audit log at out/audit.log (both go with ``stack``). Registers
    names[1] when it is the derived-anchors partner of names[0], then activates names[0]."""
    if admin_url:
        token = Path(token_file).read_text().strip()
    else:
        from sglang_kascade.eval.launch import free_port

        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        token = secrets.token_urlsafe(24)
        (tmp / "token").write_text(token)
        (tmp / "token").chmod(0o600)
        admin_url = stack.enter_context(sidecar_process(
            server_url, free_port(), tmp / "token", out / "sidecar.log", out / "audit.log"))
    admin = Admin(admin_url, token)
    admin.wait_ready()
    if names[1] == derived_name(names[0]):
        admin.ensure_profile(second_profile(names[0]))
    r = admin.post(f"/v1/profiles/{names[0]}/activate")
    if r.status_code != 200:
        raise RuntimeError(f"activating {names[0]}: HTTP {r.status_code}: {r.text[:300]}")
    return admin


def acknowledged(body: dict) -> bool:
    """An activation's answer lists schedulers that all took its generation (staged or
    serving it)."""
    scheds, generation = body.get("schedulers") or [], body.get("generation")
    return (bool(scheds) and isinstance(generation, int)
            and all(s.get("current_generation", 0) >= generation for s in scheds))


def swap_loop(admin: Admin, names: list, every_s: float, t0: float, stop: threading.Event,
              swaps: list, end_s: float = math.inf) -> None:
    """Activate names[1], names[0], names[1], ... every ``every_s`` seconds until ``stop``, the
    last one before ``end_s`` (seconds after ``t0``)."""
    i = 1
    while i * every_s < end_s and not stop.wait(max(0.0, t0 + i * every_s - time.time())):
        name = names[i % len(names)]
        t = time.time()
        entry = {"t_s": t - t0, "profile": name}
        try:
            r = admin.post(f"/v1/profiles/{name}/activate")
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            entry.update(status=r.status_code, generation=body.get("generation"),
                         acknowledged=acknowledged(body),
                         ok=(r.status_code == 200 and body.get("active") == name
                             and acknowledged(body)))
            if not entry["ok"]:
                entry["error"] = r.text[:300]
        except requests.RequestException as e:
            entry.update(status=None, ok=False, error=f"{type(e).__name__}: {e}"[:300])
        entry["elapsed_ms"] = (time.time() - t) * 1000.0
        swaps.append(entry)
        i += 1


def sidecar_state(admin: Admin) -> dict:
    """What the sidecar says at the end of a run: its history (``GET /v1/history``), its
    ``kascade_*`` counters (``/metrics``) and the active profile (``GET /v1/active``)."""
    try:
        return {"history": admin.get("/v1/history").json(),
                "metrics": {k: v for k, v in parse_prometheus(admin.get("/metrics").text).items()
                            if k.startswith("kascade_")},
                "active": admin.get("/v1/active").json()}
    except (requests.RequestException, ValueError) as e:
        return {"history": {"error": str(e)}, "metrics": None, "active": None}


def audit_swaps(swaps: list, state: dict, audit_log: Optional[Path] = None) -> dict:
    """Marks each successful swap ``in_history`` (the sidecar's history has its generation under
    its profile's name) and ``in_audit_log`` (the audit log at ``audit_log`` has the
    activation's ``requested`` and ``active`` lines; None without one). Returns the counts,
    with the schedulers' counts of profiles applied and refused at a batch boundary."""
    history = state.get("history")
    entries = history.get("history") if isinstance(history, dict) else None
    seen = {(h.get("generation"), h.get("name")) for h in entries or [] if isinstance(h, dict)}
    logged = None
    if audit_log is not None:
        logged = {}
        lines = audit_log.read_text().splitlines() if audit_log.exists() else []
        for line in lines:
            try:
                a = json.loads(line)
            except ValueError:
                continue
            m = GENERATION.match(a.get("detail") or "") if isinstance(a, dict) else None
            if m and a.get("action") == "activate":
                logged.setdefault((int(m.group(1)), a.get("name")), set()).add(a.get("result"))
    ok = [s for s in swaps if s["ok"]]
    audited = 0
    for s in ok:
        key = (s["generation"], s["profile"])
        s["in_history"] = key in seen
        s["in_audit_log"] = None if logged is None else \
            {"requested", "active"} <= logged.get(key, set())
        audited += s["in_history"] and s["in_audit_log"] is not False
    metrics = state.get("metrics") or {}
    return {"succeeded": len(ok), "in_history": sum(s["in_history"] for s in ok),
            "in_audit_log": None if logged is None else sum(s["in_audit_log"] for s in ok),
            "audited": audited, "all_audited": audited == len(ok),
            "applied": metrics.get("kascade_swaps_applied_total"),
            "refused": metrics.get("kascade_swaps_refused_total")}


def describe_load(cfg: dict) -> dict:
    """How a soak's page names its load: ``title`` (the heading), ``short`` (the plot's title)
    and ``text`` (the load line), for locust users (this module) or served clients
    (bench/served_soak.py, ``cfg["load"] == "served"``)."""
    if cfg.get("load") == "served":
        shape = f"{cfg['concurrency']} x {cfg['context']} tokens + {cfg['new_tokens']} new"
        return {"title": f"{cfg['load_s']:.0f} s of served load ({shape})",
                "short": f"{shape}, {cfg['load_s']:.0f} s",
                "text": f"{cfg['concurrency']} concurrent streaming clients, each sending "
                        f"`/generate` requests of {cfg['context']} fresh random token ids for "
                        f"{cfg['new_tokens']} new tokens (greedy, ignore_eos) one after another "
                        f"for {cfg['load_s']:.0f} s (asked: {cfg['duration_s']:g} s)"}
    return {"title": f"{cfg['duration_s']} s of mixed load",
            "short": f"{cfg['users']} users, {cfg['duration_s']} s",
            "text": f"{cfg['users']} users (mix {cfg['mix']}), max_tokens {cfg['max_tokens']}, "
                    f"think time {cfg['think_s']} s"}


def report_md(rep: dict, png_name: Optional[str]) -> str:
    """``png_name``: the timeline beside the page, or None where none was drawn."""
    a, cfg, sw = rep["summary"]["all"], rep["config"], rep["swaps"]
    ok_swaps = [s for s in sw if s["ok"]]
    load = describe_load(cfg)
    lines = [
        f"# Soak: {load['title']}, profile swap every {cfg['swap_every_s']} s",
        "",
        f"Generated by `{rep['command']}` on {rep['date']} ({rep['device']}).",
        "",
    ]
    if rep.get("commit"):
        lines.append(f"- code: commit `{rep['commit']}`; "
                     + ", ".join(f"{k} {v}" for k, v in (rep.get("versions") or {}).items()
                                 if v))
    lines += [
        f"- server: `{rep['server']}`",
        f"- load: {load['text']}",
        f"- swaps: {len(sw)} attempted, {len(ok_swaps)} succeeded"
        + (f" (activate call p50 {percentile([s['elapsed_ms'] for s in ok_swaps], 50):.0f} ms, "
           f"max {max(s['elapsed_ms'] for s in ok_swaps):.0f} ms)" if ok_swaps else "")
        + (f"; profiles alternated: {', '.join(cfg['profiles'])}" if sw else " (--no-swap)"),
        *audit_line(rep.get("audit")),
        f"- requests in flight across at least one swap: {rep.get('across_swaps', '-')} "
        f"of {a['requests']}",
        f"- requests: {a['requests']}, **failed: {a['failures']}**"
        + (f" ({a['errors']})" if a["errors"] else "")
        + f"; in flight when the run ended (cut, not counted): {a['interrupted']}",
        "",
        "| class | requests | failed | TTFT p50 / p90 (ms) | ITL p50 / p90 (ms) | decode tok/s | "
        "output tok/s | cache hit |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt="{:.0f}"):
        return "-" if x is None else fmt.format(x)

    for cls, s in list(rep["summary"]["classes"].items()) + [("all", a)]:
        lines.append(
            f"| {cls} | {s['requests']} | {s['failures']} | {f(s['ttft_ms']['p50'])} / "
            f"{f(s['ttft_ms']['p90'])} | {f(s['itl_ms']['p50'])} / {f(s['itl_ms']['p90'])} | "
            f"{f(s['decode_tokens_per_s']['mean'], '{:.1f}')} | "
            f"{f(s['output_tokens_per_s'], '{:.2f}')} | {f(s['cache_hit_rate'], '{:.2f}')} |")
    if "server" in rep["summary"]:
        server = rep["summary"]["server"].get("cache_hit_rate")
        lines += ["", f"Server-wide radix-cache hit rate (/metrics): {f(server, '{:.2f}')}."]
    lines += ["", f"![timeline]({png_name})" if png_name else
              "No timeline drawn (no matplotlib, or the run had not ended): the same command "
              "with `--rebuild --report PREFIX` draws it from PREFIX.json.", "",
              "Timeline: requests binned by start time; vertical lines mark swaps "
              "(red: a failed swap). Metrics are defined in docs/loadtest.md."]
    m = rep.get("sidecar_metrics") or {}
    if m:
        lines += ["", "Sidecar counters at the end (`/metrics`): "
                  + ", ".join(f"`{k}` {v:g}" for k, v in sorted(m.items())
                              if k.startswith(("kascade_swaps", "kascade_forwards",
                                               "kascade_sparse_forwards",
                                               "kascade_dense_fallback_forwards"))) + "."]
    if rep.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in rep["notes"]]
    return "\n".join(lines) + "\n"


def audit_line(au: Optional[dict]) -> list:
    if not au:
        return []
    where = "history" + (" and audit log (requested and active lines)"
                         if au["in_audit_log"] is not None else "")

    def n(x):
        return "-" if x is None else f"{x:g}"

    return [f"- audit: {au['audited']} of {au['succeeded']} successful swaps found in the "
            f"sidecar's {where}; profiles applied at a batch boundary "
            f"(`kascade_swaps_applied_total`): {n(au['applied'])} for {au['succeeded'] + 1} "
            f"activations (the swaps and the initial one), refused there: {n(au['refused'])}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=600)
    ap.add_argument("--swap-every", type=float, default=30.0)
    ap.add_argument("--no-swap", action="store_true", help="the same load, no sidecar")
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--spawn-rate", type=float, default=1.0)
    ap.add_argument("--mix", default="chat=1,agent=1,rag=1")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--think", default="0.5,2.0")
    ap.add_argument("--rag-doc-tokens", type=int, default=800)
    ap.add_argument("--stop-timeout", type=int, default=120)
    ap.add_argument("--url", help="a running kascade server (else one is started on the CPU)")
    ap.add_argument("--admin-url", help="a running sidecar (else one is started)")
    ap.add_argument("--token-file", help="the sidecar's bearer token (with --admin-url)")
    ap.add_argument("--profiles", default=f"{PROFILE_A},{PROFILE_B}",
                    help="the two profiles to alternate; the second is registered if missing "
                         "when it is the first's derived-anchors partner (FIRST-derived-anchors)")
    ap.add_argument("--server-arg", action="append", default=[])
    ap.add_argument("--bin", type=float, default=10.0, help="timeline bin, seconds")
    ap.add_argument("--out", default="soak-out", help="locust files, logs, records")
    ap.add_argument("--report", default="soak-report", help="REPORT.{md,json,png}")
    ap.add_argument("--note", action="append", default=[], help="a line for the report")
    ap.add_argument("--rebuild", action="store_true",
                    help="only rewrite REPORT.md/.png from REPORT.json")
    args = ap.parse_args(argv)
    if args.rebuild:
        rebuild(Path(args.report))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    names = args.profiles.split(",")
    prompts_path = save_prompts(build_prompts(0, rag_doc_tokens=args.rag_doc_tokens),
                                out / "prompts.json")

    with ExitStack() as stack:
        url = args.url
        if not url:
            from sglang_kascade.eval import launch

            print("[soak] starting kascade server", flush=True)
            server = stack.enter_context(launch.running_server(
                "kascade", [*SERVER_FLAGS, "--kascade-profile", names[0], *args.server_arg],
                log_path=out / "server.log"))
            url = server.url
        admin = None if args.no_swap else start_admin(stack, url, out, names, args.admin_url,
                                                      args.token_file)
        warm_up(url)
        flush_cache(url)

        swaps, stop = [], threading.Event()
        load_start = os.getloadavg()
        t0 = time.time()
        swapper = None
        if admin:
            swapper = threading.Thread(target=swap_loop, daemon=True,
                                       args=(admin, names, args.swap_every, t0, stop, swaps))
            swapper.start()
        print(f"[soak] {args.duration} s of load on {url}"
              + ("" if admin else " (no swaps)"), flush=True)
        try:
            summary = run_locust(url, out, users=args.users, spawn_rate=args.spawn_rate,
                                 duration_s=args.duration, mix=args.mix,
                                 prompts_path=prompts_path, max_tokens=args.max_tokens,
                                 think_s=args.think, stop_timeout_s=args.stop_timeout)
        finally:
            stop.set()
            if swapper:
                swapper.join(timeout=330)
        state = sidecar_state(admin) if admin else {}

    load_end = os.getloadavg()
    records = read_records(out / "records.jsonl")
    rep = {
        "command": "python -m loadtest.soak " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
        "device": "CPU" if not args.url else args.url,
        "server": "kascade, " + " ".join([*SERVER_FLAGS, "--kascade-profile", names[0],
                                          *args.server_arg]),
        "config": {"duration_s": args.duration, "swap_every_s": None if args.no_swap
                   else args.swap_every, "users": args.users, "mix": args.mix,
                   "max_tokens": args.max_tokens, "think_s": args.think,
                   "rag_doc_tokens": args.rag_doc_tokens, "profiles": names,
                   "bin_s": args.bin},
        "t0": t0, "summary": summary, "swaps": swaps,
        "sidecar_history": state.get("history"), "sidecar_metrics": state.get("metrics"),
        "sidecar_active": state.get("active"),
        "audit": audit_swaps(swaps, state, None if args.admin_url else out / "audit.log")
        if admin else None,
        "notes": args.note + [
            f"machine: {os.cpu_count()} CPUs, load average (1/5/15 min) "
            f"{' '.join(f'{x:.1f}' for x in load_start)} at the start and "
            f"{' '.join(f'{x:.1f}' for x in load_end)} at the end (other work shares it)"],
        "zero_failed_requests": summary["all"]["failures"] == 0,
    }
    write_report(rep, records, report)
    a = summary["all"]
    bad_swaps = sum(1 for s in swaps if not s["ok"])
    print(f"[soak] {a['requests']} requests, {a['failures']} failed; {len(swaps)} swaps, "
          f"{bad_swaps} failed; report {report.with_suffix('.md')}", flush=True)
    return 0 if soak_passed(rep) else 1


def soak_passed(rep: dict) -> bool:
    """No failed request, no failed swap, every swap audited, none refused at a batch
    boundary."""
    au = rep.get("audit") or {}
    return (rep["summary"]["all"]["failures"] == 0 and all(s["ok"] for s in rep["swaps"])
            and au.get("all_audited", True) and not au.get("refused"))


def write_report(rep: dict, records: list, report: Path, draw: bool = True) -> None:
    """REPORT.json (with every request record; replaced whole, so a reader or a killed run never
    sees half of it), REPORT.png (the timeline: with ``draw`` and matplotlib), REPORT.md."""
    t0, cfg = rep["t0"], rep["config"]
    rep["records"] = [r.to_json() for r in records]
    rep["timeline"] = timeline(records, t0, cfg.get("bin_s", 10.0))
    rep["across_swaps"] = len({id(r) for s in rep["swaps"]
                               for r in in_flight_at(records, t0 + s["t_s"])})
    png = None
    if draw:
        try:
            from .plot import timeline_png

            png = timeline_png(rep["timeline"], rep["swaps"], report.with_suffix(".png"),
                               title=f"soak: {describe_load(cfg)['short']}, "
                                     + (f"swap every {cfg['swap_every_s']:.0f} s"
                                        if cfg["swap_every_s"] else "no swaps"))
        except ImportError:  # matplotlib: not on every GPU host; --rebuild draws it later
            pass
    tmp = report.with_name(report.name + ".json.tmp")
    tmp.write_text(json.dumps(rep, indent=1))
    os.replace(tmp, report.with_suffix(".json"))
    report.with_suffix(".md").write_text(report_md(rep, png.name if png else None))


def rebuild(report: Path) -> None:
    """Rewrite REPORT.md/.png from REPORT.json (its records and swaps), e.g. after a plot change."""
    rep = json.loads(report.with_suffix(".json").read_text())
    write_report(rep, [Record(**r) for r in rep["records"]], report)


if __name__ == "__main__":
    sys.exit(main())
