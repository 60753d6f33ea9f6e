"""Served sweep, the project's headline: a real ``sglang.launch_server`` per backend (the same
command for all, only ``--attention-backend`` differs) under concurrent streamed ``/generate``
requests, over cells of concurrency x context, cold server and warm.

A cell ``CxL`` (or ``CxLxN``) starts C clients at once (threads); each sends
``--requests-per-client`` greedy requests one after another (``ignore_eos``, N or ``--new-tokens``
new tokens each) whose prompts are fresh random token ids of L tokens (no radix-cache hits: every
request of a server gets its own ids; both backends get the same ids). Per request: time to first token (TTFT), per-token inter-token
latencies (ITL) and decode ms per token; per cell: TTFT p50/p90/mean, ITL p50/p90, decode ms per
token p50, output tokens/s (every completion token received / the cell's wall time) and wall time.

Passes: the first pass over the cells on a freshly started server is "cold" (it pays whatever the
server compiles while serving); ``--warm-passes`` more passes over the same cells are "warm".
Each backend's start-up time (launch -> /health ready) is recorded too.

The JSON (meta + rows) is rewritten after every cell, so a run stopped by a time limit keeps what
it measured. ``--time-budget-s``: each backend gets an equal share of the time left when its server
starts; cells that would start after its share are recorded as skipped, requests still streaming
at its end are cut (recorded, the cell marked "cut"), and the server is shut down.

GPU host (../shared/gpu-stack staged, this package installed in /tmp/site: docs/gpu-runs.md;
Llama-3.1-8B shapes, random weights, bf16):
  PYTHONPATH=/tmp/site python3 -P bench/e2e_served.py --out $OUT/served.json \\
      --cells 1x131000,16x32768,16x4096 --time-budget-s 480 --commit <the tree's commit>
CPU (the embedded model; what tests/unit/test_served_bench.py runs):
  python bench/e2e_served.py --device cpu --model "" --cells 1x300,2x300 --new-tokens 4 \\
      --out /tmp/served.json
Plot: python bench/plot_side_by_side.py served OUT.png served.json
Page: python bench/served_report.py served.json docs/results/served-<device>.md
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a copy of the tree (GPU host: no install)

from sglang_kascade.eval import launch  # noqa: E402

ORIGINAL_ENV = dict(os.environ)
LLAMA = str(ROOT / "bench" / "assets" / "llama-3.1-8b-config")
# Every CUDA server alike: random weights, bf16, prefill graphs off (as bench/e2e_bench.sh at
# 128K: room for a long prefill's activations). The KV pool is sized by SGLang from
# --mem-fraction-static, never forced: kascade's graph buffers follow the pool's size.
GPU_ARGS = ["--load-format", "dummy", "--dtype", "bfloat16",
            "--cuda-graph-backend-prefill=disabled"]
# The baseline first: the time its server leaves of its share of --time-budget-s goes to the
# next backend, and kascade's start (Triton compiles on a fresh host) is the slower one.
DEFAULT_BACKENDS = {"cuda": ["flashinfer", "kascade"], "cpu": ["torch_native", "kascade"]}
TOKEN_LO, TOKEN_HI = 100, 20000  # random prompt ids: inside every supported model's vocabulary
CONTEXT_MARGIN = 64              # --context-length above the longest prompt + new tokens
CONNECT_TIMEOUT_S = 30
MAX_WAIT_S = 1800                # no budget: the longest a request may go without a byte


# ---- cells ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    concurrency: int
    context: int
    new_tokens: Optional[int] = None  # None: --new-tokens

    @property
    def name(self) -> str:
        tail = f"x{self.new_tokens}" if self.new_tokens else ""
        return f"{self.concurrency}x{self.context}{tail}"

    def tokens(self, default: int) -> int:
        return self.new_tokens or default


def parse_cells(spec: str) -> list:
    """``"1x131000,16x32768x512"`` -> cells (CONCURRENCYxCONTEXT[xNEW_TOKENS]), in the order
    given (the order they run in)."""
    cells = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        fields = part.lower().split("x")
        if (len(fields) not in (2, 3) or not all(f.isdigit() and int(f) > 0 for f in fields)
                or (len(fields) == 3 and int(fields[2]) < 2)):
            raise argparse.ArgumentTypeError(
                f"bad cell {part!r}: want CONCURRENCYxCONTEXT[xNEW_TOKENS], new tokens >= 2")
        cells.append(Cell(*map(int, fields)))
    if not cells:
        raise argparse.ArgumentTypeError("no cells")
    return cells


def cells_from_args(args) -> list:
    """--cells, else the cross product --concurrency x --contexts (context-major: all
    concurrencies of the shortest context first)."""
    if args.cells:
        return args.cells
    return [Cell(c, n) for n in args.contexts for c in args.concurrency]


# ---- statistics ----------------------------------------------------------------------------


def percentile(values, q: float) -> Optional[float]:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def itl_from_marks(marks) -> list:
    """Per-token inter-token latencies (ms) from streamed chunk marks [(arrival s, completion
    tokens so far)]: SGLang may stream several tokens in one chunk, so a chunk that brings k new
    tokens after a gap g counts as k tokens of g / k each. The first mark's tokens have no ITL
    (they are the first token's TTFT)."""
    out = []
    for (t0, n0), (t1, n1) in zip(marks, marks[1:]):
        k = n1 - n0
        if k > 0:
            out += [1e3 * (t1 - t0) / k] * k
    return out


def decode_ms_per_token(marks) -> Optional[float]:
    """(last mark's arrival - first's) / tokens between them; None with fewer than 2 marks."""
    if len(marks) < 2 or marks[-1][1] <= marks[0][1]:
        return None
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return 1e3 * (t1 - t0) / (n1 - n0)


def cell_stats(reqs: list, wall_s: float) -> dict:
    """Per-cell figures over its requests. TTFT and decode ms/token over the requests that got a
    first token; ITL pooled over every token of every request; output tokens/s counts every
    completion token received (a cut request's too) over the cell's wall time."""
    ttft = [r["ttft_s"] for r in reqs if r.get("ttft_s") is not None]
    itl = [x for r in reqs for x in r.get("itl_ms", [])]
    dec = [r["decode_ms_per_token"] for r in reqs if r.get("decode_ms_per_token") is not None]
    tokens = sum(r.get("tokens", 0) for r in reqs)
    return dict(
        requests=len(reqs), ok=sum(r["status"] == "ok" for r in reqs),
        completion_tokens=tokens, wall_s=wall_s,
        ttft_s=dict(p50=percentile(ttft, 50), p90=percentile(ttft, 90),
                    mean=sum(ttft) / len(ttft) if ttft else None),
        itl_ms=dict(p50=percentile(itl, 50), p90=percentile(itl, 90)),
        decode_ms_per_token=dict(p50=percentile(dec, 50)),
        output_tokens_per_s=tokens / wall_s if wall_s > 0 else None,
    )


# ---- one request, one cell -----------------------------------------------------------------


class Cut(Exception):
    """The time budget ended while the request was still streaming."""


def prompt_ids(seed: int, key: str, length: int) -> list:
    """Random ids for one request, the same for every backend: ``key`` names the request (pass,
    cell, client, index), so no two requests of one server share a prefix beyond chance."""
    rng = random.Random(f"{seed}:{key}")
    return rng.choices(range(TOKEN_LO, TOKEN_HI), k=length)


def stream_generate(url: str, ids: list, new_tokens: int, deadline: float) -> dict:
    """One greedy streamed ``/generate``; the record's times are relative to its send. Its status
    is "ok", or "short" when the stream ended before ``new_tokens`` tokens.

    Raises Cut when ``deadline`` (perf_counter) passes before the stream ends, with the partial
    record in ``args[0]``; other failures raise as they come."""
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0,
                                "ignore_eos": True}}
    marks, meta = [], {}
    t0 = time.perf_counter()

    def record(status: str) -> dict:
        rel = [(t - t0, n) for t, n in marks]
        return dict(status=status, ttft_s=rel[0][0] if rel else None,
                    e2e_s=time.perf_counter() - t0, tokens=rel[-1][1] if rel else 0,
                    prompt_tokens=int(meta.get("prompt_tokens", len(ids))),
                    cached_tokens=int(meta.get("cached_tokens", 0)),
                    decode_ms_per_token=decode_ms_per_token(rel),
                    chunks=len(rel), itl_ms=[round(x, 4) for x in itl_from_marks(rel)])

    read_timeout = min(MAX_WAIT_S, max(1.0, deadline - t0))
    try:
        with requests.post(url + "/generate", json=body, stream=True,
                           timeout=(CONNECT_TIMEOUT_S, read_timeout)) as r:
            r.raise_for_status()
            for raw in r.iter_lines():
                line = raw.decode("utf-8", "replace").strip()
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        raise RuntimeError(f"server error: {chunk['error']}")
                    meta = chunk.get("meta_info", meta)
                    n = int(meta.get("completion_tokens", 0))
                    if n and (not marks or n > marks[-1][1]):
                        marks.append((time.perf_counter(), n))
                done = marks and marks[-1][1] >= new_tokens
                if time.perf_counter() > deadline and not done:
                    raise Cut(record("cut"))  # closing the stream aborts it in the server
    except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
        # a read timeout inside the stream comes as ConnectionError (requests wraps urllib3's)
        if time.perf_counter() >= deadline - 1.0:
            raise Cut(record("cut"))
        raise
    # ignore_eos: anything but new_tokens tokens is a failure ("short"), not a figure to trust
    return record("ok" if marks and marks[-1][1] == new_tokens else "short")


