"""Anchor profile loading and validation (sglang_kascade/profile.py) and the Top-k budget.

Every malformed profile must raise KascadeConfigError whose message names the offending field.
"""

from __future__ import annotations

import copy
import json
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest

from sglang_kascade.config import BudgetConfig, KascadeConfigError
from sglang_kascade.profile import (FINGERPRINT_FIELDS, MAX_PROFILE_BYTES, OPTIONAL_DEFAULTS,
                                    REQUIRED, SCHEMA_VERSION, AnchorProfile, ModelFingerprint,
                                    derived_default_profile, find_shipped_profile, load_profile,
                                    profile_from_dict, profile_from_json_text)

N_LAYERS, N_Q, N_KV, HEAD_DIM = 30, 9, 3, 64
ANCHORS = [0, 2, 8, 13, 14]
IDENT = [0, 1, 2]
# Non-identity rows, all on reuse layers.
REMAPPED = {1: [2, 0, 1], 5: [0, 0, 2], 20: [1, 1, 1], 29: [2, 1, 0]}


def valid_profile_dict() -> dict:
    head_map = [list(REMAPPED.get(i, IDENT)) for i in range(N_LAYERS)]
    return {
        "schema_version": SCHEMA_VERSION,
        "name": "test-llama",
        "model": {
            "architecture": "LlamaForCausalLM",
            "num_layers": N_LAYERS,
            "num_q_heads": N_Q,
            "num_kv_heads": N_KV,
            "head_dim": HEAD_DIM,
        },
        "dense_layers": [0],
        "anchor_layers": list(ANCHORS),
        "head_map": head_map,
        "topk_fraction": 0.1,
        "k_min": 128,
        "tile_size": 32,
        "granularity": "token",
        "page_tile_size": 16,
        "round_to": 1,
        "dense_tail": 0,
        "query_tail": 48,
        "provenance": {"source": "unit test", "dataset": "none"},
    }


FP = ModelFingerprint("LlamaForCausalLM", N_LAYERS, N_Q, N_KV, HEAD_DIM)


def names_field(message: str, field: str) -> bool:
    """``field`` appears as a whole name: 'tile_size' must not match inside 'page_tile_size',
    'model' must not match inside 'model.num_layers', 'head_map' not inside 'head_map[3]'."""
    pattern = rf"(?<![\w.\[]){re.escape(field)}(?![\w.\[])"
    return re.search(pattern, message) is not None


def assert_rejected(data, field: str, also: str = "") -> str:
    with pytest.raises(KascadeConfigError) as ei:
        profile_from_dict(data)
    msg = str(ei.value)
    assert names_field(msg, field), f"message does not name {field!r}: {msg}"
    if also:
        assert also in msg, msg
    return msg


def with_(path, value):
    """A copy of the valid profile with ``path`` (a key or a tuple of keys/indices) set."""
    d = valid_profile_dict()
    keys = path if isinstance(path, tuple) else (path,)
    target = d
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    return d


def without(path):
    d = valid_profile_dict()
    keys = path if isinstance(path, tuple) else (path,)
    target = d
    for k in keys[:-1]:
        target = target[k]
    del target[keys[-1]]
    return d


# ------------------------------------------------------------------------------------------
# The valid profile, round trips, roles
# ------------------------------------------------------------------------------------------


def test_names_field_helper_is_strict():
    assert names_field("profile tile_size=0: must be >= 1", "tile_size")
    assert not names_field("profile page_tile_size=0: must be >= 1", "tile_size")
    assert not names_field("profile field 'model.num_layers': missing", "model")
    assert not names_field("profile field 'head_map[3]': bad", "head_map")
    assert names_field("profile field 'head_map[3]': bad", "head_map[3]")


