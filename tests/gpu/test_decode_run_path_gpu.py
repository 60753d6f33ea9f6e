"""DevicePath's one decode run path, eager and captured, without SGLang: a stack of layers (fused
layer 0, an anchor, reuse layers through head maps) run eagerly (``plan``) and captured in a CUDA
graph (``plan_graph`` + ``fill_graph_rows`` at the graph's head), then replayed at the captured
lengths and at shorter ones with new queries. Each layer's output of a replay must equal the
eager step's (the same exact Top-k, the same kernels) within bf16's rounding of split merges.
The kernels themselves are checked against the float64 oracle in test_decode_kernels_gpu.py.

Marker ``gpu``: needs CUDA (graphs); SGLang is not imported (runs on a bare torch + Triton host).
"""

from __future__ import annotations


import pytest
import torch

from decode_inputs import make_decode_batch, rel_err

from sglang_kascade.layers import LayerTable

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROLES = ["dense_anchor", "reuse", "anchor", "reuse", "reuse"]
SELECTS = [True, False, True, False, False]


def _layers(dp, fwd, q, batch, scale) -> list:
    outs = []
    for i, role in enumerate(ROLES):
        out = dp.forward(fwd, role, i, q, batch.k_pool, batch.v_pool, batch.req_to_token, scale)
        assert out is not None, (i, role)  # every layer of this stack runs on the kernels
        outs.append(out)
    return outs


@pytest.mark.parametrize("lens", [[300, 9000, 5000], [20000]], ids=["ragged", "one-long"])
def test_eager_and_captured_decode_take_one_run_path(lens):
    from sglang_kascade.config import BudgetConfig, DevSwitches
    from sglang_kascade.device_path import DevicePath

    hkv, g, d, dtype, dev = 2, 4, 64, torch.bfloat16, torch.device("cuda")
    budget = BudgetConfig(topk_fraction=0.1, k_min=16)
    scale = d ** -0.5
    batch = make_decode_batch(lens, [budget.k_for(n) for n in lens], hkv, g, d, dtype, 1, dev,
                              seed=11)
    rev = tuple(reversed(range(hkv)))
    ident = tuple(range(hkv))
    layers = LayerTable(tuple(ROLES), tuple(SELECTS), (ident, rev, ident, ident, rev))
    gen = torch.Generator().manual_seed(5)
    steps = [(lens, batch.q), ([max(1, n - 37) for n in lens],
                               (torch.randn(batch.q.shape, generator=gen) * 3).to(dev, dtype))]

    eager = DevicePath(dev, DevSwitches(node_switch=False))
    eager.set_profile(layers)
    want = []
    for s, q in steps:
        fwd = eager.plan(batch.req_idx.tolist(), s, budget)
        want.append([o.float().cpu() for o in _layers(eager, fwd, q, batch, scale)])

    graph = DevicePath(dev, DevSwitches(node_switch=False))
    graph.set_profile(layers)
    graph.set_budget(budget)
    graph.init_graph_state(len(lens), max(lens), sum(lens) + 64, 0, budget)
    req = batch.req_idx.to(torch.int64).clone()  # SGLang's static rows and lengths
    seq = torch.tensor(lens, dtype=torch.int32, device=dev)
    q_static = batch.q.clone()

    def step():
        fwd = graph.plan_graph(lens)
        graph.fill_graph_rows(fwd, req, seq)  # the plan kernel at the graph's head
        return _layers(graph, fwd, q_static, batch, scale)

    step()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        outs = step()
    for (s, q), w in zip(steps, want):
        seq.copy_(torch.tensor(s, dtype=torch.int32, device=dev))
        q_static.copy_(q)
        cuda_graph.replay()
        torch.cuda.synchronize()
        for layer, (a, b) in enumerate(zip(w, outs)):
            assert rel_err(b.float().cpu(), a) < 1e-2, (s, layer, ROLES[layer])
