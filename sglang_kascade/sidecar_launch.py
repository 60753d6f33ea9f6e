"""Start the admin sidecar next to the server when ``--kascade-admin-port`` asks for it.

Runs in the launcher process (from the ``ServerArgs.from_cli_args`` hook). The sidecar is its own
process (server/cli.py); it exits when the launcher does (``--exit-with-pid``), and the launcher
also terminates it at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys

from .config import ADMIN_TOKEN_ENV as TOKEN_ENV
from .config import CONTROL_OFF, KascadeConfigError, KascadeOptions
from .control import default_control_dir, prepare_control_dir

logger = logging.getLogger("sglang_kascade")


def sidecar_command(options: KascadeOptions, host: str, port: int) -> list:
    if options.control_dir == CONTROL_OFF:
        raise KascadeConfigError("--kascade-admin-port needs hot-swap: drop --kascade-control-dir off")
    if not options.admin_token_file and not os.environ.get(TOKEN_ENV):
        raise KascadeConfigError(f"--kascade-admin-port needs a token: --kascade-admin-token-file "
                                 f"FILE or the {TOKEN_ENV} environment variable")
    server_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    cmd = [sys.executable, "-m", "sglang_kascade.server",
           "--server-url", f"http://{server_host}:{port}",
           "--port", str(options.admin_port),
           "--control-dir", options.control_dir or str(default_control_dir(port)),
           "--exit-with-pid", str(os.getpid())]
    if options.admin_token_file:
        cmd += ["--token-file", options.admin_token_file]
    return cmd


def start_sidecar(options: KascadeOptions, host: str, port: int) -> subprocess.Popen:
    cmd = sidecar_command(options, host, port)
    # The control directory is checked here, in the launcher, so an unsafe one stops the start
    # before any model loads (ControlDirError is a KascadeConfigError naming the path).
    prepare_control_dir(cmd[cmd.index("--control-dir") + 1])
    proc = subprocess.Popen(cmd)
    atexit.register(proc.terminate)
    logger.info("kascade: admin sidecar on 127.0.0.1:%d (pid %d)", options.admin_port, proc.pid)
    return proc
