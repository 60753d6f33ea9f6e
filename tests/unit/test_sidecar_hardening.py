"""Hardening of the hot-swap channel and the admin sidecar (issue 20, items 2 to 8): who may own
the control directory, audit before the request and reconciliation after a killed sidecar, one
lock for activation and replacement, whole-name matching, uploads that read back identically,
stray files in the control directory, the store's quota, the listing cache, and which routes are
open. Each test reproduces a failure of the earlier code; no SGLang server is needed (in-process
scheduler channels stand in for the scheduler processes, as in test_sidecar_api.py)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_kascade.config import KascadeConfigError, KascadeOptions
from sglang_kascade.control import (ControlPaths, default_control_dir, pid_alive, read_json,
                                    write_json_atomic)
from sglang_kascade.profile import load_profile
from sidecar_fixtures import (AUTH, SMOL, TOKEN, alt_profile, control,  # noqa: F401 (fixture)
                              fake_scheduler, sidecar_client, smol_profile, upload)

REPO = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)



@pytest.fixture
def client(control):
    with sidecar_client(control) as c:
        yield c


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """A private $TMPDIR (and no XDG_RUNTIME_DIR), so the default control dir lands in tmp_path."""
    base = tmp_path / "tmp"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o1777)  # like /tmp: sticky, everyone may create entries
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    return base


def open_channel(options: KascadeOptions, port: int = 30123):
    """What every scheduler process does at start-up (plugin.open_control_channel)."""
    from sglang_kascade.plugin import open_control_channel

    profile = load_profile(SMOL)
    return open_control_channel(options, port, profile.model, profile)


# ---- item 2: the control directory belongs to the server's user -------------------------------

def test_default_control_dir_uses_xdg_runtime_dir_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_control_dir(30000) == tmp_path / "sglang-kascade" / "30000"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/path")  # not absolute: ignored
    assert default_control_dir(30000).parent.name == f"sglang-kascade-{os.getuid()}"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_control_dir(30000) == \
        Path(tempfile.gettempdir()) / f"sglang-kascade-{os.getuid()}" / "30000"


def test_every_level_the_server_creates_is_0700(own_tmp):
    old = os.umask(0o022)
    try:
        ch = open_channel(KascadeOptions())
    finally:
        os.umask(old)
    try:
        root = default_control_dir(30123)
        assert ch is not None and ch.paths.root == root
        for level in (root.parent, root, root / "schedulers"):
            assert mode(level) == 0o700, level
            assert os.lstat(level).st_uid == os.geteuid()
    finally:
        ch.stop()


def test_a_world_writable_per_user_folder_made_first_is_refused_at_start_up(own_tmp):
    """The issue's attack: another user makes /tmp/sglang-kascade-<victim uid> (mode 777) before
    the victim's server starts, to plant request.json later. Start-up must fail, loudly."""
    base = own_tmp / f"sglang-kascade-{os.getuid()}"
    base.mkdir()
    os.chmod(base, 0o777)
    with pytest.raises(KascadeConfigError, match="writable by group or others"):
        open_channel(KascadeOptions())
    assert not (base / "30123").exists()


@pytest.mark.skipif(not IS_ROOT, reason="making a folder owned by another user needs root")
def test_a_port_folder_made_by_another_user_is_refused_not_silently_off(own_tmp):
    base = own_tmp / f"sglang-kascade-{os.getuid()}"
    base.mkdir(mode=0o700)
    port_dir = base / "30123"
    port_dir.mkdir(mode=0o700)
    os.chown(port_dir, 4242, 4242)
    with pytest.raises(KascadeConfigError, match="owned by uid 4242"):
        open_channel(KascadeOptions())
    with pytest.raises(KascadeConfigError, match="owned by uid 4242"):  # explicit dir: same
        open_channel(KascadeOptions(control_dir=str(port_dir)))


def test_a_symlinked_control_dir_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(KascadeConfigError, match="symlink"):
        open_channel(KascadeOptions(control_dir=str(link)))


def test_a_control_dir_under_a_folder_others_may_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # not sticky: anyone could rename the control dir away
    with pytest.raises(KascadeConfigError, match="others may rename"):
        open_channel(KascadeOptions(control_dir=str(shared / "control")))


