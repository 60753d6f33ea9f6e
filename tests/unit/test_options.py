"""Kascade options: validation, environment fallbacks, precedence, profile resolution and the
launcher flags (sglang_kascade/config.py, resolve.py, sglang_adapter.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import types
from pathlib import Path

import pytest

from sglang_kascade.config import (GRANULARITIES, OPTION_TABLE, BudgetConfig, KascadeConfigError,
                                   KascadeOptions, PolicyConfig)
from sglang_kascade.profile import ModelFingerprint, derived_default_profile, profile_from_dict
from sglang_kascade.resolve import resolve_profile
from sglang_kascade.sglang_adapter import (_OPTIONS_ATTR, add_kascade_flags, kascade_options,
                                           options_from_namespace)

FP = ModelFingerprint("LlamaForCausalLM", 30, 9, 3, 64)
ENV = {name: s.env for name, s in OPTION_TABLE.items()}
FLAG = {name: s.flag for name, s in OPTION_TABLE.items()}


def names_field(message: str, field: str) -> bool:
    """Whole-name match ('tile_size' does not match inside 'page_tile_size')."""
    return re.search(rf"(?<![\w.]){re.escape(field)}(?![\w.])", message) is not None


def profile_dict(**budget) -> dict:
    ident = [0, 1, 2]
    d = {
        "schema_version": 1,
        "name": "opt-test",
        "model": FP.to_json(),
        "dense_layers": [0],
        "anchor_layers": [0, 2, 8, 13, 14],
        "head_map": [[2, 0, 1] if i == 1 else list(ident) for i in range(30)],
        "topk_fraction": 0.2,
        "k_min": 64,
        "tile_size": 16,
        "granularity": "page",
        "page_tile_size": 32,
        "round_to": 8,
        "provenance": {"source": "test"},
    }
    d.update(budget)
    return d


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No SGLANG_KASCADE_* variable from the outer environment leaks into a test."""
    for env in ENV.values():
        monkeypatch.delenv(env, raising=False)


# ------------------------------------------------------------------------------------------
# The option table
# ------------------------------------------------------------------------------------------


def test_option_table_covers_every_option_and_budget_field():
    option_fields = [f.name for f in dataclasses.fields(KascadeOptions)]
    assert list(OPTION_TABLE) == option_fields
    budget_fields = {f.name for f in dataclasses.fields(BudgetConfig)}
    policy_fields = {f.name for f in dataclasses.fields(PolicyConfig)}
    assert policy_fields == {"name", "sink_tokens", "rerank"}
    operations = {"control_dir", "admin_port", "admin_token_file"}  # hot-swap sidecar
    operations |= {"dense_prefill_below"}  # when sparsity pays (serving, not the budget)
    operations |= {"warmup"}  # Triton kernels compiled at start-up (warmup.py)
    assert budget_fields == (set(option_fields) - {"profile", "policy", "sink_tokens", "rerank"}
                             - operations)
    for name, s in OPTION_TABLE.items():
        assert s.flag.startswith("--kascade-") and s.env.startswith("SGLANG_KASCADE_")
        assert s.type in (str, int, float) and s.help
        if s.allowed is not None and s.type is int:  # an inclusive range the checks read
            lo, hi = s.allowed
            assert isinstance(lo, int) and isinstance(hi, int) and lo <= hi
        elif s.allowed is not None:  # choices
            assert s.type is str and all(isinstance(c, str) for c in s.allowed)
        if s.default is not None:
            assert isinstance(s.default, s.type), name
            assert s.allowed is None or s.type is not int or s.allowed[0] <= s.default <= \
                s.allowed[1]
            assert s.allowed is None or s.type is int or s.default in s.allowed
    assert len(set(FLAG.values())) == len(FLAG) and len(set(ENV.values())) == len(ENV)


# ------------------------------------------------------------------------------------------
# KascadeOptions validation
# ------------------------------------------------------------------------------------------


def test_empty_options_are_valid_and_unset():
    o = KascadeOptions()
    assert all(getattr(o, f.name) is None for f in dataclasses.fields(o))


def test_valid_options_are_kept():
    o = KascadeOptions(profile="x.json", topk_fraction=0.05, k_min=1, tile_size=64,
                       granularity="page", page_tile_size=8, round_to=128)
    assert (o.topk_fraction, o.k_min, o.tile_size, o.granularity, o.page_tile_size,
            o.round_to) == (0.05, 1, 64, "page", 8, 128)
    assert KascadeOptions(topk_fraction=1).topk_fraction == 1
    for g in GRANULARITIES:
        assert KascadeOptions(granularity=g).granularity == g


