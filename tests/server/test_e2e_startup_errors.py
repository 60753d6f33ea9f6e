"""Bad configurations fail at start-up with a message naming the problem (real launcher)."""

from __future__ import annotations

import json

import pytest

from server_utils import run_server_expecting_failure

pytestmark = pytest.mark.server


def test_out_of_range_topk_is_refused():
    code, out = run_server_expecting_failure("kascade", ["--kascade-topk", "1.5"])
    assert code not in (None, 0)
    assert "topk_fraction=1.5" in out and "(0, 1]" in out


def test_malformed_profile_is_refused_before_loading_the_model(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "model": ')
    code, out = run_server_expecting_failure("kascade", ["--kascade-profile", str(bad)])
    assert code not in (None, 0)
    assert "not valid JSON" in out and str(bad) in out


def test_profile_for_another_model_is_refused(tmp_path):
    from sglang_kascade.profile import ModelFingerprint, derived_default_profile

    other = derived_default_profile(ModelFingerprint("LlamaForCausalLM", 32, 32, 8, 128))
    path = tmp_path / "llama8b.json"
    path.write_text(json.dumps(other.to_json()))
    code, out = run_server_expecting_failure("kascade", ["--kascade-profile", str(path)])
    assert code is not None  # never became healthy
    assert "another model" in out and "model.num_layers" in out
