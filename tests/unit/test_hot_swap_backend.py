"""Profile hot-swap inside one scheduler process: the control channel and the backend.

The channel (sglang_kascade/control.py) is driven by hand (``poll_once`` instead of its thread)
so the moment a profile is staged is exact. The backend runs the fake scenario of
test_backend_vs_reference.py; its q/k/v inputs do not depend on the profile, so a run that swaps
from profile A to B must give, forward for forward, A's outputs before the swap and B's after.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from sglang_kascade.config import KascadeConfigError, KascadeOptions
from sglang_kascade.control import (ControlPaths, SchedulerChannel, read_json,
                                    write_json_atomic)
from sglang_kascade.plugin import profile_validator
from sglang_kascade.profile import ModelFingerprint
from test_backend_vs_reference import CASES, HEAD_MAPS, build, make_profile_dict, run_backend

SWAP_FORWARD = 2  # staged in the middle of forward 2 (between layers 2 and 3)


def channel_for(tmp_path, profile_dict, pid=None, check=None):
    validate = profile_validator(ModelFingerprint(**profile_dict["model"]), check)
    return SchedulerChannel(tmp_path, profile_dict["model"], validate, profile_dict, pid=pid)


def request(tmp_path, generation, profile):
    write_json_atomic(ControlPaths(tmp_path).request,
                      {"generation": generation, "profile": profile, "requested_at": 0})


def profile_b(pd):
    hkv = pd["model"]["num_kv_heads"]
    b = make_profile_dict(hkv, [0], [0, 3], HEAD_MAPS[hkv], pd["granularity"],
                          pd["page_tile_size"])
    b["model"] = dict(pd["model"])
    b["name"] = "b"
    b["topk_fraction"] = 0.5
    return b


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["token", "page-slotpage16"])
def test_swap_takes_effect_at_the_next_forward_for_every_layer(tmp_path, case, monkeypatch):
    import sglang_kascade.control as control

    monkeypatch.setattr(control, "STATS_EVERY_S", 1e9)  # only the first and forced writes land
    scn_a = build(case)
    pd_b = profile_b(scn_a.profile_dict)
    scn_b = dataclasses.replace(scn_a, profile_dict=pd_b)
    channel = channel_for(tmp_path, scn_a.profile_dict)

    def hook(f, layer_id, be):
        if f == SWAP_FORWARD and layer_id == 3:
            request(tmp_path, 1, pd_b)
            channel.poll_once()  # staged now, mid-forward: this forward must stay on A

    swapped = run_backend(scn_a, batched=True, control=channel, hook=hook)
    only_a = run_backend(scn_a, batched=True)
    only_b = run_backend(scn_b, batched=True)
    differs_after = False
    for key, out in swapped.outputs.items():
        expected = (only_a if key[0] <= SWAP_FORWARD else only_b).outputs[key]
        assert torch.equal(out, expected), key
        if key[0] > SWAP_FORWARD:
            differs_after |= not torch.equal(only_a.outputs[key], only_b.outputs[key])
    assert differs_after, "profiles A and B give the same outputs: the test would prove nothing"
    be = swapped.backend
    assert be.profile.anchor_layers == (0, 3) and be.budget.topk_fraction == 0.5
    assert be.stats.swaps_applied == 1
    state = read_json(ControlPaths(tmp_path).scheduler_file(os.getpid()))
    assert state["applied_generation"] == 1 and state["current"]["name"] == "b"
    assert state["staged_generation"] is None
    # The counters are published with the acknowledgement, not at the next stats tick.
    assert read_json(ControlPaths(tmp_path).stats_file(os.getpid()))["swaps_applied"] == 1


def test_flags_still_override_a_swapped_profile(tmp_path):
    scn_a = build(CASES[0])
    pd_b = profile_b(scn_a.profile_dict)
    channel = channel_for(tmp_path, scn_a.profile_dict)
    run = run_backend(scn_a, batched=True)
    be = run.backend
    be.control, be.options = channel, KascadeOptions(topk_fraction=0.125, k_min=2)
    request(tmp_path, 1, pd_b)
    channel.poll_once()
    be._at_batch_boundary()
    assert be.profile.anchor_layers == (0, 3)
    assert (be.budget.topk_fraction, be.budget.k_min) == (0.125, 2)
    assert be.budget.tile_size == pd_b["tile_size"]


BAD_REQUESTS = {
    "not an object": [1, 2],
    "missing field": {k: v for k, v in build(CASES[0]).profile_dict.items() if k != "head_map"},
    "other model": {**build(CASES[0]).profile_dict,
                    "model": {**build(CASES[0]).profile_dict["model"], "num_layers": 7}},
    "fraction > 1": {**build(CASES[0]).profile_dict, "topk_fraction": 1.5},
}


@pytest.mark.parametrize("why", list(BAD_REQUESTS))
def test_a_bad_request_is_refused_and_nothing_changes(tmp_path, why):
    pd = build(CASES[0]).profile_dict
    channel = channel_for(tmp_path, pd)
    request(tmp_path, 1, BAD_REQUESTS[why])
    channel.poll_once()
    assert channel.take_staged() is None
    state = read_json(ControlPaths(tmp_path).scheduler_file(os.getpid()))
    assert state["rejected"]["generation"] == 1 and state["rejected"]["error"]
    assert state["current"] == pd and state["current_generation"] == 0


def test_a_profile_the_process_cannot_apply_is_refused_with_the_reason(tmp_path):
    """The backend's check (captured decode graphs) refuses: nothing is half-applied."""
    pd = build(CASES[0]).profile_dict
    channel = channel_for(tmp_path, pd, check=lambda p: f"captured graphs cannot run {p.name}")
    request(tmp_path, 1, profile_b(pd))
    channel.poll_once()
    assert channel.take_staged() is None
    state = read_json(ControlPaths(tmp_path).scheduler_file(os.getpid()))
    assert "captured graphs cannot run b" in state["rejected"]["error"]
    assert state["current"] == pd and state["current_generation"] == 0