def run_cell(url: str, cell: Cell, new_tokens: int, per_client: int, seed: int, pass_key: str,
             deadline: float, label: str) -> tuple:
    """Run one cell: ``cell.concurrency`` threads released together, each sending its requests
    in turn. Returns (request records, wall seconds from release to the last end)."""
    prompts = [[prompt_ids(seed, f"{pass_key}:{cell.name}:{c}:{i}", cell.context)
                for i in range(per_client)] for c in range(cell.concurrency)]
    records, lock, go = [], threading.Lock(), threading.Event()
    t_go = [0.0]

    def client(c: int) -> None:
        go.wait()
        for i, ids in enumerate(prompts[c]):
            if time.perf_counter() > deadline:
                rec = dict(status="skipped", tokens=0, itl_ms=[])  # never sent
            else:
                t_send = time.perf_counter()
                try:
                    rec = stream_generate(url, ids, new_tokens, deadline)
                except Cut as cut:
                    rec = cut.args[0]
                except Exception as e:  # recorded; the cell goes on
                    rec = dict(status="error", error=f"{type(e).__name__}: {e}"[:500],
                               tokens=0, itl_ms=[])
                rec["start_s"] = t_send - t_go[0]
            rec.update(client=c, index=i)
            with lock:
                records.append(rec)
            print(f"  [{label}] client {c} #{i}: {describe(rec)}", flush=True)

    threads = [threading.Thread(target=client, args=(c,), daemon=True)
               for c in range(cell.concurrency)]
    for t in threads:
        t.start()
    t_go[0] = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_go[0]
    records.sort(key=lambda r: (r["client"], r["index"]))
    return records, wall


