"""Kernel-level decode benchmark: Kascade's per-layer average against FlashInfer dense decode.

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim 128, bf16), Top-k
k = max(128, ceil(0.1 L)), page size 1 (token-major pool, each request's slots contiguous), one
layer's pool. Every figure comes from ONE run of this script, side by side: each kind of layer is
captured in a CUDA graph and timed by ``triton.testing.do_bench`` (median; L2 flushed before each
replay):

  dense     FlashInfer BatchDecodeWithPagedKVCacheWrapper (the faster of its tensor-core and
            CUDA-core paths at each point)
  layer0    decode_dense_select: dense attention and the selection for layer 1 in one pass over
            K and V (layer 0 is dense and selects); layer0_fi_select = FlashInfer dense followed
            by decode_select, for comparison
  anchor    decode_select + sparse attention over its selection (stored logits, V only)
  reuse     sparse attention over an anchor's selection through a head map (K and V)
  kascade   per-layer average (layer0 + 4 anchor + 27 reuse) / 32; speedup = dense / kascade

Usage (GPU host, PYTHONPATH holding flashinfer and this package):
  python3 -P bench/decode_kernels.py --out $OUT/decode_kernels.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton

from sglang_kascade.kernels.decode_attention_triton import decode_sparse_attention
from sglang_kascade.kernels.decode_dense_triton import decode_dense_select
from sglang_kascade.kernels.decode_plan import DecodeBuffers
from sglang_kascade.kernels.decode_select_triton import decode_select, select_stages

HQ, HKV, D = 32, 8, 128
N_LAYERS, N_ANCHORS = 32, 4  # layer 0 dense + 4 anchors + 27 reuse


def capture_graph(fn, adopt=None) -> torch.cuda.CUDAGraph:
    """A CUDA graph holding fn() (warmed up outside the capture). ``adopt``
    (graph_nodes.adopt): the graph is kept and handed over, as the server's is."""
    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph(keep_graph=adopt is not None)
    with torch.cuda.graph(g):
        fn()
    if adopt is not None:
        assert adopt(g)
    torch.cuda.synchronize()
    return g


def replay_time(g) -> float:
    """Median ms of one replay of graph g (L2 flushed before each replay)."""
    return triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median")


def graph_time(fn, adopt=None) -> float:
    """Median ms of one replay of a CUDA graph holding fn() (L2 flushed before each replay)."""
    return replay_time(capture_graph(fn, adopt))


def flashinfer_dense(q, k_pool, v_pool, batch, L, tensor_cores):
    import flashinfer

    dev = q.device
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=dev) * L
    indices = torch.arange(batch * L, dtype=torch.int32, device=dev)
    last = torch.ones(batch, dtype=torch.int32, device=dev)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        ws, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices,
        paged_kv_last_page_len_buffer=last)
    w.plan(indptr, indices, last, HQ, HKV, D, 1, q_data_type=q.dtype, kv_data_type=k_pool.dtype)
    cache = (k_pool.unsqueeze(1), v_pool.unsqueeze(1))  # [slots, page=1, Hkv, D]
    out = torch.empty_like(q)
    return lambda: w.run(q, cache, out=out)