def _graph_backend(pd, kmax=64, lmax=512):
    """A CPU backend whose device path believes decode graphs were captured for ``pd``."""
    from sglang_kascade.backend import KascadeAttnBackend
    from sglang_kascade.profile import profile_from_dict

    profile = profile_from_dict(pd)
    be = KascadeAttnBackend(None, None, None, profile, profile.budget, "cpu")
    dp = be.device_path
    dp.graph_kinds = dp.graph_kinds_of(be.layers.roles, be.budget)
    dp.graph_state = {"lmax": lmax, "kmax": kmax}
    return be


def test_graph_swaps_need_the_same_dense_layers_and_room_in_the_buffers():
    from sglang_kascade.profile import profile_from_dict

    pd = build(CASES[0]).profile_dict  # dense 0 (+ anchor), anchors 2, 4
    hkv = pd["model"]["num_kv_heads"]

    def variant(dense, anchors, **kw):
        v = make_profile_dict(hkv, dense, anchors, HEAD_MAPS[hkv], "token", 8)
        v.update(model=dict(pd["model"]), **kw)
        return profile_from_dict(v)

    be = _graph_backend(pd)
    assert be.device_path.graph_kinds == ["fused"] + ["sparse"] * 5
    # other anchors, head maps and a budget within the buffers: the captured graphs serve it
    assert be.hot_swap_problem(variant([0], [0, 3], topk_fraction=0.1)) is None
    assert "layers [3]" in be.hot_swap_problem(variant([0, 3], [0, 2]))
    big = variant([0], [0, 2, 4], topk_fraction=0.5)  # k_for(512) = 256 > 64 captured
    assert "exceeds the captured buffers" in be.hot_swap_problem(big)
    page = variant([0], [0, 2, 4], granularity="page")
    assert "token-granularity" in be.hot_swap_problem(page)
    every_key = variant([0], [0, 2, 4], topk_fraction=1.0)  # captured dense: other kernels
    assert "fraction of 1.0" in be.hot_swap_problem(every_key)
    dense3 = variant([0, 3], [0, 2])
    be.device_path.graph_kinds = None  # nothing captured (graphs off): anything goes
    assert be.hot_swap_problem(dense3) is None


def test_a_profile_staged_before_the_graphs_were_planned_is_refused_when_applied(tmp_path):
    """The start-up race: the watcher validated a profile while graphs were off, the graphs
    were planned, then the backend takes it: it keeps its profile and publishes the refusal."""
    pd = build(CASES[0]).profile_dict
    hkv = pd["model"]["num_kv_heads"]
    other = make_profile_dict(hkv, [0, 3], [0, 2], HEAD_MAPS[hkv], "token", 8)
    other.update(model=dict(pd["model"]), name="other-dense")
    channel = channel_for(tmp_path, pd)  # no check: validated as if graphs were off
    request(tmp_path, 1, other)
    channel.poll_once()
    be = _graph_backend(pd)
    be.control = channel
    be._at_batch_boundary()
    assert be.profile.name == pd["name"] and be.stats.swaps_applied == 0
    state = read_json(ControlPaths(tmp_path).scheduler_file(os.getpid()))
    assert state["current"] == pd and state["staged_generation"] is None
    assert state["rejected"]["generation"] == 1 and "layers [3]" in state["rejected"]["error"]
    # a good profile still swaps afterwards
    request(tmp_path, 2, profile_b(pd) | {"topk_fraction": 0.1})
    channel.poll_once()
    be._at_batch_boundary()
    assert be.profile.name == "b" and be.stats.swaps_applied == 1
    state = read_json(ControlPaths(tmp_path).scheduler_file(os.getpid()))
    assert state["applied_generation"] == 2 and state["current"]["name"] == "b"


