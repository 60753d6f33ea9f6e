"""Launch-parameter sweeps of our kernels (no FlashInfer), one run, median of
triton.testing.do_bench. Prints one line per configuration.

  topk      the radix Top-k (CHUNK, BLOCK, warps)
  merge     the reuse attention's split merge: in the kernel or a reduce launch (--contexts)
  decode    the decode reuse attention (BLOCK_N, warps, stages, splits) and the anchor's scoring
            pass (BLOCK_N, warps, stages), under CUDA graphs like bench/decode_kernels.py
  prefill   the prefill sparse attention (BLOCK_N, warps, stages)
  prefill_select  the prefill selection's passes apart (--contexts): log-sum-exp (BLOCK_N,
            warps, stages), pooled probabilities (layout, BLOCK_N, warps, stages) and the
            Top-k, in ms for the whole prompt
  prefetch  the sparse attention (reuse: K and V; anchor: logits and V) with the register-
            prefetching loop against the plain one, over BLOCK_N / warps / stages
  scale     the reuse attention against its Top-k (1.25%-20% of 128K, shipped launch): the
            fixed cost per launch and the cost per selected key

Usage (GPU host): python3 -P bench/tune_kernels.py [topk decode prefill] [--batches 1 16]
  > $OUT/tune.log
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton

from sglang_kascade.kernels.prefill_attention_triton import prefill_sparse_attention
from sglang_kascade.kernels.prefill_plan import plan_prefill_tiles
from sglang_kascade.kernels.topk_triton import topk_select


def tune_topk(batch, L, hkv=8, frac=0.1):
    """The decode radix Top-k alone on token-indexed rows (decode's layout), each launch setting
    in its own CUDA graph (at batch 1 the launches' gaps are part of the cost): the five-launch
    path over chunk / block / warps, then collect mode (topk_triton's docstring) beside it."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode_kernels import graph_time
    from topk_rows import decode_rows

    from sglang_kascade.kernels.topk_triton import topk_chunk

    scores = torch.rand(hkv, batch * L, device="cuda") ** 8  # skewed, like probabilities
    run, _ = decode_rows(scores, batch, L, int(frac * L))
    print(f"topk B={batch} L={L} default chunk {topk_chunk(batch * hkv, L)}", flush=True)
    five = [dict(CHUNK=c, BLOCK=b, num_warps=w, collect=False) for c, b, w in itertools.product(
        (512, 1024, 2048, 4096, 8192), (512, 1024), (4, 8)) if b <= c]
    collect = [dict(CHUNK=c, BLOCK=1024, num_warps=w, collect=True)
               for c, w in itertools.product((1024, 2048, 4096), (4, 8))]
    for cfg in five + collect:
        t = graph_time(lambda: run(cfg))
        print(f"topk B={batch} L={L} {cfg} {t * 1e3:.1f} us", flush=True)


def tune_prefill(L, hkv=8, g=4, d=128, frac=0.1, k_min=128):
    dev = torch.device("cuda")
    q = torch.randn(L, hkv * g, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(L, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    r2t = torch.arange(L, dtype=torch.int32, device=dev)[None]
    req = torch.zeros(1, dtype=torch.int32, device=dev)
    tiles = plan_prefill_tiles([0], [L], 32, dev)
    s = tiles.tile_start.long()
    k_t = torch.minimum(s, torch.clamp((s * frac).ceil().long(), min=k_min))
    kmax = int(k_t.max())
    sel = (torch.rand(tiles.num_tiles, hkv, kmax, device=dev) * s.clamp(min=1)[:, None, None]
           ).to(torch.int32)
    hm = torch.arange(hkv, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    for bn, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3)):
        cfg = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
        try:
            t = triton.testing.do_bench(
                lambda: prefill_sparse_attention(q, k, v, r2t, req, tiles, 32, sel,
                                                 k_t.to(torch.int32), hm, d ** -0.5, out, cfg),
                warmup=20, rep=100, return_mode="median")
            print(f"prefill L={L} {cfg} {t:.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 (out of shared memory / registers)
            print(f"prefill L={L} {cfg} failed: {type(e).__name__}", flush=True)


def _reuse_point(batch, L, frac, k_min):
    """One decode point (decode_kernels.point_inputs) with its selection made: (the selection's
    arguments, the buffers, reuse(cfg): the reuse attention with launch overrides cfg,
    anchor(cfg): the anchor's attention from the stored logits, identity head map)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode_kernels import D, HKV, point_inputs

    from sglang_kascade.kernels.decode_attention_triton import decode_sparse_attention
    from sglang_kascade.kernels.decode_select_triton import decode_select

    p = point_inputs(batch, L, torch.bfloat16, frac, k_min)
    q, k_pool, v_pool, tok_off, topk, buf = (p[n] for n in ("q", "k_pool", "v_pool", "tok_off",
                                                             "topk", "buf"))
    args = (q, k_pool, p["req_to_token"], p["req_idx"], p["seq_lens"], tok_off, topk, D ** -0.5,
            buf)
    decode_select(*args)
    out = torch.empty_like(q)

    def reuse(cfg):
        return decode_sparse_attention(q, k_pool, v_pool, buf.sel_slot, tok_off, topk,
                                       p["head_map"], D ** -0.5, buf, out, launch=cfg)

    ident = torch.arange(HKV, dtype=torch.int32, device=q.device)

    def anchor(cfg):
        return decode_sparse_attention(q, k_pool, v_pool, buf.sel_slot, tok_off, topk, ident,
                                       D ** -0.5, buf, out, sel_pos=buf.sel_pos,
                                       logits=buf.logits, launch=cfg)

    return args, buf, reuse, anchor


def tune_merge(batch, L, frac=0.1, k_min=128):
    """The sparse attention's split merge: in the kernel (last split) or the reduce kernel, at
    the default split count and fewer."""
    _, buf, reuse, _ = _reuse_point(batch, L, frac, k_min)  # puts bench/ on sys.path
    from decode_kernels import graph_time

    default = buf.step(batch).splits
    for splits in sorted({default, max(1, default // 2), max(1, default // 4), 8}):
        for merge in (True, False):
            cfg = dict(splits=splits, merge=merge)
            t = graph_time(lambda: reuse(cfg))
            print(f"merge B={batch} L={L} {cfg} {t * 1e3:.1f} us", flush=True)


def tune_prefetch(batch, L, frac=0.1, k_min=128):
    _, _, reuse, anchor_of = _reuse_point(batch, L, frac, k_min)  # puts bench/ on sys.path
    from decode_kernels import graph_time

    def anchor(cfg):  # the logits path's tiles: BLOCK_NL / PREFETCH_L
        return anchor_of(dict(cfg, BLOCK_NL=cfg["BLOCK_N"], PREFETCH_L=cfg["PREFETCH"]))

    cfgs = [dict(BLOCK_N=bn, num_warps=4, num_stages=st, PREFETCH=pf)
            for bn, st, pf in itertools.product((32, 64), (1, 2, 3), (False, True))]
    cfgs += [dict(BLOCK_N=64, num_warps=8, num_stages=st, PREFETCH=True) for st in (1, 3)]
    for name, fn in (("reuse", reuse), ("anchor", anchor)):
        for cfg in cfgs:
            try:
                t = graph_time(lambda: fn(cfg))
                print(f"prefetch {name} B={batch} L={L} {cfg} {t * 1e3:.1f} us", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"prefetch {name} B={batch} L={L} {cfg} failed: {type(e).__name__}",
                      flush=True)


def tune_scale(batch, L, k_min=128):
    """The reuse attention at growing Top-k: time = fixed + per-key cost (printed fit)."""
    ks, ts = [], []
    for frac in (0.0125, 0.025, 0.05, 0.1, 0.2):
        _, buf, reuse, _ = _reuse_point(batch, L, frac, k_min)  # puts bench/ on sys.path
        from decode_kernels import graph_time

        t = graph_time(lambda: reuse({})) * 1e3
        tp = graph_time(lambda: reuse({"PREFETCH": True})) * 1e3
        k = int(buf.kmax)
        ks.append(k)
        ts.append(t)
        print(f"scale B={batch} L={L} k={k} splits={buf.step(batch).splits} {t:.1f} us "
              f"(prefetch {tp:.1f} us)", flush=True)
        torch.cuda.empty_cache()
    n = len(ks)
    mk, mt = sum(ks) / n, sum(ts) / n
    slope = sum((k - mk) * (t - mt) for k, t in zip(ks, ts)) / sum((k - mk) ** 2 for k in ks)
    print(f"scale B={batch} L={L} fit: {mt - slope * mk:.1f} us + {slope * 1e3:.2f} us per 1000 "
          f"keys", flush=True)


def tune_prefill_select(L, hkv=8, g=4, d=128, tile=32):
    """The prefill selection's two scoring passes apart (log-sum-exp; pooled probabilities of
    every tile over all its candidates, one block) and the Top-k of that block."""
    from sglang_kascade.kernels.prefill_select_triton import (DEFAULT_BLOCK_BYTES, prefill_lse,
                                                              prefill_pool)

    dev = torch.device("cuda")
    q = torch.randn(L, hkv * g, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(L, hkv, d, device=dev, dtype=torch.bfloat16)
    r2t = torch.arange(L, dtype=torch.int32, device=dev)[None]
    req = torch.zeros(1, dtype=torch.int32, device=dev)
    tiles = plan_prefill_tiles([0], [L], tile, dev)
    lse = torch.empty(L, hkv * g, dtype=torch.float32, device=dev)
    nt, max_start = tiles.num_tiles, L - tile
    block = max(1, min(nt, DEFAULT_BLOCK_BYTES // (hkv * max_start * 4)))
    pooled = torch.empty(block, hkv, max_start, dtype=torch.float32, device=dev)
    scale = d ** -0.5

    best = {}

    def bench(name, fn, cfg, scale_to=1.0):
        try:
            t = triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median") * scale_to
            print(f"{name} L={L} {cfg} {t:.3f} ms", flush=True)
            if name not in best or t < best[name][0]:
                best[name] = (t, cfg)
        except Exception as e:  # noqa: BLE001 (out of shared memory / registers)
            print(f"{name} L={L} {cfg} failed: {type(e).__name__}", flush=True)

    for bn, warps, stages in itertools.product((64, 128), (4, 8), (2, 3, 4)):
        cfg = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
        bench("lse", lambda: prefill_lse(q, k, r2t, req, tiles, tile, scale, lse,
                                         dict(lse=cfg)), cfg)
    prefill_lse(q, k, r2t, req, tiles, tile, scale, lse)
    # the last block of tiles (the longest rows), scaled to every tile: pooled work per tile
    # grows with its start, so blocks average to (block tiles' mean start) / (all tiles' mean)
    a = nt - block
    starts = tiles.tile_start.double()
    per_all = float(starts.sum() / starts[a:].sum())
    for km, bn, warps, stages in itertools.product((False, True), (64, 128), (4, 8), (2, 3)):
        cfg = dict(KEYS_MAJOR=km, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        bench("pool", lambda: prefill_pool(q, k, r2t, req, tiles, tile, scale, lse, pooled, a,
                                           block, max_start, dict(pool=cfg)), cfg, per_all)
    seq = tiles.tile_start[a:].contiguous()
    kk = torch.clamp((seq.double() * 0.1).ceil(), min=128).to(torch.int32)
    kk = torch.minimum(kk, seq)
    kmax = int(kk.max())
    hist = torch.empty(4, block * hkv, 256, dtype=torch.int32, device=dev)
    ctr = torch.empty(block * hkv, 2, dtype=torch.int32, device=dev)
    pos = torch.empty(block, hkv, kmax, dtype=torch.int32, device=dev)
    slot = torch.empty_like(pos)
    row = torch.zeros(block, dtype=torch.int32, device=dev)
    bench("topk", lambda: topk_select(pooled, seq, kk, r2t, row, hist, ctr, pos, slot,
                                      max_start), {}, per_all)
    print(f"best L={L} " + json.dumps({k: v for k, v in best.items()}), flush=True)
    return {stage: best[stage][1] for stage in ("lse", "pool") if stage in best}


def tune_decode(batch, L, frac=0.1, k_min=128):
    args, buf, reuse, _ = _reuse_point(batch, L, frac, k_min)  # puts bench/ on sys.path
    from decode_kernels import graph_time

    from sglang_kascade.kernels.decode_select_triton import select_stages

    default = buf.step(batch).splits
    for bn, warps, stages, splits in itertools.product(
            (32, 64, 128), (2, 4, 8), (2, 3), sorted({default, max(1, default // 2)})):
        cfg = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages, splits=splits)
        try:
            t = graph_time(lambda: reuse(cfg))
            print(f"reuse B={batch} L={L} {cfg} {t * 1e3:.1f} us", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"reuse B={batch} L={L} {cfg} failed: {type(e).__name__}", flush=True)
    for bn, warps, stages in itertools.product((64, 128, 256), (4, 8), (2, 3)):
        cfg = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
        try:
            score = select_stages(*args, launch=dict(score=cfg))["score"]
            t = graph_time(score)
            print(f"score B={batch} L={L} {cfg} {t * 1e3:.1f} us", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"score B={batch} L={L} {cfg} failed: {type(e).__name__}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="*", default=["topk", "decode", "prefill"])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 1])
    ap.add_argument("--contexts", type=int, nargs="+", default=[131072])  # merge, prefill_select
    ap.add_argument("--best-out", help="prefill_select: write the fastest launch (JSON) here")
    a = ap.parse_args()
    for b in a.batches:
        if "merge" in a.what:
            for L in a.contexts:
                tune_merge(b, L)
        if "topk" in a.what:
            tune_topk(b, 131072)
        if "decode" in a.what:
            tune_decode(b, 131072)
        if "prefetch" in a.what:
            tune_prefetch(b, 131072)
        if "scale" in a.what:
            tune_scale(b, 131072)
    if "prefill" in a.what:
        tune_prefill(32768)
    if "prefill_select" in a.what:
        for L in a.contexts:
            launch = tune_prefill_select(L)
        if a.best_out:  # the last context's fastest launch of each pass, for prefill_kernels.py
            with open(a.best_out, "w") as f:
                json.dump(launch, f)