def test_an_own_folder_readable_by_others_is_tightened_to_0700(tmp_path):
    d = tmp_path / "control"
    d.mkdir()
    os.chmod(d, 0o755)  # nobody else could have written into it
    ch = open_channel(KascadeOptions(control_dir=str(d)))
    try:
        assert mode(d) == 0o700
    finally:
        ch.stop()


def test_the_sidecar_refuses_an_unsafe_control_dir_at_start_up(tmp_path):
    d = tmp_path / "control"
    d.mkdir()
    os.chmod(d, 0o777)
    env = {**os.environ, "SGLANG_KASCADE_ADMIN_TOKEN": TOKEN}
    r = subprocess.run([sys.executable, "-m", "sglang_kascade.server", "--port", "1",
                        "--control-dir", str(d)], env=env, capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode != 0 and "writable by group or others" in r.stderr, r.stderr


def test_the_launcher_refuses_an_unsafe_control_dir_before_starting_the_sidecar(tmp_path,
                                                                             monkeypatch):
    from sglang_kascade import sidecar_launch

    started = []
    monkeypatch.setattr(sidecar_launch.subprocess, "Popen", lambda cmd: started.append(cmd))
    d = tmp_path / "control"
    d.mkdir()
    os.chmod(d, 0o770)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    with pytest.raises(KascadeConfigError, match="writable by group or others"):
        sidecar_launch.start_sidecar(KascadeOptions(admin_port=30111, control_dir=str(d),
                                                    admin_token_file=str(token)),
                                     "127.0.0.1", 30000)
    assert started == []


# ---- item 3: audit before the request; a killed sidecar leaves no gap ----------------------------

KILLED_SIDECAR = """
import asyncio, os, signal, sys
from pathlib import Path
import sglang_kascade.server.sidecar as sc

write = sc.write_json_atomic

def write_then_die(path, data):
    write(path, data)
    if Path(path).name == "request.json":  # SIGKILL right after request.json changes
        os.kill(os.getpid(), signal.SIGKILL)

sc.write_json_atomic = write_then_die
side = sc.Sidecar(sc.SidecarSettings(control_dir=Path(sys.argv[1]), server_url="http://127.0.0.1:9",
                                     token="x" * 20))
asyncio.run(side.activate("smol-alt", False, "10.0.0.7"))
"""


def test_a_sidecar_killed_mid_swap_leaves_no_gap_in_history_or_audit(tmp_path):
    d = tmp_path / "control"
    ch = fake_scheduler(d, os.getpid())
    try:
        with sidecar_client(d) as client:
            assert upload(client, alt_profile()).status_code == 201
        r = subprocess.run([sys.executable, "-c", KILLED_SIDECAR, str(d)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == -signal.SIGKILL, r.stderr
        deadline = time.monotonic() + 10
        while ch.state["current_generation"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ch.state["current"]["name"] == "smol-alt"  # the scheduler took the swap
        audit = [json.loads(x) for x in (d / "audit.log").read_text().splitlines()]
        assert (audit[-1]["action"], audit[-1]["result"], audit[-1]["client"]) == \
            ("activate", "requested", "10.0.0.7")
        assert "generation 1" in audit[-1]["detail"]
        with sidecar_client(d) as client:  # a restarted sidecar reconciles at start-up
            hist = client.get("/v1/history", headers=AUTH).json()["history"]
            assert [(h["generation"], h["name"], h["client"]) for h in hist] == \
                [(1, "smol-alt", "10.0.0.7")]
            assert "recorded by a later sidecar" in hist[0]["note"]
            r = client.post(f"/v1/profiles/{SMOL}/activate", headers=AUTH)
            assert r.status_code == 200 and r.json()["generation"] == 2
            hist = client.get("/v1/history", headers=AUTH).json()["history"]
            assert [h["generation"] for h in hist] == [1, 2]  # no gap
        audit = [json.loads(x) for x in (d / "audit.log").read_text().splitlines()]
        assert [(a["action"], a["result"]) for a in audit][-3:] == [
            ("reconcile", "recorded"), ("activate", "requested"), ("activate", "active")]
    finally:
        ch.stop()


def test_a_settled_rollback_is_not_recorded_again(tmp_path):
    """Reconciliation records only what no sidecar settled: a refused activation's rollback,
    completed normally, stays out of history after a restart."""
    d = tmp_path / "control"

    def refuse_alt(data):
        if data.get("name") == "smol-alt":
            raise ValueError("refuses smol-alt")
        from sglang_kascade.profile import profile_from_dict

        return profile_from_dict(data)

    ch = fake_scheduler(d, os.getpid(), validate=refuse_alt)
    try:
        with sidecar_client(d) as client:
            assert upload(client, alt_profile()).status_code == 201
            r = client.post("/v1/profiles/smol-alt/activate", headers=AUTH)
            assert r.status_code == 409
        with sidecar_client(d) as client:
            assert client.get("/v1/history", headers=AUTH).json()["history"] == []
    finally:
        ch.stop()


# ---- item 4: activation and replacement under one lock ----------------------------------------

def test_replacing_a_profile_while_it_is_being_activated_keeps_the_served_content(tmp_path):
    d = tmp_path / "control"
    entered, release = threading.Event(), threading.Event()

    def slow(data):  # the scheduler takes its time to stage smol-alt
        from sglang_kascade.profile import profile_from_dict

        if data.get("name") == "smol-alt":
            entered.set()
            release.wait(20)
        return profile_from_dict(data)

    ch = fake_scheduler(d, os.getpid(), validate=slow)
    alt = alt_profile()
    changed = {**alt, "topk_fraction": 0.3}
    results = {}
    try:
        with sidecar_client(d) as client:
            assert upload(client, alt).status_code == 201

            def activate():
                results["activate"] = client.post("/v1/profiles/smol-alt/activate",
                                                  headers=AUTH)

            def replace():
                results["replace"] = upload(client, changed, replace="true")

            a = threading.Thread(target=activate)
            a.start()
            assert entered.wait(10)
            b = threading.Thread(target=replace)
            b.start()
            b.join(0.5)  # the unserialized code answered 201 here, mid-activation
            release.set()
            a.join(20)
            b.join(20)
            assert results["activate"].status_code == 200, results["activate"].text
            assert results["replace"].status_code == 409, results["replace"].text
            assert "is active" in results["replace"].json()["detail"]
            served = client.get("/v1/active", headers=AUTH).json()["sha256"]
            stored = client.get("/v1/profiles", headers=AUTH).json()["profiles"]
            assert served in {p["sha256"] for p in stored}
            assert client.get("/v1/profiles/smol-alt", headers=AUTH).json() == alt
    finally:
        release.set()
        ch.stop()


def test_the_active_profile_cannot_be_deleted(client):
    assert upload(client, alt_profile()).status_code == 201
    assert client.post("/v1/profiles/smol-alt/activate", headers=AUTH).status_code == 200
    r = client.delete("/v1/profiles/smol-alt", headers=AUTH)
    assert r.status_code == 409 and "is active" in r.json()["detail"]
    assert client.delete(f"/v1/profiles/{SMOL}", headers=AUTH).status_code == 409  # shipped
    assert client.delete("/v1/profiles/nope", headers=AUTH).status_code == 404
    assert client.post(f"/v1/profiles/{SMOL}/activate", headers=AUTH).status_code == 200
    assert client.delete("/v1/profiles/smol-alt", headers=AUTH).status_code == 204
    assert client.get("/v1/profiles/smol-alt", headers=AUTH).status_code == 404


# ---- item 5: names matched whole ---------------------------------------------------------------

@pytest.mark.parametrize("name", [SMOL + "\n", "smol-alt\n", "smol-alt\r\n", " smol-alt"])
def test_a_name_with_a_trailing_newline_is_refused(client, control, name):
    r = upload(client, alt_profile(name=name))
    assert r.status_code == 422 and "'name'" in r.json()["detail"], r.text
    assert sorted(p.name for p in (control / "profiles").iterdir()) == []


# ---- item 6: what is accepted reads back identically -------------------------------------------

def _with_provenance(raw_value: str) -> bytes:
    d = alt_profile(name="prov")
    d["provenance"] = {"x": "PLACEHOLDER"}
    return json.dumps(d).replace('"PLACEHOLDER"', raw_value).encode()


@pytest.mark.parametrize("raw", ['"\\ud800"', '"a\\udfffb"', "[" * 900 + "]" * 900, "NaN",
                                 "1e400", "-1e400", "Infinity", "-Infinity",
                                 '{"\\ud800": 1}'],
                         ids=["lone-high-surrogate", "lone-low-surrogate", "nested-900",
                              "nan", "1e400", "-1e400", "infinity", "-infinity", "surrogate-key"])
def test_uploads_that_cannot_round_trip_are_refused(client, control, raw):
    r = client.post("/v1/profiles", content=_with_provenance(raw),
                    headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert "provenance" in r.json()["detail"]
    assert not (control / "profiles" / "prov.json").exists()
    assert client.get("/v1/profiles/prov", headers=AUTH).status_code == 404


JSON_LEAVES = (st.none() | st.booleans() | st.integers(-(1 << 80), 1 << 80)
               | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(st.characters(blacklist_categories=()), max_size=8))
JSON_VALUES = st.recursive(
    JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(st.characters(blacklist_categories=()), max_size=6), inner,
                      max_size=4), max_leaves=20)


def _nest(value, depth: int):
    for _ in range(depth):
        value = [value]
    return value


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(value=JSON_VALUES, depth=st.integers(0, 40))
def test_whatever_is_accepted_reads_back_identically(tmp_path_factory, value, depth):
    d = tmp_path_factory.mktemp("rt") / "control"
    ch = fake_scheduler(d, os.getpid(), start=False)
    try:
        with sidecar_client(d) as client:
            profile = alt_profile(name="prov")
            profile["provenance"] = {"x": _nest(value, depth)}
            body = json.dumps(profile, allow_nan=True)  # ensure_ascii: surrogates as escapes
            r = client.post("/v1/profiles", content=body,
                            headers={**AUTH, "Content-Type": "application/json"})
            assert r.status_code in (201, 422), r.text
            back = client.get("/v1/profiles/prov", headers=AUTH)
            if r.status_code == 201:
                assert back.status_code == 200
                assert back.json() == json.loads(body)
                assert json.dumps(back.json(), sort_keys=True) == \
                    json.dumps(json.loads(body), sort_keys=True)
            else:
                assert back.status_code == 404
    finally:
        ch.stop()


# ---- item 7: stray files in the control directory ----------------------------------------------

def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except OSError:
        return 1 << 22


STRAY_NAMES = ["99999999999999999999", "\u00b2\u00b3", "\u0661\u0662", "0", "-1", "00001",
               str((1 << 22) + 1), str(_pid_max() + 1), "1e3", " 1"]


@pytest.mark.parametrize("stem", STRAY_NAMES,
                         ids=["huge", "superscript-digits", "arabic-indic-digits", "zero",
                              "negative", "leading-zeros", "over-2^22", "over-pid-max", "float",
                              "space"])
def test_stray_scheduler_files_are_ignored(control, stem):
    """Each stray file copies the live scheduler's state but serves another profile: counted as
    a scheduler, it would make activations wait for it and roll back onto its profile."""
    paths = ControlPaths(control)
    phantom = read_json(paths.scheduler_file(os.getpid()))
    phantom["current"] = alt_profile(name="phantom")
    write_json_atomic(paths.schedulers / f"{stem}.json", phantom)
    write_json_atomic(paths.stats / f"{stem}.json", {"sparse_forwards": 7})
    with sidecar_client(control, activation_timeout_s=2.0) as client:
        assert client.get("/health").json() == {"status": "ok", "schedulers": 1}
        for path in ("/v1/profiles", "/v1/active", "/v1/history", "/metrics",
                     f"/v1/profiles/{SMOL}"):
            assert client.get(path, headers=AUTH).status_code == 200, path
        assert upload(client, alt_profile()).status_code == 201
        r = client.post("/v1/profiles/smol-alt/activate", headers=AUTH)
        assert r.status_code == 200, r.text
        a = client.get("/v1/active", headers=AUTH).json()
        assert a["name"] == "smol-alt" and a["consistent"]
        assert [s["pid"] for s in a["schedulers"]] == [os.getpid()]
    assert (paths.schedulers / f"{stem}.json").exists()  # not ours to delete


def test_pid_zero_and_negative_pids_are_never_alive():
    assert not pid_alive(0) and not pid_alive(-1) and not pid_alive(1 << 40)
    assert pid_alive(os.getpid())


def test_malformed_scheduler_state_of_a_live_pid_is_ignored(control):
    paths = ControlPaths(control)
    write_json_atomic(paths.scheduler_file(os.getppid()), {"current_generation": "7",
                                                           "fingerprint": []})
    with sidecar_client(control, activation_timeout_s=2.0) as client:
        assert client.get("/health").json()["schedulers"] == 1
        assert upload(client, alt_profile()).status_code == 201
        assert client.post("/v1/profiles/smol-alt/activate", headers=AUTH).status_code == 200


def test_a_directory_named_request_json_gives_a_clear_error_not_500(control):
    (control / "request.json").mkdir()
    with sidecar_client(control) as client:
        assert upload(client, alt_profile()).status_code == 201
        for path in ("/v1/profiles", "/v1/active", "/v1/history", "/metrics"):
            assert client.get(path, headers=AUTH).status_code == 200, path
        r = client.post("/v1/profiles/smol-alt/activate", headers=AUTH)
        assert r.status_code == 503 and "request.json" in r.json()["detail"], r.text
        assert client.get("/v1/active", headers=AUTH).json()["name"] == SMOL
        assert client.get("/health").status_code == 200


def test_unwritable_history_or_audit_log_answers_503(control):
    (control / "audit.log").mkdir()
    with sidecar_client(control) as client:
        r = upload(client, alt_profile())
        assert r.status_code == 503 and "audit log" in r.json()["detail"]
        r = client.post(f"/v1/profiles/{SMOL}/activate", headers=AUTH)
        assert r.status_code == 503 and "audit log" in r.json()["detail"]
    (control / "audit.log").rmdir()
    (control / "history.jsonl").mkdir()
    with sidecar_client(control) as client:
        r = client.get("/v1/history", headers=AUTH)
        assert r.status_code == 503 and "history" in r.json()["detail"]


# ---- item 8: quota, listing cache off the event loop, open routes ------------------------------

def _named(i: int, pad: int = 0) -> dict:
    d = alt_profile(name=f"p{i:03d}", fraction=round(0.05 + i / 1000, 3))
    if pad:
        d["provenance"]["pad"] = "x" * pad
    return d


def test_the_store_has_a_count_quota(control):
    with sidecar_client(control, max_profiles=3) as client:
        for i in range(3):
            assert upload(client, _named(i)).status_code == 201
        r = upload(client, _named(3))
        assert r.status_code == 409 and "--max-profiles 3" in r.json()["detail"], r.text
        changed = {**_named(1), "topk_fraction": 0.5}
        assert upload(client, changed, replace="true").status_code == 201  # same count
        assert client.delete("/v1/profiles/p000", headers=AUTH).status_code == 204
        assert upload(client, _named(3)).status_code == 201
        audit = [json.loads(x) for x in (control / "audit.log").read_text().splitlines()]
        assert ("delete", "deleted") in {(a["action"], a["result"]) for a in audit}


def test_the_store_has_a_byte_quota(control):
    size = len(json.dumps(_named(0, pad=20000)).encode())
    small = len(json.dumps(_named(2)).encode())
    with sidecar_client(control, max_store_bytes=2 * size + small + 100) as client:
        assert upload(client, _named(0, pad=20000)).status_code == 201
        assert upload(client, _named(1, pad=20000)).status_code == 201
        r = upload(client, _named(2, pad=20000))
        assert r.status_code == 413 and "--max-store-bytes" in r.json()["detail"], r.text
        assert upload(client, _named(2)).status_code == 201  # a small one still fits
        bigger = _named(1, pad=22000)
        r = upload(client, bigger, replace="true")
        assert r.status_code == 413  # a replacement counts its growth
        assert client.get("/v1/profiles/p001", headers=AUTH).json() == _named(1, pad=20000)


def test_the_cli_has_quota_flags(monkeypatch):
    from sglang_kascade.server.cli import parse_args, settings_from_args

    monkeypatch.setenv("SGLANG_KASCADE_ADMIN_TOKEN", TOKEN)
    s = settings_from_args(parse_args([]))
    assert (s.max_profiles, s.max_store_bytes) == (100, 64 << 20)
    s = settings_from_args(parse_args(["--max-profiles", "5", "--max-store-bytes", "2000000"]))
    assert (s.max_profiles, s.max_store_bytes) == (5, 2000000)
    with pytest.raises(SystemExit, match="max-profiles"):
        settings_from_args(parse_args(["--max-profiles", "0"]))


def test_listing_validates_each_profile_once_per_upload(control, monkeypatch):
    import sglang_kascade.server.store as store_mod

    calls = []
    original = store_mod.profile_from_dict

    def counting(data):
        calls.append(data.get("name") if isinstance(data, dict) else None)
        return original(data)

    monkeypatch.setattr(store_mod, "profile_from_dict", counting)
    with sidecar_client(control) as client:
        for i in range(20):
            assert upload(client, _named(i)).status_code == 201
        first = client.get("/v1/profiles", headers=AUTH).json()["profiles"]
        assert len(first) == 24
        n = len(calls)
        for _ in range(5):
            assert client.get("/v1/profiles", headers=AUTH).json()["profiles"] == first
        assert len(calls) == n, calls[n:]  # served from the cache
        # a file changed behind the sidecar's back is noticed (and validated once)
        edited = {**_named(7), "topk_fraction": 0.42}
        write_json_atomic(control / "profiles" / "p007.json", edited)
        listed = {p["name"]: p for p in client.get("/v1/profiles", headers=AUTH).json()["profiles"]}
        assert listed["p007"]["topk_fraction"] == 0.42 and calls[n:] == ["p007"]


def test_health_answers_while_lists_are_in_flight(control, monkeypatch):
    """Four lists are held inside the store (deterministically, by an event) while /health is
    asked: it must answer, so listing does not run on the event loop. No timing threshold."""
    n_lists = 4
    with sidecar_client(control) as client:
        for i in range(40):
            assert upload(client, _named(i)).status_code == 201
        store = client.app.state.sidecar.store
        scan = store._scan
        inside = threading.Semaphore(0)
        release = threading.Event()

        def held_scan():
            inside.release()
            release.wait(30)
            return scan()

        monkeypatch.setattr(store, "_scan", held_scan)
        answers = []
        lists = [threading.Thread(target=lambda: answers.append(
            client.get("/v1/profiles", headers=AUTH))) for _ in range(n_lists)]
        try:
            for t in lists:
                t.start()
            for _ in range(n_lists):  # every list is in flight, inside the store
                assert inside.acquire(timeout=20)
            health = []
            h = threading.Thread(target=lambda: health.append(client.get("/health")))
            h.start()
            h.join(20)
            assert health and health[0].status_code == 200, "/health waited for the lists"
            assert health[0].json()["schedulers"] == 1
            assert not answers  # the lists were still held while /health answered
        finally:
            release.set()
            for t in lists:
                t.join(30)
        assert [r.status_code for r in answers] == [200] * n_lists
        assert all(len(r.json()["profiles"]) == 44 for r in answers)


def test_open_routes_hold_no_secrets(control):
    with sidecar_client(control) as client:
        assert upload(client, alt_profile()).status_code == 201
        for path in ("/health", "/openapi.json", "/docs", "/redoc"):
            r = client.get(path)
            assert r.status_code == 200, path
            assert TOKEN not in r.text and str(control) not in r.text, path
            assert "smol-alt" not in r.text, path  # no profile content either
        described = client.get("/openapi.json").json()["info"]["description"]
        assert "/openapi.json" in described and "no secrets" in described
