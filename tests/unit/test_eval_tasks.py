"""The accuracy suite without a server: task generation, scoring, results merging, report."""

from __future__ import annotations

import json
import math
import random

import pytest

pytest.importorskip("transformers")

from sglang_kascade.corpus import (DataError, calibration_documents,  # noqa: E402
                                           heldout_documents, read_documents)
from sglang_kascade.eval import cli, results, scoring, sweep  # noqa: E402
from sglang_kascade.eval.client import ServerInfo, kascade_flags  # noqa: E402
from sglang_kascade.eval.tasks import (TASKS, count_word, make_sample,  # noqa: E402
                                       make_samples)
from sglang_kascade.eval.text import Segment, Tokens, insert_needles  # noqa: E402

LENGTHS = (512, 1000, 2048, 4096)


@pytest.fixture(scope="module")
def tokens():
    try:
        heldout_documents()
    except DataError as e:
        pytest.skip(str(e))
    from transformers import AutoTokenizer

    from sglang_kascade.embedded_model import ensure_converted

    return Tokens(AutoTokenizer.from_pretrained(ensure_converted()))


@pytest.fixture(scope="module")
def calibration_text():
    return "\n\n".join(read_documents(calibration_documents()))


def body_text(tokens, s):
    return tokens.decode(s.input_ids[s.body[0]:s.body[1]])


def frame_text(tokens, s):
    return tokens.decode(s.input_ids[:s.body[0]]) + tokens.decode(s.input_ids[s.body[1]:])


@pytest.mark.parametrize("task", TASKS)
def test_generation_is_deterministic_for_a_seed(tokens, task):
    a = make_sample(tokens, task, 1024, 0, seed=3)
    b = make_sample(tokens, task, 1024, 0, seed=3)
    assert a == b
    other_seed = make_sample(tokens, task, 1024, 0, seed=4)
    other_index = make_sample(tokens, task, 1024, 1, seed=3)
    assert other_seed.input_ids != a.input_ids and other_seed.answers != a.answers
    assert other_index.input_ids != a.input_ids
    # a sample does not depend on how many are drawn
    assert make_samples(tokens, task, 1024, 3, seed=3)[0] == a


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", LENGTHS)
def test_context_has_the_requested_token_length(tokens, task, length):
    for i in range(2):
        s = make_sample(tokens, task, length, i)
        assert abs(len(s.input_ids) - length) <= 0  # exact, by construction
        assert s.length == length
        assert 0 < s.body[0] < s.body[1] < length


def test_long_contexts_fit_exactly(tokens):
    for task in TASKS:
        assert len(make_sample(tokens, task, 8000, 0).input_ids) == 8000


@pytest.mark.parametrize("task", TASKS)
def test_needles_and_answers_occur_exactly_once_in_the_context(tokens, task):
    for length in (512, 2048):
        for i in range(3):
            s = make_sample(tokens, task, length, i)
            text = body_text(tokens, s)
            frame = frame_text(tokens, s)
            assert s.needles and s.answers
            for needle in s.needles:
                assert text.count(needle) == 1, needle
            for u in s.unique:
                assert count_word(text, u) == 1, u
            for a in s.answers:
                assert count_word(text, a) >= 1, a
                assert count_word(frame, a) == 0, a  # the prompt frame never gives it away
            if task in ("passkey", "single_needle", "multi_key", "multi_value"):
                for a in s.answers:
                    assert count_word(text, a) == 1, a
            for f in s.forbidden:
                assert count_word(text, f) >= 1  # distractors are really in the context
            assert s.question in frame
            assert len(s.depths) == len(s.needles)
            assert all(0.0 <= d <= 1.0 for d in s.depths)


