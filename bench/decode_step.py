"""Whole-step decode attention in one CUDA graph: what a captured SGLang decode step launches.

bench/decode_kernels.py times each kind of layer alone; a served step runs 32 layers in one
graph, where the per-layer kernels of every layer (also the gated-off selection of reuse layers,
which keeps hot-swapped profiles running without a recapture) pay their graph-node cost. This
script captures the attention of all layers of one step, Llama-3.1-8B shapes (32 layers, 32 query
heads, 8 KV heads, head dim 128, bf16), the shipped profile (profiles/llama-3.1-8b-instruct.json:
layer 0 dense, anchors 0, 2, 8, 13, 14), Top-k 10%, page size 1, side by side in one run:

  flashinfer     FlashInfer's paged decode (tensor cores) in every layer
  kascade        DevicePath's CUDA-graph path, as the server captures it (layer 0 fused dense +
                 selection; every other layer captures the selection's kernels, then attends over
                 the selection); the graph handed to graph_nodes.adopt, which takes the
                 selection kernels of the layers that do not select out of the graph
  kascade_gated  the same graph with the node switch off (SGLANG_KASCADE_NODE_SWITCH=0): the
                 selection kernels of every sparse layer launch, gated off on the device
  kascade_exact  the eager path captured: only the profile's anchors launch a selection, and
                 they attend from their logits (a graph that could not follow a hot-swapped
                 profile: the difference is the price of hot-swap readiness)

Layers alternate between POOLS copies of the KV pool, so a layer does not find the previous
layer's keys in L2. Times: median of triton.testing.do_bench over graph replays (ms per step).
Also the host time of plan_graph per replay (views of the static tensors; the plan itself is a
kernel at the graph's head).

Usage (GPU host): PYTHONPATH=/tmp/site python3 -P bench/decode_step.py --out $OUT/step.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_kernels import (D, HKV, HQ, capture_graph, flashinfer_dense, graph_time,  # noqa: E402
                            replay_time)

from sglang_kascade import graph_nodes  # noqa: E402
from sglang_kascade.profile import layer_roles  # noqa: E402
from sglang_kascade.config import BudgetConfig, DevSwitches  # noqa: E402
from sglang_kascade.device_path import DevicePath  # noqa: E402
from sglang_kascade.profile import load_profile  # noqa: E402

POOLS = 2


def kernel_breakdown(g, replays: int = 20) -> dict:
    """Where a replay of graph g spends its time: GPU microseconds per replay of each kernel
    name (CUPTI through torch.profiler, kernels in place, not serialised), and ``busy`` (their
    sum: the step time less it is node-launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    per: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            name = e.name[:60]
            n, t = per.get(name, (0, 0.0))
            per[name] = (n + 1, t + e.device_time)
    out = {name: dict(launches=n / replays, us=t / replays) for name, (n, t) in
           sorted(per.items(), key=lambda kv: -kv[1][1])}
    return dict(kernels=out, busy_us=sum(v["us"] for v in out.values()))


def step_point(batch: int, L: int, fraction: float, k_min: int, breakdown: bool = False) -> dict:
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(batch * 7919 + L)
    profile = load_profile("llama-3.1-8b-instruct")
    roles, selects = layer_roles(profile)
    n_layers = len(roles)
    budget = BudgetConfig(topk_fraction=fraction, k_min=k_min)
    slots = batch * L
    pools = [(torch.randn(slots, HKV, D, device=dev, dtype=dtype, generator=gen),
              torch.randn(slots, HKV, D, device=dev, dtype=dtype, generator=gen))
             for _ in range(POOLS)]
    q = torch.randn(batch, HQ, D, device=dev, dtype=dtype, generator=gen) * 3
    req_to_token = torch.arange(slots, dtype=torch.int32, device=dev).view(batch, L)
    req_idx = torch.arange(batch, dtype=torch.int64, device=dev)
    seq_lens = torch.full((batch,), L, dtype=torch.int32, device=dev)
    lens = [L] * batch
    scale = D ** -0.5

    dense = [flashinfer_dense(q, k, v, batch, L, True) for k, v in pools]

    def run_layers(dp, fwd):
        for i, role in enumerate(roles):
            k, v = pools[i % POOLS]
            if dp.forward(fwd, role, i, q, k, v, req_to_token, scale) is None:
                dense[i % POOLS]()

    def graph_path(node_switch: bool):  # the server's: capacity = this batch (pool = its keys)
        dp = DevicePath(dev, DevSwitches(node_switch=node_switch))
        dp.set_profile(profile, roles, selects)
        dp.init_graph_state(batch, L, slots, 0, budget)
        return dp, dp.plan_graph(lens)

    def graph_layers(dp, fwd):  # the plan kernel at the graph's head (the server's in_graph hook)
        dp.fill_graph_rows(fwd, req_idx, seq_lens)
        run_layers(dp, fwd)

    dp, fwd = graph_path(True)
    nodes_off = []

    def adopt(g):  # the server's hand-over; count while the graph lives
        taken = graph_nodes.adopt(g)
        nodes_off.append(dp.node_switch.disabled_nodes())
        return taken

    g_served = capture_graph(lambda: graph_layers(dp, fwd), adopt=adopt)
    times = {"kascade": replay_time(g_served)}
    kernels = kernel_breakdown(g_served) if breakdown else None
    del g_served
    nodes_off = nodes_off[0]
    plan_us = host_us(lambda: dp.plan_graph(lens))
    dg, gfwd = graph_path(False)
    times["kascade_gated"] = graph_time(lambda: graph_layers(dg, gfwd))
    de = DevicePath(dev)  # the eager path (only the anchors select), captured
    de.set_profile(profile, roles, selects)
    efwd = de.plan(req_idx.tolist(), lens, budget)
    times["kascade_exact"] = graph_time(lambda: run_layers(de, efwd))
    times["flashinfer"] = graph_time(lambda: [dense[i % POOLS]() for i in range(n_layers)])
    return dict(batch=batch, context=L, topk=budget.k_for(L), layers=n_layers,
                anchors=[i for i, s in enumerate(selects) if s], ms=times,
                plan_graph_host_us=plan_us, selection_nodes_off=nodes_off, kernels=kernels,
                speedup={k: times["flashinfer"] / v for k, v in times.items()
                         if k != "flashinfer"})


def host_us(fn, n: int = 200) -> float:
    """Median host microseconds of fn() (the GPU idle: each call waits for the previous)."""
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    return sorted(ts)[n // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--k-min", type=int, default=128)
    ap.add_argument("--breakdown", action="store_true",
                    help="also profile the served graph's kernels (torch.profiler)")
    args = ap.parse_args()
    rows = []
    for b in args.batches:
        for L in args.contexts:
            if b * L * HKV * D * 2 * 2 * POOLS > 0.6 * torch.cuda.get_device_properties(0).total_memory:
                continue
            r = step_point(b, L, args.fraction, args.k_min, args.breakdown)
            rows.append(r)
            m, sp = r["ms"], r["speedup"]
            print(f"B={b:3d} L={L:7d} flashinfer {m['flashinfer']:.3f} ms | " + " | ".join(
                f"{k} {m[k]:.3f} ({sp[k]:.2f}x)" for k in sp)
                + f" | plan_graph {r['plan_graph_host_us']:.0f} us"
                + f" | {r['selection_nodes_off']} nodes off", flush=True)
            if r["kernels"]:
                print(f"  served graph: kernels busy {r['kernels']['busy_us']:.0f} us of "
                      f"{m['kascade'] * 1e3:.0f} us per step")
                for name, v in r["kernels"]["kernels"].items():
                    print(f"    {v['us']:8.1f} us  {v['launches']:5.1f} x  {name}")
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, profile="llama-3.1-8b-instruct", pools=POOLS,
                fraction=args.fraction, k_min=args.k_min)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    assert all(math.isfinite(t) for r in rows for t in r["ms"].values())


if __name__ == "__main__":
    main()
