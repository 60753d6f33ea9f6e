"""Smoke load: one real CPU server (kascade), locust headless, all three user classes.

Bounded: 25 s of load with 3 users (one per class) on loopback; users finish the request
they are in after that (locust's --stop-timeout). Speed is reported, never asserted.
"""

from __future__ import annotations

import csv
import json

import pytest

from loadtest import run

pytestmark = pytest.mark.server


def test_smoke_load_against_cpu_kascade_server(tmp_path):
    out = tmp_path / "smoke"
    rc = run.main(["--compare", "--backends", "kascade", "--users", "3", "--spawn-rate", "3",
                   "--duration", "25", "--mix", "chat=1,agent=1,rag=1", "--max-tokens", "8",
                   "--rag-doc-tokens", "256", "--rag-documents", "1", "--think", "0.1,0.3",
                   "--stop-timeout", "240", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    k = summary["runs"]["kascade"]
    print(json.dumps({c: {m: s[m] for m in ("requests", "failures", "ttft_ms", "itl_ms",
                                             "decode_tokens_per_s", "cache_hit_rate")}
                      for c, s in k["classes"].items()}, indent=1))
    assert rc == 0 and k["all"]["failures"] == 0, k["all"]["errors"]
    for cls in ("chat", "agent", "rag"):
        s = k["classes"][cls]
        assert s["ok"] >= 1, cls
        assert s["ttft_ms"]["p50"] > 0 and s["prompt_tokens"] > 0, cls
    # every RAG task asks two questions about one document: the second reuses its prefix
    rag = k["classes"]["rag"]
    assert rag["ok"] >= 2 and rag["cached_tokens"] > 0 and rag["cache_hit_rate"] > 0
    assert k["server"]["cached_tokens"] > 0  # SGLang's own counter (/metrics) agrees
    assert any(s["decode_tokens_per_s"]["mean"] for s in k["classes"].values())

    # locust's own outputs: the CSV names our events, the HTML report exists
    with open(out / "kascade" / "locust_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for cls in ("chat", "agent", "rag"):
        assert int(rows[("POST", f"{cls} /v1/chat/completions")]["Request Count"]) >= 1
        assert int(rows[("TTFT", cls)]["Request Count"]) >= 1
        assert int(rows[("POST", f"{cls} /v1/chat/completions")]["Failure Count"]) == 0
    assert "<html" in (out / "kascade" / "report.html").read_text()[:2000].lower()
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
