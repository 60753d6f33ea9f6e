"""bench/served_soak.py: the soak under the served benchmark's load with profile swaps.

Quick tests (no SGLang): request records as the soak report counts them, and the page of a
served soak. The server test (marker: server) runs the real soak on the CPU with the embedded
model, a real sidecar and a tiny load, and checks requests, swaps, the audit and the files.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadtest.summary import summarize
from test_served_bench import BENCH, load

soak_run = load("served_soak")


def test_stream_records_count_as_ok_failed_or_cut():
    ok = dict(status="ok", ttft_s=0.5, e2e_s=1.5, tokens=4, itl_ms=[100.0] * 3, prompt_tokens=200,
              cached_tokens=0)
    r = soak_run.to_record(ok, 1000.0, 4)
    assert r.ok and not r.interrupted and r.error == "" and r.cls == "served"
    assert (r.t_start, r.ttft_ms, r.latency_ms, r.completion_tokens) == (1000.0, 500.0, 1500.0, 4)
    assert r.decode_tokens_per_s == pytest.approx(10.0)

    short = soak_run.to_record(dict(ok, status="short", tokens=3), 1000.0, 4)
    assert not short.ok and short.error == "wrong token count: 3 of 4"
    err = soak_run.to_record(dict(status="error", error="HTTPError: 500", e2e_s=0.1), 1.0, 4)
    assert not err.ok and err.error == "HTTPError: 500" and err.ttft_ms is None
    cut = soak_run.to_record(dict(ok, status="cut", tokens=2), 1000.0, 4)
    assert cut.interrupted and not cut.ok and cut.error == ""

    s = summarize([r, short, err, cut], 10.0)["all"]
    assert (s["requests"], s["ok"], s["failures"], s["interrupted"]) == (3, 1, 2, 1)
    assert s["errors"] == {"wrong token count": 1, "HTTPError": 1}


def test_served_soak_page_names_its_load_and_audit(tmp_path):
    from loadtest.soak import write_report

    args = soak_run.parse_args(["--out", str(tmp_path), "--device", "cpu", "--concurrency", "2",
                                "--context", "200", "--new-tokens", "4", "--duration", "30",
                                "--commit", "abc123"])
    assert args.profiles == "smollm2-135m-instruct,smollm2-135m-instruct-derived-anchors"
    rep = soak_run.base_report(args, ["--device", "cpu"], args.profiles.split(","), {})
    t0 = rep["t0"]
    recs = [soak_run.to_record(dict(status="ok", ttft_s=0.5, e2e_s=1.5, tokens=4,
                                    itl_ms=[100.0] * 3), t0 + i, 4) for i in range(3)]
    soak_run.fill(rep, recs, [{"t_s": 1.2, "profile": "b", "ok": True, "generation": 2,
                               "elapsed_ms": 40.0}], 25.0)
    rep["audit"] = {"succeeded": 1, "in_history": 1, "in_audit_log": 1, "audited": 1,
                    "all_audited": True, "applied": 2.0, "refused": 0.0}
    write_report(rep, recs, args.report, draw=False)
    md = (tmp_path / "served-soak.md").read_text()
    assert md.startswith("# Soak: 25 s of served load (2 x 200 tokens + 4 new), profile swap "
                         "every 30.0 s")
    assert "2 concurrent streaming clients" in md and "for 25 s (asked: 30 s)" in md
    assert "commit `abc123`" in md and "sglang" in md and "cpu (" in md
    assert "1 of 1 successful swaps found in the sidecar's history and audit log" in md
    assert "| all | 3 | 0 |" in md and "No timeline drawn" in md
    assert rep["summary"]["window_s"] == pytest.approx(3.5)  # first send to last answer


@pytest.mark.server
def test_real_soak_on_the_cpu_swaps_under_served_load(tmp_path):
    """About 70 s on 2 idle cores: the server start (~25 s), a warm-up request, 24 s of load
    with swaps at 6, 12 and 18 s, the drain, the server's stop. On a loaded CPU a prefill can
    outlast a swap interval, and a profile staged and then replaced before the next batch is
    never applied (by design), so the applied count is checked where it is certain: the
    initial activation (the warm-up's batches) and the last swap (the load goes on after it).
    The deadline leaves a slow start room: a server start took 90 s at load average 7."""
    out = tmp_path / "soak"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "served_soak.py"), "--device", "cpu", "--concurrency", "2",
         "--context", "200", "--new-tokens", "4", "--duration", "24", "--swap-every", "6",
         "--drain-s", "40", "--deadline-s", "300", "--out", str(out)],
        cwd=tmp_path, timeout=420, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "served-soak.json").read_text())
    a = rep["summary"]["all"]
    assert a["failures"] == 0 and a["ok"] >= 2 and a["ok"] == len(
        [r for r in rep["records"] if r["ok"]])
    for r in rep["records"]:
        if r["ok"]:
            assert r["completion_tokens"] == 4 and r["prompt_tokens"] == 200
    swaps = rep["swaps"]
    assert len(swaps) == 3 and all(s["ok"] and s["acknowledged"] for s in swaps)
    assert all(s["in_history"] and s["in_audit_log"] for s in swaps)
    assert [s["profile"] for s in swaps[:2]] == ["smollm2-135m-instruct-derived-anchors",
                                                 "smollm2-135m-instruct"]
    au = rep["audit"]
    assert au["all_audited"] and au["audited"] == len(swaps) and au["refused"] == 0
    assert au["applied"] >= 2 and rep["warmup"]["status"] == "ok"
    last = rep["sidecar_active"]["schedulers"][0]
    assert (last["current_name"], last["current_generation"], last["applied_generation"]) == (
        swaps[-1]["profile"], swaps[-1]["generation"], swaps[-1]["generation"])
    assert rep["sidecar_metrics"]["kascade_swaps_total"] == len(swaps) + 1  # + the initial one
    log = [json.loads(line) for line in (out / "audit.log").read_text().splitlines()]
    assert sum(e["action"] == "activate" and e["result"] == "active" for e in log) == \
        len(swaps) + 1
    md = (out / "served-soak.md").read_text()
    assert rep["command"] in md and rep["commit"] in md and "**failed: 0**" in md
    assert "![timeline](served-soak.png)" in md
    assert (out / "served-soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "server.log").stat().st_size > 0 and (out / "sidecar.log").exists()
