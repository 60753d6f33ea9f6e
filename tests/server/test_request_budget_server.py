"""Per-request budgets through a real SGLang server on the CPU (marker: server): SGLang's
``custom_params`` on /generate and the OpenAI-compatible routes (the OpenAI client's
``extra_body``), 400 on bad values, the response's meta info, the scheduler's counters, and a
mixed batch (dense, 5%, 20% and the server's default) giving each request, token by token, what
it gets alone.

Greedy decoding. Prompts of 900 tokens with ``--kascade-k-min 32`` (past k_min / 5% = 640 keys,
so the four budgets select differently: 45, 90, 180 and 900 keys at the end of the prompt) and
sparse prefill at every length (``--kascade-dense-prefill-below 0``: the CPU default would
prefill them dense whatever a request asks). The radix cache is flushed before each run, so every
run prefills (a cached prefix keeps the KV its first request computed).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import pytest
import requests

from server_utils import (SPARSE_PREFILL, embedded_model_path, flush_cache, generated_text,
                          running_server)

pytestmark = pytest.mark.server

NEW_TOKENS = 20
PROMPT_TOKENS = 900
ASKS = {"dense": {"dense": True}, "5%": {"topk": 0.05}, "20%": {"topk": 0.2}, "default": None}
META = {"dense": {"budget": "dense"}, "5%": {"budget": "custom", "topk": 0.05},
        "20%": {"budget": "custom", "topk": 0.2}, "default": {"budget": "default"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    control = tmp_path_factory.mktemp("control")
    with running_server("kascade", SPARSE_PREFILL + ["--kascade-k-min", "32",
                                                     "--kascade-control-dir", str(control)]) as url:
        yield url, control


@pytest.fixture(scope="module")
def prompts():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    out = {}
    for i, name in enumerate(ASKS):
        ids = tok(generated_text(PROMPT_TOKENS // 3, seed=40 + i))["input_ids"]
        assert len(ids) >= PROMPT_TOKENS
        out[name] = ids[:PROMPT_TOKENS]
    return out


def generate(url, ids, ask, **extra):
    sp = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0}
    if ask is not None:
        sp["custom_params"] = {"kascade": ask}
    return requests.post(url + "/generate", json={"input_ids": ids, "sampling_params": sp,
                                                  **extra}, timeout=900)


def counters(control, timeout_s=20.0) -> dict:
    """The scheduler's latest counters (backend_stats snapshot, published every second)."""
    time.sleep(2.5)  # the watcher thread publishes a pending snapshot after STATS_EVERY_S
    deadline = time.time() + timeout_s
    while True:
        files = sorted((control / "stats").glob("*.json"))
        if files:
            return json.loads(files[-1].read_text())
        if time.time() > deadline:
            raise AssertionError(f"no scheduler stats under {control}")
        time.sleep(0.5)


def test_mixed_batch_gives_each_request_its_tokens_alone(server, prompts):
    url, control = server
    alone = {}
    before = counters(control)
    for name, ask in ASKS.items():
        flush_cache(url)
        r = generate(url, prompts[name], ask)
        r.raise_for_status()
        out = r.json()
        assert out["meta_info"]["kascade"] == META[name]
        assert out["meta_info"]["completion_tokens"] == NEW_TOKENS
        alone[name] = out["output_ids"]
    after_alone = counters(control)
    flush_cache(url)
    start = threading.Barrier(len(ASKS))

    def send(name):
        start.wait()
        return name, generate(url, prompts[name], ASKS[name])

    with cf.ThreadPoolExecutor(len(ASKS)) as pool:
        mixed = dict(pool.map(send, ASKS))
    after_mixed = counters(control)
    for name, r in mixed.items():
        r.raise_for_status()
        assert r.json()["meta_info"]["kascade"] == META[name]
        assert r.json()["output_ids"] == alone[name], name
    # batched together: the four requests' decode steps shared forward passes
    decode_alone = after_alone["forwards"]["decode"] - before["forwards"]["decode"]
    decode_mixed = after_mixed["forwards"]["decode"] - after_alone["forwards"]["decode"]
    assert decode_alone >= len(ASKS) * (NEW_TOKENS - 1)
    assert decode_mixed <= decode_alone // 2, (decode_mixed, decode_alone)
    # counted by budget class, once per request
    got = {c: after_mixed["request_budgets"][c] - before["request_budgets"][c]
           for c in ("dense", "custom", "default")}
    assert got == {"dense": 2, "custom": 4, "default": 2}
    # the budgets change the computation: the 5% and 20% requests' first-token logprobs differ
    # from the same prompt served dense (same prompt, other budget)
    flush_cache(url)
    lp = {}
    for name in ("dense", "5%"):
        flush_cache(url)
        r = generate(url, prompts["20%"], ASKS[name], return_logprob=True)
        r.raise_for_status()
        lp[name] = r.json()["meta_info"]["output_token_logprobs"][0][0]
    flush_cache(url)
    r = generate(url, prompts["20%"], ASKS["20%"], return_logprob=True)
    lp["20%"] = r.json()["meta_info"]["output_token_logprobs"][0][0]
    assert len({round(v, 6) for v in lp.values()}) == 3, lp


@pytest.mark.parametrize("ask,message", [
    ({"topk": 1.5}, "custom_params.kascade.topk=1.5: must be in (0, 1]"),
    ({"topk": 0}, "custom_params.kascade.topk=0: must be in (0, 1]"),
    ({"topk": "5%"}, "custom_params.kascade.topk='5%': must be a number in (0, 1]"),
    ({"top_k": 0.1}, "unknown field(s) 'top_k'"),
    ({"dense": "yes"}, "custom_params.kascade.dense='yes': must be true or false"),
    ({"topk": 0.1, "dense": True}, "give topk or dense: true, not both"),
])
def test_bad_values_get_400_with_the_reason(server, ask, message):
    url, _ = server
    r = generate(url, [1, 2, 3], ask)
    assert r.status_code == 400, r.text
    assert message in r.text
    chat = requests.post(url + "/v1/chat/completions", timeout=300, json={
        "model": "default", "max_tokens": 4, "custom_params": {"kascade": ask},
        "messages": [{"role": "user", "content": "Hello"}]})
    assert chat.status_code == 400, chat.text
    assert message in chat.text


def test_openai_routes_carry_the_budget_to_the_scheduler(server):
    """The OpenAI client's extra_body={"custom_params": {...}} is a top-level body field: the
    chat and completions routes hand it to the scheduler, where it is counted by class."""
    url, control = server
    before = counters(control)["request_budgets"]
    chat = requests.post(url + "/v1/chat/completions", timeout=300, json={
        "model": "default", "temperature": 0, "max_tokens": 8,
        "custom_params": {"kascade": {"dense": True}},
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    chat.raise_for_status()
    assert chat.json()["choices"][0]["message"]["content"]
    comp = requests.post(url + "/v1/completions", timeout=300, json={
        "model": "default", "temperature": 0, "max_tokens": 8, "prompt": "The sea is",
        "custom_params": {"kascade": {"topk": 0.3}}})
    comp.raise_for_status()
    after = counters(control)["request_budgets"]
    assert after["dense"] - before["dense"] == 1
    assert after["custom"] - before["custom"] == 1
    assert after["default"] == before["default"]