def triton_dense(q, k_pool, v_pool, batch, L, scale, topk_all):
    """Our gather attention with every position selected: its efficiency against FlashInfer."""
    dev = q.device
    buf = DecodeBuffers(batch=batch, q_heads=HQ, kv_heads=HKV, head_dim=D, lmax=L, kmax=L,
                        device=dev)
    # request b's run starts at b * L; slots == token indices here
    buf.sel_slot.copy_(torch.arange(batch * L, dtype=torch.int32, device=dev)[None].expand(HKV, -1))
    tok_off = torch.arange(batch, dtype=torch.int64, device=dev) * L
    ident = torch.arange(HKV, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    return lambda: decode_sparse_attention(q, k_pool, v_pool, buf.sel_slot, tok_off, topk_all,
                                           ident, scale, buf, out)


def point_inputs(batch: int, L: int, dtype, fraction: float, k_min: int) -> dict:
    """Inputs of one point, seeded by (batch, L): pools of batch * L random K/V rows (each
    request's slots contiguous), queries, req_to_token, lengths L, budgets
    k = min(L, max(k_min, ceil(fraction L))), row offsets, buffers sized for them, and a random
    head map. Shared by the decode benchmarks (decode_tilelang.py, tune_kernels.py)."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(batch * 1000003 + L)
    slots = batch * L
    k_pool = torch.randn(slots, HKV, D, device=dev, dtype=dtype, generator=gen)
    v_pool = torch.randn(slots, HKV, D, device=dev, dtype=dtype, generator=gen)
    q = torch.randn(batch, HQ, D, device=dev, dtype=dtype, generator=gen) * 3
    k = min(L, max(k_min, math.ceil(fraction * L)))
    return dict(
        q=q, k_pool=k_pool, v_pool=v_pool, k=k, scale=D ** -0.5,
        req_to_token=torch.arange(slots, dtype=torch.int32, device=dev).view(batch, L),
        req_idx=torch.arange(batch, dtype=torch.int32, device=dev),
        seq_lens=torch.full((batch,), L, dtype=torch.int32, device=dev),
        topk=torch.full((batch,), k, dtype=torch.int32, device=dev),
        tok_off=torch.arange(batch, dtype=torch.int64, device=dev) * L,
        buf=DecodeBuffers(batch=batch, q_heads=HQ, kv_heads=HKV, head_dim=D, lmax=L, kmax=k,
                          device=dev),
        head_map=torch.randperm(HKV, device=dev, generator=gen).to(torch.int32))


def bench_point(batch: int, L: int, dtype, fraction: float, k_min: int,
                flashinfer: bool = True) -> dict:
    p = point_inputs(batch, L, dtype, fraction, k_min)
    q, k_pool, v_pool, k, scale, buf = (p[n] for n in ("q", "k_pool", "v_pool", "k", "scale",
                                                        "buf"))
    req_to_token, req_idx, seq_lens, topk, tok_off, head_map = (p[n] for n in (
        "req_to_token", "req_idx", "seq_lens", "topk", "tok_off", "head_map"))
    dev = q.device
    ident = torch.arange(HKV, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    sel_args = (q, k_pool, req_to_token, req_idx, seq_lens, tok_off, topk, scale, buf)
    decode_select(*sel_args)  # a real selection

    def anchor_attn():
        decode_sparse_attention(q, k_pool, v_pool, buf.sel_slot, tok_off, topk, ident, scale,
                                buf, out, sel_pos=buf.sel_pos, logits=buf.logits)

    def reuse_attn():
        decode_sparse_attention(q, k_pool, v_pool, buf.sel_slot, tok_off, topk, head_map, scale,
                                buf, out)

    def select():
        decode_select(*sel_args)

    t_triton_dense = graph_time(triton_dense(q, k_pool, v_pool, batch, L, scale,
                                             torch.full_like(seq_lens, L)))
    dense_t, dense_tc = math.inf, None
    for tc in ((False, True) if flashinfer else ()):
        t = graph_time(flashinfer_dense(q, k_pool, v_pool, batch, L, tc))
        if t < dense_t:
            dense_t, dense_tc = t, tc
    if flashinfer:
        dense_fn = flashinfer_dense(q, k_pool, v_pool, batch, L, dense_tc)
    else:  # smoke runs without FlashInfer: our own kernel stands in for dense
        dense_t, dense_fn = t_triton_dense, triton_dense(q, k_pool, v_pool, batch, L, scale,
                                                         torch.full_like(seq_lens, L))

    stages = select_stages(*sel_args)
    topk_alone = stages["topk"]  # zeroed by the score stage in a layer: here by two memsets
    stages["topk"] = lambda: (buf.topk_hist.zero_(), buf.topk_ctr.zero_(), topk_alone())
    t_stage = {name: graph_time(fn) for name, fn in stages.items()}
    t_stage["attn_anchor"] = graph_time(anchor_attn)
    t_stage["attn_reuse"] = graph_time(reuse_attn)
    t_select = graph_time(select)
    t_layer0_fi = graph_time(lambda: (dense_fn(), select()))
    t_layer0 = graph_time(lambda: decode_dense_select(q, k_pool, v_pool, req_to_token, req_idx,
                                                      seq_lens, tok_off, topk, scale, buf, out))
    t_anchor = graph_time(lambda: (select(), anchor_attn()))
    t_reuse = t_stage["attn_reuse"]
    n_reuse = N_LAYERS - 1 - N_ANCHORS
    avg = (t_layer0 + N_ANCHORS * t_anchor + n_reuse * t_reuse) / N_LAYERS

    # Fewest bytes each kind must move (GB/s = bytes / time): K and V rows, indices, logits.
    row = HKV * D * k_pool.element_size()  # one position's K (or V) over all KV heads
    g = HQ // HKV
    dense_bytes = batch * L * 2 * row
    score_bytes = batch * L * (row + HKV * g * 4 + 4)  # K, logits written, req_to_token
    reuse_bytes = batch * k * (2 * row + HKV * 4)  # selected K and V, slots
    anchor_attn_bytes = batch * k * (row + HKV * (g * 4 + 8))  # selected V, logits, pos + slot
    gbs = lambda nbytes, ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
    return dict(
        batch=batch, context=L, topk=k, dtype=str(dtype).replace("torch.", ""),
        splits=buf.step(batch).splits, dense_flashinfer_tensor_cores=dense_tc,
        dense_baseline="flashinfer" if flashinfer else "triton_gather_all",
        ms=dict(dense=dense_t, triton_gather_all=t_triton_dense, layer0=t_layer0,
                layer0_fi_select=t_layer0_fi, anchor=t_anchor, reuse=t_reuse, select=t_select,
                kascade_avg=avg, **{f"stage_{n}": v for n, v in t_stage.items()}),
        speedup=dense_t / avg,
        reuse_speedup=dense_t / t_reuse,
        anchor_speedup=dense_t / t_anchor,
        gbs=dict(dense=gbs(dense_bytes, dense_t), score=gbs(score_bytes, t_stage["score"]),
                 reuse=gbs(reuse_bytes, t_reuse),
                 attn_anchor=gbs(anchor_attn_bytes, t_stage["attn_anchor"])),
        avg_share=dict(layer0=t_layer0 / N_LAYERS / avg,
                       anchors=N_ANCHORS * t_anchor / N_LAYERS / avg,
                       reuse=n_reuse * t_reuse / N_LAYERS / avg),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--k-min", type=int, default=128)
    ap.add_argument("--no-flashinfer", action="store_true", help="smoke run: no FlashInfer")
    args = ap.parse_args()
    rows = []
    for b in args.batches:
        for L in args.contexts:
            r = bench_point(b, L, torch.bfloat16, args.fraction, args.k_min,
                            flashinfer=not args.no_flashinfer)
            rows.append(r)
            m = r["ms"]
            print(f"B={b:3d} L={L:7d} k={r['topk']:6d} dense {m['dense']*1e3:8.1f}us "
                  f"layer0 {m['layer0']*1e3:8.1f} (fi+sel {m['layer0_fi_select']*1e3:8.1f}) anchor {m['anchor']*1e3:8.1f} "
                  f"reuse {m['reuse']*1e3:7.1f} gather-all {m['triton_gather_all']*1e3:8.1f} avg {m['kascade_avg']*1e3:7.1f} "
                  f"speedup {r['speedup']:.2f}x | score {m['stage_score']*1e3:.1f} "
                  f"pool {m['stage_pool']*1e3:.1f} topk {m['stage_topk']*1e3:.1f} "
                  f"attnA {m['stage_attn_anchor']*1e3:.1f} | "
                  f"GB/s dense {r['gbs']['dense']:.0f} score {r['gbs']['score']:.0f} "
                  f"reuse {r['gbs']['reuse']:.0f}", flush=True)
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, heads=dict(q=HQ, kv=HKV, head_dim=D),
                layers=dict(total=N_LAYERS, anchors=N_ANCHORS, dense_layer0=1),
                fraction=args.fraction, k_min=args.k_min)
    try:
        import flashinfer
        meta["flashinfer"] = flashinfer.__version__
    except Exception:  # noqa: BLE001
        pass
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
