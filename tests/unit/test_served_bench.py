"""bench/e2e_served.py (the served sweep), bench/plot_side_by_side.py's served mode and
bench/served_report.py.

Quick tests (no SGLang): the statistics, cell parsing, and the sweep end to end against a tiny
in-process stand-in for ``/generate`` that streams several tokens per chunk, including a time
budget that runs out. The server test (marker: server) runs the real sweep on the CPU with the
embedded model at tiny sizes, kascade vs torch_native, then the plot and the results page.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


served = load("e2e_served")


# ---- statistics ----------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert served.percentile(xs, 50) == 3.0
    assert served.percentile(xs, 90) == pytest.approx(4.6)
    assert served.percentile(xs, 0) == 1.0 and served.percentile(xs, 100) == 5.0
    assert served.percentile([7.0], 90) == 7.0
    assert served.percentile([], 50) is None


def test_itl_counts_a_chunk_of_k_tokens_as_k_gaps():
    # first token at 1.0 s; then one token after 0.1 s, three tokens together after 0.3 s
    marks = [(1.0, 1), (1.1, 2), (1.4, 5)]
    assert served.itl_from_marks(marks) == pytest.approx([100.0, 100.0, 100.0, 100.0])
    assert served.decode_ms_per_token(marks) == pytest.approx(100.0)
    marks = [(0.0, 1), (0.05, 2), (0.45, 4)]
    assert served.itl_from_marks(marks) == pytest.approx([50.0, 200.0, 200.0])
    assert served.decode_ms_per_token(marks) == pytest.approx(150.0)
    assert served.decode_ms_per_token([(0.2, 1)]) is None and served.itl_from_marks([]) == []


def test_cell_stats_pool_tokens_and_count_every_token_in_throughput():
    reqs = [dict(status="ok", ttft_s=1.0, itl_ms=[10.0, 20.0], decode_ms_per_token=15.0,
                 tokens=3),
            dict(status="ok", ttft_s=3.0, itl_ms=[30.0], decode_ms_per_token=30.0, tokens=2),
            dict(status="cut", ttft_s=None, itl_ms=[], decode_ms_per_token=None, tokens=0)]
    s = served.cell_stats(reqs, wall_s=2.5)
    assert s["requests"] == 3 and s["ok"] == 2 and s["completion_tokens"] == 5
    assert s["ttft_s"] == dict(p50=2.0, p90=pytest.approx(2.8), mean=2.0)
    assert s["itl_ms"]["p50"] == 20.0 and s["decode_ms_per_token"]["p50"] == 22.5
    assert s["output_tokens_per_s"] == 2.0


def test_cells_from_a_list_or_a_cross_product():
    cells = served.parse_cells("1x131000, 16x32768x512")
    assert [c.name for c in cells] == ["1x131000", "16x32768x512"]
    assert [c.tokens(128) for c in cells] == [128, 512]
    for bad in ("4", "x100", "0x100", "2x", "ax3", "1x100x1", "1x2x3x4"):
        with pytest.raises(Exception):
            served.parse_cells(bad)
    args = served.parse_args(["--out", "x.json", "--device", "cpu", "--concurrency", "1", "4",
                              "--contexts", "4096", "32768"])
    assert [c.name for c in served.cells_from_args(args)] == ["1x4096", "4x4096", "1x32768",
                                                              "4x32768"]
    assert args.backends == ["torch_native", "kascade"] and args.model == ""
    gpu = served.parse_args(["--out", "x.json", "--device", "cuda", "--cells", "1x131072"])
    assert gpu.backends == ["flashinfer", "kascade"] and gpu.model == served.LLAMA


def test_cuda_servers_leave_the_pool_to_sglang_and_fit_the_longest_cell(tmp_path):
    args = served.parse_args(["--out", "x.json", "--device", "cuda", "--cells",
                              "1x131072,16x32768x512", "--server-arg=--chunked-prefill-size",
                              "--server-arg=8192"])
    extra, max_total, env = served.server_setup(args, args.cells)
    assert max_total is None and "--max-total-tokens" not in extra
    i = extra.index("--context-length")
    assert int(extra[i + 1]) >= 131072 + args.new_tokens
    assert env == {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}  # past 131072 positions
    assert extra[extra.index("--mem-fraction-static") + 1] == "0.8"
    assert extra[-2:] == ["--chunked-prefill-size", "8192"] and "dummy" in extra


# ---- the sweep against a stand-in server ---------------------------------------------------


class FakeGenerate(BaseHTTPRequestHandler):
    """``/generate`` streaming SGLang's shape: the first token, then chunks of 1 or 2 tokens
    ``delay`` s apart; ``/health`` answers 200."""

    delay = 0.01

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n_new = body["sampling_params"]["max_new_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n, step = 0, 1
        try:
            while n < n_new:
                time.sleep(self.delay)
                n = min(n_new, n + step)
                step = 3 - step  # 1, 2, 1, 2 ... tokens per chunk
                meta = dict(prompt_tokens=len(body["input_ids"]), completion_tokens=n,
                            cached_tokens=0)
                self.wfile.write(f"data: {json.dumps({'meta_info': meta})}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client cut the stream (time budget)


@pytest.fixture
def fake_launch(monkeypatch):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeGenerate)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    @contextmanager
    def running_server(backend, extra, model_path, device, max_total_tokens, log_path,
                       startup_timeout_s):
        yield served.launch.Server(url=f"http://127.0.0.1:{httpd.server_port}", pid=0,
                                   log=log_path, command=["fake-server", backend, *extra])

    monkeypatch.setattr(served.launch, "running_server", running_server)
    yield FakeGenerate
    httpd.shutdown()


def model_dir(tmp_path) -> str:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    return str(d)


def test_sweep_against_a_stand_in_server_then_plot_and_page(tmp_path, fake_launch):
    out = tmp_path / "served.json"
    rc = served.main(["--device", "cpu", "--model", model_dir(tmp_path), "--cells", "1x64,3x32x6",
                      "--backends", "kascade", "torch_native",
                      "--new-tokens", "6", "--requests-per-client", "2", "--warm-passes", "2",
                      "--out", str(out), "--commit", "abc123"])
    d = json.loads(out.read_text())
    assert rc == 0 and d["meta"]["commit"] == "abc123"
    assert d["meta"]["servers"]["kascade"]["command"][:2] == ["fake-server", "kascade"]
    assert [(r["backend"], r["pass_label"], r["pass_index"], r["cell"]) for r in d["rows"]] == [
        (b, lab, i, c) for b in ("kascade", "torch_native")
        for lab, i in (("cold", 0), ("warm", 1), ("warm", 2)) for c in ("1x64", "3x32x6")]
    for r in d["rows"]:
        assert r["status"] == "ok" and len(r["requests"]) == r["concurrency"] * 2
        assert r["stats"]["completion_tokens"] == 6 * len(r["requests"])
        # 1 + 2 + 1 + 2 tokens after the first: every token has an ITL, none is counted twice
        assert all(len(q["itl_ms"]) == 5 and q["chunks"] == 4 for q in r["requests"])
    render_and_check(out, tmp_path)


def test_time_budget_skips_the_cells_left_and_cuts_streams(tmp_path, fake_launch, monkeypatch):
    monkeypatch.setattr(fake_launch, "delay", 0.2)  # 40 tokens: ~5 s a request, past the budget
    out = tmp_path / "served.json"
    t0 = time.perf_counter()
    served.main(["--device", "cpu", "--model", model_dir(tmp_path), "--cells", "2x16,1x16",
                 "--new-tokens", "40", "--out", str(out), "--time-budget-s", "3"])
    assert time.perf_counter() - t0 < 8
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows] == ["cut", "skipped", "skipped", "skipped"] * 2
    cut = rows[0]
    assert all(q["status"] == "cut" and 0 < q["tokens"] < 40 for q in cut["requests"])
    assert rows[1]["reason"] == "time budget"
    render_and_check(out, tmp_path)  # cells without figures: "not run" in the plot and page
    assert "skipped (time budget)" in (tmp_path / "results" / "served-test.md").read_text()


def render_and_check(result: Path, tmp_path: Path) -> None:
    png = tmp_path / "plot.png"
    subprocess.run([sys.executable, str(BENCH / "plot_side_by_side.py"), "served", str(png),
                    str(result)], check=True, cwd=tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    page = tmp_path / "results" / "served-test.md"
    page.parent.mkdir(exist_ok=True)
    page.with_suffix(".note.md").write_text("## Against the targets\n\nnote line\n")
    subprocess.run([sys.executable, str(BENCH / "served_report.py"), str(result), str(page)],
                   check=True, cwd=tmp_path)
    text = page.read_text()
    assert "![served sweep](served-test.png)" in text and (page.parent / "served-test.png").exists()
    # the hand-written note sits between the ratio table's plot and the figures
    assert text.index("served-test.png)") < text.index("note line") < text.index("## Figures")
    meta = json.loads(result.read_text())["meta"]
    assert meta["command"] in text and meta["commit"] in text
    for cell in meta["cells"]:
        assert f"| {cell} | cold |" in text and f"| {cell} | warm |" in text


# ---- the real sweep on the CPU -------------------------------------------------------------


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.server
def test_real_sweep_on_the_cpu_kascade_vs_torch_native(tmp_path):
    """About 2 minutes on 2 idle cores (two server starts dominate); the budget is generous so
    that a loaded machine slows the test down instead of skipping cells."""
    out = tmp_path / "served.json"
    subprocess.run([sys.executable, str(BENCH / "e2e_served.py"), "--device", "cpu", "--model", "",
                    "--cells", "1x300,2x300", "--new-tokens", "4", "--time-budget-s", "900",
                    "--out", str(out)], check=True, cwd=tmp_path, timeout=1200)
    d = json.loads(out.read_text())
    meta = d["meta"]
    assert meta["backends"] == ["torch_native", "kascade"] and meta["cells"] == ["1x300", "2x300"]
    assert meta["versions"]["sglang"] and meta["device_name"].startswith("cpu")
    for b in meta["backends"]:
        info = meta["servers"][b]
        assert finite_positive(info["startup_s"]) and "sglang.launch_server" in info["command_line"]
        assert f"--attention-backend {b}" in info["command_line"]
    seen = {(r["backend"], r["pass_label"], r["cell"]) for r in d["rows"]}
    assert seen == {(b, p, c) for b in meta["backends"] for p in ("cold", "warm")
                    for c in meta["cells"]}
    for r in d["rows"]:
        assert r["status"] == "ok", r
        s = r["stats"]
        assert s["ok"] == s["requests"] == r["concurrency"]
        assert s["completion_tokens"] == 4 * r["concurrency"]
        for v in (s["ttft_s"]["p50"], s["ttft_s"]["p90"], s["ttft_s"]["mean"], s["itl_ms"]["p50"],
                  s["itl_ms"]["p90"], s["decode_ms_per_token"]["p50"], s["output_tokens_per_s"],
                  s["wall_s"]):
            assert finite_positive(v), (r["backend"], r["cell"], s)
        for q in r["requests"]:
            assert q["prompt_tokens"] == 300 and q["cached_tokens"] == 0  # fresh ids: no hits
    render_and_check(out, tmp_path)


def test_one_batch_finds_the_benchmark_module_of_the_installed_sglang():
    """bench/one_batch.py runs SGLang's one-batch benchmark, which moved in 0.5.21."""
    pytest.importorskip("sglang.srt.plugins")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import one_batch
    finally:
        sys.path.pop(0)
    name = one_batch.one_batch_module()
    assert name in one_batch.ONE_BATCH_MODULES and importlib.util.find_spec(name) is not None
