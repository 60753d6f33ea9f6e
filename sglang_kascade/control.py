"""The hot-swap channel between the admin sidecar and the backend in every scheduler process.

One control directory per served port (mode 0700, owner only) holds plain JSON files:

  schedulers/<pid>.json  written by each scheduler's backend: model fingerprint, the profile every
                         forward pass from now on uses, applied / staged / rejected generations
  request.json           written by the sidecar: the newest activation {generation, profile}
  stats/<pid>.json       counters for the sidecar's /metrics, written at most once a second
  history.jsonl, audit.log, profiles/   the sidecar's own records (server/)

Every write goes to a temporary file that is then renamed over the target, so a reader sees the
old file or the new one, never half of one. Why files and not SGLang's control path: SGLang
0.5.21's HTTP server has no generic call into the scheduler processes (``collective_rpc`` exists
only on the in-process ``Engine``, over an IPC socket with a random name, with flat scalar
arguments; ``/set_internal_state`` takes a fixed allow-list of server-args keys), so using it would
mean patching SGLang's HTTP server and scheduler. A directory works for any number of scheduler
processes, survives a sidecar restart, needs no port, and is protected by file permissions.

Timing: a watcher thread in each scheduler polls ``request.json`` every ``POLL_S``, validates the
profile against the served model and *stages* it; the backend applies the staged profile in
``init_forward_metadata``, i.e. at the next batch boundary, for all layers of that forward pass
at once. A forward pass already running finishes with the old profile. The sidecar answers an
activation once every live scheduler has staged (or refused) it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger("sglang_kascade")

POLL_S = 0.05
STATS_EVERY_S = 1.0


def default_control_dir(port: int) -> Path:
    """The directory shared by a server on ``port`` and its sidecar, unless one is given."""
    return Path(tempfile.gettempdir()) / f"sglang-kascade-{os.getuid()}" / str(port)


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def write_json_atomic(path: Path, data) -> None:
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path):
    """The parsed file, or None if it is missing or unreadable (e.g. mid-rename on old kernels)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ControlPaths:
    root: Path

    @property
    def request(self) -> Path:
        return self.root / "request.json"

    @property
    def schedulers(self) -> Path:
        return self.root / "schedulers"

    @property
    def stats(self) -> Path:
        return self.root / "stats"

    def scheduler_file(self, pid: int) -> Path:
        return self.schedulers / f"{pid}.json"

    def stats_file(self, pid: int) -> Path:
        return self.stats / f"{pid}.json"

    def live_files(self, folder: Path) -> dict:
        """{pid: parsed JSON} of the files in ``folder`` whose process is alive."""
        found = {}
        for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            if p.stem.isdigit() and pid_alive(int(p.stem)):
                data = read_json(p)
                if isinstance(data, dict):
                    found[int(p.stem)] = data
        return found

    def live_schedulers(self) -> dict:
        return self.live_files(self.schedulers)

    def live_stats(self) -> dict:
        return self.live_files(self.stats)

    def remove_stale(self) -> None:
        for folder in (self.schedulers, self.stats):
            for p in folder.glob("*.json") if folder.is_dir() else []:
                if p.stem.isdigit() and not pid_alive(int(p.stem)):
                    p.unlink(missing_ok=True)


@dataclass(frozen=True)
class Staged:
    generation: int
    profile: object  # AnchorProfile, validated against the served model
    profile_json: dict