def test_old_generations_and_garbage_are_ignored(tmp_path):
    pd = build(CASES[0]).profile_dict
    request(tmp_path, 5, pd)  # left over from an earlier server: start-up profile wins
    channel = channel_for(tmp_path, pd)
    channel.poll_once()
    assert channel.take_staged() is None and channel.state["current_generation"] == 5
    request(tmp_path, 4, profile_b(pd))  # older than what this scheduler has
    channel.poll_once()
    assert channel.take_staged() is None
    ControlPaths(tmp_path).request.write_text("{not json")
    channel.poll_once()
    assert channel.take_staged() is None
    request(tmp_path, 6, profile_b(pd))
    channel.poll_once()
    staged = channel.take_staged()
    assert staged.generation == 6 and staged.profile.anchor_layers == (0, 3)
    assert channel.take_staged() is None  # handed over once


def test_watcher_thread_stages_without_help(tmp_path):
    pd = build(CASES[0]).profile_dict
    channel = channel_for(tmp_path, pd).start()
    try:
        request(tmp_path, 1, profile_b(pd))
        for _ in range(200):
            staged = channel.take_staged()
            if staged:
                break
            time.sleep(0.01)
        assert staged is not None and staged.generation == 1
    finally:
        channel.stop()
    assert not ControlPaths(tmp_path).scheduler_file(os.getpid()).exists()


def test_dead_schedulers_are_not_listed_and_are_cleaned_up(tmp_path):
    pd = build(CASES[0]).profile_dict
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    paths = ControlPaths(tmp_path)
    write_json_atomic(paths.scheduler_file(int(dead)), {"pid": int(dead)})
    write_json_atomic(paths.stats_file(int(dead)), {})
    assert paths.live_schedulers() == {}
    channel_for(tmp_path, pd)  # a new scheduler removes the stale files
    assert not paths.scheduler_file(int(dead)).exists()
    assert list(paths.live_schedulers()) == [os.getpid()]
    assert oct(tmp_path.stat().st_mode & 0o777) == oct(0o700)


def test_stats_held_back_are_written_after_the_interval(tmp_path, monkeypatch):
    """Forwards inside the write interval are not lost: the watcher writes them once it has
    passed (a server that goes idle still publishes its last forwards); the snapshot function is
    called only when written."""
    import sglang_kascade.control as control

    monkeypatch.setattr(control, "STATS_EVERY_S", 0.3)
    scn = build(CASES[0])
    channel = channel_for(tmp_path, scn.profile_dict)
    stats_file = ControlPaths(tmp_path).stats_file(os.getpid())
    calls = []

    def snapshot(n):
        return lambda: calls.append(n) or {"n": n}

    channel.maybe_write_stats(snapshot(1))  # the first one is due
    assert read_json(stats_file) == {"n": 1}
    channel.maybe_write_stats(snapshot(2))  # inside the interval: held back
    channel.maybe_write_stats(snapshot(3))
    channel.flush_stats()  # still inside it
    assert read_json(stats_file) == {"n": 1} and calls == [1]
    channel.start()
    try:
        deadline = time.time() + 5
        while read_json(stats_file) != {"n": 3} and time.time() < deadline:
            time.sleep(0.05)
    finally:
        channel.stop()
    assert calls == [1, 3]  # the newest held-back snapshot, made once


def test_stats_count_sparse_and_dense_forwards(tmp_path):
    scn = build(CASES[0])
    channel = channel_for(tmp_path, scn.profile_dict)
    run = run_backend(scn, batched=True, control=channel)
    be = run.backend
    channel.maybe_write_stats(be.stats.snapshot({"roles": be.role_counts()}), force=True)
    snap = read_json(ControlPaths(tmp_path).stats_file(os.getpid()))
    assert snap["forwards"]["extend"] == 3 and snap["forwards"]["decode"] == 3
    assert snap["sparse_forwards"] + snap["dense_fallback_forwards"] == 6
    assert snap["sparse_forwards"] >= 1
    sel = snap["selection"]
    assert sel["count"] == sum(sel["counts"]) == 2 + 4 + 4 + 4 + 2 + 3  # requests per forward
    assert 0 < sel["sum"] < sel["visible_sum"]
    for phase in ("extend", "decode"):  # every query counted: the budget actually spent
        assert 0 < snap["keys"][phase]["read"] < snap["keys"][phase]["candidate"]
    assert snap["roles"] == {"dense": 0, "dense_anchor": 1, "anchor": 2, "reuse": 3,
                             "dense_fallback_layers": 0}


def test_validator_refuses_other_model():
    pd = build(CASES[0]).profile_dict
    other = {**pd, "model": {**pd["model"], "num_kv_heads": 4},
             "head_map": [[0, 1, 2, 3]] * len(pd["head_map"])}
    with pytest.raises(KascadeConfigError, match="num_kv_heads"):
        profile_validator(ModelFingerprint(**pd["model"]))(json.loads(json.dumps(other)))
