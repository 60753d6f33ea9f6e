"""Soak under the served benchmark's load: C concurrent streaming clients, each sending
``/generate`` requests of L fresh random token ids for N new tokens one after another, while the
admin sidecar swaps the kascade profile every ``--swap-every`` seconds.

GPU host (the stack staged, this package installed in /tmp/site: docs/gpu-runs.md):
  PYTHONPATH=/tmp/site python3 -P bench/served_soak.py --out $OUT/soak --commit <the tree's commit>
CPU (the embedded model; what tests/unit/test_served_soak.py runs, smaller):
  python bench/served_soak.py --device cpu --concurrency 2 --context 200 --new-tokens 4 \\
      --duration 40 --swap-every 8 --out /tmp/soak

One kascade server, started as the served sweep starts it (bench/e2e_served.py: Llama-3.1-8B
shapes with random weights on CUDA, the embedded model on the CPU) with ``--kascade-profile``
the first of ``--profiles``; the admin sidecar beside it (loadtest/soak.py: a fresh bearer token,
its audit log under ``--out``), the first profile's derived-anchors partner registered, then the
two activated in turn over HTTP. A request fails on an HTTP or stream error or a token count
other than N (``ignore_eos``); one still streaming when the drain ends is cut: reported, neither
ok nor failed. A swap fails unless the sidecar answers 200 with every scheduler holding its
generation; each successful one is then looked up in the sidecar's history and audit log.

Time: the run ends by ``--deadline-s`` after it starts, report written. The load stops at the
earlier of ``--duration`` after it began and ``--deadline-s - --drain-s - REPORT_S``; requests
in flight then get ``--drain-s`` to finish. Under ``--out``: served-soak.json (rewritten every
few seconds, the page with it, so a killed run keeps what it saw), served-soak.md, served-soak.png
(where matplotlib is installed; ``--rebuild`` draws it later from the JSON), server.log,
sidecar.log, audit.log. Exit status 1 if a request or a swap failed, a swap is missing from the
audit, a profile was refused at a batch boundary, no swap happened, or the server did not start.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))  # e2e_served, when run with -P

import e2e_served as served  # noqa: E402  (puts the checkout on sys.path)

from loadtest import soak  # noqa: E402
from loadtest.stream import Record  # noqa: E402
from loadtest.summary import load_window, summarize  # noqa: E402

REPORT_S = 15.0     # kept at the end for the sidecar's state and the report
MIN_LOAD_S = 60.0   # a server that starts later than this before the load must end: no run
SNAPSHOT_S = 10.0   # the JSON and the page rewritten this often during the load
SWAP_JOIN_S = 35.0  # an activation under way at the end: the sidecar's timeout and rollback
WARMUP_S = 120.0    # the warm-up request's limit
ERROR_PAUSE_S = 1.0  # a client's pause after a failed request (a dead server: no busy loop)
PROFILE_FOR = {served.LLAMA: "llama-3.1-8b-instruct", "": soak.PROFILE_A}


def to_record(rec: dict, t_wall: float, new_tokens: int) -> Record:
    """A stream_generate record (or an error's) as the soak report's Record: cut requests are
    ``interrupted``; a finished stream with a token count other than ``new_tokens`` fails."""
    status, tokens = rec["status"], rec.get("tokens", 0)
    error = {"ok": "", "cut": "", "short": f"wrong token count: {tokens} of {new_tokens}"}
    ttft = rec.get("ttft_s")
    return Record(cls="served", t_start=t_wall, ok=status == "ok",
                  error=error.get(status, rec.get("error") or status),
                  latency_ms=1e3 * rec["e2e_s"], ttft_ms=None if ttft is None else 1e3 * ttft,
                  itl_ms=rec.get("itl_ms", []), prompt_tokens=rec.get("prompt_tokens", 0),
                  completion_tokens=tokens, cached_tokens=rec.get("cached_tokens", 0),
                  interrupted=status == "cut")


class ServedLoad:
    """``cell.concurrency`` client threads, each sending requests one after another until
    ``load_end`` (perf_counter); a request still streaming at ``drain_end`` is cut."""

    def __init__(self, url: str, cell: served.Cell, seed: int, load_end: float,
                 drain_end: float):
        self.url, self.cell, self.seed = url, cell, seed
        self.load_end, self.drain_end = load_end, drain_end
        self._records, self._lock = [], threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(c,), daemon=True)
                         for c in range(cell.concurrency)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def records(self) -> list:
        with self._lock:
            return sorted(self._records, key=lambda r: r.t_start)

    def _client(self, c: int) -> None:
        i, n = 0, self.cell.new_tokens
        while time.perf_counter() < self.load_end:
            ids = served.prompt_ids(self.seed, f"soak:{c}:{i}", self.cell.context)
            t_wall, t_send = time.time(), time.perf_counter()
            try:
                rec = served.stream_generate(self.url, ids, n, self.drain_end)
            except served.Cut as cut:
                rec = cut.args[0]
            except Exception as e:  # a failed request; the client goes on
                rec = dict(status="error", error=f"{type(e).__name__}: {e}"[:500],
                           e2e_s=time.perf_counter() - t_send)
            with self._lock:
                self._records.append(to_record(rec, t_wall, n))
            i += 1
            if rec["status"] == "error":
                time.sleep(ERROR_PAUSE_S)


def warm_up(url: str, cell: served.Cell, seed: int, deadline: float) -> dict:
    """One request of the load's shape before it starts, so that first-use costs (allocations,
    kernels first run at these sizes) stay out of the soak; its outcome is reported, not
    counted."""
    ids = served.prompt_ids(seed, "soak:warm-up", cell.context)
    try:
        rec = served.stream_generate(url, ids, cell.new_tokens, deadline)
    except served.Cut as cut:
        rec = cut.args[0]
    except Exception as e:
        return {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    return {k: rec.get(k)
            for k in ("status", "ttft_s", "e2e_s", "tokens", "decode_ms_per_token")}


def parse_args(argv: list) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python bench/served_soak.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for the report, logs, audit log")
    ap.add_argument("--report", default=None, help="REPORT.{json,md,png} (default: "
                                                   "OUT/served-soak)")
    ap.add_argument("--duration", type=float, default=360.0, help="seconds of load asked")
    ap.add_argument("--swap-every", type=float, default=30.0)
    ap.add_argument("--deadline-s", type=float, default=560.0,
                    help="the whole run, server start included, ends by then, report written")
    ap.add_argument("--drain-s", type=float, default=30.0,
                    help="after the load, for requests in flight to finish (then cut)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--context", type=int, default=32768, help="prompt tokens per request")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--profiles", default=None,
                    help="FIRST,SECOND to alternate (default: the shipped profile of the model "
                         "and its derived-anchors partner, which is registered)")
    ap.add_argument("--bin", type=float, default=10.0, help="timeline bin, seconds")
    ap.add_argument("--rebuild", action="store_true",
                    help="only rewrite REPORT.md/.png from REPORT.json")
    served.add_server_options(ap)
    args = served.resolve_server_options(ap.parse_args(argv))
    if not (args.out or args.rebuild and args.report):
        ap.error("--out is needed (--rebuild: --report)")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode needs two tokens to time)")
    if args.profiles is None:
        first = PROFILE_FOR.get(args.model)
        if first is None:
            ap.error("--profiles is needed for a model without a shipped profile here")
        args.profiles = f"{first},{soak.derived_name(first)}"
    args.report = Path(args.report or Path(args.out) / "served-soak")
    return args


def base_report(args, argv: list, names: list, info: dict) -> dict:
    """The page's fixed part; ``load_s``, ``t0`` and the results are filled in as the run goes."""
    return {
        "command": "python bench/served_soak.py " + shlex.join(argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": served.device_name(args.device), "commit": served.git_commit(args.commit),
        "versions": served.stack_versions(), "server": "kascade (not started)",
        "server_info": info,
        "config": {"load": "served", "duration_s": args.duration, "load_s": 0.0,
                   "swap_every_s": args.swap_every, "concurrency": args.concurrency,
                   "context": args.context, "new_tokens": args.new_tokens, "profiles": names,
                   "bin_s": args.bin, "deadline_s": args.deadline_s, "drain_s": args.drain_s,
                   "model": args.model or "embedded (SmolLM2-135M-Instruct)", "seed": args.seed},
        "t0": time.time(), "summary": summarize([], 0.0), "swaps": [], "notes": [],
    }


def fill(rep: dict, records: list, swaps: list, load_s: float) -> list:
    """Put the records so far in ``rep`` (summary over the load window); returns them."""
    window = load_window(records, load_s)
    rep["config"]["load_s"] = load_s
    rep["summary"] = summarize(records, window)
    rep["summary"]["window_s"] = window
    rep["swaps"] = list(swaps)
    rep["zero_failed_requests"] = rep["summary"]["all"]["failures"] == 0
    return records


def run(args, argv: list) -> int:
    t_start = time.perf_counter()
    hard_end = t_start + args.deadline_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    names = args.profiles.split(",")
    cell = served.Cell(args.concurrency, args.context, args.new_tokens)
    extra, max_total, env = served.server_setup(args, [cell])
    setup = ([*extra, "--kascade-profile", names[0]], max_total, env)
    info = {}
    rep = base_report(args, argv, names, info)
    soak.write_report(rep, [], args.report, draw=False)
    problem = soak.sidecar_problem()
    if problem:  # before minutes of server start
        return give_up(rep, args.report, f"the admin sidecar cannot start here: {problem}")

    with ExitStack() as stack:
        try:
            server = stack.enter_context(served.served_server(
                "kascade", args, setup, hard_end - REPORT_S - args.drain_s - MIN_LOAD_S, info,
                out / "server.log"))
        except served.launch.LaunchError as e:
            info.update(error=str(e)[-4000:], startup_s=None)
            lines = str(e).strip().splitlines()
            return give_up(rep, args.report, "the server did not start: " + " / ".join(
                lines[:1] + ["..."] + lines[-3:]) + " (server_info.error: the log's tail)")
        rep["server"] = "kascade, " + info["command_line"]
        try:
            admin = soak.start_admin(stack, server.url, out, names)
        except (RuntimeError, requests.RequestException) as e:
            return give_up(rep, args.report, f"the admin sidecar did not come up: {e}"[:600])

        rep["warmup"] = warm_up(server.url, cell, args.seed,
                                min(time.perf_counter() + WARMUP_S,
                                    hard_end - REPORT_S - args.drain_s - MIN_LOAD_S))
        load_left = hard_end - REPORT_S - args.drain_s - time.perf_counter()
        load_s = min(args.duration, load_left)
        rep["t0"], p0 = time.time(), time.perf_counter()
        load = ServedLoad(server.url, cell, args.seed, p0 + load_s, p0 + load_s + args.drain_s)
        swaps, stop = [], threading.Event()
        swapper = threading.Thread(target=soak.swap_loop, daemon=True,
                                   args=(admin, names, args.swap_every, rep["t0"], stop, swaps,
                                         load_s))
        print(f"[served-soak] server ready in {info['startup_s']:.0f} s; {load_s:.0f} s of "
              f"{cell.concurrency} x {cell.context} + {cell.new_tokens} on {server.url}, swap "
              f"every {args.swap_every:g} s", flush=True)
        load.start()
        swapper.start()
        watch(load, swaps, stop, rep, args.report, load_s)
        swapper.join(timeout=max(1.0, min(SWAP_JOIN_S, hard_end - time.perf_counter())))
        records = fill(rep, load.records(), swaps, load_s)

        state = soak.sidecar_state(admin)
        rep.update(sidecar_history=state["history"], sidecar_metrics=state["metrics"],
                   sidecar_active=state["active"],
                   audit=soak.audit_swaps(rep["swaps"], state, out / "audit.log"))
        a = rep["summary"]["all"]
        w = rep["warmup"]
        rep["notes"] += [f"server start-up {info['startup_s']:.0f} s (launch to /health ready); "
                         f"one warm-up request of the load's shape before it, not counted: "
                         + served.describe(w)]
        if load_s < args.duration:
            rep["notes"].append(f"load shortened from {args.duration:g} s to {load_s:.0f} s to "
                                f"end within --deadline-s {args.deadline_s:g}")
        if a["interrupted"]:
            rep["notes"].append(f"{a['interrupted']} requests still streaming {args.drain_s:g} s "
                                "after the load ended were cut (not counted as failed)")
        soak.write_report(rep, records, args.report)
    passed = soak.soak_passed(rep) and bool(rep["swaps"])
    au = rep["audit"]
    print(f"[served-soak] {a['requests']} requests, {a['failures']} failed, {a['interrupted']} "
          f"cut; {len(rep['swaps'])} swaps, {au['succeeded']} ok, {au['audited']} audited, "
          f"{au['refused'] or 0:g} refused at a batch boundary; "
          f"{'PASS' if passed else 'FAIL'}; page {args.report.with_suffix('.md')}", flush=True)
    return 0 if passed else 1


def give_up(rep: dict, report: Path, why: str) -> int:
    """A run that cannot go on: the reason on the page, exit status 1."""
    rep["notes"].append(why)
    soak.write_report(rep, [], report, draw=False)
    print(f"[served-soak] FAIL: {why}", flush=True)
    return 1


def watch(load: ServedLoad, swaps: list, stop: threading.Event, rep: dict, report: Path,
          load_s: float) -> None:
    """Until every client is done: stop the swaps when the load ends, print each swap, rewrite
    the JSON and the page every SNAPSHOT_S."""
    printed, next_write = 0, 0.0
    while load.alive():
        now = time.perf_counter()
        if now >= load.load_end:
            stop.set()
        for s in swaps[printed:]:
            print(f"[served-soak] swap at {s['t_s']:.0f} s to {s['profile']}: "
                  f"{'ok' if s['ok'] else 'FAILED ' + s.get('error', '')}, generation "
                  f"{s.get('generation')}, {s['elapsed_ms']:.0f} ms", flush=True)
            printed += 1
        if now >= next_write:
            records = fill(rep, load.records(), swaps, load_s)
            soak.write_report(rep, records, report, draw=False)
            a = rep["summary"]["all"]
            print(f"[served-soak] {time.time() - rep['t0']:.0f} s: {a['requests']} requests "
                  f"done, {a['failures']} failed, {len(swaps)} swaps", flush=True)
            next_write = now + SNAPSHOT_S
        time.sleep(0.5)
    stop.set()


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.rebuild:
        soak.rebuild(args.report)
        return 0
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
