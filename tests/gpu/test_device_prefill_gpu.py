"""KascadeAttnBackend on CUDA through the device path (Triton prefill and decode kernels) against the
float64 oracle, on the scenario of test_backend_vs_reference.py: ragged extend batches with cold
prompts, a chunked-prefill continuation whose prefix is not a multiple of the tile, a radix-cache
hit sharing another request's slots, a prefix already in the pool, decode steps and a late extend;
pages of 1 or 16 slots scattered over the pool; bf16 and fp16; GQA groups 3 and 4.

Marker ``gpu``; skipped without CUDA. Per case the backend runs twice on the GPU: device path on
and off (off: the PyTorch path, itself checked against the oracle on the CPU). Checks: the device
path ran for extend and decode forwards; every selection is a valid Top-k of the oracle's float64
pooled scores (the oracle continues with the backend's selection on a float near-tie); every
layer's output matches the oracle within the CPU test's bf16 bounds (fp16 the same); the device
and PyTorch paths agree on most selections.
"""

from __future__ import annotations

import pytest
import torch

import test_backend_vs_reference as tb
from sglang_kascade.config import KascadeOptions, PolicyConfig
from test_policies import run_policy_oracle

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ATOL, RTOL = 3e-2, 2e-2

# (profile, granularity, page_tile, slot_page, Hq, Hkv, D, dtype), as in test_backend_vs_reference
CASES = [
    ("a024", "token", 8, 1, 8, 2, 64, torch.bfloat16),
    ("a024", "token", 8, 16, 12, 4, 32, torch.float16),
    ("a02d3", "token", 8, 16, 8, 2, 64, torch.bfloat16),
    ("a024", "token", 8, 16, 8, 2, 128, torch.float16),
]


@pytest.mark.parametrize("policy", ["kascade", "oracle"])
@pytest.mark.parametrize("case", CASES, ids=tb.case_id)
def test_device_path_prefill_and_decode_match_oracle(case, policy):
    scn = tb.build(case)
    pol = PolicyConfig(name=policy)
    sparse = KascadeOptions(dense_prefill_below=0)  # these prompts are short: sparse anyway
    dev = tb.run_backend(scn, batched=True, policy=pol, device="cuda", device_path=True,
                         options=sparse)
    torch_path = tb.run_backend(scn, batched=True, policy=pol, device="cuda", device_path=False,
                                options=sparse)
    assert dev.backend.device_path.layers_run > 0
    assert dev.backend.stats.device_forwards >= 4  # extend and decode forwards
    assert torch_path.backend.device_path.layers_run == 0
    outputs, masks, ties = run_policy_oracle(scn, policy, dev.selections)
    assert set(dev.outputs) == set(outputs)
    for key, want in outputs.items():
        torch.testing.assert_close(dev.outputs[key].double(), want, atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{policy} {key}: {m}")
    assert len(ties) <= max(1, len(masks) // 20), ties
    # the PyTorch path on the same GPU inputs picks (almost) the same keys
    pd, hkv = scn.profile_dict, scn.model.hkv
    kfn = lambda s: tb.ref.budget_k(s, pd["topk_fraction"], pd["k_min"], pd["round_to"])  # noqa: E731
    same = 0
    for f, name, lid in masks:
        st = next(x for x in tb.FORWARDS[f].steps if x.name == name)
        s = st.prefix + st.n
        tiles = (tb.ref.oracle_decode_tiles(s, kfn) if tb.FORWARDS[f].decode else
                 tb.ref.oracle_extend_tiles(st.prefix, st.n, pd["tile_size"], kfn))
        a = tb.ref.mask_from_kernel(dev.selections[f, name, lid], tiles, hkv, s)
        b = tb.ref.mask_from_kernel(torch_path.selections[f, name, lid], tiles, hkv, s)
        same += torch.equal(a, b)
    assert same >= 0.9 * len(masks), (same, len(masks))
