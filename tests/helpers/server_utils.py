"""Start and stop real SGLang server processes for the end-to-end tests."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from contextlib import contextmanager

import requests

from sglang_kascade.eval import launch
from sglang_kascade.eval.launch import embedded_model_path, free_port, server_command  # noqa: F401

# Sparse prefill at every length: the CPU default prefills prompts under 4096 tokens dense, so
# server tests of the sparse prefill path (short prompts) ask for it.
SPARSE_PREFILL = ["--kascade-dense-prefill-below", "0"]

STARTUP_TIMEOUT_S = 420


@contextmanager
def running_server(backend: str = "kascade", extra=(), model_path=None, device="cpu"):
    """Yield the base URL of a ready server; the process group is killed afterwards."""
    with launch.running_server(backend, extra, model_path, device,
                               startup_timeout_s=STARTUP_TIMEOUT_S) as server:
        yield server.url


def run_server_expecting_failure(backend: str, extra=(), timeout=STARTUP_TIMEOUT_S):
    """Start a server that must refuse to start; return (returncode, combined output)."""
    port = free_port()
    proc = subprocess.Popen(server_command(port, backend, extra), env=launch.server_env("cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    started = False
    while proc.poll() is None and time.time() < deadline:
        try:
            started = requests.get(url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            pass
        if started:
            break
        time.sleep(2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return (None if started else proc.returncode), out


def flush_cache(url: str, timeout_s: float = 60.0) -> None:
    """Empty the radix cache. SGLang answers 400 while the scheduler still has work in flight
    (e.g. just after a response was sent), so retry until it is idle."""
    deadline = time.time() + timeout_s
    while True:
        r = requests.post(url + "/flush_cache", timeout=60)
        if r.status_code == 200:
            return
        if time.time() > deadline:
            r.raise_for_status()
        time.sleep(0.5)


def generate(url, *, text=None, input_ids=None, max_new_tokens=16, top_logprobs=0):
    body = {"sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0}}
    if top_logprobs:  # meta_info gains output_token_logprobs / output_top_logprobs
        body.update(return_logprob=True, top_logprobs_num=top_logprobs)
    if text is not None:
        body["text"] = text
    else:
        body["input_ids"] = input_ids
    r = requests.post(url + "/generate", json=body, timeout=900)
    r.raise_for_status()
    return r.json()


def assert_greedy_runs_agree(a: dict, b: dict, *, near_tie=0.1, logprob_tol=0.25, min_agree=4):
    """Two greedy runs of one prompt computed in different orders (chunked prefill, other page
    size): a sparse selection is a Top-k, so float rounding can swap keys of almost equal score
    and move logits slightly. Required: the same tokens until a step where either run's top-2
    logprobs are within ``near_tie`` (a coin flip; the runs may part there), chosen-token
    logprobs within ``logprob_tol`` before it, and at least ``min_agree`` equal tokens. Both
    runs need ``generate(..., top_logprobs=2)``."""
    ta, tb = (r["meta_info"]["output_token_logprobs"] for r in (a, b))
    ka, kb = (r["meta_info"]["output_top_logprobs"] for r in (a, b))
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x[1] != y[1]:
            margins = [top[0][0] - top[1][0] for top in (ka[i], kb[i])]
            assert min(margins) < near_tie, f"runs part at step {i} without a near tie: {margins}"
            assert i >= min_agree, f"runs part at step {i} (< {min_agree})"
            return
        assert abs(x[0] - y[0]) < logprob_tol, f"step {i}: logprob {x[0]} vs {y[0]}"


WORDS = ("river stone garden lantern copper meadow harbor violet winter signal orchard "
         "canyon silver thunder pepper marble falcon ribbon velvet compass").split()


def generated_text(n_sentences: int, seed: int) -> str:
    """Deterministic filler prose (no dataset needed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def passkey_prompt(n_sentences: int, key: str, seed: int = 0) -> str:
    filler = generated_text(n_sentences, seed)
    cut = len(filler) // 2
    return (filler[:cut] + f" The pass key is {key}. Remember it. {key} is the pass key. "
            + filler[cut:] + "\nWhat is the pass key? The pass key is")