def test_valid_profile_loads_with_its_values():
    p = profile_from_dict(valid_profile_dict())
    assert p.name == "test-llama"
    assert p.model == FP
    assert p.num_layers == N_LAYERS
    assert p.dense_layers == (0,)
    assert p.anchor_layers == tuple(ANCHORS)
    assert len(p.head_map) == N_LAYERS and all(len(r) == N_KV for r in p.head_map)
    assert p.head_map[1] == (2, 0, 1) and p.head_map[20] == (1, 1, 1)
    assert p.head_map[8] == tuple(IDENT)
    assert p.budget == BudgetConfig(topk_fraction=0.1, k_min=128, tile_size=32,
                                    granularity="token", page_tile_size=16, round_to=1,
                                    query_tail=48)
    assert p.provenance == {"source": "unit test", "dataset": "none"}


def test_round_trip_through_to_json():
    p = profile_from_dict(valid_profile_dict())
    again = profile_from_dict(p.to_json())
    assert again == p
    assert again.provenance == p.provenance  # provenance is compare=False: check it separately
    want = {**valid_profile_dict(), "tp_sizes": [1]}  # optional, written
    del want["dense_tail"]  # a prefill tail is written only where set (0: off, left out)
    assert p.to_json() == want and p.to_json()["query_tail"] == 48


def test_round_trip_through_json_text():
    p = profile_from_dict(valid_profile_dict())
    text = json.dumps(p.to_json())
    assert profile_from_json_text(text) == p
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION


def test_to_json_is_a_copy_not_a_view():
    p = profile_from_dict(valid_profile_dict())
    j = p.to_json()
    j["head_map"][1][0] = 0
    j["anchor_layers"].append(29)
    assert p.head_map[1] == (2, 0, 1)
    assert p.anchor_layers == tuple(ANCHORS)


def test_validation_does_not_mutate_input():
    d = valid_profile_dict()
    before = copy.deepcopy(d)
    profile_from_dict(d)
    assert d == before


def test_optional_fields_take_their_defaults():
    d = valid_profile_dict()
    for name in OPTIONAL_DEFAULTS:
        d.pop(name, None)
    p = profile_from_dict(d)
    assert p.name is None
    assert p.tp_sizes == tuple(OPTIONAL_DEFAULTS["tp_sizes"]) == (1,)
    assert p.budget.page_tile_size == OPTIONAL_DEFAULTS["page_tile_size"] == 16
    assert p.budget.round_to == OPTIONAL_DEFAULTS["round_to"] == 1
    assert p.budget.dense_tail == OPTIONAL_DEFAULTS["dense_tail"] == 0
    assert p.budget.query_tail == OPTIONAL_DEFAULTS["query_tail"] == 0
    assert profile_from_dict(p.to_json()) == p


def test_name_may_be_null():
    assert profile_from_dict(with_("name", None)).name is None


def test_integer_topk_fraction_one_is_accepted_as_float():
    p = profile_from_dict(with_("topk_fraction", 1))
    assert p.budget.topk_fraction == 1.0 and isinstance(p.budget.topk_fraction, float)


def test_page_granularity_and_rounding_are_kept():
    d = valid_profile_dict()
    d.update(granularity="page", page_tile_size=64, round_to=128)
    p = profile_from_dict(d)
    assert (p.budget.granularity, p.budget.page_tile_size, p.budget.round_to) == ("page", 64, 128)
    assert profile_from_dict(p.to_json()) == p


def test_roles():
    p = profile_from_dict(valid_profile_dict())
    assert p.role(0) == "dense_anchor"
    for a in ANCHORS[1:]:
        assert p.role(a) == "anchor" and not p.is_reuse(a)
    for layer in range(N_LAYERS):
        if layer not in ANCHORS:
            assert p.role(layer) == "reuse" and p.is_reuse(layer)
    assert not p.is_reuse(0)


def test_dense_only_layer_role():
    d = valid_profile_dict()
    d["dense_layers"] = [0, 6]
    p = profile_from_dict(d)
    assert p.role(6) == "dense"
    assert not p.is_reuse(6)
    assert p.role(7) == "reuse" and p.anchor_for(7) == 2  # a dense-only layer selects nothing


