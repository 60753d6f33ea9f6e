"""HTTP client of a running SGLang server: what it serves and greedy ``/generate``."""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field

import requests


class ServerError(RuntimeError):
    pass


@dataclass
class ServerInfo:
    url: str
    model_path: str
    context_length: int | None  # the longest sequence (prompt + output) it accepts
    max_input: int | None  # longest prompt (max_req_input_len)
    attention_backend: str | None
    launch_command: str | None
    kascade: dict = field(default_factory=dict)  # --kascade-* flags of the launch command
    version: str | None = None

    def flag(self, name: str):
        return self.kascade.get(name)


def _get(url: str, path: str, timeout: float = 30):
    r = requests.get(url.rstrip("/") + path, timeout=timeout)
    r.raise_for_status()
    return r.json()


def kascade_flags(launch_command: str | None) -> dict:
    """``--kascade-x y`` / ``--kascade-x=y`` pairs of a launch command line -> {"x": "y"}."""
    out = {}
    if not launch_command:
        return out
    try:
        argv = shlex.split(launch_command)
    except ValueError:
        argv = launch_command.split()
    for i, a in enumerate(argv):
        if a.startswith("--kascade-"):
            name, eq, value = a[len("--kascade-"):].partition("=")
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
            out[name] = value
    return out


def server_info(url: str, wait_s: float = 0) -> ServerInfo:
    """Read /model_info and /server_info (waiting up to ``wait_s`` for /health)."""
    deadline = time.time() + wait_s
    while True:
        try:
            if requests.get(url.rstrip("/") + "/health", timeout=10).status_code == 200:
                break
        except requests.RequestException as e:
            if time.time() >= deadline:
                raise ServerError(f"no SGLang server answers at {url}: {e}") from e
        if time.time() >= deadline:
            raise ServerError(f"the server at {url} is not healthy")
        time.sleep(2)
    model = _get(url, "/model_info")
    try:
        info = _get(url, "/server_info")
    except requests.RequestException:
        info = {}
    ctx = info.get("context_length")
    max_input = info.get("max_req_input_len")
    if max_input is None:
        for state in info.get("internal_states") or []:
            max_input = state.get("max_req_input_len") or max_input
    launch = info.get("launch_command")
    model_path = model.get("model_path") or model.get("tokenizer_path")
    if not ctx:
        ctx = model_context_length(model_path)
    return ServerInfo(
        url=url.rstrip("/"),
        model_path=model_path,
        context_length=int(ctx) if ctx else None,
        max_input=int(max_input) if max_input else None,
        attention_backend=info.get("attention_backend"),
        launch_command=launch,
        kascade=kascade_flags(launch),
        version=info.get("version"),
    )


def model_context_length(model_path) -> int | None:
    """The model's own context (``config.json``), for servers that do not report theirs."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    cfg = cfg.get("text_config", cfg)
    for key in ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def generate(url: str, input_ids, max_new_tokens: int, retries: int = 2,
             timeout: float = 3600) -> dict:
    """Greedy decoding of ``input_ids``; returns the server's JSON (``text``, ``meta_info``)."""
    body = {
        "input_ids": list(input_ids),
        "sampling_params": {"temperature": 0.0, "max_new_tokens": int(max_new_tokens)},
    }
    last = None
    for attempt in range(retries + 1):
        try:
            r = requests.post(url.rstrip("/") + "/generate", json=body, timeout=timeout)
            if r.status_code == 200:
                return r.json()
            last = ServerError(f"/generate answered {r.status_code}: {r.text[:500]}")
            if 400 <= r.status_code < 500:
                break  # the request itself is wrong: do not retry
        except requests.RequestException as e:
            last = e
        time.sleep(2 * (attempt + 1))
    raise ServerError(f"/generate failed: {last}")
