"""Load-test tooling without a server: SSE parsing, records, summaries, prompts, plots, mix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.config import parse_mix
from loadtest.prompts import build_prompts, load_prompts, save_prompts
from loadtest.stream import Record, StreamError, parse_sse, record_from_stream
from loadtest.summary import (in_flight_at, parse_prometheus, percentile, server_cache_hit_rate,
                              summarize, timeline)

REPO = Path(__file__).resolve().parents[2]


def _chunk(content=None, finish=None, usage=None, role=False):
    delta = {"content": content}
    if role:
        delta["role"] = "assistant"
    body = {"choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return "data: " + json.dumps(body)


USAGE = {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103,
         "prompt_tokens_details": {"cached_tokens": 64}}


def _stream(*lines, t0=10.0, dt=0.5):
    return [(t0 + i * dt, line.encode()) for i, line in enumerate(lines)]


def test_parse_sse_times_tokens_and_usage():
    lines = _stream(_chunk("", role=True), _chunk("Hel"), "", _chunk("lo"), _chunk("!"),
                    _chunk(None, finish="length"), _chunk(usage=USAGE), "data: [DONE]")
    res = parse_sse(lines)
    assert res.text == "Hello!"
    assert res.content_times == [10.5, 11.5, 12.0]  # the empty role chunk and blank line skipped
    assert res.finish_reason == "length" and res.done
    rec = record_from_stream("rag", 1000.0, 10.0, 14.0, res, messages=2)
    assert rec.ttft_ms == pytest.approx(500.0)
    assert rec.itl_ms == pytest.approx([1000.0, 500.0])
    assert rec.latency_ms == pytest.approx(4000.0)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens) == (100, 3, 64)
    assert rec.decode_tokens_per_s == pytest.approx(2 / 1.5)


@pytest.mark.parametrize("lines, why", [
    ([_chunk("a"), _chunk(usage=USAGE)], "without \\[DONE\\]"),
    ([_chunk(""), _chunk(usage=USAGE), "data: [DONE]"], "empty answer"),
    ([_chunk("  "), _chunk(usage=USAGE), "data: [DONE]"], "empty answer"),
    ([_chunk("a"), "data: [DONE]"], "no usage"),
    (['data: {"error": {"message": "boom", "code": 500}}'], "server error.*boom"),
    (["data: {not json"], "bad JSON"),
    (["<html>oops</html>"], "unexpected line"),
])
def test_parse_sse_failures(lines, why):
    with pytest.raises(StreamError, match=why):
        parse_sse(_stream(*lines))


def test_usage_without_cache_report_counts_zero_cached():
    usage = dict(USAGE, prompt_tokens_details=None)
    res = parse_sse(_stream(_chunk("x"), _chunk("y"), _chunk(usage=usage), "data: [DONE]"))
    assert record_from_stream("chat", 0, 10.0, 12.0, res, 1).cached_tokens == 0


def test_parse_mix():
    assert parse_mix("chat=2,agent=1,rag=1") == {"chat": 2, "agent": 1, "rag": 1}
    assert parse_mix("rag") == {"chat": 0, "agent": 0, "rag": 1}
    for bad in ("chat=1,bogus=1", "chat=x", "chat=-1", "chat=0", ""):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_percentile_matches_linear_interpolation():
    assert percentile([], 50) is None
    assert percentile([5.0], 90) == 5.0
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile(list(range(11)), 90) == pytest.approx(9.0)


def _rec(cls, ok=True, **kw):
    base = dict(cls=cls, t_start=100.0, ok=ok, latency_ms=1000.0, ttft_ms=200.0,
                itl_ms=[50.0, 150.0], prompt_tokens=400, completion_tokens=3, cached_tokens=300)
    if not ok:
        base.update(ttft_ms=None, itl_ms=[], prompt_tokens=0, completion_tokens=0,
                    cached_tokens=0, error="StreamError: empty answer")
    base.update(kw)
    return Record(**base)


def test_summarize_per_class_and_cache_hit_rate():
    recs = [_rec("rag"), _rec("rag", cached_tokens=100, t_start=115.0), _rec("chat", ok=False),
            _rec("rag", ok=False, interrupted=True, error="interrupted: the run ended")]
    s = summarize(recs, duration_s=10.0)
    rag = s["classes"]["rag"]
    assert (rag["requests"], rag["ok"], rag["failures"], rag["interrupted"]) == (2, 2, 0, 1)
    assert rag["cache_hit_rate"] == pytest.approx(400 / 800)
    assert rag["itl_ms"]["p50"] == pytest.approx(100.0)
    assert rag["output_tokens_per_s"] == pytest.approx(0.6)
    assert rag["decode_tokens_per_s"]["mean"] == pytest.approx(2 / 0.2)
    chat = s["classes"]["chat"]
    assert chat["failures"] == 1 and chat["errors"] == {"StreamError": 1}
    assert chat["cache_hit_rate"] is None and chat["ttft_ms"]["p50"] is None
    assert "agent" not in s["classes"]
    assert s["all"]["requests"] == 3 and s["all"]["failures"] == 1

    bins = timeline(recs, t0=100.0, bin_s=10.0)
    assert [b["requests"] for b in bins] == [2, 1]
    assert [b["failures"] for b in bins] == [1, 0]
    # chunks at t_start + 0.2, + 0.25, + 0.4 s: three per successful request, in its bin
    assert [b["output_tokens_per_s"] for b in bins] == pytest.approx([0.3, 0.3])
    assert in_flight_at(recs, 100.5) == [recs[0], recs[2]]
    assert in_flight_at(recs, 101.5) == []


def test_prometheus_counters_and_server_hit_rate():
    text = """# HELP sglang:prompt_tokens_total x
