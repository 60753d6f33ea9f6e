"""Summaries of a load-test run: per user class, from records.jsonl and /metrics scrapes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .config import CLASSES
from .stream import Record


def read_records(path) -> list:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(Record(**json.loads(line)))
    return out


def percentile(values, q: float):
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def class_summary(records: list, duration_s: float) -> dict:
    interrupted = [r for r in records if r.interrupted]
    records = [r for r in records if not r.interrupted]
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    itl = [g for r in ok for g in r.itl_ms]
    tps = [r.decode_tokens_per_s for r in ok if r.decode_tokens_per_s is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    completion = sum(r.completion_tokens for r in ok)
    errors = {}
    for r in records:
        if not r.ok:
            key = r.error.split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(records),
        "ok": len(ok),
        "failures": len(records) - len(ok),
        "errors": errors,
        "interrupted": len(interrupted),  # in flight when the run ended: neither ok nor failed
        "ttft_ms": {"mean": _mean(ttft), "p50": percentile(ttft, 50), "p90": percentile(ttft, 90),
                    "p99": percentile(ttft, 99)},
        "itl_ms": {"mean": _mean(itl), "p50": percentile(itl, 50), "p90": percentile(itl, 90),
                   "p99": percentile(itl, 99)},
        "decode_tokens_per_s": {"mean": _mean(tps), "p50": percentile(tps, 50)},
        "latency_ms": {"p50": percentile([r.latency_ms for r in ok], 50),
                       "p90": percentile([r.latency_ms for r in ok], 90)},
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": completion,
        "cache_hit_rate": cached / prompt if prompt else None,
        "mean_prompt_tokens": prompt / len(ok) if ok else None,
        "output_tokens_per_s": completion / duration_s if duration_s > 0 else None,
        "requests_per_s": len(ok) / duration_s if duration_s > 0 else None,
    }


def load_window(records: list, fallback_s: float) -> float:
    """Seconds from the first request sent to the last answer received (cut requests left
    out); ``fallback_s`` when no request finished."""
    done = [r for r in records if not r.interrupted]
    if not done:
        return fallback_s
    return max(r.t_start + r.latency_ms / 1000.0 for r in done) - min(r.t_start for r in done)


def summarize(records: list, duration_s: float) -> dict:
    """{'classes': {cls: summary}, 'all': summary} over the classes present in ``records``."""
    classes = {c: class_summary([r for r in records if r.cls == c], duration_s)
               for c in CLASSES if any(r.cls == c for r in records)}
    return {"classes": classes, "all": class_summary(records, duration_s)}


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict:
    """Sum of every sample of each metric name (labels summed over): {name: value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


def server_cache_hit_rate(before: dict, after: dict):
    """Radix-cache hit rate of the requests between two /metrics scrapes (SGLang counters)."""
    prompt = after.get("sglang:prompt_tokens_total", 0.0) - before.get("sglang:prompt_tokens_total", 0.0)
    cached = after.get("sglang:cached_tokens_total", 0.0) - before.get("sglang:cached_tokens_total", 0.0)
    return {"prompt_tokens": prompt, "cached_tokens": cached,
            "cache_hit_rate": cached / prompt if prompt > 0 else None}


def token_times(r: Record) -> list:
    """Wall-clock time of each streamed content chunk of a successful request."""
    if not r.ok or r.ttft_ms is None:
        return []
    t = r.t_start + r.ttft_ms / 1000.0
    out = [t]
    for gap in r.itl_ms:
        t += gap / 1000.0
        out.append(t)
    return out


def timeline(records: list, t0: float, bin_s: float = 10.0) -> list:
    """Per time bin: requests, failures, TTFT and ITL p50 of the requests that started in it,
    and output tokens/s of the content chunks streamed in it (one chunk ~ one token)."""
    records = [r for r in records if not r.interrupted]
    if not records:
        return []
    emitted = [t for r in records for t in token_times(r)]
    end = max([r.t_start for r in records] + emitted)
    n_bins = int((end - t0) // bin_s) + 1
    bins = [[] for _ in range(n_bins)]
    tokens = [0] * n_bins
    for r in records:
        bins[max(0, int((r.t_start - t0) // bin_s))].append(r)
    for t in emitted:
        tokens[max(0, int((t - t0) // bin_s))] += 1
    out = []
    for i, rs in enumerate(bins):
        ok = [r for r in rs if r.ok]
        out.append({
            "t_s": i * bin_s,
            "requests": len(rs),
            "failures": len(rs) - len(ok),
            "ttft_p50_ms": percentile([r.ttft_ms for r in ok if r.ttft_ms is not None], 50),
            "itl_p50_ms": percentile([g for r in ok for g in r.itl_ms], 50),
            "output_tokens_per_s": tokens[i] / bin_s,
        })
    return out


def in_flight_at(records: list, t: float) -> list:
    """Requests (successful or failed, not cut) sent before and finished after wall time ``t``."""
    return [r for r in records if not r.interrupted
            and r.t_start <= t <= r.t_start + r.latency_ms / 1000.0]
