"""Serve one long prompt on the CPU and report time and peak memory, kascade vs a dense backend.

    python bench/cpu_long_prompt.py --backends kascade torch_native --tokens 8000

Starts each server in turn (real SGLang processes, embedded model), sends one greedy request of
``--tokens`` generated prompt tokens plus ``--new-tokens`` output tokens, and prints wall time
and the peak resident memory summed over the server's processes. Numbers depend on what else
runs on the machine: compare backends measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_utils import embedded_model_path, generated_text, running_server  # noqa: E402


def peak_rss_while(fn, pid_filter):
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            total = 0
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if pid_filter(" ".join(p.info["cmdline"] or [])):
                        total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            time.sleep(0.5)

    t = threading.Thread(target=watch)
    t.start()
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    return result, peak[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["kascade", "torch_native"])
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    ids = tok(generated_text(args.tokens // 3, seed=7))["input_ids"][: args.tokens]
    rows = []
    for backend in args.backends:
        with running_server(backend) as url:
            def one():
                t0 = time.time()
                r = requests.post(url + "/generate", timeout=3600, json={
                    "input_ids": ids,
                    "sampling_params": {"max_new_tokens": args.new_tokens, "temperature": 0}})
                r.raise_for_status()
                return time.time() - t0

            seconds, peak = peak_rss_while(one, lambda c: "sglang" in c and "cpu_long_prompt" not in c)
        rows.append((backend, seconds, peak / 2**30))
        print(f"{backend:14s} {len(ids)} tokens: {seconds:7.1f} s, peak RSS {peak / 2**30:.2f} GiB",
              flush=True)
    base = dict((b, s) for b, s, _ in rows)
    if "kascade" in base and len(base) > 1:
        for b, s in base.items():
            if b != "kascade":
                print(f"time {b} / kascade = {s / base['kascade']:.2f}x")


if __name__ == "__main__":
    main()