def test_multi_value_and_variable_tracking_shapes(tokens):
    mv = make_sample(tokens, "multi_value", 2048, 0)
    assert len(mv.answers) == 4 and len(set(mv.answers)) == 4 and not mv.forbidden
    vt = make_sample(tokens, "variable_tracking", 2048, 0)
    text = body_text(tokens, vt)
    assert len(vt.answers) == 5 and len(vt.forbidden) == 5
    value = vt.needles[0].split("= ")[1].rstrip(".")
    assert f"VAR {vt.answers[0]} = {value}." in text
    # the chain is in order: each assignment comes after the one it reads
    positions = [text.index(n) for n in vt.needles[:5]]
    assert positions == sorted(positions)
    mk = make_sample(tokens, "multi_key", 2048, 0)
    assert len(mk.forbidden) == 3 and set(mk.answers).isdisjoint(mk.forbidden)


def test_two_hop_facts_are_in_different_documents(tokens):
    for i in range(4):
        s = make_sample(tokens, "two_hop", 4096, i)
        text = body_text(tokens, s)
        docs = text.split("Document ")
        assert len(docs) - 1 == len(s.documents) >= 3
        leader_fact, town_fact = s.needles[0], s.needles[1]
        where = [j for j, d in enumerate(docs) if leader_fact in d], \
            [j for j, d in enumerate(docs) if town_fact in d]
        assert len(where[0]) == 1 and len(where[1]) == 1 and where[0] != where[1]
        assert s.answers[0] in town_fact


@pytest.mark.parametrize("task", TASKS)
def test_only_heldout_documents_are_used(tokens, task):
    heldout = {p.name for p in heldout_documents()}
    calib = {p.name for p in calibration_documents()}
    assert heldout and heldout.isdisjoint(calib)
    for length in (512, 4096):
        for i in range(3):
            s = make_sample(tokens, task, length, i)
            if task == "passkey":
                assert s.documents == []
            else:
                assert s.documents and set(s.documents) <= heldout
                assert set(s.documents).isdisjoint(calib)


