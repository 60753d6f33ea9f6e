"""The admin sidecar's HTTP API over a real control directory (no SGLang server: in-process
scheduler channels stand in for the scheduler processes; tests/server/test_sidecar_server.py uses
the real server)."""

from __future__ import annotations

import copy
import json
import os

import pytest

from sglang_kascade.control import ControlPaths, read_json
from sidecar_fixtures import (AUTH, SMOL, TOKEN, alt_profile, control,  # noqa: F401 (fixture)
                              fake_scheduler, sidecar_client, smol_profile, upload)



@pytest.fixture
def client(control):
    with sidecar_client(control, max_upload_bytes=64 * 1024) as c:
        yield c


def active_sha(client):
    r = client.get("/v1/active", headers=AUTH)
    assert r.status_code == 200
    return r.json()["sha256"]


# ---- auth ------------------------------------------------------------------------------------

ROUTES = [("get", "/v1/profiles"), ("get", f"/v1/profiles/{SMOL}"), ("post", "/v1/profiles"),
          ("post", f"/v1/profiles/{SMOL}/activate"), ("get", "/v1/active"),
          ("get", "/v1/history"), ("get", "/metrics"), ("delete", "/v1/profiles/smol-alt")]


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": TOKEN}, {"Authorization": "Basic x"}],
                         ids=["none", "wrong", "no-scheme", "basic"])
