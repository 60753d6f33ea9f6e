"""Start and stop a stock SGLang server process (``python -m sglang.launch_server``).

The launcher the sweep and the end-to-end tests (tests/helpers/server_utils.py) use:
a free port, the CPU engine switch on CPU, a log file, readiness through ``/health``, and the
whole process group killed on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import requests

STARTUP_TIMEOUT_S = 600
MAX_TOTAL_TOKENS = 24000


class LaunchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_model_path() -> str:
    from ..embedded_model import ensure_converted

    return str(ensure_converted())


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def server_command(port: int, backend: str, extra=(), model_path=None, device="cpu",
                   max_total_tokens: Optional[int] = MAX_TOTAL_TOKENS) -> list:
    """``max_total_tokens=None``: no ``--max-total-tokens``, SGLang sizes the KV pool itself
    (from ``--mem-fraction-static``), as a user's server would."""
    pool = [] if max_total_tokens is None else ["--max-total-tokens", str(max_total_tokens)]
    return [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", model_path or embedded_model_path(),
        "--device", device,
        "--attention-backend", backend,
        *pool,
        "--host", "127.0.0.1", "--port", str(port),
        "--random-seed", "0",
        *extra,
    ]


def server_env(device: str = "cpu") -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"  # SGLang's CPU engine (no vllm/CUDA imports)
    return env


def tail(path, n: int = 60) -> str:
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(True)[-n:])
    except OSError:
        return ""


@dataclass
class Server:
    url: str
    pid: int
    log: Path
    command: list


@contextmanager
def running_server(backend: str = "kascade", extra=(), model_path=None, device="cpu",
                   max_total_tokens: Optional[int] = MAX_TOTAL_TOKENS, log_path=None,
                   startup_timeout_s: float = STARTUP_TIMEOUT_S):
    """Yield a ready ``Server``; its process group is terminated afterwards."""
    port = free_port()
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="sglang-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = server_command(port, backend, extra, model_path, device, max_total_tokens)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=server_env(device), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + startup_timeout_s
            while True:
                if proc.poll() is not None:
                    raise LaunchError(f"server exited with {proc.returncode} "
                                      f"(log {log_path}):\n{tail(log_path)}")
                try:
                    if requests.get(url + "/health", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.time() > deadline:
                    raise LaunchError(f"server not ready in {startup_timeout_s:.0f}s "
                                      f"(log {log_path}):\n{tail(log_path)}")
                time.sleep(2)
            yield Server(url=url, pid=proc.pid, log=log_path, command=cmd)
        finally:
            stop(proc)


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever is left of the group (scheduler, detokenizer)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