def test_filler_text_comes_from_the_heldout_essays(tokens, calibration_text):
    heldout_text = "\n\n".join(t.strip() for t in read_documents(heldout_documents()))
    for i in range(3):
        s = make_sample(tokens, "single_needle", 2048, i)
        text = body_text(tokens, s)
        for needle in s.needles:
            text = text.replace(" " + needle, "\0")
        piece = max(text.split("\0"), key=len)
        snippet = piece[len(piece) // 2: len(piece) // 2 + 80]
        assert snippet in heldout_text
        assert snippet not in calibration_text


@pytest.mark.parametrize("task", TASKS)
def test_needles_are_disjoint_from_calibration(tokens, task, calibration_text):
    for i in range(3):
        s = make_sample(tokens, task, 1024, i)
        for needle in s.needles:
            assert needle not in calibration_text
        for x in s.answers + s.unique:
            assert count_word(calibration_text, x) == 0, x


def test_insert_needles_at_sentence_boundaries():
    filler = Segment(list(range(100)), ends=[10, 20, 30, 40, 50, 60, 70, 80, 90])
    ids, starts = insert_needles(filler, [[-1, -1], [-2], [-3]], [0.52, 0.11, 0.5])
    assert len(ids) == 104
    assert ids[starts[0]:starts[0] + 2] == [-1, -1] and ids[starts[1]] == -2
    assert ids[starts[2]] == -3
    # depth order kept and each needle at a distinct boundary
    assert starts[1] < starts[2] < starts[0]
    assert ids[starts[1] - 1] == 9  # after filler token 9 (boundary 10)
    assert ids[starts[2] - 1] == 49 and ids[starts[0] - 1] == 59
    assert [x for x in ids if x >= 0] == list(range(100))


@pytest.mark.parametrize("prediction,answers,forbidden,expected", [
    (" 71432. Remember it.", ["71432"], [], (1.0, 1.0)),
    ("The pass key is 71,432!", ["71432"], [], (1.0, 1.0)),
    ("714320", ["71432"], [], (0.0, 0.0)),  # inside a longer number
    ("1714 32", ["71432"], [], (0.0, 0.0)),
    ("  Velmora.\n", ["velmora"], [], (1.0, 1.0)),  # case and punctuation
    ("VELMORA", ["Velmora"], [], (1.0, 1.0)),
    ("Velmoran", ["Velmora"], [], (0.0, 0.0)),
    ("1234567, 2345678 and 3456789", ["1234567", "2345678", "3456789", "4567890"], [],
     (0.0, 0.75)),
    ("- 4567890\n- 1234567\n- 3456789\n- 2345678", ["1234567", "2345678", "3456789", "4567890"],
     [], (1.0, 1.0)),
    ("ABCDE, FGHIJ", ["ABCDE", "FGHIJ"], ["KLMNO"], (1.0, 1.0)),
    ("ABCDE, FGHIJ, KLMNO", ["ABCDE", "FGHIJ"], ["KLMNO"], (0.0, 1.0)),  # a distractor named
    ("", ["1"], [], (0.0, 0.0)),
])
def test_scoring(prediction, answers, forbidden, expected):
    assert scoring.score(prediction, answers, forbidden) == expected


def test_normalize():
    assert scoring.normalize("  Hello,\tWorld!! \n") == "hello world"
    assert scoring.normalize("7,123,456.") == "7123456"
    assert scoring.normalize("a-b_c") == "a b c"
    assert scoring.normalize("12,34") == "12 34"  # not a thousands separator


def test_kascade_flags_and_policy_description():
    flags = kascade_flags("--model-path /m --attention-backend kascade --kascade-topk 0.05 "
                          "--kascade-policy=quest --port 1")
    assert flags == {"topk": "0.05", "policy": "quest"}
    info = ServerInfo(url="u", model_path="/m", context_length=8192, max_input=8191,
                      attention_backend="kascade", launch_command=None, kascade=flags)
    assert cli.describe_policy(info) == ("quest@0.05", "quest", 0.05)
    assert cli.describe_policy(info, label="x", budget=0.2) == ("x", "quest", 0.2)
    dense = ServerInfo(url="u", model_path="/m", context_length=8192, max_input=8191,
                       attention_backend="torch_native", launch_command=None)
    assert cli.describe_policy(dense) == ("dense", "dense", 1.0)
    lengths, notes = cli.fit_lengths([1024, 8192, 9000], info, 64)
    assert lengths == [1024, 8128] and len(notes) == 2


def test_cli_options():
    args = cli.build_parser().parse_args(["--quick"])
    cli.resolve_args(args)
    assert args.tasks == ["passkey", "single_needle"] and args.lengths == [512, 1024]
    assert args.samples_per_cell == 2
    args = cli.build_parser().parse_args(["--quick", "--lengths", "2k,3000", "--tasks", "all"])
    cli.resolve_args(args)
    assert args.lengths == [2048, 3000] and args.tasks == list(TASKS)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--tasks", "nope"])


def test_sweep_skips_unknown_policies(monkeypatch):
    monkeypatch.setattr(sweep, "known_policies", lambda: ("kascade", "quest"))
    msgs = []
    configs = sweep.builtin_configs(["kascade", "quest", "nope"], [0.05, 0.1], log=msgs.append)
    labels = [c["label"] for c in configs]
    assert labels == ["dense", "kascade@0.05", "kascade@0.10", "quest@0.05", "quest@0.10"]
    assert configs[3]["args"] == ["--kascade-topk", "0.05", "--kascade-policy", "quest"]
    assert any("nope" in m for m in msgs)
    monkeypatch.setattr(sweep, "known_policies", lambda: None)  # no --kascade-policy flag
    configs = sweep.builtin_configs(["kascade", "quest"], [0.1], dense=False, log=msgs.append)
    assert [c["args"] for c in configs] == [["--kascade-topk", "0.1"]]


def fake_rows():
    rng = random.Random(0)
    rows = []
    for label, policy, budget in [("dense", "dense", 1.0), ("kascade@0.05", "kascade", 0.05),
                                  ("kascade@0.10", "kascade", 0.1), ("quest@0.10", "quest", 0.1)]:
        for task in ("passkey", "single_needle", "two_hop"):
            for n in (1024, 2048):
                rows.append({"label": label, "policy": policy, "budget": budget, "task": task,
                             "context_length": n, "score": round(rng.random(), 2),
                             "partial": 0.5, "n": 4, "seed": 0, "model": "M"})
    return rows


def test_results_merge_replaces_same_cells(tmp_path):
    path = tmp_path / "r.json"
    rows = fake_rows()
    results.merge_into_file(path, rows[:5], {"label": "dense", "command": "c1"})
    changed = dict(rows[0], score=0.123)
    data = results.merge_into_file(path, [changed] + rows[5:], {"label": "x", "command": "c2"})
    assert len(data["rows"]) == len(rows)
    assert [r for r in data["rows"] if results.row_key(r) == results.row_key(rows[0])][0][
        "score"] == 0.123
    assert [r["command"] for r in data["runs"]] == ["c1", "c2"]
    assert json.loads(path.read_text())["format"] == results.FORMAT


def test_report_renders_table_and_plot(tmp_path):
    from sglang_kascade.eval import report

    rows = fake_rows()
    data = results.merge(results.empty(), rows, {
        "label": "dense", "command": "python -m sglang_kascade.eval --label dense",
        "server_launch_command": "--model-path /m --attention-backend torch_native",
        "date": "2026-01-01T00:00:00Z", "requests": 24, "elapsed_s": 1.0})
    data["sweep"] = {"command": "python -m sglang_kascade.eval.sweep --quick", "date": "d"}
    src = tmp_path / "acc.json"
    results.save(data, src)
    out = tmp_path / "pages" / "acc.md"
    assert report.main(["--in", str(src), "--out", str(out)]) == 0
    md = out.read_text()
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "![average score against budget](acc.png)" in md
    assert "| policy | budget | label | passkey | single_needle | two_hop | average |" in md
    for label in ("dense", "kascade@0.05", "kascade@0.10", "quest@0.10"):
        assert f"| {label} |" in md
    # the average of dense = mean over tasks of the per-task means
    dense = [r for r in rows if r["label"] == "dense"]
    per_task = [sum(r["score"] for r in dense if r["task"] == t) / 2
                for t in ("passkey", "single_needle", "two_hop")]
    assert f"**{sum(per_task) / 3:.3f}**" in md
    assert "python -m sglang_kascade.eval.sweep --quick" in md
    assert "python -m sglang_kascade.eval --label dense" in md
    assert "python -m sglang.launch_server --model-path /m" in md
    assert "python -m sglang_kascade.eval.report --in" in md
    # incomplete labels are marked
    data["rows"] = [r for r in data["rows"] if not (r["label"] == "quest@0.10"
                                                    and r["task"] == "two_hop")]
    results.save(data, src)
    report.main(["--in", str(src), "--out", str(out), "--plot", "none"])
    assert "*" in out.read_text().split("| quest@0.10 |")[1].split("\n")[0]


def test_sign_test_p_values():
    from sglang_kascade.eval.report import sign_test_p

    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(1, 0) == 1.0  # one discordant pair says nothing
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)  # 2 * (1/2)^5
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(1, 9) == pytest.approx(2 * 11 / 1024)  # 2 * (C(10,0) + C(10,1)) / 2^10