def test_every_route_but_health_needs_the_token(client, method, path, headers):
    r = getattr(client, method)(path, headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers.get("www-authenticate") == "Bearer"


def test_health_is_open_and_counts_schedulers(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "schedulers": 1}


# ---- reading ---------------------------------------------------------------------------------

def test_list_show_and_active(client):
    r = client.get("/v1/profiles", headers=AUTH)
    profiles = {p["name"]: p for p in r.json()["profiles"]}
    assert profiles[SMOL]["active"] and profiles[SMOL]["compatible"]
    assert profiles[SMOL]["source"] == "shipped"
    llama = profiles["llama-3.1-8b-instruct"]
    assert llama["compatible"] is False and "num_layers" in llama["problem"]
    assert not llama["active"]
    assert client.get(f"/v1/profiles/{SMOL}", headers=AUTH).json() == smol_profile()
    assert client.get("/v1/profiles/nope", headers=AUTH).status_code == 404
    a = client.get("/v1/active", headers=AUTH).json()
    assert a["name"] == SMOL and a["consistent"] and a["generation"] == 0
    assert [s["pid"] for s in a["schedulers"]] == [os.getpid()]


# ---- upload + activate -----------------------------------------------------------------------

def test_upload_activate_history_audit_metrics(client, control):
    alt = alt_profile()
    r = upload(client, alt)
    assert r.status_code == 201 and r.json()["created"] is True
    assert upload(client, alt).status_code == 200  # identical: unchanged
    changed = {**alt, "topk_fraction": 0.3}
    assert upload(client, changed).status_code == 409
    r = client.post("/v1/profiles/smol-alt/activate", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["active"] == "smol-alt" and body["previous"] == SMOL and body["generation"] == 1
    assert body["flushed_cache"] is False
    state = read_json(ControlPaths(control).scheduler_file(os.getpid()))
    assert state["current"] == alt and state["current_generation"] == 1
    a = client.get("/v1/active", headers=AUTH).json()
    assert a["name"] == "smol-alt" and a["generation"] == 1
    # replacing the active profile is refused; replacing another one is allowed
    assert upload(client, changed, replace="true").status_code == 409
    hist = client.get("/v1/history", headers=AUTH).json()["history"]
    assert [(h["name"], h["previous"], h["generation"]) for h in hist] == [("smol-alt", SMOL, 1)]
    r = client.post(f"/v1/profiles/{SMOL}/activate", headers=AUTH)
    assert r.status_code == 200 and r.json()["generation"] == 2
    assert upload(client, changed, replace="true").status_code == 201
    audit = [json.loads(x) for x in (control / "audit.log").read_text().splitlines()]
    assert [(x["action"], x["result"]) for x in audit] == [
        ("upload", "created"), ("upload", "unchanged"), ("upload", "refused"),
        ("activate", "requested"), ("activate", "active"), ("upload", "refused"),
        ("activate", "requested"), ("activate", "active"), ("upload", "created")]
    assert all(x["client"] for x in audit)
    m = client.get("/metrics", headers=AUTH)
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert f'kascade_active_profile_info{{generation="2",name="{SMOL}"' in m.text
    assert 'kascade_swaps_total{result="ok"} 2.0' in m.text
    assert "kascade_schedulers 1.0" in m.text


def test_metrics_sum_the_schedulers_stats(control, client):
    """Counters are read from every live scheduler's stats snapshot (BackendStats.snapshot)."""
    from sglang_kascade.backend_stats import BackendStats
    from sglang_kascade.control import ControlPaths, write_json_atomic

    stats = BackendStats(sparse_forwards=5, dense_fallback_forwards=2, device_forwards=4,
                         swaps_applied=1, swaps_refused=3)
    stats.record_keys(False, 300, 1000)
    stats.record_keys(True, 20, 80)
    stats.record_keys(True, 5, 20)
    roles = {"dense": 0, "dense_anchor": 1, "anchor": 11, "reuse": 18, "dense_fallback_layers": 0}
    write_json_atomic(ControlPaths(control).stats_file(os.getpid()),
                      stats.snapshot({"roles": roles}))
    text = client.get("/metrics", headers=AUTH).text
    for line in ("kascade_sparse_forwards_total 5.0", "kascade_dense_fallback_forwards_total 2.0",
                 "kascade_device_forwards_total 4.0", "kascade_swaps_applied_total 1.0",
                 "kascade_swaps_refused_total 3.0", 'kascade_layers{role="anchor"} 11.0',
                 'kascade_layers{role="reuse"} 18.0',
                 'kascade_keys_read_total{phase="extend"} 300.0',
                 'kascade_keys_candidate_total{phase="extend"} 1000.0',
                 'kascade_keys_read_total{phase="decode"} 25.0',
                 'kascade_keys_candidate_total{phase="decode"} 100.0'):
        assert line in text, text


def test_activating_an_incompatible_or_unknown_profile_changes_nothing(client):
    before = active_sha(client)
    r = client.post("/v1/profiles/llama-3.1-8b-instruct/activate", headers=AUTH)
    assert r.status_code == 422 and "num_layers" in r.json()["detail"]
    assert client.post("/v1/profiles/nope/activate", headers=AUTH).status_code == 404
    assert active_sha(client) == before


# ---- bad uploads: 4xx naming the problem, nothing changes --------------------------------------

def _bad(**changes):
    d = alt_profile(name="bad-one")
    for path, value in changes.items():
        target, keys = d, path.split(".")
        for k in keys[:-1]:
            target = target[int(k)] if k.isdigit() else target[k]
        last = keys[-1]
        if value is DELETE:
            del target[last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return json.dumps(d).encode()


DELETE = object()
ident = [0, 1, 2]
BAD_UPLOADS = [
    # (id, body bytes, content type, status, words the message must contain)
    ("not-json", b"{not json", "application/json", 400, "not valid JSON"),
    ("empty", b"", "application/json", 400, "empty"),
    ("array", b"[1, 2]", "application/json", 422, "JSON object"),
    ("string", b'"profile"', "application/json", 422, "JSON object"),
    ("not-utf8", b"\xff\xfe{}", "application/json", 400, "UTF-8"),
    ("text-plain", _bad(), "text/plain", 415, "application/json"),
    ("oversized", b'{"x": "' + b"a" * (70 * 1024) + b'"}', "application/json", 413, "larger"),
    ("deep-nesting", b"[" * 30000 + b"]" * 30000, "application/json", 400, "not valid JSON"),
    ("huge-int", b'{"k_min": ' + b"9" * 5000 + b"}", "application/json", 400, "not valid JSON"),
    ("missing-field", _bad(head_map=DELETE), "application/json", 422, "head_map"),
    ("unknown-field", _bad(extra_field=1), "application/json", 422, "extra_field"),
    ("wrong-type-fraction", _bad(topk_fraction="0.1"), "application/json", 422, "topk_fraction"),
    ("nan-fraction", _bad().replace(b'"topk_fraction": 0.2', b'"topk_fraction": NaN'),
     "application/json", 422, "topk_fraction"),
    ("fraction-zero", _bad(topk_fraction=0), "application/json", 422, "topk_fraction"),
    ("fraction-above-one", _bad(topk_fraction=1.5), "application/json", 422, "topk_fraction"),
    ("k-min-negative", _bad(k_min=-1), "application/json", 422, "k_min"),
    ("k-min-float", _bad(k_min=1.5), "application/json", 422, "k_min"),
    ("tile-zero", _bad(tile_size=0), "application/json", 422, "tile_size"),
    ("granularity", _bad(granularity="block"), "application/json", 422, "granularity"),
    ("schema-version", _bad(schema_version=2), "application/json", 422, "schema_version"),
    ("head-map-out-of-range", _bad(**{"head_map.7.1": 3}), "application/json", 422,
     "head_map[7][1]"),
    ("head-map-row-length", _bad(**{"head_map.7": [0, 1]}), "application/json", 422,
     "head_map[7]"),
    ("head-map-rows", _bad(head_map=[ident] * 29), "application/json", 422, "head_map"),
    ("wrong-layer-count", _bad(**{"model.num_layers": 24, "head_map": [ident] * 24}),
     "application/json", 422, "model.num_layers=24 but the served model has 30"),
    ("wrong-kv-heads", _bad(**{"model.num_kv_heads": 1}), "application/json", 422, "head_map"),
    ("wrong-architecture", _bad(**{"model.architecture": "Qwen3ForCausalLM"}),
     "application/json", 422, "architecture"),
    ("anchors-unsorted", _bad(anchor_layers=[0, 10, 5]), "application/json", 422,
     "anchor_layers"),
    ("anchors-duplicated", _bad(anchor_layers=[0, 5, 5]), "application/json", 422,
     "anchor_layers"),
    ("anchor-out-of-range", _bad(anchor_layers=[0, 30]), "application/json", 422,
     "anchor_layers"),
    ("layer0-not-dense", _bad(dense_layers=[1]), "application/json", 422, "dense_layers"),
    ("layer0-not-anchor", _bad(anchor_layers=[5, 10]), "application/json", 422,
     "anchor_layers"),
    ("name-missing", _bad(name=None), "application/json", 422, "name"),
    ("name-traversal", _bad(name="../evil"), "application/json", 422, "name"),
    ("name-shipped", _bad(name=SMOL), "application/json", 409, "shipped"),
    ("provenance-type", _bad(provenance="me"), "application/json", 422, "provenance"),
]


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_upload_is_refused_with_a_message_and_nothing_changes(client, control, case):
    _id, body, ctype, status, words = case
    before_sha = active_sha(client)
    before_list = client.get("/v1/profiles", headers=AUTH).json()
    r = client.post("/v1/profiles", content=body,
                    headers={**AUTH, "Content-Type": ctype})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"], r.json()
    assert active_sha(client) == before_sha
    assert client.get("/v1/profiles", headers=AUTH).json() == before_list
    assert not any(p.name == "bad-one.json" for p in (control / "profiles").iterdir())


def test_chunked_upload_over_the_limit_is_refused(client):
    def chunks():
        for _ in range(100):
            yield b" " * 1024

    r = client.post("/v1/profiles", content=chunks(),
                    headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413


# ---- schedulers that refuse, hang, or are missing ----------------------------------------------

def test_a_refusing_scheduler_rolls_everyone_back(tmp_path):
    d = tmp_path / "control"

    def refuse_alt(data):
        if data.get("name") == "smol-alt":
            raise ValueError("this scheduler refuses smol-alt")
        from sglang_kascade.profile import profile_from_dict

        return profile_from_dict(data)

    good = fake_scheduler(d, os.getpid())
    bad = fake_scheduler(d, os.getppid(), validate=refuse_alt)
    try:
        with sidecar_client(d) as client:
            assert upload(client, alt_profile()).status_code == 201
            r = client.post("/v1/profiles/smol-alt/activate", headers=AUTH)
            assert r.status_code == 409 and "refuses smol-alt" in r.json()["detail"]
            a = client.get("/v1/active", headers=AUTH).json()
            assert a["name"] == SMOL and a["consistent"]
            assert good.state["current"] == smol_profile()
            assert client.get("/v1/history", headers=AUTH).json()["history"] == []
    finally:
        good.stop()
        bad.stop()


def test_a_scheduler_that_never_answers_times_out_and_rolls_back(tmp_path):
    d = tmp_path / "control"
    hung = fake_scheduler(d, os.getpid(), start=False)
    try:
        with sidecar_client(d, activation_timeout_s=0.3) as client:
            assert upload(client, alt_profile()).status_code == 201
            r = client.post("/v1/profiles/smol-alt/activate", headers=AUTH)
            assert r.status_code == 504 and "did not acknowledge" in r.json()["detail"]
            request = read_json(ControlPaths(d).request)
            assert request["profile"] == smol_profile()  # the last word is the rollback
    finally:
        hung.stop()


def test_no_scheduler_means_503(tmp_path):
    with sidecar_client(tmp_path / "empty") as client:
        assert client.get("/health").json()["schedulers"] == 0
        assert upload(client, alt_profile()).status_code == 503
        r = client.post(f"/v1/profiles/{SMOL}/activate", headers=AUTH)
        assert r.status_code == 503 and "no live kascade scheduler" in r.json()["detail"]
        assert client.get("/v1/profiles", headers=AUTH).status_code == 200
        assert client.get("/metrics", headers=AUTH).status_code == 200


def test_upload_does_not_mutate_shipped_profiles(client):
    before = copy.deepcopy(client.get(f"/v1/profiles/{SMOL}", headers=AUTH).json())
    upload(client, alt_profile(name=SMOL))
    assert client.get(f"/v1/profiles/{SMOL}", headers=AUTH).json() == before


def test_profile_json_schema_in_openapi_accepts_every_shipped_profile(client):
    import jsonschema

    from sglang_kascade.profile import PROFILE_JSON_SCHEMA, shipped_profiles_dir

    openapi = client.get("/openapi.json").json()
    body = openapi["paths"]["/v1/profiles"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["title"] == "AnchorProfile"
    for p in shipped_profiles_dir().glob("*.json"):
        jsonschema.validate(json.loads(p.read_text()), PROFILE_JSON_SCHEMA)
