"""Fuzzing the profile schema against a running backend (issue 20, item 1): a random
valid-looking profile (every number drawn from extremes: 0, negatives, 2**31, 2**63, 2**64, huge
floats, NaN, inf, and ordinary values) is either refused by the scheduler's validation with a
KascadeConfigError, or hot-swapped into a backend that then runs prefill and decode forwards
(the scenario of test_backend_vs_reference.py, CPU, PyTorch path) with finite outputs. Nothing
else may happen: no other exception from validation, none from the batch boundary or a forward.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from sglang_kascade.config import (MAX_BUDGET_KEYS, MAX_PAGE_TILE_SIZE, MAX_TILE_SIZE, POLICIES,
                                   KascadeConfigError, PolicyConfig)
from sglang_kascade.plugin import profile_validator
from sglang_kascade.policies import budget_problem
from sglang_kascade.profile import ModelFingerprint
from test_backend_vs_reference import CASES, build, run_backend
from test_hot_swap_backend import channel_for, request

BASE = build(CASES[0])  # 6 layers, 8 query heads, 2 KV heads, head dim 64
EXTREME_INTS = [0, -1, 1, 2, 3, 7, 16, 31, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -2**63,
                10**30]
EXTREME_FLOATS = [0.0, -0.0, 1e-300, 5e-324, 0.1, 0.5, 1.0, 1.0000001, 1e308, -1.0, math.nan,
                  math.inf, -math.inf]

ints = st.one_of(st.sampled_from(EXTREME_INTS), st.integers(min_value=-5, max_value=200))
numbers = st.one_of(ints, st.sampled_from(EXTREME_FLOATS),
                    st.floats(allow_nan=True, allow_infinity=True))
# in range, at the caps and just past them (config.py)
caps = st.sampled_from([MAX_BUDGET_KEYS, MAX_BUDGET_KEYS + 1, MAX_TILE_SIZE, MAX_TILE_SIZE + 1,
                        MAX_PAGE_TILE_SIZE, MAX_PAGE_TILE_SIZE + 1])
BUDGET_VALUES = {
    "topk_fraction": st.one_of(numbers, st.floats(0, 1), st.sampled_from([1e-9, 0.01, 1.0])),
    "k_min": st.one_of(ints, numbers, caps, st.integers(1, 300)),
    "tile_size": st.one_of(ints, numbers, caps, st.integers(1, 64)),
    "page_tile_size": st.one_of(ints, numbers, caps, st.integers(1, 64)),
    "round_to": st.one_of(ints, numbers, caps, st.integers(1, 300)),
}


def sometimes(draw, one_in: int) -> bool:
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def profiles(draw) -> dict:
    """Each field changed with some probability, the rest as in the served scenario's profile,
    so that a good share of the examples validates and reaches the backend."""
    data = {**BASE.profile_dict, "model": dict(BASE.profile_dict["model"]),
            "head_map": [list(r) for r in BASE.profile_dict["head_map"]]}
    for field, values in BUDGET_VALUES.items():
        if sometimes(draw, 3):
            data[field] = draw(values)
    data["granularity"] = draw(st.sampled_from(["token", "page"]))
    for field in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"):
        if sometimes(draw, 25):  # a fingerprint that is not the served model, or out of range
            data["model"][field] = draw(ints)
    if sometimes(draw, 2):  # other anchors: sorted unique layers in range
        data["anchor_layers"] = [0] + sorted(draw(st.sets(st.integers(1, 5), max_size=5)))
    if sometimes(draw, 12):
        data["anchor_layers"] = [0, draw(ints)]
    if sometimes(draw, 12):  # a head-map entry out of range
        data["head_map"][draw(st.integers(0, 5))][0] = draw(ints)
    return data


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=profiles(), policy=st.sampled_from(POLICIES))
def test_a_random_profile_is_refused_or_served(tmp_path_factory, data, policy):
    tmp = tmp_path_factory.mktemp("control")
    # as the server's validator (backend.hot_swap_problem): what the policy needs of a budget
    channel = channel_for(tmp, BASE.profile_dict,
                          check=lambda p: budget_problem(PolicyConfig(name=policy), p.budget))
    try:
        channel._validate(data)
    except KascadeConfigError:
        return  # refused cleanly, with the reason (the sidecar's 409 / 422)

    staged = {}

    def hook(f, layer_id, be):
        if f == 0 and layer_id is None:  # before the first batch boundary
            request(tmp, 1, data)
            channel.poll_once()
            staged["ok"] = channel._staged is not None

    run = run_backend(BASE, batched=True, policy=PolicyConfig(name=policy), control=channel,
                      hook=hook)
    be = run.backend
    assert staged["ok"]
    # Validation knows everything applying needs: nothing it accepts is refused at the batch
    # boundary (the second line of defence, test_hardening_swap.py, stays unused).
    assert be.stats.swaps_refused == 0, channel.state["rejected"]
    assert be.stats.swaps_applied == 1 and channel.state["applied_generation"] == 1
    assert be.budget.k_min == data["k_min"]
    for key, out in run.outputs.items():
        assert torch.isfinite(out).all(), key


def test_the_fuzzer_reaches_the_backend():
    """The strategy is not all refusals: a sample of its profiles validates."""
    validate = profile_validator(ModelFingerprint(**BASE.profile_dict["model"]))

    def accepted(d):
        try:
            validate(d)
        except KascadeConfigError:
            return False
        return d["k_min"] != BASE.profile_dict["k_min"]

    found = find(profiles(), accepted, settings=settings(max_examples=500, deadline=None,
                                                         derandomize=True))
    assert validate(found).budget.k_min == found["k_min"]

