"""The decode Top-k on rows of different shapes of scores, each mode in its own CUDA graph.

A radix select's cost depends on the scores: collect mode (kernels/topk_triton.py) hands the keys
that share the threshold's 16-bit prefix to one program per row, so rows whose scores are nearly
equal (a model with random weights, long runs of one repeated token) put most of the row there.
This script times the Top-k alone at decode's layout (token-indexed rows, 8 KV heads, k = 10%) on:

  skewed   rand()**8: many distinct magnitudes (the kernel benchmarks' inputs)
  softmax  softmax of N(0, 1) logits over the row (a trained model's spread is wider)
  flat     1/L * (1 + 1e-6 * N(0, 1)): every key on one 16-bit prefix

Usage (GPU host): PYTHONPATH=/tmp/site python3 -P bench/topk_rows.py --out $OUT/topk_rows.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_kernels import graph_time  # noqa: E402

from sglang_kascade.kernels.topk_triton import topk_select  # noqa: E402

HKV = 8


def scores_of(kind: str, batch: int, length: int, dev) -> torch.Tensor:
    """[Hkv, batch * length] fp32 non-negative scores of one distribution."""
    shape = (HKV, batch, length)
    if kind == "skewed":
        s = torch.rand(shape, device=dev) ** 8
    elif kind == "softmax":
        s = torch.softmax(torch.randn(shape, device=dev), dim=-1)
    elif kind == "flat":
        s = (1.0 + 1e-6 * torch.randn(shape, device=dev)) / length
    else:
        raise ValueError(kind)
    return s.reshape(HKV, batch * length).contiguous()


MODES = {"collect": dict(collect=True), "five": dict(collect=False),
         # collect mode with the candidates always left to one program per row
         "collect_serial": dict(collect=True, cand_max=1 << 30)}


def decode_rows(scores: torch.Tensor, batch: int, length: int, k: int):
    """The decode Top-k on ``scores`` [Hkv, batch * length] (token-indexed rows of ``length``
    keys, budget ``k`` each, identity slots): (run(launch), pos [Hkv, batch * length])."""
    dev, hkv = scores.device, scores.shape[0]
    tok_off = torch.arange(batch, dtype=torch.int64, device=dev) * length
    seq = torch.full((batch,), length, dtype=torch.int32, device=dev)
    topk = torch.full((batch,), k, dtype=torch.int32, device=dev)
    r2t = torch.arange(batch * length, dtype=torch.int32, device=dev).view(batch, length)
    req = torch.arange(batch, dtype=torch.int32, device=dev)
    hist = torch.empty(4, batch * hkv, 256, dtype=torch.int32, device=dev)
    ctr = torch.empty(batch * hkv, 2, dtype=torch.int32, device=dev)
    pos = torch.empty(hkv, batch * length, dtype=torch.int32, device=dev)
    slot = torch.empty_like(pos)

    def run(launch: dict | None = None):
        topk_select(scores, seq, topk, r2t, req, hist, ctr, pos, slot, length,
                    launch=launch, tok_off=tok_off)

    return run, pos


def time_topk(kind: str, batch: int, length: int, launch: dict) -> float:
    scores = scores_of(kind, batch, length, torch.device("cuda"))
    k = max(128, length // 10)
    run, pos = decode_rows(scores, batch, length, k)
    ms = graph_time(lambda: run(launch))
    # the selection must be exact whatever the mode: its smallest kept score >= the k-th largest
    for b in range(batch):
        row = scores[:, b * length:(b + 1) * length]
        kth = row.topk(k, dim=-1).values[:, -1]
        got = torch.gather(row, 1, pos[:, b * length:b * length + k].long())
        assert bool((got.min(dim=-1).values >= kth).all()), (kind, batch, length, launch)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--kinds", nargs="+", default=["skewed", "softmax", "flat"])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for batch in args.batches:
        for length in args.contexts:
            for kind in args.kinds:
                us = {mode: round(1e3 * time_topk(kind, batch, length, launch), 1)
                      for mode, launch in MODES.items()}
                rows.append(dict(batch=batch, context=length, scores=kind, us=us))
                print(f"B={batch} L={length} {kind:8s} " + "  ".join(
                    f"{m} {t:8.1f} us" for m, t in us.items()), flush=True)
    if args.out:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
