"""Every Triton kernel variant the device path launches, compiled for Hopper (sm_90) on a machine
without a GPU (tests/kernels/test_sm90_compile.py).

Two steps, each its own process (Triton decides at import whether kernels are interpreted):

  record OUT.json --hq H --hkv K --d D --dtype bfloat16 --tile T
      under TRITON_INTERPRET=1: runs DevicePath.warm_up (every variant eager decode and prefill
      launch at start-up: sglang_kascade/warmup.py) and one decode step the way a captured graph
      runs it (the in-graph plan kernel, then every layer through the static plan), and records
      each distinct launch as Triton's compiler sees it: the signature, the constexprs and the
      pointer / integer attributes from Triton's own binder for an sm_90 target, and the launch
      options.
  compile IN.json OUT.json
      compiled (interpreter off): each recorded variant through triton.compile for sm_90, down
      to the cubin (ptxas); per variant "ok" or the error, and its shared memory in bytes.

What it catches without a GPU: a kernel that the interpreter runs but the compiler rejects, and a
block that needs more shared memory than a Hopper block can have. Not what the GPU tests check
(values, timing), and compiled by this machine's Triton, not the GPU hosts' (3.6).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

SM90 = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp size)
SM90_SMEM_BYTES = 232448  # the most shared memory one block may use on H100 / H200 (227 KiB)


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget(*SM90)


def record(out: str, hq: int, hkv: int, d: int, dtype: str, tile: int) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "record runs under TRITON_INTERPRET=1"
    import torch
    from triton.compiler import make_backend
    from triton_launches import hook_launches

    backend = make_backend(_target())
    variants = {}

    def on_launch(fn, jf, bound, spec, opts, kwargs):
        launch = {k: v for k, v in kwargs.items() if k not in jf.arg_names}
        _, signature, constexprs, attrs = jf._pack_args(backend, dict(launch), bound, spec, opts)
        rec = dict(module=fn.__module__, name=fn.__name__, signature=signature,
                   constexprs=[[list(k), v] for k, v in constexprs.items()],
                   attrs=[[list(k), v] for k, v in attrs.items()], launch=launch)
        variants.setdefault(json.dumps(rec, sort_keys=True, default=str), rec)

    hook_launches(backend, on_launch)

    from sglang_kascade.config import BudgetConfig
    from sglang_kascade.device_path import DevicePath
    from sglang_kascade.kernels.graph_plan_triton import graph_rows
    from sglang_kascade.layers import LayerTable

    dt = getattr(torch, dtype)
    roles = ("dense_anchor", "anchor", "reuse", "reuse")
    head_map = tuple(tuple(range(hkv)) for _ in roles)
    dp = DevicePath("cpu")
    dp.set_profile(LayerTable(roles, (True, True, False, False), head_map))
    dp.graph_selects, dp.head_map_table = dp.layers.device_tables()  # set_profile: CUDA only
    budget = BudgetConfig(topk_fraction=0.1, k_min=16, tile_size=tile)
    dp.set_budget(budget)
    dp.warm_up(hq=hq, hkv=hkv, d=d, dtype=dt, tile_size=tile, r2t_stride=4096)

    # A decode step as a captured graph runs it: the plan kernel, then each layer.
    slots, seq = 4096, [300, 1000]
    dp.init_graph_state(max_bs=2, lmax=4096, tokens=2 * slots, pad_keys=2, budget=budget)
    fwd = dp.plan_graph(seq)
    g = dp.graph_state
    graph_rows(torch.tensor([1, 0]), torch.tensor(seq), g["req_idx"], g["seq_lens"],
               g["tok_off"], g["topk"], dp.graph_budget_f, dp.graph_budget_i, g["kmax"],
               g["row_frac"])
    fwd.rows_filled = True
    k_pool, v_pool = (torch.randn(slots, hkv, d).to(dt) for _ in range(2))
    r2t = torch.randint(0, slots, (4, 4096), dtype=torch.int32)
    q = torch.randn(len(seq), hq, d).to(dt)
    for layer, role in enumerate(roles):
        dp.forward(fwd, role, layer, q, k_pool, v_pool, r2t, d ** -0.5)

    with open(out, "w") as f:
        json.dump(list(variants.values()), f, default=str)


def compile_all(src: str, out: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "compile runs with the interpreter off"
    import triton
    from triton.compiler import ASTSource, make_backend

    target = _target()
    backend = make_backend(target)
    results = []
    with open(src) as f:
        recs = json.load(f)
    for rec in recs:
        fn = getattr(importlib.import_module(rec["module"]), rec["name"])
        source = ASTSource(fn, rec["signature"], {tuple(p): v for p, v in rec["constexprs"]},
                           {tuple(p): v for p, v in rec["attrs"]})
        options = backend.parse_options(dict(rec["launch"])).__dict__
        res = dict(name=rec["name"], constexprs=rec["constexprs"])
        try:
            kernel = triton.compile(source, target=target, options=options)
            res.update(ok=True, shared=int(kernel.metadata.shared))
        except Exception as e:  # reported per variant; the test names them
            res.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
        results.append(res)
    with open(out, "w") as f:
        json.dump(results, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)
    r = sub.add_parser("record")
    r.add_argument("out")
    r.add_argument("--hq", type=int, required=True)
    r.add_argument("--hkv", type=int, required=True)
    r.add_argument("--d", type=int, required=True)
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--tile", type=int, default=32)
    c = sub.add_parser("compile")
    c.add_argument("src")
    c.add_argument("out")
    a = ap.parse_args(argv)
    if a.step == "record":
        record(a.out, a.hq, a.hkv, a.d, a.dtype, a.tile)
    else:
        compile_all(a.src, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
