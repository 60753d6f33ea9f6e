"""Served end-to-end latency, one long request at a time: a real ``sglang.launch_server`` per
backend (the same command for both, only ``--attention-backend`` differs), requests streamed
through ``/generate`` with random token ids (fresh ones per request: no radix-cache hits).

Per request: TTFT (request sent -> first streamed token) and decode time per token ((last token's
arrival - first's) / tokens between them: robust to chunked streaming). Unlike bench_one_batch,
the server's scheduler overlaps host work with the GPU, so this is what a client sees. A short
warm-up request per server (compilation, graph capture) is not counted.

Usage (GPU host, ../shared/gpu-stack staged):
  PYTHONPATH=/tmp/site python3 -P bench/e2e_served.py --out $OUT/served.json --lengths 131000 \\
      --backends kascade flashinfer --requests 3
Plot: python bench/plot_side_by_side.py served OUT.png served.json
On the CPU (a smoke test of the script with the embedded model):
  python bench/e2e_served.py --device cpu --model "" --backends kascade torch_native \\
      --lengths 600 --new-tokens 8 --requests 1 --out /tmp/served.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import requests

from sglang_kascade.eval import launch

LLAMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "llama-3.1-8b-config")
GPU_ARGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--mem-fraction-static", "0.55",
            "--cuda-graph-backend-prefill=disabled"]  # prefill graphs: as bench/e2e_bench.sh


def streamed(url: str, ids: list, new_tokens: int) -> dict:
    """One greedy streamed request: {ttft_s, decode_ms_per_token, tokens, total_s}."""
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0,
                                "ignore_eos": True}}
    marks = []  # (arrival, completion tokens so far)
    t0 = time.perf_counter()
    with requests.post(url + "/generate", json=body, stream=True, timeout=1800) as r:
        r.raise_for_status()
        for raw in r.iter_lines():
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            n = int(chunk.get("meta_info", {}).get("completion_tokens", 0))
            if n and (not marks or n > marks[-1][1]):
                marks.append((time.perf_counter(), n))
    if len(marks) < 2:
        raise RuntimeError(f"too few streamed tokens to time decode: {marks}")
    (t_first, n_first), (t_last, n_last) = marks[0], marks[-1]
    return dict(ttft_s=t_first - t0, total_s=t_last - t0, tokens=n_last,
                decode_ms_per_token=1e3 * (t_last - t_first) / (n_last - n_first))


def run_backend(backend: str, args, rng: random.Random) -> list:
    model = args.model if args.model else None  # "" -> the embedded model
    extra = GPU_ARGS if args.device == "cuda" else []
    extra = extra + list(args.server_arg)
    cap = max(args.lengths) + args.new_tokens + 64
    log = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"served-{backend}.log")
    rows = []
    with launch.running_server(backend, extra, model, args.device, max_total_tokens=max(cap, 4096),
                               log_path=log) as server:
        streamed(server.url, [rng.randrange(100, 20000) for _ in range(min(2048, cap // 2))], 4)
        for length in args.lengths:
            for i in range(args.requests):
                ids = [rng.randrange(100, 20000) for _ in range(length)]
                r = streamed(server.url, ids, args.new_tokens)
                rows.append(dict(backend=backend, length=length, request=i, **r))
                print(f"{backend} L={length} #{i}: TTFT {r['ttft_s']:.3f} s, decode "
                      f"{r['decode_ms_per_token']:.2f} ms/token", flush=True)
    return rows


def summary(rows: list, backends: list) -> list:
    out = []
    for length in sorted({r["length"] for r in rows}):
        med = {}
        for b in backends:
            mine = [r for r in rows if r["backend"] == b and r["length"] == length]
            med[b] = dict(ttft_s=statistics.median(r["ttft_s"] for r in mine),
                          decode_ms_per_token=statistics.median(r["decode_ms_per_token"]
                                                                for r in mine))
        line = dict(length=length, medians=med)
        if len(backends) == 2:
            a, b = backends  # speedup of the first over the second
            line["speedup"] = dict(
                ttft=med[b]["ttft_s"] / med[a]["ttft_s"],
                decode=med[b]["decode_ms_per_token"] / med[a]["decode_ms_per_token"])
        out.append(line)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", nargs="+", default=["kascade", "flashinfer"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[131000])
    ap.add_argument("--requests", type=int, default=3, help="timed requests per length")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=LLAMA, help='model path ("": the embedded model)')
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra server argument (repeat; use --server-arg=--flag)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for b in args.backends:
        rows += run_backend(b, args, rng)
    result = dict(device=args.device, model=args.model or "embedded", backends=args.backends,
                  new_tokens=args.new_tokens, command=" ".join(sys.argv), rows=rows,
                  summary=summary(rows, args.backends))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for line in result["summary"]:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