def test_anchor_for():
    p = profile_from_dict(valid_profile_dict())
    expected = {0: 0, 1: 0, 2: 2, 3: 2, 7: 2, 8: 8, 12: 8, 13: 13, 14: 14, 15: 14, 29: 14}
    for layer, anchor in expected.items():
        assert p.anchor_for(layer) == anchor, layer
    for layer in range(N_LAYERS):  # against a brute-force definition
        a = p.anchor_for(layer)
        assert a in ANCHORS and a <= layer
        assert not any(a < x <= layer for x in ANCHORS)


# ------------------------------------------------------------------------------------------
# Malformed profiles
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "{", "not json", "{'schema_version': 1}", '{"a": 1,}',
                                  '{"a": tru}'])
def test_invalid_json_text(text):
    with pytest.raises(KascadeConfigError, match="not valid JSON"):
        profile_from_json_text(text)


@pytest.mark.parametrize("text", ["[]", "1", "null", '"profile"', "true", "[{}]"])
def test_top_level_must_be_an_object(text):
    with pytest.raises(KascadeConfigError, match="JSON object"):
        profile_from_json_text(text)


@pytest.mark.parametrize("value", [[], None, "profile", 3])
def test_top_level_must_be_an_object_dict_api(value):
    with pytest.raises(KascadeConfigError, match="JSON object"):
        profile_from_dict(value)


def test_pathological_json_still_gives_config_error():
    # An integer literal over Python's int-conversion digit limit and very deep nesting made
    # json.loads raise ValueError / RecursionError rather than KascadeConfigError.
    with pytest.raises(KascadeConfigError, match="not valid JSON"):
        profile_from_json_text('{"k_min": ' + "1" * 5000 + "}")
    with pytest.raises(KascadeConfigError, match="not valid JSON"):
        profile_from_json_text("[" * 200_000)


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_required_field(field):
    assert_rejected(without(field), field, also="missing")


@pytest.mark.parametrize("field", FINGERPRINT_FIELDS)
def test_missing_model_field(field):
    assert_rejected(without(("model", field)), f"model.{field}", also="missing")


def test_required_list_matches_to_json_keys():
    data = {**valid_profile_dict(), "dense_tail": 16}  # the tails are written where set
    keys = set(profile_from_dict(data).to_json())
    assert keys == set(REQUIRED) | set(OPTIONAL_DEFAULTS)


@pytest.mark.parametrize("field", ["extra", "anchors", "Name", "topk"])
def test_unknown_field(field):
    assert_rejected(with_(field, 1), field, also="unknown field")


@pytest.mark.parametrize("value", [0, 2, 99, -1, "1", True, 1.0, None, [1]])
def test_wrong_schema_version(value):
    assert_rejected(with_("schema_version", value), "schema_version", also="not supported")


BAD_INT_VALUES = ["30", True, False, 30.0, 2.5, None, [30], {}]


@pytest.mark.parametrize("field", FINGERPRINT_FIELDS[1:])
@pytest.mark.parametrize("value", BAD_INT_VALUES + [0, -3])
def test_model_integer_fields_wrong_type_or_range(field, value):
    assert_rejected(with_(("model", field), value), f"model.{field}")


@pytest.mark.parametrize("value", ["", None, 5, True, ["LlamaForCausalLM"]])
def test_model_architecture_wrong(value):
    assert_rejected(with_(("model", "architecture"), value), "model.architecture")


@pytest.mark.parametrize("value", [None, "LlamaForCausalLM", [], 30])
def test_model_not_an_object(value):
    assert_rejected(with_("model", value), "model", also="object")


def test_num_q_heads_must_be_a_multiple_of_num_kv_heads():
    assert_rejected(with_(("model", "num_q_heads"), 8), "model.num_q_heads", also="multiple")
    assert_rejected(with_(("model", "num_q_heads"), 2), "model.num_q_heads", also="multiple")


