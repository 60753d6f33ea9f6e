"""Where a kascade decode step's time goes, without the model: KascadeAttnBackend alone on the
Llama-3.1-8B attention shapes (32 layers, 32 query / 8 KV heads, head dim 128, bf16, batch 1),
the shipped profile's roles (dense [0], anchors [0, 2, 8, 13, 14]), fake pools and ForwardBatch.

Per context L: a decode forward of all 32 layers through the device path, timed
  * eager, host: the Python time to issue the 32 layers (no sync inside),
  * eager, total: issue + synchronize,
  * the same 32 layers captured in one CUDA graph and replayed (GPU time only),
and a torch.profiler table of the eager forward (top ops by self CPU time). Also the PyTorch
path's extend (prefill) time per role for one request of L tokens (dense layer output faked).

Usage (GPU host, PYTHONPATH=/tmp/site): python3 -P bench/backend_overhead.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang_kascade.backend import KascadeAttnBackend
from sglang_kascade.profile import profile_from_dict

LAYERS, HQ, HKV, D = 32, 32, 8, 128
DENSE, ANCHORS = [0], [0, 2, 8, 13, 14]
DEV = "cuda"


class Pool:
    def __init__(self, r2t):
        self.req_to_token = r2t


class KV:
    def __init__(self, n_slots):
        self.k = [torch.randn(n_slots, HKV, D, device=DEV, dtype=torch.bfloat16)
                  for _ in range(LAYERS)]
        self.v = [torch.randn(n_slots, HKV, D, device=DEV, dtype=torch.bfloat16)
                  for _ in range(LAYERS)]

    def get_key_buffer(self, i):
        return self.k[i]

    def get_value_buffer(self, i):
        return self.v[i]

    def set_kv_buffer(self, layer, loc, k, v, *a, **kw):
        self.k[layer.layer_id][loc] = k.reshape(-1, HKV, D)
        self.v[layer.layer_id][loc] = v.reshape(-1, HKV, D)


class FakeDense:
    """Output zeros (timing of the kascade side only)."""

    def init_forward_metadata(self, fb):
        pass

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        return torch.zeros_like(q)

    forward_extend = forward_decode


@dataclass
class Layer:
    layer_id: int
    tp_q_head_num: int = HQ
    tp_k_head_num: int = HKV
    tp_v_head_num: int = HKV
    qk_head_dim: int = D
    v_head_dim: int = D
    scaling: float = D ** -0.5
    sliding_window_size: int = -1
    is_cross_attention: bool = False


class Mode:
    def __init__(self, decode):
        self.decode = decode

    def is_decode(self):
        return self.decode

    def is_idle(self):
        return False

    def is_mixed(self):
        return False

    def is_extend(self):
        return not self.decode


@dataclass
class Batch:
    forward_mode: Mode
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    out_cache_loc: torch.Tensor
    extend_prefix_lens_cpu: list = None
    extend_seq_lens_cpu: list = None


def backend(n_slots, r2t):
    ident = list(range(HKV))
    pd = {"schema_version": 1, "name": "bench",
          "model": {"architecture": "LlamaForCausalLM", "num_layers": LAYERS, "num_q_heads": HQ,
                    "num_kv_heads": HKV, "head_dim": D},
          "dense_layers": DENSE, "anchor_layers": ANCHORS, "head_map": [ident] * LAYERS,
          "topk_fraction": 0.1, "k_min": 128, "tile_size": 32, "granularity": "token",
          "page_tile_size": 16, "round_to": 1, "provenance": {"source": "bench"}}
    prof = profile_from_dict(pd)
    kv = KV(n_slots)
    return KascadeAttnBackend(FakeDense(), Pool(r2t), kv, prof, prof.budget, torch.device(DEV))


def decode(length: int, out: dict, prof_dir: Path):
    r2t = torch.arange(length + 8, device=DEV, dtype=torch.int32)[None].repeat(2, 1)
    be = backend(length + 8, r2t)
    layers = [Layer(i) for i in range(LAYERS)]
    fb = Batch(Mode(True), torch.tensor([1], device=DEV), torch.tensor([length], device=DEV),
               torch.tensor([length]), torch.tensor([length - 1], device=DEV))
    qs = [torch.randn(1, HQ * D, device=DEV, dtype=torch.bfloat16) * 3 for _ in range(LAYERS)]
    ks = torch.randn(1, HKV, D, device=DEV, dtype=torch.bfloat16)

    def step(with_meta=True):
        if with_meta:
            be.init_forward_metadata(fb)
        for layer in layers:
            be.forward(qs[layer.layer_id], ks, ks, layer, fb)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n = 20
    host, total = [], []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append(t1 - t0)
        total.append(t2 - t0)
    meta = []
    for _ in range(n):
        t0 = time.perf_counter()
        be.init_forward_metadata(fb)
        meta.append(time.perf_counter() - t0)
    # per role host time (no sync)
    roles = {}
    be.init_forward_metadata(fb)
    torch.cuda.synchronize()
    for layer in layers:
        t0 = time.perf_counter()
        be.forward(qs[layer.layer_id], ks, ks, layer, fb)
        roles.setdefault(be.layers.roles[layer.layer_id], []).append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    # CUDA graph of the 32 layers (metadata outside, as SGLang's replay does)
    be.init_forward_metadata(fb)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(with_meta=False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    be.device_fwd.has_selection = False
    with torch.cuda.graph(g):
        step(with_meta=False)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    graph_ms = e0.elapsed_time(e1) / n
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1e3  # noqa: E731
    res = {"context": length, "eager_host_ms": med(host), "eager_total_ms": med(total),
           "init_forward_metadata_ms": med(meta), "graph_replay_ms": graph_ms,
           "host_ms_per_layer_by_role": {r: 1e3 * sum(v) / len(v) for r, v in roles.items()}}
    print(json.dumps(res), flush=True)
    out.setdefault("decode", []).append(res)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    (prof_dir / f"profile_decode_{length}.txt").write_text(table)
    print(table[:6000], flush=True)
    be.device_path.graph_buffers = be.device_path.buffers = None  # free before the next L
    torch.cuda.empty_cache()


def prefill(length: int, out: dict):
    r2t = torch.arange(length + 8, device=DEV, dtype=torch.int32)[None].repeat(2, 1)
    be = backend(length + 8, r2t)
    fb = Batch(Mode(False), torch.tensor([1], device=DEV), torch.tensor([length], device=DEV),
               torch.tensor([length]), torch.arange(length, device=DEV), [0], [length])
    q = torch.randn(length, HQ * D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(length, HKV, D, device=DEV, dtype=torch.bfloat16)
    be.init_forward_metadata(fb)
    times = {}
    for lid in (0, 1, 2, 3):  # dense_anchor (selects), reuse, anchor, reuse
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        be.forward(q, k, k, Layer(lid), fb)
        torch.cuda.synchronize()
        times[f"layer{lid}_{be.layers.roles[lid]}_s"] = time.perf_counter() - t0
    res = {"context": length, **times}
    print(json.dumps(res), flush=True)
    out.setdefault("prefill_torch_path", []).append(res)
    del be
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lens", default="4096,32768,131072")
    ap.add_argument("--prefill-lens", default="4096,32768")
    a = ap.parse_args()
    d = Path(a.out)
    d.mkdir(parents=True, exist_ok=True)
    out = {"device": torch.cuda.get_device_name()}
    for length in [int(x) for x in a.lens.split(",") if x]:
        decode(length, out, d)
    for length in [int(x) for x in a.prefill_lens.split(",") if x]:
        prefill(length, out)
    (d / "backend_overhead.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
