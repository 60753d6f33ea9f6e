"""Hot-swap end to end: a real SGLang server (CPU) started with ``--kascade-admin-port``, so the
plugin starts the real sidecar process; profiles are uploaded and swapped over HTTP while
requests run. Marker: server.

What is checked: no request fails across a swap under load; the radix cache survives a swap;
greedy output under the swapped-in profile equals a cold start with that profile; swapping back
with ``flush_cache=true`` recomputes and changes the output; metrics count the swaps; the sidecar
ends with the server.
"""

from __future__ import annotations

import json
import secrets
import threading
import time

import pytest
import requests

from server_utils import (SPARSE_PREFILL, embedded_model_path, free_port, generate,
                          generated_text, running_server)
from sidecar_fixtures import SMOL, alt_profile

pytestmark = pytest.mark.server

N_PROMPT = 640  # tokens: past k_min (128), so tiles attend sparsely and profiles matter


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path())


def prompt_ids(tokenizer, seed: int, n: int = N_PROMPT) -> list:
    ids = tokenizer(f"Document {seed}. " + generated_text(n // 4, seed))["input_ids"]
    return ids[:n]


def wait_for(url, timeout_s=60):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not come up")


class Load:
    """Background /generate requests until stopped; records every outcome."""

    def __init__(self, url, prompts, workers=2):
        self.url, self.prompts, self.stop = url, prompts, threading.Event()
        self.ok, self.failed = 0, []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(workers)]

    def _run(self, i):
        n = 0
        while not self.stop.is_set():
            ids = self.prompts[(i + n) % len(self.prompts)]
            n += 1
            try:
                out = generate(self.url, input_ids=ids, max_new_tokens=6)
                assert out["meta_info"]["completion_tokens"] == 6
                self.ok += 1
            except Exception as e:  # recorded, asserted on by the test
                self.failed.append(repr(e))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=600)


def test_swap_under_load_matches_cold_start(tmp_path, tokenizer):
    token = secrets.token_hex(16)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    alt = alt_profile(name="smol-alt", anchors=(0, 4, 9, 18), fraction=0.1)
    alt_file = tmp_path / "smol-alt.json"
    alt_file.write_text(json.dumps(alt))
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    auth = {"Authorization": f"Bearer {token}"}
    extra = ["--kascade-control-dir", str(tmp_path / "control"),
             "--kascade-admin-port", str(admin_port),
             "--kascade-admin-token-file", str(token_file), "--enable-metrics", *SPARSE_PREFILL]
    cached = prompt_ids(tokenizer, 100)
    fresh = [prompt_ids(tokenizer, s) for s in (1, 2, 3)]
    load_prompts = [prompt_ids(tokenizer, s, 320) for s in (11, 12, 13, 14)]

    with running_server("kascade", extra) as url:
        wait_for(admin)
        assert requests.get(admin + "/v1/active", timeout=10).status_code == 401
        active = requests.get(admin + "/v1/active", headers=auth, timeout=10).json()
        assert active["name"] == SMOL and len(active["schedulers"]) == 1
        r = requests.post(admin + "/v1/profiles", data=json.dumps(alt), timeout=10,
                          headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 201, r.text

        generate(url, input_ids=cached, max_new_tokens=2)  # into the radix cache under A
        with Load(url, load_prompts) as load:
            while load.ok < 2:  # requests are in flight when the swap happens
                time.sleep(0.2)
            r = requests.post(admin + "/v1/profiles/smol-alt/activate", headers=auth, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["active"] == "smol-alt" and r.json()["previous"] == SMOL
            ok_at_swap = load.ok
            while load.ok < ok_at_swap + 3:  # and keep running after it
                time.sleep(0.2)
        assert load.failed == [], load.failed

        again = generate(url, input_ids=cached, max_new_tokens=2)
        assert again["meta_info"]["cached_tokens"] >= len(cached) - 1  # radix cache kept
        swapped = [generate(url, input_ids=p, max_new_tokens=12)["output_ids"] for p in fresh]

        metrics = requests.get(admin + "/metrics", headers=auth, timeout=10).text
        assert 'kascade_active_profile_info{generation="1",name="smol-alt"' in metrics
        assert "kascade_swaps_applied_total 1.0" in metrics
        assert 'kascade_layers{role="anchor"} 3.0' in metrics  # 4, 9, 18
        assert 'kascade_layers{role="reuse"} 26.0' in metrics

        # Back to A with the cache flushed: prompts are recomputed under A.
        r = requests.post(admin + f"/v1/profiles/{SMOL}/activate", params={"flush_cache": "true"},
                          headers=auth, timeout=120)
        assert r.status_code == 200 and r.json()["flushed_cache"] is True, r.text
        under_a = [generate(url, input_ids=p, max_new_tokens=12) for p in fresh]
        # flushed: nothing cached but the few leading tokens the prompts share ("Document")
        assert all(o["meta_info"]["cached_tokens"] <= 4 for o in under_a), \
            [o["meta_info"]["cached_tokens"] for o in under_a]
        history = requests.get(admin + "/v1/history", headers=auth, timeout=10).json()["history"]
        assert [h["name"] for h in history] == ["smol-alt", SMOL]

    with pytest.raises(requests.RequestException):  # the sidecar ended with the server
        for _ in range(20):
            requests.get(admin + "/health", timeout=1)
            time.sleep(0.5)

    with running_server("kascade", ["--kascade-profile", str(alt_file),
                                     "--kascade-control-dir", "off", *SPARSE_PREFILL]) as url:
        cold = [generate(url, input_ids=p, max_new_tokens=12)["output_ids"] for p in fresh]
    assert swapped == cold
    assert [o["output_ids"] for o in under_a] != swapped  # the swap changed what was served
