"""Serve long prompts on the CPU: time to first token, decode time per token and peak memory,
kascade against a dense backend, side by side in one run.

    python bench/cpu_long_prompt.py --backends kascade torch_native --tokens 2048 8000 \
        --repeats 3 --out /tmp/cpu_long.json

Starts each server in turn (real SGLang processes, the embedded model, default flags plus
``--kascade-args`` for kascade). Per prompt length and repeat, with the radix cache flushed before
each request: one streamed greedy request of ``--new-tokens`` tokens (EOS ignored); time to first
token (TTFT) is the first chunk's arrival, decode time per token the time from the first chunk to
the last over the tokens in between. Medians over the repeats; peak resident memory summed over
the server's processes. Numbers depend on what else runs on the machine: compare backends
measured in the same run only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_utils import (embedded_model_path, flush_cache, generated_text,  # noqa: E402
                          running_server)


class PeakRss:
    """Peak summed RSS of the processes whose command line matches, sampled every 0.5 s."""

    def __init__(self, match):
        self.match, self.peak, self._done = match, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._done.is_set():
            total = 0
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if self.match(" ".join(p.info["cmdline"] or [])):
                        total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def timed_generate(url: str, ids: list, new_tokens: int) -> tuple:
    """(time to first token s, decode s per token) of one streamed greedy /generate of
    ``new_tokens`` tokens (EOS ignored), radix cache flushed first."""
    flush_cache(url)
    t0 = time.perf_counter()
    times, meta = [], {}
    with requests.post(url + "/generate", timeout=3600, stream=True, json={
            "input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0,
                                "ignore_eos": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            times.append(time.perf_counter())
            meta = json.loads(line[5:])["meta_info"]
    got = meta.get("completion_tokens")
    if got != new_tokens or len(times) < 2:
        raise RuntimeError(f"asked for {new_tokens} tokens, got {got} in {len(times)} chunks")
    return times[0] - t0, (times[-1] - times[0]) / (got - 1)


def measure(url: str, prompts: dict, new_tokens: int, repeats: int) -> dict:
    out = {}
    for n, ids in prompts.items():
        ttft, decode = [], []
        for _ in range(repeats):
            first, per_token = timed_generate(url, ids, new_tokens)
            ttft.append(first)
            decode.append(per_token)
        out[n] = dict(ttft_s=ttft, decode_s=decode, ttft_median_s=statistics.median(ttft),
                      decode_median_ms=1e3 * statistics.median(decode))
        print(f"  {n:6d} tokens: TTFT {out[n]['ttft_median_s']:7.2f} s, decode "
              f"{out[n]['decode_median_ms']:7.1f} ms/token (medians of {repeats})", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["kascade", "torch_native"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8000])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kascade-args", default="", help="extra launcher flags for kascade")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    text = generated_text(max(args.tokens) // 3, seed=7)
    ids = tok(text)["input_ids"]
    if len(ids) < max(args.tokens):
        raise SystemExit(f"generated text has {len(ids)} tokens, fewer than {max(args.tokens)}")
    prompts = {n: ids[:n] for n in args.tokens}
    results = {}
    for backend in args.backends:
        extra = shlex.split(args.kascade_args) if backend == "kascade" else []
        print(f"{backend} {' '.join(extra)}".rstrip(), flush=True)
        with running_server(backend, extra) as url:
            with PeakRss(lambda c: "sglang" in c and "cpu_long_prompt" not in c) as rss:
                rows = measure(url, prompts, args.new_tokens, args.repeats)
        results[backend] = dict(extra=extra, peak_rss_gib=rss.peak / 2**30, lengths=rows)
        print(f"  peak RSS {rss.peak / 2**30:.2f} GiB", flush=True)
    if "kascade" in results and len(results) > 1:
        ka = results["kascade"]["lengths"]
        for b, res in results.items():
            if b == "kascade":
                continue
            for n, row in res["lengths"].items():
                print(f"{n:6d} tokens: TTFT {b} / kascade = "
                      f"{row['ttft_median_s'] / ka[n]['ttft_median_s']:.2f}x, decode "
                      f"{row['decode_median_ms'] / ka[n]['decode_median_ms']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            command=" ".join(["python", "bench/cpu_long_prompt.py"] + sys.argv[1:]),
            date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            new_tokens=args.new_tokens, repeats=args.repeats, results=results), indent=1) + "\n")


if __name__ == "__main__":
    main()
