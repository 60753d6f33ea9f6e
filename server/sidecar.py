"""What the admin sidecar does, without HTTP: read the schedulers' state, store and activate
profiles over the control channel (sglang_kascade/control.py), keep history and an audit log.

app.py maps these operations onto FastAPI routes. Errors are ``StoreError(status, message)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

from sglang_kascade.control import (ControlPaths, prepare_control_dir, read_json,
                                    write_json_atomic)
from sglang_kascade.profile import FINGERPRINT_FIELDS, ModelFingerprint

from .store import ProfileStore, StoredProfile, StoreError, canonical_sha256, validate_for_model

logger = logging.getLogger("sglang_kascade.sidecar")

HISTORY_KEEP = 1000
WAIT_POLL_S = 0.02


@dataclass(frozen=True)
class SidecarSettings:
    control_dir: Path
    server_url: str  # the SGLang server, for /flush_cache
    token: str
    max_upload_bytes: int = 1 << 20
    activation_timeout_s: float = 15.0
    audit_log: Optional[Path] = None  # default: <control_dir>/audit.log
    max_profiles: int = 100  # uploaded profiles kept at most
    max_store_bytes: int = 64 << 20  # their bytes together


class Sidecar:
    """Changes (upload, delete, activate) run one at a time under ``_lock``: an upload that
    replaces a profile cannot slip in while that profile is being activated, so the profile the
    schedulers serve is always the content stored under its name (replacing or deleting the
    active profile is refused).

    Audit order: an activation's audit line (``result: requested``) is written before
    ``request.json``; the outcome follows, and ``settled.json`` records the last generation whose
    outcome this sidecar recorded. ``reconcile`` (at start-up, before each activation, on
    ``/v1/history``) records in history a generation the schedulers acknowledged that was never
    settled, e.g. because the sidecar was killed mid-swap.
    """

    def __init__(self, settings: SidecarSettings, shipped_dir: Optional[Path] = None):
        self.settings = settings
        self.paths = ControlPaths(prepare_control_dir(settings.control_dir))
        self.store = ProfileStore(self.paths.root / "profiles", shipped_dir,
                                  max_profiles=settings.max_profiles,
                                  max_bytes=settings.max_store_bytes)
        self.history_file = self.paths.root / "history.jsonl"
        self.settled_file = self.paths.root / "settled.json"
        self.audit_file = Path(settings.audit_log or self.paths.root / "audit.log")
        self.swaps = {"ok": 0, "refused": 0, "timeout": 0}
        self._lock = asyncio.Lock()
        try:
            self.reconcile()
        except StoreError as e:  # an unreadable history is reported by the routes that need it
            logger.warning("sidecar: history not reconciled at start-up: %s", e.message)

    # ---- reading state ---------------------------------------------------------------------

    def schedulers(self) -> dict:
        """Live schedulers whose file has the shape SchedulerChannel writes (stray or
        hand-made files are ignored rather than break every route)."""
        return {pid: s for pid, s in self.paths.live_schedulers().items() if _well_formed(s)}

    def fingerprint(self) -> ModelFingerprint:
        scheds = self.schedulers()
        if not scheds:
            raise StoreError(503, "no live kascade scheduler in the control directory "
                                  f"{self.paths.root} (is the SGLang server up with "
                                  "--attention-backend kascade and the same --kascade-control-dir?)")
        fps = {json.dumps(s.get("fingerprint"), sort_keys=True) for s in scheds.values()}
        if len(fps) != 1:
            raise StoreError(503, "schedulers report different models: " + ", ".join(sorted(fps)))
        raw = next(iter(scheds.values()))["fingerprint"]
        return ModelFingerprint(**{f: raw[f] for f in FINGERPRINT_FIELDS})

    def active(self) -> dict:
        scheds = self.schedulers()
        views = [scheduler_view(pid, s) for pid, s in sorted(scheds.items())]
        shas = {v["current_sha256"] for v in views}
        first = views[0] if views else None
        return {
            "name": first["current_name"] if first else None,
            "sha256": first["current_sha256"] if first else None,
            "generation": max((v["current_generation"] for v in views), default=0),
            "consistent": len(shas) <= 1,
            "schedulers": views,
        }

    def history(self) -> list:
        try:
            lines = self.history_file.read_text().splitlines() if self.history_file.exists() \
                else []
        except (OSError, UnicodeDecodeError) as e:
            raise StoreError(503, f"cannot read the history {self.history_file}: {e}") from e
        out = []
        for line in lines[-HISTORY_KEEP:]:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def summaries(self) -> list:
        """The listing, from the store's cache (each profile validated once per upload and
        served model). Blocking file I/O: routes call it from a worker thread."""
        try:
            fp = self.fingerprint()
        except StoreError:
            fp = None
        return self.store.summaries(fp, self.active()["sha256"])

    def metrics_view(self) -> dict:
        active = self.active()
        return {"stats": self.paths.live_stats(), "schedulers": self.schedulers(),
                "active": active if active["sha256"] else None, "swaps": dict(self.swaps)}

    # ---- changes -----------------------------------------------------------------------------

    async def upload(self, data, replace: bool, client: str) -> tuple[StoredProfile, bool]:
        async with self._lock:  # not while an activation is under way
            return await asyncio.to_thread(self._upload, data, replace, client)

    def _upload(self, data, replace: bool, client: str) -> tuple[StoredProfile, bool]:
        try:
            if not isinstance(data, dict):
                raise StoreError(422, "profile must be a JSON object")
            fp = self.fingerprint()
            validate_for_model(data, fp)
            if replace and self.store.get_uploaded_sha(data.get("name")) == self.active()["sha256"]:
                raise StoreError(409, f"profile {data.get('name')!r} is active; activate another "
                                      "profile before replacing it")
            stored, created = self.store.put(data, replace, fp)
        except StoreError as e:
            self.audit("upload", client, name=_name_of(data), result="refused", detail=e.message)
            raise
        self.audit("upload", client, name=stored.name, sha256=stored.sha256,
                   result="created" if created else "unchanged")
        return stored, created

    async def delete(self, name: str, client: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self._delete, name, client)

    def _delete(self, name: str, client: str) -> None:
        try:
            if self.store.get_uploaded_sha(name) == self.active()["sha256"]:
                raise StoreError(409, f"profile {name!r} is active; activate another profile "
                                      "before deleting it")
            stored = self.store.delete(name)
        except StoreError as e:
            self.audit("delete", client, name=name, result="refused", detail=e.message)
            raise
        self.audit("delete", client, name=name, sha256=stored.sha256, result="deleted")

    async def activate(self, name: str, flush_cache: bool, client: str) -> dict:
        async with self._lock:  # one change at a time
            try:
                self.reconcile()
                result = await self._activate(name, client)
            except StoreError as e:
                self.audit("activate", client, name=name, result="refused", detail=e.message)
                raise
        result["flushed_cache"] = await self._flush_cache() if flush_cache else False
        return result

    def history_reconciled(self) -> list:
        """History, after recording any acknowledged generation it lacks (skipped while an
        activation holds the lock: that one records its own outcome)."""
        if not self._lock.locked():
            self.reconcile()
        return self.history()

    async def _activate(self, name: str, client: str) -> dict:
        fp = self.fingerprint()
        stored = await asyncio.to_thread(self.store.get, name)
        await asyncio.to_thread(validate_for_model, stored.data, fp)
        before = self.active()
        previous = next(iter(self.schedulers().values()))["current"]
        generation = self._next_generation(before["generation"])
        ok, why = await self._request(generation, stored.data, kind="activate", client=client,
                                      previous=before["name"])
        if not ok:
            self.swaps["refused" if why.startswith("refused") else "timeout"] += 1
            rollback = self._next_generation(generation)
            # everyone back on the profile they had
            await self._request(rollback, previous, kind="rollback", client=client,
                                previous=name)
            self._settle(rollback)
            raise StoreError(409 if why.startswith("refused") else 504,
                             f"activation of {name!r} failed ({why}); "
                             f"{before['name']!r} stays active")
        self.swaps["ok"] += 1
        self._record_history(generation, name, stored.sha256, before["name"], client)
        self.audit("activate", client, name=name, sha256=stored.sha256, result="active",
                   detail=f"generation {generation}, previous {before['name']!r}")
        self._settle(generation)
        return {"active": name, "generation": generation, "previous": before["name"],
                "applies": "from the next batch boundary of every scheduler",
                "schedulers": self.active()["schedulers"]}

    def _record_history(self, generation: int, name, sha256: str, previous, client: str,
                        **extra) -> None:
        entry = {"time": time.time(), "generation": generation, "name": name,
                 "sha256": sha256, "previous": previous, "client": client, **extra}
        try:
            with self.history_file.open("a") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as e:
            raise StoreError(503, f"cannot write the history {self.history_file}: {e}") from e

    def _settle(self, generation: int) -> None:
        """This sidecar recorded the outcome of ``generation``: reconcile leaves it alone."""
        try:
            write_json_atomic(self.settled_file, {"generation": generation, "time": time.time()})
        except OSError as e:
            raise StoreError(503, f"cannot write {self.settled_file}: {e}") from e

    def _last_history_generation(self) -> int:
        return max((h["generation"] for h in self.history()
                    if isinstance(h, dict) and _is_int(h.get("generation"))), default=0)

    def reconcile(self) -> Optional[dict]:
        """Record the newest request's generation in history (and the audit log) if every live
        scheduler acknowledged it (staged or applied; a refusal is not an acknowledgement) but no
        sidecar settled it. Returns the history entry written, or None."""
        req = read_json(self.paths.request)
        if not isinstance(req, dict) or not _is_int(req.get("generation")) \
                or not isinstance(req.get("profile"), dict):
            return None
        generation = req["generation"]
        settled = read_json(self.settled_file)
        if isinstance(settled, dict) and _is_int(settled.get("generation")) \
                and settled["generation"] >= generation:
            return None
        if self._last_history_generation() >= generation:
            return None
        scheds = self.schedulers()
        if not scheds or not all(generation in (s.get("applied_generation"),
                                                s.get("staged_generation"))
                                 for s in scheds.values()):
            return None  # not (yet) served: nothing happened that history should show
        profile = req["profile"]
        name = profile.get("name") if isinstance(profile.get("name"), str) else None
        sha = canonical_sha256(profile)
        client = req.get("client") if isinstance(req.get("client"), str) else "unknown"
        previous = req.get("previous") if isinstance(req.get("previous"), str) else None
        kind = req.get("kind") if req.get("kind") in ("activate", "rollback") else "activate"
        note = (f"{kind} acknowledged by the schedulers, recorded by a later sidecar (the one "
                "that requested it stopped before recording the outcome)")
        self._record_history(generation, name, sha, previous, client, note=note)
        self.audit("reconcile", "sidecar", name=name, sha256=sha, result="recorded",
                   detail=f"generation {generation}: {note}")
        self._settle(generation)
        logger.warning("sidecar: generation %d (%s) was served but not recorded; recorded now",
                       generation, name)
        return {"generation": generation, "name": name}

    def _next_generation(self, at_least: int) -> int:
        req = read_json(self.paths.request)
        last = req.get("generation", 0) if isinstance(req, dict) else 0
        return max(int(last) if isinstance(last, int) else 0, at_least) + 1

    async def _request(self, generation: int, profile: dict, kind: str, client: str,
                       previous: Optional[str]) -> tuple[bool, str]:
        """Audit, write the request, wait until every live scheduler has staged or refused it.

        The audit line comes first: a sidecar killed right after ``request.json`` changes has
        still recorded what it asked for. The request carries who asked and why (the schedulers
        read only ``generation`` and ``profile``), for ``reconcile``."""
        name = profile.get("name") if isinstance(profile, dict) else None
        sha = canonical_sha256(profile)
        self.audit(kind, client, name=name, sha256=sha, result="requested",
                   detail=f"generation {generation}, previous {previous!r}")
        try:
            write_json_atomic(self.paths.request, {
                "generation": generation, "profile": profile, "requested_at": time.time(),
                "kind": kind, "client": client, "previous": previous})
        except OSError as e:
            raise StoreError(503, f"cannot write {self.paths.request}: {e}") from e
        deadline = time.monotonic() + self.settings.activation_timeout_s
        while True:
            scheds = self.schedulers()
            refused = [f"{pid}: {s['rejected'].get('error')}" for pid, s in scheds.items()
                       if (s.get("rejected") or {}).get("generation") == generation]
            if refused:
                return False, "refused by scheduler " + "; ".join(refused)
            if scheds and all(s.get("current_generation", 0) >= generation
                              for s in scheds.values()):
                return True, ""
            if not scheds:
                return False, "timeout: no live scheduler"
            if time.monotonic() > deadline:
                late = [pid for pid, s in scheds.items()
                        if s.get("current_generation", 0) < generation]
                return False, f"timeout: schedulers {late} did not acknowledge in " \
                              f"{self.settings.activation_timeout_s:g} s"
            await asyncio.sleep(WAIT_POLL_S)

    async def _flush_cache(self, timeout_s: float = 30.0) -> bool:
        """SGLang answers 400 while requests are in flight: retry until idle or timeout."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=30) as http:
            while time.monotonic() < deadline:
                try:
                    r = await http.post(self.settings.server_url.rstrip("/") + "/flush_cache")
                    if r.status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        return False

    def audit(self, action: str, client: str, **fields) -> None:
        """Append one line; a change whose audit line cannot be written does not happen (503)."""
        line = {"time": time.time(), "action": action, "client": client, **fields}
        try:
            self.audit_file.parent.mkdir(parents=True, exist_ok=True)
            with self.audit_file.open("a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:
            raise StoreError(503, f"cannot write the audit log {self.audit_file}: {e}") from e
        logger.info("audit %s", json.dumps(line))


def scheduler_view(pid: int, s: dict) -> dict:
    current = s.get("current") or {}
    return {
        "pid": pid,
        "current_name": current.get("name") if isinstance(current, dict) else None,
        "current_sha256": canonical_sha256(current) if isinstance(current, dict) else None,
        "current_generation": s.get("current_generation", 0),
        "applied_generation": s.get("applied_generation"),
        "staged_generation": s.get("staged_generation"),
        "rejected": s.get("rejected"),
    }


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _well_formed(s: dict) -> bool:
    """The fields of a scheduler file the sidecar relies on."""
    fp = s.get("fingerprint")
    return (_is_int(s.get("current_generation")) and isinstance(fp, dict)
            and all(f in fp for f in FINGERPRINT_FIELDS) and isinstance(s.get("current"), dict)
            and all(x is None or _is_int(x) for x in (s.get("applied_generation"),
                                                      s.get("staged_generation")))
            and (s.get("rejected") is None or isinstance(s.get("rejected"), dict)))


def _name_of(data) -> Optional[str]:
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None
