"""Calibration for tensor parallelism: ``--tp N`` (rank-local head maps chosen by similarity)
and ``calibrate.tp_fit`` (an unconstrained profile made rank-local afterwards), on a tiny
random Llama with 8 KV heads (no download, CPU)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from sglang_kascade.calibrate.cli import main as calibrate_main  # noqa: E402
from sglang_kascade.calibrate.headmap import map_similarity, rank_local_similarity  # noqa: E402
from sglang_kascade.calibrate.tp_fit import main as tp_fit_main  # noqa: E402
from sglang_kascade.profile import load_profile  # noqa: E402
from sglang_kascade.tp import head_map_problem, same_rank  # noqa: E402
from tiny_llama import WORDS, save_tiny_llama, tiny_config  # noqa: E402

torch.set_num_threads(1)
HKV = 8


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(folder, unconstrained profile path, its stats, the --tp 2 4 profile path)."""
    root = tmp_path_factory.mktemp("tp-calibrate")
    model = save_tiny_llama(root / "model", tiny_config(num_kv_heads=HKV, num_q_heads=16,
                                                        hidden=128))
    text = root / "dev.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    common = ["--model", str(model), "--data", str(text), "--context-length", "160",
              "--num-samples", "2", "--tile-size", "16", "--k-min", "8", "--anchors", "2",
              "--quiet"]
    free, stats, tp = root / "free.json", root / "free.pt", root / "tp.json"
    assert calibrate_main(common + ["--out", str(free), "--stats-out", str(stats)]) == 0
    assert calibrate_main(common + ["--out", str(tp), "--tp", "2", "4"]) == 0
    return root, free, stats, tp


def test_tp_calibration_writes_a_rank_local_map(calibrated):
    _, free, stats, tp = calibrated
    p, unconstrained = load_profile(str(tp)), load_profile(str(free))
    assert p.tp_sizes == (1, 2, 4) and unconstrained.tp_sizes == (1,)
    assert all(head_map_problem(p.head_map, HKV, n) is None for n in (2, 4))
    assert head_map_problem(unconstrained.head_map, HKV, 4) is not None  # random heads: crosses
    assert "rank at TP [1, 2, 4]" in p.provenance["method"]["head_map"]
    sim = torch.load(stats)["sim"]
    if p.anchor_layers == unconstrained.anchor_layers:  # same anchors: the map is the argmax
        local = rank_local_similarity(sim, (2, 4))  # over same-rank heads, so never worse
        assert map_similarity(sim, p.anchor_layers, p.head_map) == pytest.approx(
            map_similarity(local, p.anchor_layers, p.head_map))
        assert map_similarity(sim, p.anchor_layers, p.head_map) <= map_similarity(
            sim, unconstrained.anchor_layers, unconstrained.head_map) + 1e-9


def test_tp_fit_uses_the_similarity_and_keeps_local_entries(calibrated, tmp_path, capsys):
    _, free, stats, tp = calibrated
    out = tmp_path / "fit.json"
    assert tp_fit_main([str(free), "--tp", "4", "--out", str(out), "--stats", str(stats)]) == 0
    src, fit = load_profile(str(free)), load_profile(str(out))
    sim = torch.load(stats)["sim"]
    assert fit.tp_sizes == (1, 4) and fit.name == "free-tp4"
    assert fit.anchor_layers == src.anchor_layers and fit.budget == src.budget
    for j, (a, b) in enumerate(zip(src.head_map, fit.head_map)):
        anchor = max(x for x in src.anchor_layers if x <= j)
        for h2, (h_src, h_fit) in enumerate(zip(a, b)):
            assert same_rank(h2, h_fit, HKV, (4,))
            if same_rank(h2, h_src, HKV, (4,)):
                assert h_fit == h_src
            else:  # moved: the most similar anchor head of its rank
                best = max(float(sim[anchor, j, h2, c]) for c in range(HKV)
                           if same_rank(h2, c, HKV, (4,)))
                assert float(sim[anchor, j, h2, h_fit]) == best
    t = fit.provenance["tp_fit"]
    assert t["moved_entries"] > 0 and t["similarity_after"] <= t["similarity_before"] + 1e-9
    assert "mean reuse-head similarity" in capsys.readouterr().err
    # without the statistics: the identity for every moved entry
    assert tp_fit_main([str(free), "--tp", "8", "--out", str(out)]) == 0
    assert load_profile(str(out)).head_map == tuple((tuple(range(HKV)),) * src.num_layers)


def test_tp_fit_errors(calibrated, tmp_path, capsys):
    _, free, _, _ = calibrated
    assert tp_fit_main([str(free), "--tp", "3", "--out", str(tmp_path / "x.json")]) == 2
    assert "neither divides" in capsys.readouterr().err
