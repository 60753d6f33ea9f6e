"""One decode point's kernels launched eagerly a few times, for a profiler to attach to (ncu).

Anchor selection (score, pool, radix Top-k), the anchor's attention from its logits and the reuse
attention, Llama-3.1-8B shapes, bf16, Top-k 10% (bench/decode_kernels.point_inputs). Example (GPU
host, one reuse launch with every ncu section):

  PYTHONPATH=/tmp/site ncu --clock-control none --set full -k regex:_sparse_decode_kernel \
      --launch-skip 4 --launch-count 1 python3 -P bench/probe_kernels.py --batch 1 --context 131072
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_kernels import D, HKV, point_inputs  # noqa: E402

from sglang_kascade.kernels.decode_attention_triton import decode_sparse_attention  # noqa: E402
from sglang_kascade.kernels.decode_select_triton import decode_select  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=6)
    a = ap.parse_args()
    p = point_inputs(a.batch, a.context, torch.bfloat16, a.fraction, 128)
    q, k_pool, v_pool, tok_off, topk, buf = (p[n] for n in ("q", "k_pool", "v_pool", "tok_off",
                                                             "topk", "buf"))
    ident = torch.arange(HKV, dtype=torch.int32, device=q.device)
    out = torch.empty_like(q)
    for _ in range(a.repeats):
        decode_select(q, k_pool, p["req_to_token"], p["req_idx"], p["seq_lens"], tok_off, topk,
                      D ** -0.5, buf)
        decode_sparse_attention(q, k_pool, v_pool, buf.sel_slot, tok_off, topk, ident,
                                D ** -0.5, buf, out, sel_pos=buf.sel_pos, logits=buf.logits)
        decode_sparse_attention(q, k_pool, v_pool, buf.sel_slot, tok_off, topk, p["head_map"],
                                D ** -0.5, buf, out)
    torch.cuda.synchronize()
    print(f"B={a.batch} L={a.context} k={p['k']} splits={buf.step(a.batch).splits}: "
          f"{a.repeats} rounds done")


if __name__ == "__main__":
    main()
