"""TileLang against Triton on the decode reuse kernel: sparse attention over an anchor's Top-k
selection through a random head map (K and V gathered from the pool), side by side.

Llama-3.1-8B shapes (32 query heads, 8 KV heads, head dim 128, bf16), k = ceil(0.1 L), one layer's
pool, inputs built as decode_kernels.py's bench_point builds them (each request's slots
contiguous, a real selection from decode_select). Both kernels write the same split partials;
the TileLang ones are merged by the Triton reduce (combine_splits, timed alone as ``combine``),
the Triton kernel merges its own in its last split when it has at most MERGE_MAX_SPLITS splits,
else it uses combine_splits too. Each is captured in a CUDA graph and timed by
decode_kernels.graph_time (median, L2 flushed before each replay). ``--check`` first compares the outputs: TileLang against Triton,
and both against the PyTorch reference (decode_torch); the run exits 1 after writing the JSON if
TileLang is off the reference by more than the tests' bf16 bound.

Usage (GPU host, PYTHONPATH holding tilelang and this package):
  python3 -P bench/decode_tilelang.py --check --out $OUT/decode_tilelang.json
  (--block-n / --stages / --threads take several values: every TileLang config is timed)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

# -P keeps the checkout off sys.path: decode_kernels.py (graph_time, shapes) is beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
from decode_kernels import D, HKV, HQ, graph_time, point_inputs  # noqa: E402

from sglang_kascade.kernels.decode_attention_tilelang import (  # noqa: E402
    decode_sparse_attention_tilelang,
)
from sglang_kascade.kernels.decode_attention_triton import (  # noqa: E402
    combine_splits,
    decode_sparse_attention,
)
from sglang_kascade.kernels.decode_plan import gather_rows  # noqa: E402
from sglang_kascade.kernels.decode_select_triton import decode_select  # noqa: E402
from sglang_kascade.kernels.decode_torch import decode_sparse_attention_torch  # noqa: E402

CHECK_REL = 1e-2  # tests' bf16 bound (output rounding ~4e-3)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def make_point(batch: int, L: int, fraction: float, dtype=torch.bfloat16) -> dict:
    """Inputs of one point (decode_kernels.point_inputs, no k_min) with decode_select's
    selection."""
    p = point_inputs(batch, L, dtype, fraction, 0)
    decode_select(*(p[n] for n in ("q", "k_pool", "req_to_token", "req_idx", "seq_lens",
                                   "tok_off", "topk", "scale", "buf")))
    return p


def reuse_fns(p: dict, configs: list) -> tuple:
    """(triton fn, {config name: tilelang fn}, outputs) over the point's inputs."""
    args = (p["q"], p["k_pool"], p["v_pool"], p["buf"].sel_slot, p["tok_off"], p["topk"],
            p["head_map"], p["scale"], p["buf"])
    outs = {"triton": torch.empty_like(p["q"])}
    fns = {}
    for bn, st, th in configs:
        name = f"bn{bn}-st{st}-t{th}"
        out = outs[name] = torch.empty_like(p["q"])
        fns[name] = functools.partial(decode_sparse_attention_tilelang, *args, out, block_n=bn,
                                      num_threads=th, num_stages=st)
    return functools.partial(decode_sparse_attention, *args, outs["triton"]), fns, outs


def check_point(p: dict, triton_fn, tl_fns: dict, outs: dict) -> dict:
    """Relative errors: each TileLang config against Triton and against the PyTorch reference."""
    pos = gather_rows(p["buf"].sel_pos, p["tok_off"], p["k"]).long()  # [B, Hkv, k]
    valid = torch.ones_like(pos, dtype=torch.bool)
    want = decode_sparse_attention_torch(p["q"], p["k_pool"], p["v_pool"], p["req_to_token"],
                                         p["req_idx"], pos, valid, p["scale"], p["head_map"])
    triton_fn()
    res = {"triton_vs_ref": rel(outs["triton"], want)}
    for name, fn in tl_fns.items():
        outs[name].fill_(float("nan"))
        fn()
        res[f"{name}_vs_triton"] = rel(outs[name], outs["triton"])
        res[f"{name}_vs_ref"] = rel(outs[name], want)
    return res


def bench_point(batch: int, L: int, fraction: float, configs: list, check: bool) -> dict:
    p = make_point(batch, L, fraction)
    triton_fn, tl_fns, outs = reuse_fns(p, configs)
    st = p["buf"].step(batch)
    errs = check_point(p, triton_fn, tl_fns, outs) if check else {}
    ms = {"triton": graph_time(triton_fn)}
    for name, fn in tl_fns.items():
        ms[f"tilelang_{name}"] = graph_time(fn)
    ms["combine"] = graph_time(lambda: combine_splits(st.attn_o, st.attn_lse, st.splits,
                                                      outs["triton"]))
    row = HKV * D * p["k_pool"].element_size()  # one position's K (or V) over all KV heads
    nbytes = batch * p["k"] * (2 * row + HKV * 4)  # selected K and V, slots
    best = min((k for k in ms if k.startswith("tilelang_")), key=ms.get)
    return dict(batch=batch, context=L, topk=p["k"], splits=st.splits, ms=ms, best_tilelang=best,
                tilelang_over_triton=ms[best] / ms["triton"],
                gbs={k: nbytes / (v * 1e-3) / 1e9 for k, v in ms.items() if k != "combine"},
                check=errs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--block-n", type=int, nargs="+", default=[64])
    ap.add_argument("--stages", type=int, nargs="+", default=[2])
    ap.add_argument("--threads", type=int, nargs="+", default=[128])
    ap.add_argument("--check", action="store_true", help="compare outputs before timing")
    args = ap.parse_args()
    configs = list(itertools.product(args.block_n, args.stages, args.threads))
    rows, failed = [], []
    for b in args.batches:
        for L in args.contexts:
            r = bench_point(b, L, args.fraction, configs, args.check)
            rows.append(r)
            m, best = r["ms"], r["best_tilelang"]
            errs = " ".join(f"{k} {v:.1e}" for k, v in r["check"].items())
            print(f"B={b:3d} L={L:7d} k={r['topk']:6d} splits {r['splits']:2d} | "
                  f"triton {m['triton']*1e3:7.1f}us ({r['gbs']['triton']:.0f} GB/s) | "
                  f"{best} {m[best]*1e3:7.1f}us ({r['gbs'][best]:.0f} GB/s) "
                  f"x{r['tilelang_over_triton']:.2f} | combine {m['combine']*1e3:.1f}us"
                  + (f" | rel {errs}" if errs else ""), flush=True)
            failed += [f"B={b} L={L} {k}" for k, v in r["check"].items()
                       if k.endswith("_vs_ref") and not v < CHECK_REL]
            torch.cuda.empty_cache()
    import tilelang

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, tilelang=tilelang.__version__,
                heads=dict(q=HQ, kv=HKV, head_dim=D), fraction=args.fraction,
                tilelang_configs=[dict(block_n=bn, num_stages=st, num_threads=th)
                                  for bn, st, th in configs])
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, check_failed=failed), f, indent=1)
    if failed:
        print("CHECK FAILED (rel err vs reference >= %g): %s" % (CHECK_REL, ", ".join(failed)))
        sys.exit(1)


if __name__ == "__main__":
    main()
