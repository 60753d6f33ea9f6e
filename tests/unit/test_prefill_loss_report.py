"""calibrate/prefill_loss_report.py: the summary means of prefill_loss JSON and its plots, on a
hand-written file of two prompts."""

from __future__ import annotations

import json

import pytest

from sglang_kascade.calibrate import prefill_loss_report as rep


def _result(mass, err, kl, agree, share):
    layers = [{"layer": 0, "role": "dense"},
              {"layer": 1, "role": "reuse", "body_mass": mass, "body_err": err,
               "question_mass": mass - 0.1, "question_err": err + 0.1, "last_mass": mass,
               "last_err": err, "body_own_mass": mass + 0.05},
              {"layer": 2, "role": "anchor", "body_mass": mass + 0.02, "body_err": err / 2,
               "question_mass": mass, "question_err": err, "last_mass": mass,
               "last_err": err / 2}]
    return {"prefix": 0, "layers": layers,
            "tiles": {"start": [0, 32, 64], "sparse": [False, True, True],
                      "question": [False, False, True], "queries": [32, 32, 20],
                      "mass": [1.0, mass, mass], "err": [0.0, err, err + 0.1]},
            "budget": {"share": share},
            "answer": {"kl_first": kl, "agree_first": agree, "first_logprob": -0.1}}


@pytest.fixture
def runs(tmp_path):
    data = {"format": "sglang-kascade-prefill-loss/1", "prompts": [
        {"task": "passkey", "length": 96, "index": 0, "question_from": 80, "variants": {
            "base": _result(0.9, 0.2, 0.3, False, 0.5),
            "qtail": _result(0.9, 0.1, 0.1, True, 0.5)}},
        {"task": "two_hop", "length": 96, "index": 0, "question_from": 80, "variants": {
            "base": _result(0.8, 0.4, 0.1, True, 0.25),
            "qtail": _result(0.8, 0.2, 0.1, True, 0.25)}}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    return path


def test_summary_means_over_layers_then_prompts(runs):
    data = rep.load([runs])
    s = rep.summary(data["base"])
    assert s["prompts"] == 2
    # prompt means over the two sparse layers: (0.2 + 0.1) / 2 and (0.4 + 0.2) / 2
    assert s["body_err"] == pytest.approx((0.15 + 0.3) / 2)
    assert s["body_mass"] == pytest.approx((0.91 + 0.81) / 2)
    assert s["question_err"] == pytest.approx(((0.3 + 0.2) / 2 + (0.5 + 0.4) / 2) / 2)
    assert s["share"] == pytest.approx(0.375)
    assert (s["kl_first"], s["agree_first"], s["answers"]) == (pytest.approx(0.2), 1, 2)
    assert s["first_err"] is None  # no cached prefix: no first-tile figures
    assert rep.layer_means(data["base"], "body_own_mass", roles=("reuse",)) == {
        1: pytest.approx(0.9)}


def test_markdown_and_plots(runs, tmp_path, capsys):
    assert rep.main(["--in", str(runs), "--variants", "base,qtail",
                     "--plot-layers", str(tmp_path / "l.png"),
                     "--plot-tiles", str(tmp_path / "t.png"),
                     "--plot-summary", str(tmp_path / "s.png"), "--own-of", "base"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("| base | 2 | 0.375 |") and out[2].endswith("| 0.2000 | 1/2 |")
    assert out[3].startswith("| qtail | 2 |") and "| 2/2 |" in out[3]
    for name in ("l", "t", "s"):
        png = (tmp_path / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(SystemExit, match="no results for variant"):
        rep.main(["--in", str(runs), "--variants", "nope"])


def test_first_tile_after_a_prefix_against_the_cold_tile():
    cold = _result(0.9, 0.2, 0.1, True, 0.5)
    warm = _result(0.9, 0.2, 0.1, True, 0.5)
    warm["prefix"] = 40
    warm["tiles"] = {"start": [32, 64], "sparse": [True, True], "question": [False, True],
                     "queries": [24, 20], "mass": [0.9, 0.9], "err": [0.15, 0.3]}
    data = {"base": [{**cold, "task": "passkey", "length": 96}],
            "prefix": [{**warm, "task": "passkey", "length": 96}]}
    cmp = rep.first_tile_vs_cold(data, "prefix", "base")
    assert cmp == {"partial": 0.15, "cold": 0.2, "prompts": 1}  # tile 32: cold err 0.2
    assert rep.first_tile_vs_cold(data, "base", "base") is None  # no prefix: nothing to compare


def test_a_compressed_run_reads_as_the_plain_one(runs, tmp_path):
    """``.json.gz`` (how results pages keep a run in git) holds the same data as the plain file."""
    from sglang_kascade.calibrate.run_file import read_json, write_json

    gz = tmp_path / "run.json.gz"
    write_json(gz, read_json(runs))
    assert gz.read_bytes()[:2] == b"\x1f\x8b"  # gzip's magic number
    assert rep.load([gz]) == rep.load([runs])


def test_keys_read_counted_end_to_end_win_over_the_budgets_share(runs, tmp_path):
    data = json.loads(runs.read_text())
    for prompt, read in zip(data["prompts"], (0.2, 0.1)):
        prompt["variants"]["qtail"]["budget"]["read"] = read
    path = tmp_path / "read.json"
    path.write_text(json.dumps(data))
    loaded = rep.load([path])
    assert rep.summary(loaded["qtail"])["share"] == pytest.approx(0.15)
    assert rep.summary(loaded["base"])["share"] == pytest.approx(0.375)
