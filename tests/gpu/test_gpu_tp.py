"""``--tp-size N`` with kascade on several GPUs (markers: gpu, server; skipped with fewer than N
GPUs). N from KASCADE_TP (default 2); bench/gpu_tp_run.sh runs this file.

Random weights (``--load-format dummy``) on a 6-layer Llama-3.1-shaped model with 8 KV heads
(head dim 128, GQA 4), a profile whose reuse heads read other anchor heads of their own rank
(rank-local at N, tp.py). Checks: fraction 1.0 gives FlashInfer's tokens at the same TP size;
at 10%, decode CUDA graphs give eager decode's tokens and TP N gives TP 1's, up to near ties
(random weights: flat logits; bf16 all-reduces in another order); a hot swap reaches every rank.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from server_utils import STARTUP_TIMEOUT_S, assert_greedy_runs_agree, generate
from sglang_kascade.control import ControlPaths, write_json_atomic
from sglang_kascade.eval import launch

TP = int(os.environ.get("KASCADE_TP", "2"))
pytestmark = [pytest.mark.gpu, pytest.mark.server,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < TP
                                 or TP < 2, reason=f"needs {max(TP, 2)} CUDA GPUs")]

ASSETS = Path(__file__).parent / "gpu_assets"
MODEL = str(ASSETS / "mini-llama-8kv")  # config only: 8 KV heads
COMMON = ["--load-format", "dummy", "--dtype", "bfloat16", "--mem-fraction-static", "0.3",
          "--tokenizer-path", str(ASSETS / "mini-llama"), "--cuda-graph-backend-prefill=disabled"]
SPARSE = ["--kascade-k-min", "32", "--kascade-dense-prefill-below", "0",
          "--chunked-prefill-size", "1024"]
LAYERS, HKV = 6, 8


def rank_local_profile(name: str, anchors: list, shift: int) -> dict:
    """Reuse head h reads head (h + shift) mod b of its own block of b = HKV / TP heads."""
    b = HKV // TP
    row = [h - h % b + (h + shift) % b for h in range(HKV)]
    ident = list(range(HKV))
    return {"schema_version": 1, "name": name,
            "model": {"architecture": "LlamaForCausalLM", "num_layers": LAYERS,
                      "num_q_heads": 32, "num_kv_heads": HKV, "head_dim": 128},
            "dense_layers": [0], "anchor_layers": anchors,
            "head_map": [ident if i in anchors else row for i in range(LAYERS)],
            "topk_fraction": 0.1, "k_min": 32, "tile_size": 32, "granularity": "token",
            "tp_sizes": sorted({1, TP}), "provenance": {"source": "test_gpu_tp"}}


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, 120000, (n,), generator=g).tolist() for n in (17, 700, 3000)]


def run(backend, extra, tp=TP, logprobs=0):
    with launch.running_server(backend, COMMON + ["--tp-size", str(tp)] + extra, MODEL, "cuda",
                               startup_timeout_s=STARTUP_TIMEOUT_S) as server:
        outs = [generate(server.url, input_ids=p, max_new_tokens=16, top_logprobs=logprobs)
                for p in prompts()]
        return outs, server.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def profile_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-profiles") / "a.json"
    path.write_text(json.dumps(rank_local_profile("tp-a", [0, 2, 4], shift=1)))
    return str(path)


def test_fraction_one_gives_flashinfer_tokens_at_the_same_tp(profile_a):
    kascade, log = run("kascade", ["--kascade-profile", profile_a, "--kascade-topk", "1.0"])
    flashinfer, _ = run("flashinfer", [])
    assert [o["output_ids"] for o in kascade] == [o["output_ids"] for o in flashinfer]
    assert f"kascade: TP rank {TP - 1} of {TP}" in log, log[-3000:]


def test_sparse_graphs_equal_eager_and_tp1(profile_a):
    args = SPARSE + ["--kascade-profile", profile_a]
    graphs, log = run("kascade", args, logprobs=2)
    eager, _ = run("kascade", args + ["--disable-cuda-graph"], logprobs=2)
    one, _ = run("kascade", args, tp=1, logprobs=2)
    assert "Triton kernels in a CUDA graph" in log and "device prefill path active" in log
    for g, e, o in zip(graphs, eager, one):
        assert_greedy_runs_agree(g, e, min_agree=1)
        assert_greedy_runs_agree(g, o, min_agree=1)


def test_hot_swap_reaches_every_rank(profile_a, tmp_path):
    control = tmp_path / "control"
    b = rank_local_profile("tp-b", [0, 3], shift=2)
    args = SPARSE + ["--kascade-profile", profile_a, "--kascade-control-dir", str(control)]
    with launch.running_server("kascade", COMMON + ["--tp-size", str(TP)] + args, MODEL, "cuda",
                               startup_timeout_s=STARTUP_TIMEOUT_S) as server:
        generate(server.url, input_ids=prompts()[1], max_new_tokens=4)
        paths = ControlPaths(control)
        write_json_atomic(paths.request, {"generation": 1, "profile": b,
                                          "requested_at": time.time()})
        deadline = time.time() + 60
        while time.time() < deadline:
            state = next(iter(paths.live_schedulers().values()), {})
            if state.get("staged_generation") == 1:
                break
            time.sleep(0.2)
        swapped = [generate(server.url, input_ids=p, max_new_tokens=16, top_logprobs=2)
                   for p in prompts()]
        state = next(iter(paths.live_schedulers().values()))
        log = server.log.read_text(errors="replace")
    assert state["applied_generation"] == 1, state
    for rank in range(TP):  # every rank applied it (each logs its own line)
        assert f"TP{rank}] kascade: profile tp-b active (generation 1)" in log, log[-3000:]
    b_path = tmp_path / "b.json"
    b_path.write_text(json.dumps(b))
    started_b, _ = run("kascade", SPARSE + ["--kascade-profile", str(b_path)], logprobs=2)
    for s, o in zip(swapped, started_b):
        assert_greedy_runs_agree(s, o, min_agree=1)
