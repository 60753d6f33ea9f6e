"""A sidecar app over a real control directory, with in-process scheduler channels standing in
for SGLang's scheduler processes (the same SchedulerChannel class, watcher thread included)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sglang_kascade.control import SchedulerChannel
from sglang_kascade.profile import load_profile, profile_from_dict
from sglang_kascade.server.app import create_app
from sglang_kascade.server.sidecar import SidecarSettings

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SMOL = "smollm2-135m-instruct"


def smol_profile() -> dict:
    return load_profile(SMOL).to_json()


def alt_profile(name="smol-alt", anchors=(0, 5, 10, 20), fraction=0.2) -> dict:
    d = smol_profile()
    ident = list(range(d["model"]["num_kv_heads"]))
    d.update(name=name, anchor_layers=list(anchors), topk_fraction=fraction,
             head_map=[list(ident) for _ in range(d["model"]["num_layers"])],
             provenance={"source": "test: hand-made alternative"})
    return d


def fake_scheduler(control_dir: Path, pid: int, validate=None, start=True) -> SchedulerChannel:
    base = smol_profile()
    fp = base["model"]

    def check(data):
        p = profile_from_dict(data)
        p.check_model(load_profile(SMOL).model)
        return p

    ch = SchedulerChannel(control_dir, fp, validate or check, base, pid=pid)
    return ch.start() if start else ch


@contextmanager
def sidecar_client(control_dir: Path, **settings):
    app = create_app(SidecarSettings(control_dir=control_dir, server_url="http://127.0.0.1:9",
                                     token=TOKEN, **settings))
    with TestClient(app) as client:
        yield client


def upload(client, data, **params):
    return client.post("/v1/profiles", content=json.dumps(data), params=params,
                       headers={**AUTH, "Content-Type": "application/json"})


@pytest.fixture
def control(tmp_path):
    d = tmp_path / "control"
    ch = fake_scheduler(d, os.getpid())
    yield d
    ch.stop()
