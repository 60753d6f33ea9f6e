"""``--tp-size 2`` with kascade through real SGLang servers on the CPU (marker: server).

SGLang runs tensor parallelism on the CPU over gloo (one scheduler process per rank, each bound
to a core by SGLANG_CPU_OMP_THREADS_BIND). A tiny random Llama with 4 KV heads and a profile
whose head map is rank-local at TP 2 (reuse heads read other anchor heads of their own rank)
must give, greedy and in float32, the same tokens at TP 2 as at TP 1: at the profile's 10%
(sparse prefill and decode) and at a request's own fraction 1.0, on a cold prompt, a radix-cache
hit and a chunked prefill; and again after a hot swap, which must reach both ranks. A profile
that crosses ranks is refused at start-up.
"""

from __future__ import annotations

import json
import random
import time

import pytest
import requests

from server_utils import SPARSE_PREFILL, run_server_expecting_failure, running_server
from sglang_kascade.control import ControlPaths, write_json_atomic
from tiny_llama import save_tiny_llama, tiny_config

pytestmark = pytest.mark.server

TP_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank (SGLang asks for it)
COMMON = ["--dtype", "float32", "--chunked-prefill-size", "256", *SPARSE_PREFILL]


def profile(name, anchors, head_map, fraction):
    return {"schema_version": 1, "name": name,
            "model": {"architecture": "LlamaForCausalLM", "num_layers": 4, "num_q_heads": 8,
                      "num_kv_heads": 4, "head_dim": 16},
            "dense_layers": [0], "anchor_layers": anchors, "head_map": head_map,
            "topk_fraction": fraction, "k_min": 8, "tile_size": 16, "granularity": "token",
            "tp_sizes": [1, 2], "provenance": {"source": "test_tp_server"}}


IDENT = [0, 1, 2, 3]
PROFILE_A = profile("tiny-a", [0, 2], [IDENT, [1, 0, 3, 2], IDENT, [0, 0, 3, 3]], 0.1)
PROFILE_B = profile("tiny-b", [0, 1], [IDENT, IDENT, [1, 1, 2, 2], [1, 0, 2, 3]], 0.2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    model = save_tiny_llama(root / "model", tiny_config(num_kv_heads=4, num_q_heads=8,
                                                        hidden=128, max_positions=4096))
    path = root / "a.json"
    path.write_text(json.dumps(PROFILE_A))
    crossing = dict(PROFILE_A, head_map=[IDENT, [2, 0, 3, 1], IDENT, IDENT], tp_sizes=[1])
    (root / "crossing.json").write_text(json.dumps(crossing))
    return root, str(model)


def prompts() -> list:
    rng = random.Random(0)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in (300, 700)]


def gen(url, ids, fraction=None):
    params = {"max_new_tokens": 24, "temperature": 0.0}
    if fraction is not None:
        params["custom_params"] = {"kascade": {"topk": fraction}}
    r = requests.post(url + "/generate", json={"input_ids": ids, "sampling_params": params},
                      timeout=600)
    r.raise_for_status()
    return r.json()


def swap(control_dir, generation: int, prof: dict) -> None:
    """What the sidecar does on an activation: the request file, then wait for the staging."""
    paths = ControlPaths(control_dir)
    write_json_atomic(paths.request, {"generation": generation, "profile": prof,
                                      "requested_at": time.time()})
    deadline = time.time() + 30
    while time.time() < deadline:
        states = list(paths.live_schedulers().values())
        if states and all(s.get("staged_generation") == generation for s in states):
            return
        time.sleep(0.1)
    pytest.fail(f"not staged: {paths.live_schedulers()}")


def serve_and_collect(setup, tp: int, monkeypatch) -> dict:
    root, model = setup
    control = root / f"control-tp{tp}"
    for k, v in TP_ENV.items():
        monkeypatch.setenv(k, v)
    extra = [*COMMON, "--tp-size", str(tp), "--kascade-profile", str(root / "a.json"),
             "--kascade-control-dir", str(control)]
    out = {}
    with running_server("kascade", extra, model_path=model) as url:
        for i, ids in enumerate(prompts()):
            out[f"a-{i}"] = gen(url, ids)["output_ids"]
            hit = gen(url, ids)  # the whole prompt again: a radix-cache hit
            assert hit["meta_info"]["cached_tokens"] > 0
            out[f"a-hit-{i}"] = hit["output_ids"]
            out[f"a-dense-{i}"] = gen(url, ids[:-1], fraction=1.0)["output_ids"]
        schedulers = ControlPaths(control).live_schedulers()
        assert len(schedulers) == 1  # one control-channel end per TP group: rank 0's
        swap(control, 1, PROFILE_B)
        for i, ids in enumerate(prompts()):
            out[f"b-{i}"] = gen(url, ids[1:])["output_ids"]
        state = next(iter(ControlPaths(control).live_schedulers().values()))
        assert state["applied_generation"] == 1 and state["current"]["name"] == "tiny-b"
        stats = list(ControlPaths(control).live_stats().values())
        assert len(stats) == 1 and stats[0]["swaps_applied"] == 1
    return out


def test_tp2_gives_the_tokens_of_tp1(setup, monkeypatch):
    one = serve_and_collect(setup, 1, monkeypatch)
    two = serve_and_collect(setup, 2, monkeypatch)
    assert one == two
    assert one["a-0"] != one["a-dense-0"] or one["a-1"] != one["a-dense-1"]  # 10% is sparse
    assert one["a-0"] != one["b-0"] or one["a-1"] != one["b-1"]  # the swap changed something


def test_a_profile_that_crosses_ranks_is_refused_at_start(setup, monkeypatch):
    root, model = setup
    for k, v in TP_ENV.items():
        monkeypatch.setenv(k, v)
    code, out = run_server_expecting_failure(
        "kascade", ["--model-path", model, "--tp-size", "2", "--kascade-profile",
                    str(root / "crossing.json"), "--kascade-control-dir", "off"])
    assert code is not None and code != 0
    assert "does not fit --tp-size 2" in out and "head_map[1][0]=2" in out
    assert "sglang_kascade.calibrate.tp_fit" in out