def test_num_q_heads_equal_to_kv_heads_is_fine():
    d = with_(("model", "num_q_heads"), N_KV)
    assert profile_from_dict(d).model.num_q_heads == N_KV


@pytest.mark.parametrize("field", ["k_min", "tile_size", "page_tile_size", "round_to"])
@pytest.mark.parametrize("value", ["32", True, 32.0, 1.5, None, [32]])
def test_budget_integer_fields_wrong_type(field, value):
    assert_rejected(with_(field, value), field)


@pytest.mark.parametrize("field", ["k_min", "tile_size", "page_tile_size", "round_to"])
@pytest.mark.parametrize("value", [0, -1, -128])
def test_budget_integer_fields_out_of_range(field, value):
    assert_rejected(with_(field, value), field, also=">= 1")


@pytest.mark.parametrize("field", ["dense_tail", "query_tail"])
@pytest.mark.parametrize("value", ["32", True, 32.0, None, -1, 2 ** 24 + 1])
def test_tail_fields_refuse_bad_values(field, value):
    assert_rejected(with_(field, value), field)


@pytest.mark.parametrize("field", ["dense_tail", "query_tail"])
def test_tail_fields_reach_the_budget(field):
    assert getattr(profile_from_dict(with_(field, 2 ** 24)).budget, field) == 2 ** 24
    assert getattr(profile_from_dict(with_(field, 0)).budget, field) == 0


@pytest.mark.parametrize("value", [0, 0.0, -0.1, -1, 1.0000001, 1.5, 2, float("nan"),
                                   float("inf"), float("-inf"),
                                   pytest.param(10 ** 400, id="huge-int")])
def test_topk_fraction_out_of_range(value):
    assert_rejected(with_("topk_fraction", value), "topk_fraction", also="(0, 1]")


@pytest.mark.parametrize("value", ["0.1", True, False, None, [0.1], {}])
def test_topk_fraction_wrong_type(value):
    assert_rejected(with_("topk_fraction", value), "topk_fraction")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_topk_fraction_non_finite_json_literals(literal):
    text = json.dumps(valid_profile_dict()).replace('"topk_fraction": 0.1',
                                                    f'"topk_fraction": {literal}')
    assert literal in text
    with pytest.raises(KascadeConfigError) as ei:
        profile_from_json_text(text)
    assert names_field(str(ei.value), "topk_fraction")


@pytest.mark.parametrize("value", ["tile", "Token", "", None, 1, ["token"]])
def test_unknown_granularity(value):
    assert_rejected(with_("granularity", value), "granularity")


@pytest.mark.parametrize("field", ["dense_layers", "anchor_layers"])
@pytest.mark.parametrize("value", [None, "0", 0, {"0": 0}, ["0"], [0.0], [True], [0, None],
                                   [0, 2.0]])
def test_layer_lists_wrong_type(field, value):
    assert_rejected(with_(field, value), field, also="list of integers")


@pytest.mark.parametrize("value", [[0, 8, 2, 13, 14], [14, 13, 8, 2, 0]])
def test_anchors_unsorted(value):
    assert_rejected(with_("anchor_layers", value), "anchor_layers", also="sorted")


def test_anchors_duplicated():
    assert_rejected(with_("anchor_layers", [0, 2, 2, 8]), "anchor_layers", also="duplicate")


def test_dense_layers_duplicated_and_unsorted():
    assert_rejected(with_("dense_layers", [0, 0]), "dense_layers", also="duplicate")
    assert_rejected(with_("dense_layers", [3, 0]), "dense_layers", also="sorted")


@pytest.mark.parametrize("value", [[0, 2, 8, 13, 30], [0, 2, 8, 13, 99], [-1, 0, 2]])
def test_anchor_out_of_range(value):
    assert_rejected(with_("anchor_layers", value), "anchor_layers", also="out of range")


def test_dense_layer_out_of_range():
    assert_rejected(with_("dense_layers", [0, 30]), "dense_layers", also="out of range")