BAD_OPTIONS = [
    ("topk_fraction", 0), ("topk_fraction", 0.0), ("topk_fraction", -0.1),
    ("topk_fraction", 1.01), ("topk_fraction", 5), ("topk_fraction", float("nan")),
    ("topk_fraction", float("inf")), ("topk_fraction", True), ("topk_fraction", "0.1"),
    ("k_min", 0), ("k_min", -1), ("k_min", 1.5), ("k_min", True), ("k_min", "128"),
    ("tile_size", 0), ("tile_size", -32), ("tile_size", 32.0),
    ("page_tile_size", 0), ("page_tile_size", -16),
    ("round_to", 0), ("round_to", -128),
    ("granularity", "tile"), ("granularity", "TOKEN"), ("granularity", ""),
    ("admin_port", 0), ("admin_port", 65536), ("admin_port", -1), ("admin_port", True),
    ("control_dir", ""), ("control_dir", "  "),
]


@pytest.mark.parametrize("field,value", BAD_OPTIONS)
def test_out_of_range_options_are_refused(field, value):
    with pytest.raises(KascadeConfigError) as ei:
        KascadeOptions(**{field: value})
    msg = str(ei.value)
    assert names_field(msg, field) and msg.startswith(f"option {field}="), msg


def test_options_are_frozen():
    o = KascadeOptions(k_min=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.k_min = 5  # type: ignore[misc]
    assert o.k_min == 4


# ------------------------------------------------------------------------------------------
# Environment variables
# ------------------------------------------------------------------------------------------


def test_from_env_empty_gives_unset_options():
    assert KascadeOptions.from_env({}) == KascadeOptions()


def test_from_env_parses_every_variable_with_its_type():
    env = {ENV["profile"]: "/tmp/p.json", ENV["topk_fraction"]: "0.2", ENV["k_min"]: "64",
           ENV["tile_size"]: "16", ENV["granularity"]: "page", ENV["page_tile_size"]: "32",
           ENV["round_to"]: "8", "UNRELATED": "1"}
    o = KascadeOptions.from_env(env)
    assert o == KascadeOptions(profile="/tmp/p.json", topk_fraction=0.2, k_min=64, tile_size=16,
                               granularity="page", page_tile_size=32, round_to=8)
    assert isinstance(o.topk_fraction, float) and isinstance(o.k_min, int)


def test_from_env_ignores_empty_strings():
    env = {e: "" for e in ENV.values()}
    assert KascadeOptions.from_env(env) == KascadeOptions()


def test_from_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv(ENV["k_min"], "256")
    monkeypatch.setenv(ENV["topk_fraction"], "0.05")
    o = KascadeOptions.from_env()
    assert (o.k_min, o.topk_fraction) == (256, 0.05)


@pytest.mark.parametrize("name,raw", [("k_min", "abc"), ("k_min", "1.5"), ("k_min", "1e3"),
                                      ("tile_size", "thirty-two"), ("page_tile_size", "16.0"),
                                      ("round_to", "0x80"), ("topk_fraction", "ten"),
                                      ("topk_fraction", "10%")])
def test_from_env_bad_type_names_the_variable(name, raw):
    with pytest.raises(KascadeConfigError) as ei:
        KascadeOptions.from_env({ENV[name]: raw})
    msg = str(ei.value)
    assert ENV[name] in msg and repr(raw) in msg, msg
    assert OPTION_TABLE[name].type.__name__ in msg  # the expected type


@pytest.mark.parametrize("name,raw", [("k_min", "0"), ("topk_fraction", "1.5"),
                                      ("topk_fraction", "nan"), ("granularity", "tile"),
                                      ("round_to", "-8")])
def test_from_env_out_of_range_names_the_field(name, raw):
    with pytest.raises(KascadeConfigError) as ei:
        KascadeOptions.from_env({ENV[name]: raw})
    assert names_field(str(ei.value), name), str(ei.value)


# ------------------------------------------------------------------------------------------
# Precedence: flags over env
# ------------------------------------------------------------------------------------------


def test_merged_over_flags_win_and_unset_fields_fall_back():
    flags = KascadeOptions(k_min=64, granularity="page")
    env = KascadeOptions(k_min=32, topk_fraction=0.2, profile="env.json")
    merged = flags.merged_over(env)
    assert merged == KascadeOptions(k_min=64, granularity="page", topk_fraction=0.2,
                                    profile="env.json")
    assert merged.tile_size is None  # unset in both
    assert flags == KascadeOptions(k_min=64, granularity="page")  # inputs untouched
    assert env.merged_over(flags).k_min == 32


def test_merged_over_empty():
    o = KascadeOptions(k_min=8)
    assert o.merged_over(KascadeOptions()) == o
    assert KascadeOptions().merged_over(o) == o


def test_kascade_options_flags_over_env(monkeypatch):
    monkeypatch.setenv(ENV["k_min"], "32")
    monkeypatch.setenv(ENV["topk_fraction"], "0.2")
    server_args = types.SimpleNamespace(**{_OPTIONS_ATTR: KascadeOptions(k_min=64)})
    o = kascade_options(server_args)
    assert (o.k_min, o.topk_fraction) == (64, 0.2)


def test_kascade_options_env_only(monkeypatch):
    monkeypatch.setenv(ENV["round_to"], "128")
    o = kascade_options(types.SimpleNamespace())
    assert o == KascadeOptions(round_to=128)


# ------------------------------------------------------------------------------------------
# resolve_profile: options > profile > defaults
# ------------------------------------------------------------------------------------------


def test_resolve_explicit_profile_without_overrides(tmp_path, shipped_dir):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_dict()))
    profile, budget = resolve_profile(KascadeOptions(profile=str(path)), FP)
    assert profile == profile_from_dict(profile_dict())
    assert budget == profile.budget == BudgetConfig(topk_fraction=0.2, k_min=64, tile_size=16,
                                                    granularity="page", page_tile_size=32,
                                                    round_to=8)