class SchedulerChannel:
    """The scheduler-process end: publish state, watch for requests, hand staged profiles over.

    ``validate(profile_json) -> AnchorProfile`` raises ``KascadeConfigError`` for a profile that
    is malformed or made for another model.
    """

    def __init__(self, root: Path, fingerprint: dict, validate: Callable[[dict], object],
                 active_json: dict, pid: Optional[int] = None):
        self.paths = ControlPaths(ensure_dir(Path(root)))
        self.pid = pid or os.getpid()
        self._validate = validate
        self._lock = threading.Lock()
        self._staged: Optional[Staged] = None
        self._active_json = active_json  # the profile the backend runs (last applied)
        self._taken: Optional[Staged] = None  # handed to the backend, not yet reported
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_stats = 0.0
        self._pending_stats = None  # counters held back by maybe_write_stats (flush_stats)
        self._stats_lock = threading.Lock()
        # Start-up flags win over an activation left from an earlier server on this port.
        self._seen = self._request_stamp()
        old = read_json(self.paths.request) or {}
        self.state = {
            "pid": self.pid,
            "fingerprint": fingerprint,
            "started_at": time.time(),
            "current": active_json,  # what every forward pass from now on uses
            "current_generation": int(old.get("generation", 0)) if isinstance(old, dict) else 0,
            "applied_generation": None,
            "staged_generation": None,
            "rejected": None,  # {"generation", "error"} of the last refused request
        }
        self.paths.remove_stale()
        self._publish()

    # ---- watcher thread ------------------------------------------------------------------------

    def start(self) -> "SchedulerChannel":
        self._thread = threading.Thread(target=self._watch, name="kascade-control", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.paths.scheduler_file(self.pid).unlink(missing_ok=True)
        self.paths.stats_file(self.pid).unlink(missing_ok=True)

    def _request_stamp(self):
        try:
            st = self.paths.request.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll_once()
                self.flush_stats()
            except Exception:  # never kill the thread: log and keep watching
                logger.exception("kascade: control channel poll failed")

    def poll_once(self) -> None:
        stamp = self._request_stamp()
        if stamp is None or stamp == self._seen:
            return
        self._seen = stamp
        request = read_json(self.paths.request)
        if not isinstance(request, dict) or not isinstance(request.get("generation"), int):
            return
        generation = request["generation"]
        with self._lock:
            if generation <= self.state["current_generation"]:
                return
        try:
            profile = self._validate(request.get("profile"))
        except Exception as e:  # KascadeConfigError, or anything unexpected: refuse, keep serving
            with self._lock:
                self.state["rejected"] = {"generation": generation, "error": str(e)}
                self._publish()
            logger.warning("kascade: activation %d refused: %s", generation, e)
            return
        with self._lock:
            self._staged = Staged(generation, profile, request["profile"])
            self.state.update(current=request["profile"], current_generation=generation,
                              staged_generation=generation)
            self._publish()
        logger.info("kascade: profile %s staged (generation %d); applies at the next batch",
                    request["profile"].get("name"), generation)

    # ---- main thread (batch boundary) -------------------------------------------------------

    def take_staged(self) -> Optional[Staged]:
        """The newest staged profile, once; None if nothing new. Cheap: one attribute read."""
        if self._staged is None:
            return None
        with self._lock:
            staged, self._staged = self._staged, None
            self._taken = staged
        return staged

    def report_applied(self, generation: int) -> None:
        with self._lock:
            if self._taken is not None and self._taken.generation == generation:
                self._active_json = self._taken.profile_json
            self.state["applied_generation"] = generation
            if self.state["staged_generation"] == generation:
                self.state["staged_generation"] = None
            self._publish()

    def report_refused(self, generation: int, error: str) -> None:
        """A staged profile the backend could not apply after all (what validation checked
        changed in between): the active profile stays, and the refusal is published."""
        with self._lock:
            self.state.update(current=self._active_json, staged_generation=None,
                              rejected={"generation": generation, "error": error})
            self._publish()

    def maybe_write_stats(self, stats, force: bool = False) -> None:
        """Publish the backend's counters at most every STATS_EVERY_S. ``stats``: the snapshot
        dict, or a function making it (called only when written: the backend calls this every
        forward). A call inside the interval is kept and written by the watcher thread once the
        interval has passed (flush_stats), so the counters of the last forwards before an idle
        spell are published too."""
        with self._lock:
            self._pending_stats = stats
        self.flush_stats(force)

    def flush_stats(self, force: bool = False) -> None:
        """Write the newest counters handed to maybe_write_stats if the interval has passed (or
        ``force``). Also called by the watcher thread: a snapshot made there may be one forward
        behind the backend."""
        now = time.monotonic()
        with self._lock:
            stats = self._pending_stats
            if stats is None or not (force or now - self._last_stats >= STATS_EVERY_S):
                return
            self._pending_stats = None
            self._last_stats = now
        with self._stats_lock:  # the scheduler thread and the watcher: one writer at a time
            write_json_atomic(self.paths.stats_file(self.pid),
                              stats() if callable(stats) else stats)

    def _publish(self) -> None:
        self.state["updated_at"] = time.time()
        write_json_atomic(self.paths.scheduler_file(self.pid), self.state)