@pytest.mark.parametrize("value", [[], [2]])
def test_layer0_must_be_dense(value):
    assert_rejected(with_("dense_layers", value), "dense_layers", also="layer 0")


@pytest.mark.parametrize("value", [[], [2, 8, 13, 14]])
def test_layer0_must_be_an_anchor(value):
    assert_rejected(with_("anchor_layers", value), "anchor_layers", also="layer 0")


@pytest.mark.parametrize("value", [None, "identity", {}, []])
def test_head_map_not_a_list_of_rows(value):
    assert_rejected(with_("head_map", value), "head_map")


@pytest.mark.parametrize("rows", [N_LAYERS - 1, N_LAYERS + 1, 1])
def test_head_map_wrong_row_count(rows):
    d = valid_profile_dict()
    d["head_map"] = [list(IDENT) for _ in range(rows)]
    assert_rejected(d, "head_map", also=f"{N_LAYERS} rows")


def test_head_map_rows_for_a_different_layer_count():
    d = valid_profile_dict()
    d["model"]["num_layers"] = 32  # head_map still has 30 rows
    assert_rejected(d, "head_map", also="32 rows")


@pytest.mark.parametrize("row", [[0, 1], [0, 1, 2, 0], [], "012", None, 0])
def test_head_map_wrong_row_length_or_type(row):
    assert_rejected(with_(("head_map", 4), row), "head_map[4]")


@pytest.mark.parametrize("entry,why", [(3, "out of range"), (99, "out of range"),
                                       (-1, "out of range"), ("0", "integer"),
                                       (True, "integer"), (1.0, "integer"), (None, "integer")])
def test_head_map_bad_entry(entry, why):
    d = valid_profile_dict()
    d["head_map"][20][1] = entry
    assert_rejected(d, "head_map[20][1]", also=why)


@pytest.mark.parametrize("layer", ANCHORS)
def test_head_map_must_be_identity_for_anchor_layers(layer):
    d = valid_profile_dict()
    d["head_map"][layer] = [1, 0, 2]
    assert_rejected(d, f"head_map[{layer}]", also="identity")


def test_head_map_must_be_identity_for_dense_only_layers():
    d = valid_profile_dict()
    d["dense_layers"] = [0, 5]  # layer 5 has a non-identity row in the valid profile
    assert_rejected(d, "head_map[5]", also="identity")


@pytest.mark.parametrize("value", [None, "unit test", [], ["a"], 1])
def test_provenance_not_an_object(value):
    assert_rejected(with_("provenance", value), "provenance", also="object")


@pytest.mark.parametrize("value", [5, True, ["x"], {}])
def test_name_not_a_string(value):
    assert_rejected(with_("name", value), "name")


def test_oversized_text_is_refused_before_parsing():
    text = json.dumps(valid_profile_dict())
    assert profile_from_json_text(text).name == "test-llama"
    padded = text + " " * (MAX_PROFILE_BYTES - len(text) + 1)  # still valid JSON
    with pytest.raises(KascadeConfigError, match="larger than"):
        profile_from_json_text(padded)
    at_limit = text + " " * (MAX_PROFILE_BYTES - len(text))
    assert profile_from_json_text(at_limit).name == "test-llama"