def test_resolve_options_override_profile_budget(tmp_path, shipped_dir):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_dict()))
    opts = KascadeOptions(profile=str(path), topk_fraction=0.05, k_min=128, granularity="token")
    profile, budget = resolve_profile(opts, FP)
    assert budget == BudgetConfig(topk_fraction=0.05, k_min=128, tile_size=16,
                                  granularity="token", page_tile_size=32, round_to=8)
    assert profile.budget.topk_fraction == 0.2  # the profile itself is unchanged
    assert profile.anchor_layers == (0, 2, 8, 13, 14)


@pytest.mark.parametrize("field", ["tile_size", "page_tile_size", "round_to"])
def test_resolve_each_integer_override(tmp_path, shipped_dir, field):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_dict()))
    _, budget = resolve_profile(KascadeOptions(profile=str(path), **{field: 3}), FP)
    assert getattr(budget, field) == 3
    assert budget.topk_fraction == 0.2 and budget.k_min == 64


def test_resolve_by_shipped_name(shipped_dir):
    (shipped_dir / "opt-test.json").write_text(json.dumps(profile_dict()))
    profile, budget = resolve_profile(KascadeOptions(profile="opt-test", k_min=16), FP)
    assert profile.name == "opt-test" and budget.k_min == 16


@pytest.mark.parametrize("field", ["architecture", "num_layers", "num_q_heads", "num_kv_heads",
                                   "head_dim"])
def test_resolve_explicit_profile_for_the_wrong_model(tmp_path, shipped_dir, field):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_dict()))
    other = FP.to_json()
    other[field] = "Qwen3ForCausalLM" if field == "architecture" else other[field] * 2
    with pytest.raises(KascadeConfigError) as ei:
        resolve_profile(KascadeOptions(profile=str(path)), ModelFingerprint(**other))
    assert f"model.{field}=" in str(ei.value), str(ei.value)


def test_resolve_missing_explicit_profile_fails(shipped_dir):
    with pytest.raises(KascadeConfigError, match="no-such"):
        resolve_profile(KascadeOptions(profile="no-such"), FP)


