"""Every numeric profile field and --kascade-* option is bounded by what the backend can serve
(issue 20, item 1): config.check_budget_fields is the one check, reached from start-up (flags,
environment, --kascade-profile), the scheduler's staging of a hot swap (plugin.profile_validator)
and the sidecar's upload / activation (server/store.validate_for_model).

The reproductions are copies of the shipped SmolLM2 profile with one number out of range: each
validated before, then crashed the server at the batch boundary (k_min 2**64, round_to 2**63:
``torch.tensor([k_min, round_to], dtype=int64)`` in device_path.set_budget), overflowed
``extend_tiles`` on prefill (tile_size 10**30) or asked for ~24 GB per decode step (page
granularity, page_tile_size 10**9).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from sglang_kascade.config import (INT32_MAX, MAX_BUDGET_KEYS, MAX_PAGE_TILE_SIZE, MAX_TILE_SIZE,
                                   BudgetConfig, KascadeConfigError, KascadeOptions,
                                   prefill_tile_problem)
from sglang_kascade.plugin import profile_validator
from sglang_kascade.profile import (PROFILE_JSON_SCHEMA, load_profile, profile_from_dict,
                                    shipped_profiles_dir)
from sglang_kascade.server.store import StoreError, validate_for_model

SHIPPED = "smollm2-135m-instruct"

# (field, value that validated before and crashed or exhausted the server, words of the range)
REPRODUCTIONS = [
    ("k_min", 2**64, f"1..{MAX_BUDGET_KEYS}"),
    ("round_to", 2**63, f"1..{MAX_BUDGET_KEYS}"),
    ("tile_size", 10**30, f"1..{MAX_TILE_SIZE}"),
    ("page_tile_size", 10**9, f"1..{MAX_PAGE_TILE_SIZE}"),
]


def shipped_dict() -> dict:
    return json.loads((shipped_profiles_dir() / f"{SHIPPED}.json").read_text())


def reproduction(field: str, value) -> dict:
    data = shipped_dict()
    data[field] = value
    if field == "page_tile_size":
        data["granularity"] = "page"
    return data


def assert_names(message: str, field: str, value, allowed: str) -> None:
    assert f"{field}={value!r}" in message, message
    assert allowed in message, message


@pytest.mark.parametrize("field, value, allowed", REPRODUCTIONS,
                         ids=[r[0] for r in REPRODUCTIONS])
def test_start_up_refuses_the_reproduction(tmp_path, field, value, allowed):
    """--kascade-profile PATH (resolve_profile -> load_profile)."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(reproduction(field, value)))
    with pytest.raises(KascadeConfigError) as e:
        load_profile(str(path))
    assert_names(str(e.value), field, value, allowed)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("field, value, allowed", REPRODUCTIONS,
                         ids=[r[0] for r in REPRODUCTIONS])
def test_scheduler_staging_refuses_the_reproduction(field, value, allowed):
    """The control channel's validator of each scheduler process (plugin.profile_validator)."""
    profile = load_profile(SHIPPED)
    validate = profile_validator(profile.model)
    with pytest.raises(KascadeConfigError) as e:
        validate(reproduction(field, value))
    assert_names(str(e.value), field, value, allowed)


@pytest.mark.parametrize("field, value, allowed", REPRODUCTIONS,
                         ids=[r[0] for r in REPRODUCTIONS])
def test_sidecar_upload_refuses_the_reproduction(field, value, allowed):
    """The sidecar's upload and activation validation: 422 with the reason."""
    with pytest.raises(StoreError) as e:
        validate_for_model(reproduction(field, value), load_profile(SHIPPED).model)
    assert e.value.status == 422
    assert_names(e.value.message, field, value, allowed)


# option -> (largest accepted, smallest refused above it)
OPTION_BOUNDS = {
    "k_min": (MAX_BUDGET_KEYS, MAX_BUDGET_KEYS + 1),
    "round_to": (MAX_BUDGET_KEYS, 2**63),
    "tile_size": (MAX_TILE_SIZE, MAX_TILE_SIZE + 1),
    "page_tile_size": (MAX_PAGE_TILE_SIZE, MAX_PAGE_TILE_SIZE + 1),
    "sink_tokens": (MAX_BUDGET_KEYS, 2**64),
    "dense_prefill_below": (INT32_MAX, INT32_MAX + 1),
}


@pytest.mark.parametrize("name", list(OPTION_BOUNDS))
def test_options_are_bounded_at_start_up(name, monkeypatch):
    """Flags and SGLANG_KASCADE_* variables (both build KascadeOptions)."""
    from sglang_kascade.config import OPTION_TABLE

    top, over = OPTION_BOUNDS[name]
    assert getattr(KascadeOptions(**{name: top}), name) == top
    with pytest.raises(KascadeConfigError) as e:
        KascadeOptions(**{name: over})
    assert f"{name}={over!r}" in str(e.value) and str(top) in str(e.value)
    env = OPTION_TABLE[name].env
    with pytest.raises(KascadeConfigError, match=name):
        KascadeOptions.from_env({env: str(over)})


