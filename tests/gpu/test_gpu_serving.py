"""The same backend code path served on a GPU (marker: gpu; skipped without CUDA).

Random weights (`--load-format dummy`) on a 6-layer Llama-3.1-shaped model (head dim 128, GQA 4):
checks plumbing on the GPU stack (FlashInfer dense delegation, SGLang 0.5.17 hooks), not quality.
The sparse server must log that its prefill and decode forwards ran on the device path (Triton
kernels).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server_utils import STARTUP_TIMEOUT_S, assert_greedy_runs_agree, generate, running_server
from sglang_kascade.eval import launch

pytestmark = [pytest.mark.gpu, pytest.mark.server,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = str(Path(__file__).parent / "gpu_assets" / "mini-llama")
COMMON = ["--load-format", "dummy", "--dtype", "bfloat16", "--mem-fraction-static", "0.3"]


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, 120000, (n,), generator=g).tolist() for n in (17, 700, 3000)]


def test_fraction_one_matches_flashinfer_and_sparse_serves():
    """Both with SGLang's default CUDA-graph settings (kascade's decode graphs on by default;
    at fraction 1.0 they capture FlashInfer in every layer)."""
    ps = prompts()
    with running_server("kascade", COMMON + ["--kascade-topk", "1.0"], MODEL, "cuda") as url:
        dense_path = [generate(url, input_ids=p, max_new_tokens=16)["output_ids"] for p in ps]
    with running_server("flashinfer", COMMON, MODEL, "cuda") as url:
        flashinfer = [generate(url, input_ids=p, max_new_tokens=16)["output_ids"] for p in ps]
    assert dense_path == flashinfer
    # sparse prefill at every length (Triton path), in chunks of 1024 (cached-prefix offsets),
    # eager decode (SGLANG_KASCADE_CUDA_GRAPH=0 is read by the server process: --disable-cuda-graph
    # has the same effect here)
    sparse_args = COMMON + ["--kascade-k-min", "32", "--kascade-dense-prefill-below", "0",
                            "--chunked-prefill-size", "1024", "--disable-cuda-graph"]
    with launch.running_server("kascade", sparse_args, MODEL, "cuda",
                               startup_timeout_s=STARTUP_TIMEOUT_S) as server:
        sparse = [generate(server.url, input_ids=p, max_new_tokens=16) for p in ps + ps[2:]]
        log = server.log.read_text(errors="replace")
    assert all(len(o["output_ids"]) == 16 for o in sparse)
    assert sparse[3]["meta_info"]["cached_tokens"] >= 2048  # the repeat hit the radix cache
    # the sparse prefill and decode ran on the batched Triton path (device_path.py)
    assert "kascade: device prefill path active" in log, log[-3000:]
    assert "kascade: device decode path active" in log, log[-3000:]


def test_sparse_decode_in_cuda_graphs_by_default():
    """The stock command: decode graphs captured with the device path at SGLang's default
    capture sizes and replayed. A batch of two requests sharing a cached 3000-token prefix in a
    4096-token KV pool exceeds the graph buffers: it runs eagerly (the graph runner hook) and
    completes. Greedy decode equals the same server's eager decode up to a near tie (random
    weights: flat logits)."""
    ps = prompts()
    extra = COMMON + ["--kascade-k-min", "32", "--max-total-tokens", "4096"]
    with launch.running_server("kascade", extra, MODEL, "cuda",
                               startup_timeout_s=STARTUP_TIMEOUT_S) as server:
        out = [generate(server.url, input_ids=p, max_new_tokens=16, top_logprobs=2) for p in ps]
        shared = [ps[2] + [7, 8, 9], ps[2] + [10, 11]]  # ps[2] is cached by now
        both = generate(server.url, input_ids=shared, max_new_tokens=16)
        log = server.log.read_text(errors="replace")
    assert all(len(o["output_ids"]) == 16 for o in out)
    assert "decode CUDA graphs on" in log, log[-3000:]
    assert "Triton kernels in a CUDA graph" in log, log[-3000:]
    assert "CUDA-graph buffers" in log, log[-3000:]  # buffer size logged at capture
    assert "switch selection kernels by profile" in log, log[-3000:]  # graph_nodes.adopt
    assert [len(o["output_ids"]) for o in both] == [16, 16]
    assert min(o["meta_info"]["cached_tokens"] for o in both) >= 2048
    assert "runs eagerly" in log, log[-3000:]
    with launch.running_server("kascade", extra + ["--disable-cuda-graph"], MODEL, "cuda",
                               startup_timeout_s=STARTUP_TIMEOUT_S) as server:
        eager = [generate(server.url, input_ids=p, max_new_tokens=16, top_logprobs=2)
                 for p in ps]
    for g, e in zip(out, eager):  # same kernels, other split sizes: equal up to a near tie
        assert_greedy_runs_agree(g, e, min_agree=1)