sglang:prompt_tokens_total{is_streaming="false",model_name="m"} 6.0
sglang:prompt_tokens_total{is_streaming="true",model_name="m"} 838.0
sglang:cached_tokens_total{cache_source="device",model_name="m"} 412.0
sglang:cache_hit_rate{tp_rank="0"} 0.98
"""
    m = parse_prometheus(text)
    assert m["sglang:prompt_tokens_total"] == 844.0
    before = {"sglang:prompt_tokens_total": 44.0, "sglang:cached_tokens_total": 12.0}
    assert server_cache_hit_rate(before, m) == {"prompt_tokens": 800.0, "cached_tokens": 400.0,
                                                "cache_hit_rate": 0.5}
    assert server_cache_hit_rate({}, {})["cache_hit_rate"] is None


ESSAYS = [(f"essay{i}", " ".join(
    f"Sentence number {j} of essay {i} talks about startups and programming languages."
    for j in range(200))) for i in range(5)]


def test_prompts_deterministic_shared_prefixes_and_sizes(tmp_path):
    a = build_prompts(7, rag_doc_tokens=300, essays=ESSAYS)
    b = build_prompts(7, rag_doc_tokens=300, essays=ESSAYS)
    assert a == b
    assert build_prompts(8, rag_doc_tokens=300, essays=ESSAYS) != a
    assert len(a.rag_documents) == 2 and len(a.rag_questions) == 2
    for doc, qs in zip(a.rag_documents, a.rag_questions):
        assert 0 < len(doc["text"]) <= 300 * 4 + 100
        assert len(set(qs)) > 1  # users ask different questions over the same document
    assert a.chat_system.startswith("You are a concise assistant")
    assert all(o.startswith("[search result from essay") for o in a.agent_tool_outputs)
    assert load_prompts(save_prompts(a, tmp_path / "p.json")) == a


def test_prompts_from_the_shipped_essays():
    p = build_prompts(0)
    assert p.description["rag_documents"] and all(p.rag_questions)
    assert all(1000 < len(d["text"]) <= 1200 * 4 + 300 for d in p.rag_documents)


@pytest.mark.parametrize("mix, classes", [("chat=1,agent=1,rag=1", ["ChatUser", "AgentUser", "RagUser"]),
                                          ("rag=2", ["RagUser"])])
def test_locustfile_user_classes_follow_the_mix(mix, classes):
    out = subprocess.run([sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"),
                          "--list"], env={"LOADTEST_MIX": mix, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    listed = [line.strip() for line in out.stdout.splitlines()[1:] if line.strip()]
    assert sorted(listed) == sorted(classes)


def test_compare_png_is_written(tmp_path):
    from loadtest.plot import compare_png

    runs = {}
    for label, ttft in (("kascade", 150.0), ("torch_native", 250.0)):
        recs = [_rec(c, ttft_ms=ttft) for c in ("chat", "agent", "rag")] + [_rec("rag", ok=False)]
        runs[label] = summarize(recs, 10.0)
        runs[label]["server"] = {"cache_hit_rate": 0.7}
    path = compare_png(runs, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soak_second_profile_same_model_other_anchors():
    from sglang_kascade.profile import load_profile, profile_from_dict

    from loadtest.soak import PROFILE_A, PROFILE_B, second_profile

    a, b = load_profile(PROFILE_A), profile_from_dict(second_profile())
    assert b.name == PROFILE_B and b.model == a.model
    assert b.anchor_layers != a.anchor_layers


class _FakeAdmin:
    def __init__(self, fail_on=()):
        self.calls, self.fail_on = [], set(fail_on)

    def post(self, path, body=None):
        import requests

        self.calls.append(path)
        name = path.split("/")[3]
        r = requests.Response()
        r.status_code = 504 if len(self.calls) in self.fail_on else 200
        r.headers["content-type"] = "application/json"
        gen = len(self.calls)
        # the third call is answered before its scheduler took the generation: not acknowledged
        sched = {"pid": 1, "current_generation": gen - (len(self.calls) == 3)}
        r._content = json.dumps({"active": name, "generation": gen, "schedulers": [sched]}
                                if r.status_code == 200 else {"detail": "timeout"}).encode()
        return r


def test_soak_swap_loop_alternates_and_records_failures():
    import threading
    import time

    from loadtest.soak import report_md, swap_loop

    admin, swaps, stop = _FakeAdmin(fail_on={2}), [], threading.Event()
    th = threading.Thread(target=swap_loop, args=(admin, ["a", "b"], 0.01, time.time(), stop, swaps))
    th.start()
    while len(swaps) < 4:
        time.sleep(0.01)
    stop.set()
    th.join()
    assert [s["profile"] for s in swaps[:4]] == ["b", "a", "b", "a"]
    assert [s["ok"] for s in swaps[:4]] == [True, False, False, True]
    assert swaps[1]["status"] == 504 and "timeout" in swaps[1]["error"]
    assert swaps[2]["generation"] == 3 and swaps[2]["status"] == 200
    assert [s["acknowledged"] for s in swaps[:4]] == [True, False, False, True]

    summary = summarize([_rec("rag"), _rec("chat")], 10.0)
    summary["server"] = {"cache_hit_rate": 0.5}
    rep = {"command": "python -m loadtest.soak", "date": "d", "device": "CPU", "server": "kascade",
           "config": {"duration_s": 600, "swap_every_s": 30, "users": 3, "mix": "chat=1",
                      "max_tokens": 8, "think_s": "0.5,2", "profiles": ["a", "b"]},
           "summary": summary, "swaps": swaps[:4], "notes": [],
           "sidecar_metrics": {"kascade_swaps_total": 3.0}}
    md = report_md(rep, "x.png")
    assert "4 attempted, 2 succeeded" in md and "**failed: 0**" in md and "![timeline](x.png)" in md
    assert "| rag | 1 | 0 |" in md


def test_run_report_md_has_a_row_per_server_and_class():
    from loadtest.run import report_md

    runs = {}
    for label in ("kascade", "torch_native"):
        runs[label] = summarize([_rec("chat"), _rec("rag"), _rec("rag", ok=False)], 10.0)
        runs[label]["server"] = {"cache_hit_rate": 0.25}
    summary = {"config": {"users": 3, "mix": "chat=1,rag=1", "duration_s": 60, "max_tokens": 8,
                          "think_s": "0.2,1.0", "rag_doc_tokens": 256},
               "runs": runs, "command": "python -m loadtest.run --compare", "date": "d"}
    md = report_md(summary, "r.png", ["a note"])
    assert "| kascade | rag | 2 | 1 | 0 | 200 / 200 |" in md
    assert "| torch_native | all | 3 | 1 |" in md
    assert "kascade 0.25, torch_native 0.25" in md and "- a note" in md


def test_soak_report_rebuilds_from_its_json(tmp_path):
    from loadtest.soak import rebuild, write_report

    recs = [_rec("chat", t_start=1000.0), _rec("rag", t_start=1012.0, latency_ms=9000.0)]
    summary = summarize(recs, 20.0)
    summary["server"] = {"cache_hit_rate": 0.5}
    rep = {"command": "c", "date": "d", "device": "CPU", "server": "kascade", "t0": 1000.0,
           "config": {"duration_s": 20, "swap_every_s": 5, "users": 2, "mix": "chat=1,rag=1",
                      "max_tokens": 8, "think_s": "0,1", "profiles": ["a", "b"], "bin_s": 5.0},
           "summary": summary, "notes": [], "sidecar_metrics": None,
           "swaps": [{"t_s": 5.0, "profile": "b", "ok": True, "elapsed_ms": 40.0},
                     {"t_s": 15.0, "profile": "a", "ok": True, "elapsed_ms": 60.0}]}
    report = tmp_path / "soak"
    write_report(rep, recs, report)
    first = (tmp_path / "soak.md").read_text()
    assert "in flight across at least one swap: 1 of 2" in first  # the rag request spans 15 s
    (tmp_path / "soak.md").unlink()
    rebuild(report)
    assert (tmp_path / "soak.md").read_text() == first
    assert (tmp_path / "soak.png").read_bytes()[:4] == b"\x89PNG"


def test_soak_audit_finds_each_swap_in_history_and_audit_log(tmp_path):
    from loadtest.soak import audit_line, audit_swaps, soak_passed

    swaps = [{"t_s": 5.0, "profile": "b", "ok": True, "generation": 2},
             {"t_s": 10.0, "profile": "a", "ok": True, "generation": 3},
             {"t_s": 15.0, "profile": "b", "ok": False, "generation": None}]
    state = {"history": {"history": [{"generation": 1, "name": "a"}, {"generation": 2, "name": "b"},
                                     {"generation": 3, "name": "b"}]},  # 3 under another name
             "metrics": {"kascade_swaps_applied_total": 3.0, "kascade_swaps_refused_total": 0.0}}
    log = tmp_path / "audit.log"
    lines = [{"action": "activate", "name": "b", "result": r,
              "detail": "generation 2, previous 'a'"} for r in ("requested", "active")]
    lines += [{"action": "activate", "name": "a", "result": "requested",  # outcome never logged
               "detail": "generation 3, previous 'b'"},
              {"action": "upload", "name": "a", "result": "active", "detail": "generation 3"}]
    log.write_text("\n".join(map(json.dumps, lines)) + "\nnot json\n")

    au = audit_swaps(swaps, state, log)
    assert [(s["in_history"], s["in_audit_log"]) for s in swaps[:2]] == [(True, True),
                                                                          (False, False)]
    assert "in_history" not in swaps[2]  # a failed swap is counted as failed, not audited
    assert au == {"succeeded": 2, "in_history": 1, "in_audit_log": 1, "audited": 1,
                  "all_audited": False, "applied": 3.0, "refused": 0.0}
    assert "1 of 2 successful swaps found in the sidecar's history and audit log" in \
        audit_line(au)[0]

    state["history"]["history"][2]["name"] = "a"
    au = audit_swaps(swaps[:2], state)  # no audit log given: history alone
    assert au["in_audit_log"] is None and au["all_audited"] and au["audited"] == 2
    rep = {"summary": summarize([_rec("rag")], 10.0), "swaps": swaps[:2], "audit": au}
    assert soak_passed(rep)
    assert not soak_passed(dict(rep, audit=dict(au, refused=1.0)))  # refused at a batch boundary
    assert not soak_passed(dict(rep, swaps=swaps))  # a failed swap