def test_report_pairs_rows_with_dense_sample_by_sample(tmp_path):
    """Rows with per-sample outcomes are compared with the dense row prompt by prompt; cells
    of another seed, sample count or prompt format, or without outcomes, are not paired."""
    from sglang_kascade.eval import report

    def row(label, policy, task, n, outcomes, **kw):
        r = {"label": label, "policy": policy, "budget": None if policy == "dense" else 0.1,
             "task": task, "context_length": n, "score": sum(outcomes) / len(outcomes),
             "partial": 0.0, "n": len(outcomes), "seed": 0, "model": "M",
             "prompt_format": "chat", "outcomes": outcomes}
        r.update(kw)
        return r

    rows = [row("dense", "dense", "passkey", 1024, [1, 1, 0, 0]),
            row("dense", "dense", "passkey", 2048, [1, 0, 1, 0]),
            row("dense", "dense", "two_hop", 1024, [1, 1, 1, 1]),
            row("kascade@0.10", "kascade", "passkey", 1024, [1, 0, 1, 0]),  # +1 -1
            row("kascade@0.10", "kascade", "passkey", 2048, [1, 0, 1, 0]),  # equal
            row("kascade@0.10", "kascade", "two_hop", 1024, [0, 0, 0, 0], seed=1),  # other seed
            row("oracle@0.10", "oracle", "passkey", 1024, [0, 0, 0, 0]),  # -2
            row("oracle@0.10", "oracle", "two_hop", 1024, [0, 0], prompt_format="plain")]
    legacy = dict(rows[3], label="old@0.10", policy="old")
    del legacy["outcomes"]
    src = tmp_path / "acc.json"
    results.save(results.merge(results.empty(), rows + [legacy]), src)
    out = tmp_path / "acc.md"
    assert report.main(["--in", str(src), "--out", str(out), "--plot", "none"]) == 0
    md = out.read_text()
    assert "## Paired against dense" in md
    assert "| kascade@0.10 | 2 | 8 | 3 | 3 | 1 | 1 | 1.000 | +0.0 (-34.6, +34.6) |" in md
    assert "| oracle@0.10 | 1 | 4 | 0 | 2 | 0 | 2 | 0.500 | -50.0 (-99.0, -1.0) |" in md
    assert "| old@0.10 | " not in md.split("## Paired against dense")[1].split("##")[0]


