"""Specialization keys of our kernels after the warm-up, on the CPU
(tests/kernels/test_warmup_cpu.py).

Run under TRITON_INTERPRET=1 from the repository root. Every interpreted launch also computes
the key a compiled launch would look up (Triton's own binder over the kernel's parameters with
its do_not_specialize lists: constexprs, dtypes, ints == 1 / divisible by 16, pointer alignment,
launch options). The warm-up runs, then decode and prefill workloads of other shapes through
DevicePath; prints every key they add (none: "OK")."""
import random, sys, time
import torch
from triton.backends.compiler import BaseBackend
from triton_launches import hook_launches

KEYS = {}
hook_launches(BaseBackend, lambda fn, jf, bound, spec, opts, kwargs: KEYS.setdefault(
    fn.__name__, set()).add(repr(spec) + repr(sorted(opts.items()))))

from sglang_kascade.config import BudgetConfig
from sglang_kascade.device_path import DevicePath
from sglang_kascade.layers import LayerTable

HQ, HKV, D, DT = 8, 2, 32, torch.float16
SLOTS, ROWS, WIDTH = 4096, 16, 3001
g = torch.Generator().manual_seed(0)
K = torch.randn(SLOTS, HKV, D, generator=g).to(DT)
V = torch.randn(SLOTS, HKV, D, generator=g).to(DT)
R2T = torch.randint(0, SLOTS, (ROWS, WIDTH), generator=g, dtype=torch.int32)
dp = DevicePath("cpu")
roles = ["dense_anchor", "anchor", "reuse", "reuse"]
dp.set_profile(LayerTable(tuple(roles), (True, True, False, False),
                          ((0, 1), (0, 1), (1, 0), (1, 0))))
dp.head_map_table = torch.tensor(  # set_profile builds it on CUDA only
    [[0, 1], [0, 1], [1, 0], [1, 0]], dtype=torch.int32)
budget = BudgetConfig(topk_fraction=0.5, k_min=16, tile_size=16)
dp.set_budget(budget)
t = time.time()
dp.warm_up(hq=HQ, hkv=HKV, d=D, dtype=DT, tile_size=16, r2t_stride=WIDTH)
base = {k: set(v) for k, v in KEYS.items()}
print("warm-up", round(time.time() - t, 1), "s;", sum(map(len, base.values())), "keys")
rng = random.Random(0)
def decode(lens, bud):
    fwd = dp.plan(rng.sample(range(ROWS), len(lens)), lens, bud)
    q = torch.randn(len(lens), HQ, D).to(DT)
    for lid, role in enumerate(roles):
        dp.forward(fwd, role, lid, q, K, V, R2T, D ** -0.5)
def prefill(prefix, extend, bud):
    fwd = dp.plan_prefill(rng.sample(range(ROWS), len(prefix)), prefix, extend, bud)
    q = torch.randn(sum(extend), HQ, D).to(DT)
    for lid, role in enumerate(roles):
        dp.forward(fwd, role, lid, q, K, V, R2T, D ** -0.5)
t = time.time()
for lens in ([17], [1, 300], [999], [5, 700, 77], [rng.randint(1, 300) for _ in range(9)]):
    decode(lens, budget)
for pre, ext in (([0, 0], [301, 45]), ([64, 7], [203, 1]), ([999], [1]), ([512], [333])):
    prefill(pre, ext, budget)
budget2 = BudgetConfig(topk_fraction=0.25, k_min=8, tile_size=16, round_to=16)
for lens in ([2, 3], [rng.randint(40, 900) for _ in range(5)]):
    decode(lens, budget2)
prefill([1, 100, 0], [401, 3, 77], budget2)
print("workloads", round(time.time() - t, 1), "s; layers", dp.layers_run)
new = {k: v - base.get(k, set()) for k, v in KEYS.items() if v - base.get(k, set())}
for k, v in new.items():
    print("NEW", k, len(v))
    for x in v:
        print("   ", x[:400])
print("OK" if not new else "FAIL")
