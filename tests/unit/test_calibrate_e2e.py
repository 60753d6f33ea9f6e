"""End-to-end calibration on a tiny random-weight LlamaForCausalLM (no download, CPU)."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from sglang_kascade.calibrate.cli import main as calibrate_main  # noqa: E402
from sglang_kascade.calibrate.model import fingerprint  # noqa: E402
from sglang_kascade.calibrate.stats import StatsCollector, collecting  # noqa: E402
from sglang_kascade.config import BudgetConfig  # noqa: E402
from sglang_kascade.profile import ModelFingerprint, load_profile, profile_from_dict  # noqa: E402
from tiny_llama import WORDS, save_tiny_llama  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "dev.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    return path


@pytest.mark.parametrize("granularity", ["token", "page"])
def test_cli_writes_a_valid_profile(tiny_model_dir, text_file, tmp_path, granularity):
    out = tmp_path / "profiles" / "tiny.json"
    stats = tmp_path / "stats.pt"
    rc = calibrate_main([
        "--model", str(tiny_model_dir), "--out", str(out), "--data", str(text_file),
        "--context-length", "160", "--num-samples", "2", "--tile-size", "16",
        "--k-min", "8", "--anchors", "2..3", "--choose", "2", "--granularity", granularity,
        "--page-tile-size", "4", "--seed", "1", "--quiet", "--stats-out", str(stats),
    ])
    assert rc == 0
    data = json.loads(out.read_text())
    profile = profile_from_dict(data)
    assert load_profile(str(out)) == profile
    assert profile.name == "tiny"
    assert profile.model == ModelFingerprint("LlamaForCausalLM", 4, 4, 2, 16)
    assert profile.dense_layers == (0,)
    assert len(profile.anchor_layers) == 2 and profile.anchor_layers[0] == 0
    assert profile.budget == BudgetConfig(topk_fraction=0.1, k_min=8, tile_size=16,
                                          granularity=granularity, page_tile_size=4)
    prov = data["provenance"]
    assert sorted(prov["dp"]) == ["2", "3"]
    assert prov["dp"]["2"]["anchors"] == list(profile.anchor_layers)
    assert prov["chosen_num_anchors"] == 2
    assert prov["dp"]["3"]["score"] >= prov["dp"]["2"]["score"]
    assert prov["sizes"]["num_samples"] == 2 and prov["sizes"]["context_length"] == 160
    assert prov["data"]["documents"] == ["dev.txt"] and prov["command"].endswith(str(stats))
    assert len(prov["importance"]) == 4 and all(x >= 0 for x in prov["importance"])
    assert prov["model"] == profile.model.to_json()
    saved = torch.load(stats)
    assert saved["sim"].shape == (4, 4, 2, 2)
    sim = saved["sim"]
    upper = ~torch.ones(4, 4, dtype=torch.bool).tril(-1)
    vals = sim[upper]
    assert bool(((vals > 0) & (vals <= 1 + 1e-5)).all())
    for l in range(4):
        assert torch.allclose(torch.diagonal(sim[l, l]), torch.ones(2, dtype=sim.dtype))


def test_choose_auto_and_single_count(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "a.json"
    common = ["--model", str(tiny_model_dir), "--data", str(text_file), "--context-length",
              "96", "--num-samples", "1", "--tile-size", "16", "--k-min", "8", "--quiet"]
    assert calibrate_main(common + ["--out", str(out), "--anchors", "3"]) == 0
    assert len(load_profile(str(out)).anchor_layers) == 3
    assert calibrate_main(common + ["--out", str(out), "--anchors", "1..4", "--choose",
                                    "auto", "--auto-tolerance", "0"]) == 0
    assert len(load_profile(str(out)).anchor_layers) == 4  # only K = n reaches the maximum


def test_block_size_bounds_memory_not_the_profile(tiny_model_dir, text_file, tmp_path):
    """The score blocks (--block-mb; default per device, 8 MiB on CPU) split the statistics'
    work, not their result: 1 MiB blocks (several per layer at this size) and the default give
    the same profile."""
    common = ["--model", str(tiny_model_dir), "--data", str(text_file), "--context-length",
              "480", "--num-samples", "2", "--tile-size", "16", "--k-min", "8", "--quiet",
              "--anchors", "2"]
    outs = []
    for extra in ([], ["--block-mb", "1"]):
        out = tmp_path / f"p{len(outs)}.json"
        assert calibrate_main(common + ["--out", str(out)] + extra) == 0
        d = json.loads(out.read_text())
        d.pop("provenance"), d.pop("name")
        outs.append(d)
    assert outs[0] == outs[1]


def test_collecting_keeps_model_outputs_and_measures_importance(tiny_model_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    fp = fingerprint(model.config)
    assert fp == ModelFingerprint("LlamaForCausalLM", 4, 4, 2, 16)
    ids = torch.randint(0, 320, (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model.model(input_ids=ids, output_hidden_states=True)
        col = StatsCollector(4, 4, 2, BudgetConfig(k_min=4, tile_size=16))
        with collecting(model, col):
            col.begin_sample(80)
            got = model.model(input_ids=ids)
            col.end_sample()
        assert model.config._attn_implementation == "sdpa"  # restored
        assert torch.allclose(got.last_hidden_state, ref.last_hidden_state, atol=1e-5)
        # importance by hand: x_l = hidden state entering layer l; x_l + attn_out_l = the
        # residual stream after attention (before the MLP)
        pos = torch.arange(80)[None]
        for l, layer in enumerate(model.model.layers):
            x = ref.hidden_states[l]
            pe = model.model.rotary_emb(x, pos)
            attn_out = layer.self_attn(layer.input_layernorm(x), position_embeddings=pe,
                                       attention_mask=None)[0]
            cos = torch.nn.functional.cosine_similarity(x, x + attn_out, dim=-1)
            assert col.importance()[l].item() == pytest.approx(float(1 - cos.mean()), abs=1e-5)


def test_cli_errors_are_reported_not_raised(tiny_model_dir, text_file, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "x.json"), "--quiet"]
    assert calibrate_main(common + ["--data", str(text_file), "--choose", "9"]) == 2
    assert "--choose 9" in capsys.readouterr().err
    assert calibrate_main(common + ["--data", str(tmp_path / "none.txt")]) == 2
    assert calibrate_main(common + ["--data", str(text_file), "--num-samples", "500"]) == 2
    assert "fewer than --num-samples" in capsys.readouterr().err
    assert calibrate_main(common + ["--data", str(text_file), "--k-min", "0"]) == 2
    assert calibrate_main(common + ["--data", str(text_file), "--block-mb", "0"]) == 2
    assert "--block-mb 0" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
