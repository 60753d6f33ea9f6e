"""The second line of defence of a hot swap (issue 20, item 1): anything raised while a staged
profile is applied at the batch boundary is caught; the profile in force stays (host state and
the device path's tables), the refusal is published in the scheduler's file (what the sidecar
reads), it is counted and logged, and the batch runs.

The backend is the fake scenario of test_backend_vs_reference.py run on the CPU; the control
channel is driven by hand as in test_hot_swap_backend.py.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from sglang_kascade.control import ControlPaths, read_json
from test_backend_vs_reference import CASES, build, run_backend
from test_hot_swap_backend import SWAP_FORWARD, channel_for, profile_b, request


def scheduler_state(tmp_path) -> dict:
    return read_json(ControlPaths(tmp_path).scheduler_file(os.getpid()))


def fail_once(monkeypatch, target, name: str, error: Exception) -> list:
    """``target.name`` raises ``error`` on its first call, then behaves; returns the calls."""
    real = getattr(target, name)
    calls = []

    def patched(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, patched)
    return calls


def swap_with_failure(tmp_path, monkeypatch, inject):
    """Run the scenario on profile A; stage B mid-forward SWAP_FORWARD; ``inject(backend)``
    arms a failure just before the batch boundary that applies B."""
    scn = build(CASES[0])
    channel = channel_for(tmp_path, scn.profile_dict)

    def hook(f, layer_id, be):
        if f == SWAP_FORWARD and layer_id == 3:
            request(tmp_path, 1, profile_b(scn.profile_dict))
            channel.poll_once()  # staged: applies at the next init_forward_metadata
            inject(be)

    return scn, run_backend(scn, batched=True, control=channel, hook=hook)


@pytest.mark.parametrize("where", ["set_profile", "device_path.set_budget"])
def test_a_swap_that_raises_while_applied_keeps_the_old_profile(tmp_path, monkeypatch, caplog,
                                                                where):
    """``set_profile`` raising at once, or the device path raising after its profile tables were
    written (a partly applied swap, rolled back): every later forward gives exactly profile A's
    outputs, and the refusal is published with the error."""
    error = RuntimeError("injected failure while applying")

    def inject(be):
        if where == "set_profile":
            fail_once(monkeypatch, be, "set_profile", error)
        else:
            fail_once(monkeypatch, be.device_path, "set_budget", error)

    caplog.set_level(logging.ERROR, logger="sglang_kascade")
    scn, swapped = swap_with_failure(tmp_path, monkeypatch, inject)
    only_a = run_backend(scn, batched=True)
    assert swapped.outputs.keys() == only_a.outputs.keys()
    for key, out in swapped.outputs.items():  # forwards after the boundary included
        assert torch.equal(out, only_a.outputs[key]), key
    be, a = swapped.backend, only_a.backend
    assert (be.profile, be.budget, be.policy) == (a.profile, a.budget, a.policy)
    assert be.layers == a.layers and be.device_path.layers == a.layers
    assert all(torch.equal(x, y) for x, y in zip(be.head_maps, a.head_maps))
    assert be.stats.swaps_applied == 0 and be.stats.swaps_refused == 1
    state = scheduler_state(tmp_path)
    assert state["current"] == scn.profile_dict  # what the sidecar shows as served
    assert state["staged_generation"] is None and state["applied_generation"] is None
    assert state["rejected"]["generation"] == 1
    assert "hot-swap refused" in state["rejected"]["error"]
    assert "RuntimeError: injected failure while applying" in state["rejected"]["error"]
    assert any("not applied" in r.getMessage() for r in caplog.records)


def test_after_a_refused_swap_the_next_one_applies(tmp_path, monkeypatch):
    scn, swapped = swap_with_failure(
        tmp_path, monkeypatch,
        lambda be: fail_once(monkeypatch, be, "set_profile", ValueError("Overflow")))
    be = swapped.backend
    channel = be.control
    request(tmp_path, 2, profile_b(scn.profile_dict))
    channel.poll_once()
    be._at_batch_boundary()
    assert be.profile.name == "b" and be.budget.topk_fraction == 0.5
    assert be.stats.swaps_applied == 1 and be.stats.swaps_refused == 1
    state = scheduler_state(tmp_path)
    assert state["applied_generation"] == 2 and state["current"]["name"] == "b"


def test_a_check_that_raises_at_the_boundary_is_a_refusal_too(tmp_path, monkeypatch):
    """hot_swap_problem itself raising (not returning a reason) is caught the same way."""
    def inject(be):
        fail_once(monkeypatch, be, "hot_swap_problem", KeyError("graph_state"))

    scn, swapped = swap_with_failure(tmp_path, monkeypatch, inject)
    be = swapped.backend
    assert be.profile.name == scn.profile_dict["name"] and be.stats.swaps_refused == 1
    assert "KeyError" in scheduler_state(tmp_path)["rejected"]["error"]