def test_size_limit_counts_bytes_not_characters():
    d = valid_profile_dict()
    d["provenance"]["note"] = "é" * (MAX_PROFILE_BYTES // 2 + 10)  # 2 bytes each in UTF-8
    text = json.dumps(d, ensure_ascii=False)
    assert len(text) < MAX_PROFILE_BYTES < len(text.encode())
    with pytest.raises(KascadeConfigError, match="larger than"):
        profile_from_json_text(text)


# ------------------------------------------------------------------------------------------
# Model check
# ------------------------------------------------------------------------------------------


def test_check_model_accepts_the_same_model():
    p = profile_from_dict(valid_profile_dict())
    assert p.check_model(ModelFingerprint(**FP.to_json())) is None


@pytest.mark.parametrize("field", FINGERPRINT_FIELDS)
def test_check_model_names_the_differing_field(field):
    p = profile_from_dict(valid_profile_dict())
    other = FP.to_json()
    other[field] = "MistralForCausalLM" if field == "architecture" else other[field] * 2
    with pytest.raises(KascadeConfigError) as ei:
        p.check_model(ModelFingerprint(**other))
    msg = str(ei.value)
    assert f"model.{field}=" in msg, msg
    assert repr(other[field]) in msg and repr(FP.to_json()[field]) in msg
    assert "test-llama" in msg


# ------------------------------------------------------------------------------------------
# load_profile / shipped profiles
# ------------------------------------------------------------------------------------------


def write_profile(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_load_profile_from_path(tmp_path):
    path = write_profile(tmp_path / "p.json", valid_profile_dict())
    p = load_profile(str(path))
    assert p == profile_from_dict(valid_profile_dict())
    assert p.provenance["source"] == "unit test"


def test_load_profile_by_shipped_name(shipped_dir):
    write_profile(shipped_dir / "alpha.json", valid_profile_dict())
    assert load_profile("alpha") == profile_from_dict(valid_profile_dict())


def test_load_profile_unknown_name_lists_shipped_names(shipped_dir):
    write_profile(shipped_dir / "alpha.json", valid_profile_dict())
    write_profile(shipped_dir / "beta.json", valid_profile_dict())
    with pytest.raises(KascadeConfigError) as ei:
        load_profile("no-such-profile")
    msg = str(ei.value)
    assert "no-such-profile" in msg
    assert "'alpha'" in msg and "'beta'" in msg and "shipped" in msg


def test_load_profile_unknown_name_real_shipped_dir():
    with pytest.raises(KascadeConfigError, match=r"no-such-profile-xyz.*shipped: \["):
        load_profile("no-such-profile-xyz")


def test_load_profile_bad_content_names_path_and_field(tmp_path):
    path = write_profile(tmp_path / "bad.json", with_("k_min", 0))
    with pytest.raises(KascadeConfigError) as ei:
        load_profile(str(path))
    msg = str(ei.value)
    assert str(path) in msg and names_field(msg, "k_min")


def test_load_profile_invalid_json_names_path(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{ not json", encoding="utf-8")
    with pytest.raises(KascadeConfigError) as ei:
        load_profile(str(path))
    assert str(path) in str(ei.value) and "not valid JSON" in str(ei.value)


def test_load_profile_bad_shipped_content_names_shipped_path(shipped_dir):
    write_profile(shipped_dir / "broken.json", without("head_map"))
    with pytest.raises(KascadeConfigError) as ei:
        load_profile("broken")
    assert str(shipped_dir / "broken.json") in str(ei.value)
    assert names_field(str(ei.value), "head_map")


def test_load_profile_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"name": "\xe9\xff"}')
    with pytest.raises(KascadeConfigError) as ei:
        load_profile(str(path))
    assert str(path) in str(ei.value)


def test_load_profile_directory_is_refused(tmp_path):
    with pytest.raises(KascadeConfigError, match="cannot read"):
        load_profile(str(tmp_path))


def test_find_shipped_profile_matches_fingerprint(shipped_dir):
    write_profile(shipped_dir / "llama.json", valid_profile_dict())
    other = valid_profile_dict()
    other["model"]["head_dim"] = 128
    other["name"] = "other"
    write_profile(shipped_dir / "other.json", other)
    found = find_shipped_profile(FP)
    assert found is not None and found.name == "test-llama"
    assert find_shipped_profile(ModelFingerprint("Qwen3ForCausalLM", 36, 32, 8, 128)) is None


def test_find_shipped_profile_tie_broken_by_model_path(shipped_dir):
    for name in ("llama-a", "llama-b"):
        write_profile(shipped_dir / f"{name}.json", with_("name", name))
    assert find_shipped_profile(FP, "/models/Llama-B-8B").name == "llama-b"
    assert find_shipped_profile(FP, "/models/llama-a").name == "llama-a"
    assert find_shipped_profile(FP, "/models/unrelated").name == "llama-a"  # first by file name


# ------------------------------------------------------------------------------------------
# Derived default
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 30, 32, 80])
def test_derived_default_profile(n):
    fp = ModelFingerprint("SomeForCausalLM", n, 8, 2, 128)
    p = derived_default_profile(fp)
    assert p.model == fp
    assert p.dense_layers == (0,)
    assert p.anchor_layers[0] == 0 and p.role(0) == "dense_anchor"
    assert list(p.anchor_layers) == sorted(set(p.anchor_layers))
    assert all(0 <= a < n for a in p.anchor_layers)
    expected = sorted({a for a in (0, 2, n // 4, n // 2, (3 * n) // 4) if a < n})
    assert list(p.anchor_layers) == expected
    assert p.head_map == tuple((0, 1) for _ in range(n))
    assert p.budget == BudgetConfig()
    assert p.name == "derived-default"
    again = profile_from_dict(p.to_json())
    assert again == p
    assert profile_from_json_text(json.dumps(p.to_json())) == p


@pytest.mark.parametrize("n,anchors", [(1, (0,)), (2, (0, 1)), (3, (0, 1, 2)), (4, (0, 1, 2, 3)),
                                       (30, (0, 2, 7, 15, 22)), (32, (0, 2, 8, 16, 24)),
                                       (80, (0, 2, 20, 40, 60))])
def test_derived_default_anchor_sets(n, anchors):
    assert derived_default_profile(ModelFingerprint("X", n, 4, 4, 64)).anchor_layers == anchors


def test_derived_default_budget_is_the_papers():
    b = derived_default_profile(FP).budget
    assert (b.topk_fraction, b.k_min, b.tile_size, b.granularity) == (0.1, 128, 32, "token")


# ------------------------------------------------------------------------------------------
# BudgetConfig.k_for
# ------------------------------------------------------------------------------------------


def plain_k(fraction: float, k_min: int, round_to: int, visible: int) -> int:
    """k = clamp(ceil(fraction * visible), k_min, visible), rounded up to round_to, clamped
    to visible again; exact decimal arithmetic (10% of 30 is 3, not 4)."""
    if visible <= 0:
        return 0
    k = max(math.ceil(Fraction(str(fraction)) * visible), k_min)
    k = -(-k // round_to) * round_to
    return min(k, visible)


def test_k_for_default_budget_examples():
    b = BudgetConfig()
    assert b.k_for(0) == 0
    assert b.k_for(-7) == 0
    assert b.k_for(1) == 1
    assert b.k_for(100) == 100  # visible <= k_min: dense
    assert b.k_for(128) == 128
    assert b.k_for(129) == 128  # k_min clamp
    assert b.k_for(1280) == 128
    assert b.k_for(1281) == 129  # ceil(128.1)
    assert b.k_for(1290) == 129
    assert b.k_for(10_000) == 1000
    assert b.k_for(131_072) == 13_108  # ceil(13107.2)


def test_k_for_exact_fractions_are_not_rounded_up_by_float_error():
    assert 0.07 * 100 > 7 and 0.14 * 50 > 7  # float error the implementation must absorb
    assert BudgetConfig(topk_fraction=0.07, k_min=1).k_for(100) == 7
    assert BudgetConfig(topk_fraction=0.14, k_min=1).k_for(50) == 7
    assert BudgetConfig(topk_fraction=0.14, k_min=1).k_for(51) == 8


def test_k_for_visible_at_most_k_min_is_dense():
    b = BudgetConfig(topk_fraction=0.05, k_min=64, round_to=16)
    for visible in range(1, 65):
        assert b.k_for(visible) == visible


def test_k_for_round_to():
    b = BudgetConfig(topk_fraction=0.1, k_min=128, round_to=128)
    assert b.k_for(1281) == 256  # 129 rounded up to 256
    assert b.k_for(2560) == 256
    assert b.k_for(2561) == 384
    assert b.k_for(200) == 128  # k_min 128 is already a multiple of 128
    assert b.k_for(100) == 100  # dense
    b = BudgetConfig(topk_fraction=0.1, k_min=128, round_to=100)
    assert b.k_for(150) == 150  # 128 -> 200 would exceed visible: clamped
    assert b.k_for(250) == 200


def test_fraction_one_is_dense():
    b = BudgetConfig(topk_fraction=1.0, k_min=1)
    assert [b.k_for(v) for v in range(0, 50)] == list(range(0, 50))


CONFIGS = [
    BudgetConfig(topk_fraction=f, k_min=k, round_to=r)
    for f in (0.025, 0.07, 0.1, 0.125, 0.14, 0.3, 0.5, 1.0)
    for k in (1, 16, 128)
    for r in (1, 8, 128)
]
VISIBLE = list(range(-2, 2050)) + [4095, 4096, 4097, 32_767, 32_768, 131_071, 131_072, 10 ** 6]


@pytest.mark.parametrize("b", CONFIGS, ids=lambda b: f"f{b.topk_fraction}-k{b.k_min}-r{b.round_to}")
def test_k_for_matches_plain_formula_and_is_monotone(b):
    ks = [b.k_for(v) for v in VISIBLE]
    assert ks == [plain_k(b.topk_fraction, b.k_min, b.round_to, v) for v in VISIBLE]
    for v, k in zip(VISIBLE, ks):
        if v <= 0:
            assert k == 0
            continue
        assert 1 <= k <= v  # never exceeds visible
        assert k >= min(b.k_min, v)  # k_min clamp
        assert k == v or k % b.round_to == 0  # rounded unless clamped to visible
    assert all(a <= c for a, c in zip(ks, ks[1:])), "k_for must be non-decreasing in visible"


@pytest.mark.parametrize("field", ["topk_fraction", "k_min", "tile_size", "granularity",
                                   "page_tile_size", "round_to"])
def test_budget_config_refuses_none(field):
    with pytest.raises(KascadeConfigError) as ei:
        BudgetConfig(**{field: None})
    assert names_field(str(ei.value), field)


@pytest.mark.parametrize("kwargs,field", [({"topk_fraction": 0}, "topk_fraction"),
                                          ({"k_min": 0}, "k_min"),
                                          ({"tile_size": -1}, "tile_size"),
                                          ({"page_tile_size": 0}, "page_tile_size"),
                                          ({"round_to": 0}, "round_to"),
                                          ({"granularity": "block"}, "granularity")])
def test_budget_config_refuses_bad_values(kwargs, field):
    with pytest.raises(KascadeConfigError) as ei:
        BudgetConfig(**kwargs)
    assert names_field(str(ei.value), field)


def test_anchor_profile_is_frozen():
    p = profile_from_dict(valid_profile_dict())
    with pytest.raises(Exception):
        p.anchor_layers = (0,)  # type: ignore[misc]
    assert isinstance(p, AnchorProfile)


# ------------------------------------------------------------------------------------------
# docs/profiles.md stays accurate
# ------------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "profiles.md"


def test_docs_example_profile_is_valid():
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    p = profile_from_json_text(blocks[0])
    assert p.name == "example-30l" and p.anchor_layers == (0, 2, 8, 13, 14)
    assert p.role(20) == "reuse" and p.head_map[20] == (1, 1, 1)


def test_docs_mention_every_field_flag_and_env_var():
    from sglang_kascade.config import OPTION_TABLE

    text = DOC.read_text(encoding="utf-8")
    for name in list(REQUIRED) + list(OPTIONAL_DEFAULTS) + list(FINGERPRINT_FIELDS):
        assert f"`{name}`" in text, name
    for s in OPTION_TABLE.values():
        assert f"`{s.flag}`" in text and f"`{s.env}`" in text, s.flag
    assert f"{MAX_PROFILE_BYTES:,}" in text
