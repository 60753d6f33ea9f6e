"""The hot-swap channel between the admin sidecar and the backend in every scheduler process.

One control directory per served port (mode 0700, owner only) holds plain JSON files:

  schedulers/<pid>.json  written by each scheduler's backend: model fingerprint, the profile every
                         forward pass from now on uses, applied / staged / rejected generations
  request.json           written by the sidecar: the newest activation {generation, profile}
  stats/<pid>.json       counters for the sidecar's /metrics, written at most once a second
  history.jsonl, audit.log, settled.json, profiles/   the sidecar's own records (server/)

The directory is this user's only (``prepare_control_dir``): whoever can write into it decides
which profile every scheduler serves.

Every write goes to a temporary file that is then renamed over the target, so a reader sees the
old file or the new one, never half of one. Why files and not SGLang's control path:
SGLang's HTTP server (0.5.17-0.5.23) has no generic call into the scheduler processes (``collective_rpc`` exists
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
import re
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .config import KascadeConfigError

logger = logging.getLogger("sglang_kascade")

POLL_S = 0.05
STATS_EVERY_S = 1.0


def default_control_base() -> Path:
    """The per-user folder holding one control directory per served port.

    ``$XDG_RUNTIME_DIR/sglang-kascade`` when that variable names an absolute path (a folder only
    this user can enter, made by the login manager), else ``$TMPDIR/sglang-kascade-<uid>``: a
    predictable name in a shared folder, so ``prepare_control_dir`` checks who made it. The server
    and a separately started sidecar derive the same path only if they see the same
    ``XDG_RUNTIME_DIR`` and ``TMPDIR``; otherwise pass ``--control-dir`` explicitly.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "sglang-kascade"
    return Path(tempfile.gettempdir()) / f"sglang-kascade-{os.getuid()}"


def default_control_dir(port: int) -> Path:
    """The directory shared by a server on ``port`` and its sidecar, unless one is given."""
    return default_control_base() / str(port)


class ControlDirError(KascadeConfigError):
    """The control directory is not safe to use. Start-up is refused rather than hot-swap turned
    off quietly: whoever can write into it decides which profile every scheduler serves."""


def _who(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _check_private(path: Path, uid: int) -> None:
    """A level of the control directory this server owns: a real directory (no symlink), owned
    by this user, nobody else may write into it. Read/search bits for others alone are
    tightened to 0700 (nobody else could have put anything inside); anything else is refused."""
    st = os.lstat(path)
    where = f"control directory level {path}"
    if stat.S_ISLNK(st.st_mode):
        raise ControlDirError(f"{where} is a symlink; refusing it (the link could be repointed). "
                              "Use a real directory or choose another control directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ControlDirError(f"{where} exists and is not a directory")
    if st.st_uid != uid:
        raise ControlDirError(f"{where} is owned by {_who(st.st_uid)}, not by this user "
                              f"({_who(uid)}); refusing it (its owner could swap the served "
                              "profile). Remove it or choose another control directory")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ControlDirError(f"{where} has mode {stat.S_IMODE(st.st_mode):04o}: writable by "
                              "group or others, who may have placed files in it; refusing it. "
                              "Remove it (it holds only state that is rebuilt) or choose another "
                              "control directory")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700, follow_symlinks=False)


def _check_ancestor(path: Path, uid: int) -> None:
    """A folder above the control directory: owned by root or this user, and not writable by
    others unless sticky (as /tmp): otherwise someone else could rename the levels below."""
    st = os.lstat(path)
    if st.st_uid not in (0, uid):
        raise ControlDirError(f"{path} (above the control directory) is owned by "
                              f"{_who(st.st_uid)}; refusing a control directory under it")
    if (stat.S_ISDIR(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            and not st.st_mode & stat.S_ISVTX):
        raise ControlDirError(f"{path} (above the control directory) has mode "
                              f"{stat.S_IMODE(st.st_mode):04o}: others may rename what is inside; "
                              "refusing a control directory under it")


def prepare_control_dir(root) -> Path:
    """Create the control directory (mode 0700 at every level created) or check an existing one.

    Private levels (checked by ``_check_private``): the directory itself, every level created
    here, and the per-user base of the default path (``default_control_base``). Every folder
    above them, and every folder on the way to what a symlink above them points at, must satisfy
    ``_check_ancestor``. Raises ControlDirError naming the path and the reason.
    """
    root = Path(os.path.abspath(root))
    uid = os.geteuid()
    private = {root}
    if root.parent == Path(os.path.abspath(default_control_base())):
        private.add(root.parent)
    missing = []
    p = root
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for level in (p, *p.parents):
        if level not in private:
            _check_ancestor(level, uid)
    if p in private:  # an existing private level: checked before anything is made inside it
        _check_private(p, uid)
    real = Path(os.path.realpath(p))
    if real != p:  # a symlink above the private levels: its target's way must be safe too
        for level in (real, *real.parents):
            _check_ancestor(level, uid)
    for level in reversed(missing):
        try:
            os.mkdir(level, 0o700)
        except FileExistsError:  # made meanwhile (another scheduler): checked below
            pass
        private.add(level)
    for level in sorted(private, key=lambda q: len(q.parts)):  # outermost first
        _check_private(level, uid)
    return root


def ensure_dir(path: Path) -> Path:
    """A sub-folder of the (already checked) control directory, mode 0700."""
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
    except (OSError, ValueError, RecursionError):
        return None


PID_LIMIT = 1 << 22  # the kernel's ceiling for pid_max (PID_MAX_LIMIT on 64-bit Linux)


def pid_max() -> int:
    """The largest PID this kernel hands out (``/proc/sys/kernel/pid_max``, else 2^22)."""
    try:
        return min(int(Path("/proc/sys/kernel/pid_max").read_text().strip()), PID_LIMIT)
    except (OSError, ValueError):
        return PID_LIMIT


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists. Only a real PID counts: 0 and negative numbers address
    process groups (``kill(0, 0)`` always succeeds), so they are never alive."""
    if not isinstance(pid, int) or pid <= 0 or pid > PID_LIMIT:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


_PID_NAME = re.compile(r"[1-9][0-9]{0,6}\.json", re.ASCII)


def pid_of(path: Path) -> Optional[int]:
    """The PID a ``schedulers/`` or ``stats/`` file is named after, or None for anything else
    (a stray file: non-ASCII digits, leading zeros, 0, beyond pid_max, not a regular file)."""
    if not _PID_NAME.fullmatch(path.name):
        return None
    pid = int(path.name[:-5])
    return pid if pid <= pid_max() else None


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
            pid = pid_of(p)
            if pid is not None and pid_alive(pid):
                data = read_json(p)
                if isinstance(data, dict):
                    found[pid] = data
        return found

    def live_schedulers(self) -> dict:
        return self.live_files(self.schedulers)

    def live_stats(self) -> dict:
        return self.live_files(self.stats)

    def remove_stale(self) -> None:
        for folder in (self.schedulers, self.stats):
            for p in folder.glob("*.json") if folder.is_dir() else []:
                pid = pid_of(p)
                if pid is not None and not pid_alive(pid) and p.is_file():
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
        self.paths = ControlPaths(prepare_control_dir(root))
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

    def agree(self, why: Optional[str]) -> Optional[str]:
        """The outcome of a staged profile over the processes that must apply it together: this
        process alone (under TP, tp_sync.TPControl gathers every rank's)."""
        return why

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
