"""The sidecar's command line and the plugin's way of starting it (no server needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sglang_kascade.config import KascadeConfigError, KascadeOptions
from sglang_kascade.control import default_control_dir
from sglang_kascade.server.auth import TOKEN_ENV, TokenError, load_token
from sglang_kascade.server.cli import parse_args, settings_from_args
from sglang_kascade.sidecar_launch import sidecar_command


def test_token_from_file_wins_and_loose_permissions_warn(tmp_path, monkeypatch):
    f = tmp_path / "token"
    f.write_text("file-token-0123456789\n")
    f.chmod(0o644)
    monkeypatch.setenv(TOKEN_ENV, "env-token-0123456789")
    token, warnings = load_token(str(f))
    assert token == "file-token-0123456789" and "chmod 600" in warnings[0]
    f.chmod(0o600)
    assert load_token(str(f)) == ("file-token-0123456789", [])
    assert load_token(None) == ("env-token-0123456789", [])


@pytest.mark.parametrize("content,env,match", [
    (None, "", "no admin token"), ("short", None, "at least 16"), ("   \n", None, "no admin token"),
])
def test_missing_or_weak_tokens_are_refused(tmp_path, monkeypatch, content, env, match):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = None
    if content is not None:
        path = tmp_path / "t"
        path.write_text(content)
    if env is not None:
        monkeypatch.setenv(TOKEN_ENV, env)
    with pytest.raises(TokenError, match=match):
        load_token(str(path) if path else None)
    with pytest.raises(TokenError, match="cannot read"):
        load_token(str(tmp_path / "missing"))


def test_settings_default_to_the_servers_control_dir(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "x" * 20)
    s = settings_from_args(parse_args(["--server-url", "http://127.0.0.1:31234"]))
    assert s.control_dir == default_control_dir(31234)
    assert s.max_upload_bytes == 1 << 20
    with pytest.raises(SystemExit, match="expected http"):
        settings_from_args(parse_args(["--server-url", "127.0.0.1:31234"]))


def test_cli_refuses_to_start_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    r = subprocess.run([sys.executable, "-m", "sglang_kascade.server", "--port", "1"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no admin token" in r.stderr


def test_plugin_sidecar_command(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    opts = KascadeOptions(admin_port=30111, admin_token_file=str(tmp_path / "t"))
    cmd = sidecar_command(opts, "0.0.0.0", 30000)
    assert cmd[1:3] == ["-m", "sglang_kascade.server"]
    assert cmd[cmd.index("--server-url") + 1] == "http://127.0.0.1:30000"
    assert cmd[cmd.index("--control-dir") + 1] == str(default_control_dir(30000))
    assert cmd[cmd.index("--exit-with-pid") + 1] == str(os.getpid())
    assert "--host" not in cmd  # the sidecar keeps its loopback default
    with pytest.raises(KascadeConfigError, match="needs a token"):
        sidecar_command(KascadeOptions(admin_port=30111), "127.0.0.1", 30000)
    with pytest.raises(KascadeConfigError, match="needs hot-swap"):
        sidecar_command(KascadeOptions(admin_port=30111, control_dir="off",
                                       admin_token_file="t"), "127.0.0.1", 30000)