@pytest.mark.parametrize("field", ["k_min", "round_to", "tile_size", "page_tile_size"])
def test_profile_fields_accept_their_cap_and_refuse_one_more(field):
    most = {"k_min": MAX_BUDGET_KEYS, "round_to": MAX_BUDGET_KEYS, "tile_size": MAX_TILE_SIZE,
            "page_tile_size": MAX_PAGE_TILE_SIZE}[field]
    data = shipped_dict()
    data[field] = most
    assert getattr(profile_from_dict(data).budget, field) == most
    data[field] = most + 1
    with pytest.raises(KascadeConfigError, match=f"at most {most}"):
        profile_from_dict(data)
    # the JSON Schema the sidecar publishes states the same range
    prop = PROFILE_JSON_SCHEMA["properties"][field]
    assert (prop["minimum"], prop["maximum"]) == (1, most)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e400, 10**400, 0, -0.5, 1.5])
def test_fraction_outside_0_1_is_refused(value):
    data = shipped_dict()
    data["topk_fraction"] = value
    with pytest.raises(KascadeConfigError, match=r"topk_fraction=.*\(0, 1\]"):
        profile_from_dict(data)


@pytest.mark.parametrize("field", ["num_layers", "num_q_heads", "num_kv_heads", "head_dim"])
def test_model_fingerprint_fields_are_int32(field):
    data = shipped_dict()
    data["model"][field] = 2**64
    with pytest.raises(KascadeConfigError) as e:
        profile_from_dict(data)
    assert f"model.{field}" in str(e.value) and str(INT32_MAX) in str(e.value)


def test_budget_at_the_caps_is_served_by_the_device_budget_and_the_plan():
    """What set_budget and the decode plan do with the largest budget validation lets through:
    int64 tensors, exact arithmetic, every key selected (k clamped to the visible keys)."""
    from sglang_kascade.device_path import DevicePath
    from sglang_kascade.kernels.decode_plan import graph_rows_torch

    budget = BudgetConfig(topk_fraction=1.0, k_min=MAX_BUDGET_KEYS, round_to=MAX_BUDGET_KEYS)
    dp = DevicePath("cpu")
    dp.set_budget(budget)
    assert dp.graph_budget_i.tolist() == [MAX_BUDGET_KEYS, MAX_BUDGET_KEYS]
    seq = torch.tensor([1, 7, INT32_MAX], dtype=torch.int64)
    outs = [torch.zeros(3, dtype=torch.int64) for _ in range(4)]
    graph_rows_torch(torch.arange(3), seq, *outs, dp.graph_budget_f, dp.graph_budget_i,
                     kmax=INT32_MAX)
    assert outs[3].tolist() == [1, 7, INT32_MAX]  # every key
    assert [budget.k_for(v) for v in (1, 7, INT32_MAX)] == [1, 7, INT32_MAX]


def test_largest_tile_plans_a_long_prefill():
    """tile_size at its cap through extend_tiles (the PyTorch path's tiling) on a prefill over
    the CPU's dense-prefill threshold."""
    from sglang_kascade.kernels.tiles import extend_tiles

    budget = BudgetConfig(tile_size=MAX_TILE_SIZE)
    tiles = extend_tiles(100, 5000, budget.tile_size, budget.k_for, "cpu")
    assert tiles.num_tiles == (5100 - 1) // MAX_TILE_SIZE + 1
    assert int(tiles.q_tile.max()) == tiles.num_tiles - 1


@pytest.mark.parametrize("tile, group, head_dim, fits", [
    # measured on an H100, bf16 (config.MAX_PREFILL_TILE_ROWS): 512 rows compile, 1024 do not
    (32, 4, 128, True), (32, 16, 128, True), (64, 8, 128, True), (128, 4, 128, True),
    (256, 1, 128, True), (512, 1, 128, True),
    (64, 16, 128, False), (128, 8, 128, False), (256, 4, 128, False), (512, 4, 128, False),
    (1, 1, 64, True), (32, 3, 64, True),  # group 3 rounds up to 4
])
def test_prefill_tile_limit_of_the_gpu_kernels(tile, group, head_dim, fits):
    why = prefill_tile_problem(tile, group, head_dim)
    assert (why is None) == fits
    if not fits:
        assert f"tile_size={tile}" in why and "use tile_size <=" in why
        bound = int(why.rsplit("<= ", 1)[1])
        assert prefill_tile_problem(bound, group, head_dim) is None


def test_backend_refuses_a_tile_its_gpu_kernels_cannot_run(monkeypatch):
    """Where the Triton prefill path runs, the backend refuses a profile whose tile does not fit
    the kernels: at start-up (KascadeConfigError) and at staging (the hot-swap reason)."""
    from sglang_kascade.backend import KascadeAttnBackend
    from sglang_kascade.device_path import DevicePath
    from sglang_kascade.profile import ModelFingerprint, derived_default_profile

    monkeypatch.setattr(DevicePath, "applies", lambda self, is_decode, policy, budget: True)
    fp = ModelFingerprint("LlamaForCausalLM", 4, 64, 8, 128)  # group 8, as Llama-3-70B
    base = derived_default_profile(fp)
    ok = profile_from_dict({**base.to_json(), "tile_size": 64})
    big = profile_from_dict({**base.to_json(), "tile_size": 128})
    with pytest.raises(KascadeConfigError, match="tile_size=128 .* use tile_size <= 64"):
        KascadeAttnBackend(None, None, None, big, big.budget, "cpu")
    be = KascadeAttnBackend(None, None, None, ok, ok.budget, "cpu")
    assert be.hot_swap_problem(ok) is None
    assert "tile_size=128" in be.hot_swap_problem(big)
    validate = profile_validator(fp, check=be.hot_swap_problem)
    with pytest.raises(KascadeConfigError, match="hot-swap refused: tile_size=128"):
        validate(big.to_json())
