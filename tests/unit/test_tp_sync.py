"""Hot swaps under tensor parallelism, in two processes over gloo (tp_sync.py).

Two ranks of a TP group of 2, each running the backend on its half of the KV heads of the fake
scenario (test_tp.rank_view). Rank 0 alone has the control channel; a profile is staged there
mid-forward, while rank 1 lags behind. Every forward of both ranks must run one profile, the
same on both: A up to the forward the swap was staged in, B from the next one. A profile one
rank cannot apply is applied by neither, and rank 0 reports that rank's reason.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sglang_kascade.control import ControlPaths, read_json
from sglang_kascade.profile import profile_from_dict
from sglang_kascade.tp import TPLayout, fit_head_map
from sglang_kascade.tp_sync import TPControl
from test_backend_vs_reference import CASES, build, run_backend
from test_hot_swap_backend import SWAP_FORWARD, channel_for, profile_b, request
from test_tp import rank_view

SIZE = 2


def rank_local(pd: dict) -> dict:
    pd = copy.deepcopy(pd)
    pd["head_map"] = [list(r) for r in fit_head_map(pd["head_map"], 4, (SIZE,))[0]]
    return pd


def scenario_profiles():
    scn = build(CASES[4])  # 12 query heads, 4 KV heads
    a = rank_local(scn.profile_dict)
    return dataclasses.replace(scn, profile_dict=a), rank_local(profile_b(a))


def rank_main(rank: int, init: str, control_dir: str, refuse_on: int, out: str) -> None:
    """One rank: join the group, run the scenario with the swap, compare with runs of A and B
    alone; writes {"ok": ..., "error": ...} to ``out``."""
    control_dir = Path(control_dir)
    try:
        torch.distributed.init_process_group("gloo", init_method=init, rank=rank,
                                             world_size=SIZE)
        group = torch.distributed.new_group(backend="gloo")
        scn_a, pd_b = scenario_profiles()
        layout = TPLayout(rank, SIZE, 4)
        part_a, _ = rank_view(scn_a, layout)
        part_b = dataclasses.replace(part_a, profile_dict=pd_b)
        channel = channel_for(control_dir, scn_a.profile_dict) if rank == 0 else None
        control = TPControl.create(channel, group, rank, SIZE, profile_from_dict)
        applied_at = []

        def hook(f, layer_id, be):
            if layer_id is None and f == 0 and rank == refuse_on:
                be.hot_swap_problem = lambda p: "this rank cannot apply it"
            elif layer_id == 0:  # after the batch boundary: the profile this forward runs
                applied_at.append(be.profile.name)
                if rank == 1:
                    time.sleep(0.05)  # rank 1 lags: the swap must land on the same forward
            elif rank == 0 and f == SWAP_FORWARD and layer_id == 3:
                request(control_dir, 1, pd_b)
                channel.poll_once()  # staged mid-forward: this forward stays on A

        swapped = run_backend(part_a, batched=True, control=control, hook=hook, tp=layout)
        only_a = run_backend(part_a, batched=True, tp=layout)
        only_b = run_backend(part_b, batched=True, tp=layout)
        refused = refuse_on >= 0
        for key, got in swapped.outputs.items():
            use_b = key[0] > SWAP_FORWARD and not refused
            assert torch.equal(got, (only_b if use_b else only_a).outputs[key]), key
        # applied_at: the profile each forward ran
        result = {"ok": True, "profiles": applied_at, "boundaries": control.boundaries,
                  "applied": swapped.backend.stats.swaps_applied,
                  "refused": swapped.backend.stats.swaps_refused}
    except Exception:  # noqa: BLE001 - reported to the parent
        result = {"ok": False, "error": traceback.format_exc()}
    with open(out, "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_ranks(tmp_path, refuse_on: int = -1) -> list:
    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [str(tmp_path / f"rank{r}.json") for r in range(SIZE)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main,
                         args=(r, init, str(tmp_path / "control"), refuse_on, outs[r]))
             for r in range(SIZE)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung (collectives out of step?)")
    results = [json.loads(open(o).read()) for o in outs]
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r}:\n{res.get('error')}"
    return results


def test_every_rank_swaps_at_the_same_batch_boundary(tmp_path):
    r0, r1 = run_ranks(tmp_path)
    assert r0["profiles"] == r1["profiles"]
    first_b = r0["profiles"].index("b")
    assert first_b == SWAP_FORWARD + 1  # the forward after the one it was staged in
    assert set(r0["profiles"][:first_b]) == {"test"} and set(r0["profiles"][first_b:]) == {"b"}
    assert r0["boundaries"] == r1["boundaries"] > SWAP_FORWARD
    assert r0["applied"] == r1["applied"] == 1
    state = read_json(ControlPaths(tmp_path / "control").scheduler_file(os.getpid()))
    assert state is None  # the channel belongs to rank 0's process, not to this one
    files = list((tmp_path / "control" / "schedulers").glob("*.json"))
    assert len(files) == 1  # one scheduler file per TP group: rank 0's
    state = json.loads(files[0].read_text())
    assert state["applied_generation"] == 1 and state["current"]["name"] == "b"


@pytest.mark.parametrize("refuse_on", [0, 1], ids=["rank0-refuses", "rank1-refuses"])
def test_a_profile_one_rank_refuses_is_applied_by_none(tmp_path, refuse_on):
    r0, r1 = run_ranks(tmp_path, refuse_on)
    assert set(r0["profiles"]) == set(r1["profiles"]) == {"test"}
    assert r0["refused"] == r1["refused"] == 1 and r0["applied"] == r1["applied"] == 0
    state = json.loads(next((tmp_path / "control" / "schedulers").glob("*.json")).read_text())
    assert state["rejected"]["generation"] == 1
    assert f"TP rank {refuse_on}: this rank cannot apply it" in state["rejected"]["error"]
    assert state["current"]["name"] == "test"
