"""calibrate/from_stats.py: anchors and head maps re-derived from saved calibration statistics."""

from __future__ import annotations

import json

import torch

from sglang_kascade.calibrate.dp import layer_weights
from sglang_kascade.calibrate.from_stats import derive, main
from sglang_kascade.config import BudgetConfig
from sglang_kascade.profile import AnchorProfile, ModelFingerprint, load_profile


def _stats():
    """4 layers, 2 KV heads. Layer 2 is unlike layer 1 (so the DP puts its second anchor
    there); layer 3's head 0 is best served by anchor head 1 of layer 2."""
    sim = torch.full((4, 4, 2, 2), 0.5)
    for a in range(4):
        sim[a, a] = torch.eye(2) * 0.5 + 0.5
    sim[0, 1] = 0.95
    sim[0, 2], sim[1, 2] = 0.1, 0.1
    sim[2, 3] = torch.tensor([[0.6, 0.9], [0.5, 0.8]])
    imp = torch.ones(4)
    return {"sim": sim, "W": layer_weights(sim, imp)}


BASE = AnchorProfile(name="base", model=ModelFingerprint("Toy", 4, 4, 2, 8), dense_layers=(0,),
                     anchor_layers=(0,), head_map=((0, 1),) * 4,
                     budget=BudgetConfig(0.2, 16, 32, query_tail=8))


def test_dp_anchors_and_head_map():
    p = derive(_stats(), BASE, "2", "s.pt")
    assert p.anchor_layers == (0, 2)
    assert p.head_map == ((0, 1), (0, 1), (0, 1), (1, 1))  # layer 3: head 0 reads head 1
    assert p.budget == BASE.budget and p.model == BASE.model
    assert p.provenance["anchors"] == "2" and p.provenance["stats"] == "s.pt"
    assert p.provenance["stats_command"] is None  # statistics saved without their command


def test_fixed_anchors_keep_layer_zero(tmp_path):
    p = derive(_stats(), BASE, "1,3", "s.pt")
    assert p.anchor_layers == (0, 1, 3)
    assert p.head_map[2] == (0, 1)  # layer 2 reuses layer 1: ties keep the identity
    torch.save(_stats(), tmp_path / "s.pt")
    (tmp_path / "base.json").write_text(json.dumps(BASE.to_json()))
    assert main(["--stats", str(tmp_path / "s.pt"), "--base", str(tmp_path / "base.json"),
                 "--anchors", "2", "--name", "k2", "--out", str(tmp_path / "k2.json")]) == 0
    loaded = load_profile(str(tmp_path / "k2.json"))
    assert loaded.name == "k2" and loaded.anchor_layers == (0, 2)
