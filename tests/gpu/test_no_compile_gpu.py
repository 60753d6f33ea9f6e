"""No Triton compile while serving: after ``DevicePath.warm_up``, eager decode and prefill
workloads compile no variant of our kernels (sglang_kascade/warmup.py).

Marker ``gpu``; skipped without CUDA (the counter reads Triton's per-device kernel caches; the
interpreter compiles nothing). Llama-3.1-8B shapes: 32 query heads, 8 KV heads, head dim 128,
bf16; a KV pool of 2^17 slots; a ``req_to_token`` whose rows are 131,089 entries wide (not a
multiple of 16, as a server's may be). The warm-up gets no pool (a scratch one of the layout).
Then, through ``DevicePath.plan`` / ``plan_prefill`` / ``forward`` over a 4-layer profile
(dense_anchor, anchor, reuse, reuse), each workload must leave the counter where the warm-up
left it:

  A: eager decode batches of 1 to 48 requests, lengths 1 to 100,003 (ragged, not multiples of
     16, rows past SHORT_ROW, a dense request among sparse ones), the eager buffers growing;
     prefill of ragged batches with cached prefixes, a 40,001-token prompt in chunks of 8,192
     (tiles in two blocks of the pooled scores), 1-token extends beside long ones;
  B: other batch sizes and lengths, another budget (fraction, k_min, round_to), other roles and
     head maps; then a hot-swapped tile size, which compiles at ``set_budget`` (the counter
     moves there) and not during its prefills.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from sglang_kascade.config import BudgetConfig
from sglang_kascade.device_path import DevicePath
from sglang_kascade.layers import LayerTable
from sglang_kascade.warmup import compiled_by_kernel, compiled_variants

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
SLOTS, ROWS, WIDTH = 1 << 17, 64, 131_089
SCALE = D ** -0.5


@pytest.fixture(scope="module")
def model():
    gen = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(SLOTS, HKV, D, generator=gen).to(DEV, DTYPE)
    v = torch.randn(SLOTS, HKV, D, generator=gen).to(DEV, DTYPE)
    r2t = torch.randint(0, SLOTS, (ROWS, WIDTH), generator=gen, dtype=torch.int32).to(DEV)
    return SimpleNamespace(k=k, v=v, r2t=r2t)


def _profile(dp, roles, perm):
    ident = list(range(HKV))
    maps = [perm if role == "reuse" else ident for role in roles]
    selects = [role in ("dense_anchor", "anchor") for role in roles]
    dp.set_profile(LayerTable(tuple(roles), tuple(selects), tuple(map(tuple, maps))))
    return roles


def _decode(dp, m, roles, lens, budget, rng):
    rows = rng.sample(range(ROWS), len(lens))
    fwd = dp.plan(rows, lens, budget)
    q = torch.randn(len(lens), HQ, D, device=DEV, dtype=DTYPE)
    for lid, role in enumerate(roles):
        dp.forward(fwd, role, lid, q, m.k, m.v, m.r2t, SCALE)


def _prefill(dp, m, roles, prefix, extend, budget, rng):
    rows = rng.sample(range(ROWS), len(prefix))
    fwd = dp.plan_prefill(rows, prefix, extend, budget)
    q = torch.randn(sum(extend), HQ, D, device=DEV, dtype=DTYPE)
    for lid, role in enumerate(roles):
        dp.forward(fwd, role, lid, q, m.k, m.v, m.r2t, SCALE)


def _check_none(before: dict, what: str):
    torch.cuda.synchronize()
    after = compiled_by_kernel()
    new = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert not new, f"{what} compiled Triton variants after the warm-up: {new}"


def test_no_compile_after_warm_up(model):
    m, rng = model, random.Random(0)
    dp = DevicePath(DEV)
    roles = _profile(dp, ["dense_anchor", "anchor", "reuse", "reuse"], [3, 1, 0, 2, 7, 6, 5, 4])
    budget = BudgetConfig(topk_fraction=0.1, k_min=128, tile_size=32)
    dp.set_budget(budget)
    dp.warm_up(hq=HQ, hkv=HKV, d=D, dtype=DTYPE, tile_size=budget.tile_size,
               r2t_stride=m.r2t.stride(0))
    assert dp.warm.variants > 0 or compiled_variants() > 0  # the counter sees the compiles
    base = compiled_by_kernel()
    layers0 = dp.layers_run

    # ---- workload A ----
    for lens in ([129], [4097], [9001], [100_003], [300, 17_000, 5], [1, 5000],
                 [1000, 1000, 1000, 70_001], [rng.randint(129, 30_000) for _ in range(13)],
                 [rng.randint(200, 8000) for _ in range(48)]):
        _decode(dp, m, roles, lens, budget, rng)
    _check_none(base, "workload A, decode")
    for prefix, extend in (([0, 0], [9000, 12_345]), ([4096, 7], [5003, 9001]),
                           ([20_000, 9_999], [1, 1]), ([30_017, 0], [1, 8000]),
                           ([0], [8192]), ([8192], [8192]), ([16_384], [8192]),
                           ([24_576], [8192]), ([32_768], [7233])):
        _prefill(dp, m, roles, prefix, extend, budget, rng)
    _check_none(base, "workload A, prefill")
    assert dp.layers_run > layers0  # the kernels ran

    # ---- workload B ----
    roles = _profile(dp, ["dense_anchor", "reuse", "anchor", "reuse"], [7, 6, 5, 4, 3, 2, 1, 0])
    budget = BudgetConfig(topk_fraction=0.05, k_min=64, tile_size=32, round_to=16)
    dp.set_budget(budget)
    for lens in ([2, 3], [65_537], [rng.randint(70, 120_000) for _ in range(7)],
                 [rng.randint(100, 4000) for _ in range(33)],
                 [rng.randint(1, 2000) for _ in range(64)], [131_000]):
        _decode(dp, m, roles, lens, budget, rng)
    for prefix, extend in (([1], [14_999]), ([123, 45_678, 0], [9_999, 3, 10_001]),
                           ([60_001], [8191]), ([0, 0, 0, 0], [3001, 3002, 3003, 3004])):
        _prefill(dp, m, roles, prefix, extend, budget, rng)
    _check_none(base, "workload B")

    # ---- a hot-swapped tile size: compiled when applied, not by its prefills ----
    swapped = BudgetConfig(topk_fraction=0.1, k_min=128, tile_size=64)
    dp.set_budget(swapped)
    torch.cuda.synchronize()
    at_swap = compiled_by_kernel()
    assert sum(at_swap.values()) > sum(base.values())  # set_budget compiled the tile's prefill
    for prefix, extend in (([0, 4096], [20_001, 3]), ([16_384], [8192])):
        _prefill(dp, m, roles, prefix, extend, swapped, rng)
    for lens in ([77, 50_000], [9000]):
        _decode(dp, m, roles, lens, swapped, rng)
    _check_none(at_swap, "the swapped tile size's workload")
