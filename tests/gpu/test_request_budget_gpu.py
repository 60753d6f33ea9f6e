"""Per-request budgets on the device path, on CUDA: a mixed batch of the scenario of
test_backend_vs_reference.py through the Triton kernels against each request served alone, and
a served mixed batch in decode graphs. (The decode graphs' plan kernel with per-row fractions
against its torch reference: test_decode_kernels_gpu.py, test_graph_plan_kernel_matches_reference.)

Marker ``gpu``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_device_path_mixed_batch_matches_each_request_alone(monkeypatch):
    """Dense, 10%, 50% and default requests batched through the Triton prefill and decode
    kernels (eager) against the same requests with the server's budget at their fraction."""
    import test_backend_vs_reference as tb
    import test_request_budget as trb
    from sglang_kascade.config import KascadeOptions

    case = ("a024", "token", 8, 16, 8, 2, 64, torch.float16)
    scn = tb.build(case)
    by_pool = {row: name for name, row in scn.pool_index.items()}
    sparse = KascadeOptions(dense_prefill_below=0)

    @dataclass
    class Mixed(tb.FakeForwardBatch):  # as init_new builds it under the plugin (sglang_adapter)
        def __post_init__(self):
            names = [by_pool[int(p)] for p in self.req_pool_indices.tolist()]
            self.rids = names
            reqs = [trb._req({"kascade": trb.ASKS[n]} if trb.ASKS[n] else None) for n in names]
            trb.sa._after_forward_batch_init(self, type(self), SimpleNamespace(reqs=reqs))

    monkeypatch.setattr(tb, "FakeForwardBatch", Mixed)
    mixed = tb.run_backend(scn, batched=True, device="cuda", options=sparse)
    monkeypatch.undo()
    assert mixed.backend.device_path.layers_run > 0
    for name in trb.ASKS:
        f = trb._fraction(name)
        alone = tb.run_backend(trb._uniform(scn, f), batched=True, device="cuda",
                               options=sparse)
        for key in (k for k in mixed.outputs if k[1] == name):
            # float16 kernels: a dense request alone goes to the dense backend, batched through
            # the sparse kernels over all its keys (the bound of test_device_prefill_gpu.py)
            torch.testing.assert_close(mixed.outputs[key].float(), alone.outputs[key].float(),
                                       atol=3e-2, rtol=2e-2, msg=lambda m: f"{key}: {m}")


@pytest.mark.server
def test_served_mixed_batch_in_decode_graphs_matches_each_request_alone():
    """The stock command on the GPU (decode CUDA graphs on), random weights as in
    test_gpu_serving.py: dense, 5%, 20% and default requests sent together give each request
    its tokens alone. Graphs of other batch sizes split the attention differently (float
    rounding), so the runs may part at a near tie (random weights: flat logits), as graph and
    eager decode do in test_gpu_serving.py."""
    import concurrent.futures as cf
    import threading

    import requests

    from server_utils import STARTUP_TIMEOUT_S, assert_greedy_runs_agree, flush_cache
    from sglang_kascade.eval import launch
    from test_gpu_serving import COMMON, MODEL

    asks = {"dense": {"dense": True}, "5%": {"topk": 0.05}, "20%": {"topk": 0.2},
            "default": None}
    g = torch.Generator().manual_seed(3)
    prompts = {name: torch.randint(100, 120000, (3000,), generator=g).tolist() for name in asks}

    def generate(url, name):
        sp = {"max_new_tokens": 16, "temperature": 0.0}
        if asks[name] is not None:
            sp["custom_params"] = {"kascade": asks[name]}
        r = requests.post(url + "/generate", timeout=600, json={
            "input_ids": prompts[name], "sampling_params": sp, "return_logprob": True,
            "top_logprobs_num": 2})
        r.raise_for_status()
        return r.json()

    extra = COMMON + ["--kascade-k-min", "32", "--kascade-dense-prefill-below", "0"]
    with launch.running_server("kascade", extra, MODEL, "cuda",
                               startup_timeout_s=STARTUP_TIMEOUT_S) as server:
        alone = {}
        for name in asks:
            flush_cache(server.url)
            alone[name] = generate(server.url, name)
        flush_cache(server.url)
        start = threading.Barrier(len(asks))

        def send(name):
            start.wait()
            return name, generate(server.url, name)

        with cf.ThreadPoolExecutor(len(asks)) as pool:
            mixed = dict(pool.map(send, asks))
        log = server.log.read_text(errors="replace")
    assert "Triton kernels in a CUDA graph" in log, log[-3000:]
    for name in asks:
        assert mixed[name]["meta_info"]["kascade"] == alone[name]["meta_info"]["kascade"]
        assert_greedy_runs_agree(alone[name], mixed[name], min_agree=1)