def test_resolve_no_profile_uses_derived_default_and_warns(shipped_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="sglang_kascade"):
        profile, budget = resolve_profile(KascadeOptions(), FP)
    assert profile == derived_default_profile(FP)
    assert budget == BudgetConfig()
    warnings = [r for r in caplog.records
                if r.name == "sglang_kascade" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "derived default" in msg and "LlamaForCausalLM" in msg and "30 layers" in msg
    assert str(list(profile.anchor_layers)) in msg


def test_resolve_derived_default_still_takes_overrides(shipped_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="sglang_kascade"):
        profile, budget = resolve_profile(KascadeOptions(topk_fraction=0.025, round_to=64), FP)
    assert profile.name == "derived-default"
    assert budget == BudgetConfig(topk_fraction=0.025, round_to=64)
    assert any("derived default" in r.getMessage() for r in caplog.records)


def test_resolve_empty_profile_string_means_unset(shipped_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="sglang_kascade"):
        profile, _ = resolve_profile(KascadeOptions(profile=""), FP)
    assert profile.name == "derived-default"


def test_resolve_picks_matching_shipped_profile_without_warning(shipped_dir, caplog):
    (shipped_dir / "opt-test.json").write_text(json.dumps(profile_dict()))
    other = profile_dict(name="other")
    other["model"] = dict(other["model"], head_dim=128)
    (shipped_dir / "other.json").write_text(json.dumps(other))
    with caplog.at_level(logging.WARNING, logger="sglang_kascade"):
        profile, budget = resolve_profile(KascadeOptions(k_min=1), FP, "/models/llama")
    assert profile.name == "opt-test" and budget.k_min == 1 and budget.round_to == 8
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------
# Launcher flags (argparse)
# ------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch", exit_on_error=True)
    parser.add_argument("--model-path", default="m")
    add_kascade_flags(parser)
    return parser


def test_flags_are_registered_with_env_in_help():
    parser = make_parser()
    help_text = parser.format_help()
    for name, s in OPTION_TABLE.items():
        flag = s.flag
        assert flag in help_text and s.env in help_text
        action = next(a for a in parser._actions if flag in a.option_strings)
        assert action.dest == f"kascade_{name}" and action.default is None


def test_add_kascade_flags_twice_is_harmless():
    parser = make_parser()
    add_kascade_flags(parser)  # e.g. the hook running twice
    args = parser.parse_args(["--kascade-k-min", "8"])
    assert options_from_namespace(args).k_min == 8


def test_no_flags_gives_unset_options():
    args = make_parser().parse_args([])
    assert options_from_namespace(args) == KascadeOptions()


def test_flags_parse_with_their_types():
    args = make_parser().parse_args([
        "--kascade-profile", "llama.json", "--kascade-topk", "0.05", "--kascade-k-min", "64",
        "--kascade-tile-size", "16", "--kascade-granularity", "page",
        "--kascade-page-tile-size", "32", "--kascade-round-to", "128",
    ])
    o = options_from_namespace(args)
    assert o == KascadeOptions(profile="llama.json", topk_fraction=0.05, k_min=64, tile_size=16,
                               granularity="page", page_tile_size=32, round_to=128)
    assert isinstance(o.topk_fraction, float) and isinstance(o.k_min, int)


def test_namespace_without_kascade_attributes():
    assert options_from_namespace(argparse.Namespace(model_path="m")) == KascadeOptions()


@pytest.mark.parametrize("flag,value", [("--kascade-k-min", "abc"), ("--kascade-k-min", "1.5"),
                                        ("--kascade-topk", "ten"),
                                        ("--kascade-round-to", "8x")])
def test_flag_types_are_enforced_by_argparse(flag, value, capsys):
    with pytest.raises(SystemExit) as ei:
        make_parser().parse_args([flag, value])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "invalid" in err


@pytest.mark.parametrize("flag,value,field", [("--kascade-k-min", "0", "k_min"),
                                              ("--kascade-topk", "1.5", "topk_fraction"),
                                              ("--kascade-topk", "0", "topk_fraction"),
                                              ("--kascade-tile-size", "-1", "tile_size"),
                                              ("--kascade-page-tile-size", "0", "page_tile_size"),
                                              ("--kascade-round-to", "0", "round_to"),
                                              ("--kascade-granularity", "tile", "granularity")])
def test_out_of_range_flag_raises_config_error(flag, value, field):
    args = make_parser().parse_args([flag, value])
    with pytest.raises(KascadeConfigError) as ei:
        options_from_namespace(args)
    assert names_field(str(ei.value), field), str(ei.value)


# ------------------------------------------------------------------------------------------
# dense_prefill_below: where sparse prefill pays
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, True, 2.5, "8k"])
def test_dense_prefill_below_rejects_bad_values(bad):
    with pytest.raises(KascadeConfigError, match="dense_prefill_below"):
        KascadeOptions(dense_prefill_below=bad)


def test_dense_prefill_below_defaults_by_device_and_obeys_the_option(monkeypatch):
    from sglang_kascade.config import (DEFAULT_CPU_DENSE_PREFILL_BELOW,
                                       DEFAULT_CUDA_DENSE_PREFILL_BELOW, dense_prefill_below)

    assert dense_prefill_below(KascadeOptions(), "cpu") == DEFAULT_CPU_DENSE_PREFILL_BELOW > 0
    assert dense_prefill_below(KascadeOptions(), "cuda:0") == DEFAULT_CUDA_DENSE_PREFILL_BELOW > 0
    assert dense_prefill_below(KascadeOptions(dense_prefill_below=0), "cuda") == 0
    monkeypatch.setenv(ENV["dense_prefill_below"], "4096")
    assert dense_prefill_below(KascadeOptions.from_env(), "cpu") == 4096


def test_readme_flags_table_lists_every_option():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for s in OPTION_TABLE.values():
        assert f"| `{s.flag}` | `{s.env}` |" in readme, s.flag