def test_difference_interval_of_paired_outcomes():
    """(wins - losses) / n with the normal interval of paired proportions; against a direct
    computation from the per-sample differences (+1, -1, 0)."""
    from sglang_kascade.eval.report import difference_interval

    diffs = [1] * 14 + [-1] * 6 + [0] * 124
    mean = sum(diffs) / len(diffs)
    var = sum((x - mean) ** 2 for x in diffs) / len(diffs)
    lo, hi = difference_interval(14, 6, 144)
    assert lo == pytest.approx(mean - 1.96 * math.sqrt(var / 144))
    assert hi == pytest.approx(mean + 1.96 * math.sqrt(var / 144))
    assert difference_interval(0, 0, 10) == (0.0, 0.0)


def test_report_pools_files_of_other_seeds(tmp_path):
    """Two results files of the same rows on other prompts: one row per cell with both files'
    outcomes, paired with dense over all of them; the same seed twice is refused."""
    from sglang_kascade.eval import report

    def row(label, policy, seed, outcomes, spent=None):
        r = {"label": label, "policy": policy, "budget": None if policy == "dense" else 0.1,
             "task": "passkey", "context_length": 1024, "score": sum(outcomes) / len(outcomes),
             "partial": 0.5, "n": len(outcomes), "seed": seed, "model": "M",
             "prompt_format": "chat", "outcomes": outcomes}
        if spent is not None:
            r["spent"] = {"extend": spent, "decode": 0.1}
        return r

    a = results.merge(results.empty(), [row("dense", "dense", 0, [1, 1, 0]),
                                        row("k@0.1", "kascade", 0, [1, 0, 0], 0.2)])
    b = results.merge(results.empty(), [row("dense", "dense", 2, [0, 1, 1, 1]),
                                        row("k@0.1", "kascade", 2, [1, 1, 0, 0], 0.1)])
    pooled = results.pool([a, b])
    k = [r for r in pooled["rows"] if r["label"] == "k@0.1"][0]
    assert k["outcomes"] == [1, 0, 0, 1, 1, 0, 0] and k["n"] == 7 and k["seed"] == "0+2"
    assert k["score"] == round(3 / 7, 4) and k["spent"]["extend"] == round(1.0 / 7, 4)
    with pytest.raises(ValueError, match="given twice"):
        results.pool([a, a])
    paths = []
    for name, data in (("a", a), ("b", b)):
        paths += ["--in", str(tmp_path / f"{name}.json")]
        results.save(data, tmp_path / f"{name}.json")
    out = tmp_path / "pooled.md"
    assert report.main(paths + ["--out", str(out), "--plot", "none"]) == 0
    md = out.read_text()
    # dense 1,1,0,0,1,1,1 against k 1,0,0,1,1,0,0: both right 2, both wrong 1, only k 1,
    # only dense 3
    assert "| k@0.1 | 1 | 7 | 2 | 1 | 1 | 3 | 0.625 | -28.6 (-80.4, +23.3) |" in md
    assert "Seed: 0+2." in md
    assert report.main(["--in", str(tmp_path / "a.json"), "--in", str(tmp_path / "a.json"),
                        "--out", str(out), "--plot", "none"]) == 2
    assert report.main(paths + ["--out", str(out), "--plot", "none", "--only", "dense"]) == 0
    assert "| k@0.1 |" not in out.read_text()
    assert report.main(paths + ["--out", str(out), "--plot", "none", "--only", "nope"]) == 2