def describe(rec: dict) -> str:
    if rec["status"] in ("error", "skipped"):  # no figures
        return rec["status"] + (f": {rec['error']}" if rec.get("error") else "")
    dec = rec.get("decode_ms_per_token")
    ttft = rec.get("ttft_s")
    return (f"{rec['status']}, TTFT {'-' if ttft is None else f'{ttft:.3f} s'}, "
            f"decode {'-' if dec is None else f'{dec:.2f} ms/token'}, {rec['tokens']} tokens")


# ---- servers and the sweep -----------------------------------------------------------------


def server_setup(args, cells: list) -> tuple:
    """(extra server args, max_total_tokens or None, env additions) shared by every backend."""
    longest = max(c.context + c.tokens(args.new_tokens) for c in cells) + CONTEXT_MARGIN
    extra = ["--context-length", str(longest)]
    env = {}
    if args.device == "cuda":
        extra = GPU_ARGS + extra
        if args.mem_fraction_static > 0:
            extra += ["--mem-fraction-static", str(args.mem_fraction_static)]
    extra += list(args.server_arg)
    max_total = args.max_total_tokens
    if max_total is None and args.device != "cuda":  # the CPU: a small fixed pool, enough
        need = max(c.concurrency * (c.context + c.tokens(args.new_tokens)) for c in cells)
        max_total = max(launch.MAX_TOTAL_TOKENS, need + CONTEXT_MARGIN)
    if longest > model_max_positions(args):
        env["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"  # e.g. 131072 + new tokens
    return extra, max_total, env


def model_max_positions(args) -> int:
    path = Path(args.model or launch.embedded_model_path()) / "config.json"
    try:
        return int(json.loads(path.read_text()).get("max_position_embeddings") or 1 << 30)
    except (OSError, ValueError):
        return 1 << 30


@contextmanager
def served_server(backend: str, args, setup: tuple, deadline: float, info: dict, log: Path):
    """The backend's server as every served run starts it (``setup``: server_setup's triple),
    its start bounded by ``deadline`` (perf_counter). ``info`` gets the log's name, the
    environment added, the start-up time and the command. Raises launch.LaunchError."""
    extra, max_total, env = setup
    os.environ.update(env)  # launch.server_env passes this process's environment on
    added = {k: v for k, v in launch.server_env(args.device).items() if k not in ORIGINAL_ENV}
    info.update(log=log.name, env=added)
    t_launch = time.perf_counter()
    startup_timeout = min(launch.STARTUP_TIMEOUT_S, max(30.0, deadline - t_launch))
    with launch.running_server(backend, extra, args.model or None, args.device,
                               max_total_tokens=max_total, log_path=log,
                               startup_timeout_s=startup_timeout) as server:
        info.update(startup_s=time.perf_counter() - t_launch,
                    command=server.command, command_line=shlex.join(server.command))
        print(f"{backend}: ready in {info['startup_s']:.1f} s: {info['command_line']}",
              flush=True)
        yield server


def run_backend(backend: str, args, cells: list, setup: tuple, deadline: float,
                result: dict) -> None:
    """Start the backend's server, run the cold pass and the warm passes, record everything in
    ``result`` (written after every cell), stop the server."""
    log = Path(args.out).with_name(f"{Path(args.out).stem}-{backend}.log")
    info = result["meta"]["servers"].setdefault(backend, {})
    passes = [("cold", 0)] + [("warm", i) for i in range(1, args.warm_passes + 1)]
    try:
        with served_server(backend, args, setup, deadline, info, log) as server:
            write_json(args.out, result)
            for label, index in passes:
                for cell in cells:
                    row = dict(backend=backend, pass_label=label, pass_index=index,
                               cell=cell.name, concurrency=cell.concurrency,
                               context=cell.context,
                               new_tokens=cell.tokens(args.new_tokens))
                    if time.perf_counter() >= deadline:
                        row.update(status="skipped", reason="time budget")
                        print(f"{backend} {label} {cell.name}: skipped (time budget)", flush=True)
                    else:
                        tag = f"{backend} {label}{index if index > 1 else ''} {cell.name}"
                        reqs, wall = run_cell(server.url, cell, cell.tokens(args.new_tokens),
                                              args.requests_per_client, args.seed,
                                              f"{index}", deadline, tag)
                        stats = cell_stats(reqs, wall)
                        status = ("cut" if any(r["status"] in ("cut", "skipped") for r in reqs)
                                  else "failed" if stats["ok"] < len(reqs) else "ok")
                        row.update(status=status, stats=stats, requests=reqs)
                        print(f"{tag}: {status}, {cell_line(stats)}", flush=True)
                    result["rows"].append(row)
                    write_json(args.out, result)
    except launch.LaunchError as e:
        info.update(error=str(e)[-4000:], startup_s=None)
        print(f"{backend}: server did not start: {str(e)[:400]}", flush=True)
        for label, index in passes:
            for cell in cells:
                result["rows"].append(dict(backend=backend, pass_label=label, pass_index=index,
                                           cell=cell.name, concurrency=cell.concurrency,
                                           context=cell.context,
                                           new_tokens=cell.tokens(args.new_tokens),
                                           status="skipped", reason="server did not start"))
    write_json(args.out, result)


def cell_line(s: dict) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    return (f"TTFT p50 {f(s['ttft_s']['p50'], '.3f')} s, ITL p50 {f(s['itl_ms']['p50'], '.2f')} "
            f"ms, {f(s['output_tokens_per_s'], '.1f')} tokens/s, wall {s['wall_s']:.1f} s")


# ---- meta and output -----------------------------------------------------------------------


def version(*dists: str) -> Optional[str]:
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def stack_versions() -> dict:
    return dict(torch=version("torch"), sglang=version("sglang"),
                flashinfer=version("flashinfer-python", "flashinfer"),
                triton=version("triton", "pytorch-triton"))


def device_name(device: str) -> str:
    """torch.cuda.get_device_name in a child process: a CUDA context in this process would take
    GPU memory the server sizes its pool from."""
    if device != "cuda":
        return f"cpu ({os.cpu_count()} cores)"
    try:
        out = subprocess.run([sys.executable, "-c",
                              "import torch; print(torch.cuda.get_device_name(0))"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip() or "cuda (name unknown)"
    except (OSError, subprocess.SubprocessError):
        return "cuda (name unknown)"


def git_commit(given: Optional[str]) -> str:
    """--commit, else the checkout's HEAD (the GPU host has a copy of the tree, no .git)."""
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def make_meta(args, argv: list, cells: list) -> dict:
    return dict(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=args.device, device_name=device_name(args.device),
        model=args.model or "embedded (SmolLM2-135M-Instruct)",
        versions=stack_versions(),
        commit=git_commit(args.commit),
        command="python bench/e2e_served.py " + shlex.join(argv), argv=argv,
        backends=args.backends, cells=[c.name for c in cells], new_tokens=args.new_tokens,
        requests_per_client=args.requests_per_client, warm_passes=args.warm_passes,
        time_budget_s=args.time_budget_s, seed=args.seed, servers={},
    )


def write_json(path: str, result: dict) -> None:
    """Atomic rewrite: a reader (or a killed run) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def add_server_options(ap: argparse.ArgumentParser) -> None:
    """The options that say how a served run starts its servers and seeds its prompts (this
    sweep and bench/served_soak.py); resolve_server_options fills the defaults that follow
    --device."""
    ap.add_argument("--device", choices=["cuda", "cpu"], default=launch.default_device())
    ap.add_argument("--model", default=None,
                    help='model path; "" = the embedded model (default: Llama-3.1-8B shapes '
                         "on CUDA, the embedded model on the CPU)")
    ap.add_argument("--mem-fraction-static", type=float, default=0.80,
                    help="CUDA: the share of GPU memory for weights and the KV pool (<= 0: "
                         "SGLang's default); 0.80 is what the baseline served figures used")
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="force the pool size (default: SGLang sizes it on CUDA; CPU: enough "
                         "for the largest cell)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra server argument (repeat; use --server-arg=--flag)")
    ap.add_argument("--commit", default=None, help="the tree's commit (default: git rev-parse)")
    ap.add_argument("--seed", type=int, default=0)


def resolve_server_options(args: argparse.Namespace) -> argparse.Namespace:
    if args.model is None:
        args.model = LLAMA if args.device == "cuda" else ""
    return args


def parse_args(argv: list) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the result JSON (server logs beside it)")
    add_server_options(ap)
    ap.add_argument("--backends", nargs="+", default=None,
                    help="in the order to run (default: flashinfer kascade on CUDA, "
                         "torch_native kascade on the CPU)")
    ap.add_argument("--cells", type=parse_cells, default=None,
                    help="CONCURRENCYxCONTEXT[xNEW_TOKENS],... in the order to run, e.g. "
                         "1x131000,16x32768x512,16x4096")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16],
                    help="with --contexts, the cross product (when --cells is not given)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--new-tokens", type=int, default=128,
                    help="completion tokens per request (a cell's xNEW_TOKENS overrides)")
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--warm-passes", type=int, default=1, help="passes after the cold one")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="whole run; each backend gets an equal share of what is left")
    args = resolve_server_options(ap.parse_args(argv))
    if args.backends is None:
        args.backends = DEFAULT_BACKENDS[args.device]
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode needs two tokens to time)")
    return args


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cells = cells_from_args(args)
    t_start = time.perf_counter()
    end = t_start + args.time_budget_s if args.time_budget_s else math.inf
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    setup = server_setup(args, cells)
    result = dict(meta=make_meta(args, argv, cells), rows=[])
    write_json(args.out, result)
    for i, backend in enumerate(args.backends):
        now = time.perf_counter()
        share = (end - now) / (len(args.backends) - i) if math.isfinite(end) else math.inf
        run_backend(backend, args, cells, setup, now + share, result)
    result["meta"]["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, result)
    bad = [r for r in result["rows"] if r["status"] == "failed"
           or r.get("reason") == "server did not start"]
    print(f"wrote {args.out}: {len(result['rows'])} rows, "
          f"{sum(r['status'] == 'skipped' for r in result['rows'])} skipped, {len(bad)} failed",
          flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
