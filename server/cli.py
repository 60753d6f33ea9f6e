"""``python -m sglang_kascade.server``: run the admin sidecar with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from sglang_kascade.control import ControlDirError, default_control_dir, pid_alive

from .auth import TOKEN_ENV, TokenError, load_token
from .sidecar import SidecarSettings

logger = logging.getLogger("sglang_kascade.sidecar")
DEFAULT_PORT = 30100


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sglang_kascade.server",
                                description="Admin sidecar of sglang-kascade: profile hot-swap "
                                            "and Prometheus metrics (docs/operations.md).")
    p.add_argument("--server-url", default="http://127.0.0.1:30000",
                   help="the SGLang server (its port also names the default control directory)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--control-dir", default=None,
                   help="control directory shared with the server (default: "
                        "$XDG_RUNTIME_DIR/sglang-kascade/<server port> if XDG_RUNTIME_DIR is "
                        "set, else $TMPDIR/sglang-kascade-<uid>/<server port>, as the server "
                        "derives it); must be this user's, mode 0700, not a symlink")
    p.add_argument("--token-file", default=None,
                   help=f"file holding the bearer token (else the {TOKEN_ENV} environment variable)")
    p.add_argument("--max-upload-bytes", type=int, default=1 << 20)
    p.add_argument("--max-profiles", type=int, default=100,
                   help="uploaded profiles kept at most (more: 409)")
    p.add_argument("--max-store-bytes", type=int, default=64 << 20,
                   help="bytes of uploaded profiles together at most (more: 413)")
    p.add_argument("--activation-timeout", type=float, default=15.0,
                   help="seconds to wait for every scheduler to stage an activation")
    p.add_argument("--audit-log", default=None, help="default: <control dir>/audit.log")
    p.add_argument("--exit-with-pid", type=int, default=None,
                   help="exit when this process ends (used when the plugin starts the sidecar)")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> SidecarSettings:
    url = urlparse(args.server_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SystemExit(f"--server-url {args.server_url!r}: expected http://HOST:PORT")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        token, warnings = load_token(args.token_file)
    except TokenError as e:
        raise SystemExit(f"sglang-kascade sidecar: {e}") from e
    for w in warnings:
        logger.warning(w)
    if args.max_upload_bytes < 1024:
        raise SystemExit("--max-upload-bytes must be at least 1024")
    if args.max_profiles < 1:
        raise SystemExit("--max-profiles must be at least 1")
    if args.max_store_bytes < args.max_upload_bytes:
        raise SystemExit("--max-store-bytes must be at least --max-upload-bytes")
    return SidecarSettings(
        control_dir=Path(args.control_dir) if args.control_dir else default_control_dir(port),
        server_url=args.server_url,
        token=token,
        max_upload_bytes=args.max_upload_bytes,
        activation_timeout_s=args.activation_timeout,
        audit_log=Path(args.audit_log) if args.audit_log else None,
        max_profiles=args.max_profiles,
        max_store_bytes=args.max_store_bytes,
    )


def _exit_with(pid: int) -> None:
    def watch():
        while pid_alive(pid):
            time.sleep(1)
        logger.info("sidecar: process %d ended; exiting", pid)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    settings = settings_from_args(args)
    if not _is_loopback(args.host):
        logger.warning("sidecar binds to %s: reachable beyond this machine; keep the token "
                       "secret and put TLS in front of it", args.host)
    if args.exit_with_pid:
        _exit_with(args.exit_with_pid)
    import uvicorn

    from .app import create_app

    logger.info("sidecar: control dir %s, server %s, listening on %s:%d",
                settings.control_dir, settings.server_url, args.host, args.port)
    try:
        app = create_app(settings)  # checks (or creates) the control directory
    except ControlDirError as e:
        raise SystemExit(f"sglang-kascade sidecar: {e}") from e
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