def test_sweep_gives_kascade_servers_a_control_dir_and_reads_the_budget_spent(tmp_path):
    """The sweep's budget-spent figure: a kascade server gets a control directory (a dense one
    or one that names its own does not), and the schedulers' key counters are summed."""
    import os

    from sglang_kascade.backend_stats import BackendStats
    from sglang_kascade.control import ControlPaths, write_json_atomic

    kas = {"label": "kascade@0.10 sparse prefill", "backend": "kascade"}
    args, control = sweep.control_args(kas, ["--kascade-topk", "0.1"], tmp_path)
    assert control == tmp_path / "kascade@0.10_sparse_prefill.control"
    assert args == ["--kascade-topk", "0.1", "--kascade-control-dir", str(control)]
    assert sweep.control_args({"label": "dense", "backend": "torch_native"}, [], tmp_path) == (
        [], None)
    own = ["--kascade-control-dir=/x"]
    assert sweep.control_args(kas, own, tmp_path) == (own, None)

    stats = BackendStats()
    stats.record_keys(False, 250, 1000)
    stats.record_keys(True, 30, 100)
    write_json_atomic(ControlPaths(control).stats_file(os.getpid()), stats.snapshot({}))
    spent = sweep.spent_budget(control)
    assert spent["extend"] == 0.25 and spent["decode"] == 0.3
    assert spent["all"] == round(280 / 1100, 4)
    assert spent["keys"] == {"extend": [250, 1000], "decode": [30, 100]}


def test_report_shows_the_budget_spent_per_row(tmp_path):
    from sglang_kascade.eval import report

    rows = fake_rows()
    for r in rows:
        if r["label"] == "kascade@0.10":
            r["spent"] = {"extend": 0.2379, "decode": 0.1312, "all": 0.2301}
    src = tmp_path / "acc.json"
    results.save(results.merge(results.empty(), rows), src)
    out = tmp_path / "acc.md"
    assert report.main(["--in", str(src), "--out", str(out), "--plot", "none"]) == 0
    md = out.read_text()
    assert "## Budget actually spent" in md
    assert "| kascade@0.10 | 0.1 | 23.8% | 13.1% | 23.0% |" in md
    assert "| quest@0.10 | 0.1 |" not in md.split("## Budget actually spent")[1].split("##")[0]
