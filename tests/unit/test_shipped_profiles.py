"""Every shipped profile validates, and the right one is chosen for each model."""

from __future__ import annotations

import json

import pytest

from sglang_kascade.profile import (ModelFingerprint, find_shipped_profile, load_profile,
                                    shipped_profiles_dir)

SHIPPED = sorted(p.stem for p in shipped_profiles_dir().glob("*.json"))
LLAMA_8B = ModelFingerprint("LlamaForCausalLM", 32, 32, 8, 128)


def test_expected_profiles_are_shipped():
    assert {"smollm2-135m-instruct", "llama-3.1-8b-instruct", "deepseek-r1-distill-llama-8b",
            "qwen3-8b"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_validates_and_names_itself(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.provenance.get("source") or profile.provenance.get("tool")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_is_the_canonical_form(name):
    """A server started with a shipped profile publishes ``to_json()`` as its current profile;
    the sidecar lists the shipped file as active only if the two are the same JSON."""
    data = json.loads((shipped_profiles_dir() / f"{name}.json").read_text())
    assert data == load_profile(name).to_json()


@pytest.mark.parametrize("model_path, expected", [
    ("/models/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
    ("/models/DeepSeek-R1-Distill-Llama-8B", "deepseek-r1-distill-llama-8b"),
])
def test_same_fingerprint_is_told_apart_by_model_path(model_path, expected):
    assert find_shipped_profile(LLAMA_8B, model_path).name == expected


def test_published_anchor_sets():
    assert load_profile("llama-3.1-8b-instruct").anchor_layers == (0, 2, 8, 13, 14)
    assert load_profile("qwen3-8b").anchor_layers == (0, 2, 7, 14, 23)
    qwen = find_shipped_profile(ModelFingerprint("Qwen3ForCausalLM", 36, 32, 8, 128), "")
    assert qwen.name == "qwen3-8b"


def test_embedded_model_gets_its_calibrated_profile():
    smol = find_shipped_profile(ModelFingerprint("LlamaForCausalLM", 30, 9, 3, 64), "")
    assert smol.name == "smollm2-135m-instruct"
    assert smol.provenance.get("dp")  # DP scores recorded by the calibration CLI
