"""Kernel-level prefill benchmark of Kascade's layers against FlashInfer dense causal prefill.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim 128, bf16), batch 1, one
whole prompt of L tokens, query tiles of 32, per-tile Top-k k = clamp(max(128, ceil(0.1 s)), s)
for a tile starting at s (the tile's own causal block on top). Selections are spread over the
candidates (one random key in each of k equal strata; the timing depends on how many keys are
gathered, not on which). The anchor stage (``prefill_select``: per-query log-sum-exp, pooled
probabilities, radix Top-k per tile and KV head) runs on the same random inputs. Per-layer
average of the paper's layout (layer 0 dense + selecting, 4 anchors, 27 reuse layers):
  (dense + select + 4 (select + reuse) + 27 reuse) / 32, against 32 dense layers.
Both sides run in ONE run of this script; median of ``triton.testing.do_bench``.

Usage (GPU host, PYTHONPATH holding flashinfer and this package):
  python3 -P bench/prefill_kernels.py --out $OUT/prefill_kernels.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from sglang_kascade.kernels.prefill_attention_triton import prefill_sparse_attention
from sglang_kascade.kernels.prefill_plan import plan_prefill_tiles
from sglang_kascade.kernels.prefill_select_triton import prefill_lse, prefill_select

HQ, HKV, D, TILE = 32, 8, 128, 32


def bench_point(L: int, fraction: float, k_min: int, launch: dict | None = None) -> dict:
    import flashinfer

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(L)
    q = torch.randn(L, HQ, D, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(L, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(L, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen)
    r2t = torch.arange(L, dtype=torch.int32, device=dev)[None]
    req_idx = torch.zeros(1, dtype=torch.int32, device=dev)
    tiles = plan_prefill_tiles([0], [L], TILE, dev)
    s = tiles.tile_start.long()  # [nt]
    k_t = torch.minimum(s, torch.clamp((s * fraction).ceil().long(), min=k_min))
    kmax = int(k_t.max())
    i = torch.arange(kmax, device=dev)[None, None, :]  # stratum of each entry
    lo = (i * s[:, None, None]) // k_t.clamp(min=1)[:, None, None]
    hi = ((i + 1) * s[:, None, None]) // k_t.clamp(min=1)[:, None, None]
    u = torch.rand(tiles.num_tiles, HKV, kmax, device=dev, generator=gen)
    pos = torch.where(i < k_t[:, None, None], lo + (u * (hi - lo)).long(), 0)
    sel_slot = pos.to(torch.int32)  # slots == positions here
    del lo, hi, u, pos
    head_map = torch.randperm(HKV, device=dev, generator=gen).to(torch.int32)
    out = torch.empty_like(q)
    scale = D ** -0.5

    def reuse():
        prefill_sparse_attention(q, k, v, r2t, req_idx, tiles, TILE, sel_slot, k_t.to(torch.int32),
                                 head_map, scale, out)

    def dense():
        flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, sm_scale=scale)

    tile_k = k_t.to(torch.int32)
    tile_row = req_idx.long()[tiles.tile_req.long()]
    sel_out = torch.empty_like(sel_slot)
    lse_buf = torch.empty(L, HQ, dtype=torch.float32, device=dev)

    def select():
        prefill_select(q, k, r2t, req_idx, tiles, TILE, tile_k, tile_row, int(s.max()), scale,
                       sel_out, launch=launch)

    def lse():
        prefill_lse(q, k, r2t, req_idx, tiles, TILE, scale, lse_buf, launch)

    def dense_lse():  # what layer 0 would run if its selection took FlashInfer's log-sum-exp
        flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, sm_scale=scale,
                                                return_lse=True)

    rep = 200 if L <= 32768 else 1000
    t_dense = triton.testing.do_bench(dense, warmup=50, rep=rep, return_mode="median")
    t_reuse = triton.testing.do_bench(reuse, warmup=50, rep=rep, return_mode="median")
    t_select = triton.testing.do_bench(select, warmup=50, rep=rep, return_mode="median")
    t_lse = triton.testing.do_bench(lse, warmup=50, rep=rep, return_mode="median")
    t_dense_lse = triton.testing.do_bench(dense_lse, warmup=50, rep=rep, return_mode="median")
    layer_avg = (t_dense + t_select + 4 * (t_select + t_reuse) + 27 * t_reuse) / 32
    gathered = int((k_t.sum() + 0) * HKV)  # selected (key, KV head) rows over all tiles
    flops_dense = 4 * HQ * D * L * (L + 1) / 2
    return dict(context=L, tiles=tiles.num_tiles, kmax=kmax,
                ms=dict(dense_flashinfer=t_dense, reuse=t_reuse, anchor_select=t_select,
                        select_lse_stage=t_lse, anchor=t_select + t_reuse,
                        dense_flashinfer_with_lse=t_dense_lse,
                        layer0=t_dense + t_select, layer_avg=layer_avg),
                speedup=t_dense / t_reuse, layer_avg_speedup=t_dense / layer_avg,
                dense_tflops=flops_dense / (t_dense * 1e-3) / 1e12,
                reuse_gathered_gb=gathered * 2 * D * 2 / 1e9,
                reuse_gather_gbs=gathered * 2 * D * 2 / (t_reuse * 1e-3) / 1e9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", type=int, nargs="+",
                    default=[4096, 8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--k-min", type=int, default=128)
    ap.add_argument("--select-launch", type=json.loads, default=None,
                    help='JSON over the selection\'s launch defaults, e.g. {"pool": {"KEYS_MAJOR": true}}')
    args = ap.parse_args()
    rows = []
    for L in args.contexts:
        r = bench_point(L, args.fraction, args.k_min, args.select_launch)
        rows.append(r)
        print(f"L={L:7d} dense {r['ms']['dense_flashinfer']:9.2f} ms ({r['dense_tflops']:.0f} "
              f"TFLOP/s) reuse {r['ms']['reuse']:9.2f} ms speedup {r['speedup']:.2f}x "
              f"gathered {r['reuse_gathered_gb']:.1f} GB at {r['reuse_gather_gbs']:.0f} GB/s | "
              f"select {r['ms']['anchor_select']:9.2f} ms (lse {r['ms']['select_lse_stage']:.2f}) "
              f"layer avg {r['ms']['layer_avg']:9.2f} ms = {r['layer_avg_speedup']:.2f}x",
              flush=True)
        torch.cuda.empty_cache()
    import flashinfer
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, flashinfer=flashinfer.__version__,
                heads=dict(q=HQ, kv=HKV, head_dim=D), tile=TILE, fraction=args.fraction,
                k_min=args.k_min, batch=1, select_launch=args.select_launch)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
