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

from sglang_kascade.control import ControlPaths, ensure_dir, read_json, write_json_atomic
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


class Sidecar:
    def __init__(self, settings: SidecarSettings, shipped_dir: Optional[Path] = None):
        self.settings = settings
        self.paths = ControlPaths(ensure_dir(Path(settings.control_dir)))
        self.store = ProfileStore(self.paths.root / "profiles", shipped_dir)
        self.history_file = self.paths.root / "history.jsonl"
        self.audit_file = Path(settings.audit_log or self.paths.root / "audit.log")
        self.swaps = {"ok": 0, "refused": 0, "timeout": 0}
        self._lock = asyncio.Lock()

    # ---- reading state ---------------------------------------------------------------------

    def schedulers(self) -> dict:
        return self.paths.live_schedulers()

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
        lines = self.history_file.read_text().splitlines() if self.history_file.exists() else []
        out = []
        for line in lines[-HISTORY_KEEP:]:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def summaries(self) -> list:
        try:
            fp = self.fingerprint()
        except StoreError:
            fp = None
        active_sha = self.active()["sha256"]
        out = []
        for name, stored in sorted(self.store.all().items()):
            problem, compatible = None, None
            try:
                validate_for_model(stored.data, fp)
                compatible = True if fp is not None else None
            except StoreError as e:
                problem, compatible = e.message, False
            d = stored.data
            out.append({
                "name": name, "source": stored.source, "sha256": stored.sha256,
                "anchor_layers": d.get("anchor_layers") if isinstance(d.get("anchor_layers"), list)
                else None,
                "topk_fraction": d.get("topk_fraction")
                if isinstance(d.get("topk_fraction"), (int, float)) else None,
                "compatible": compatible, "problem": problem,
                "active": stored.sha256 == active_sha,
            })
        return out

    def metrics_view(self) -> dict:
        active = self.active()
        return {"stats": self.paths.live_stats(), "schedulers": self.schedulers(),
                "active": active if active["sha256"] else None, "swaps": dict(self.swaps)}

    # ---- changes -----------------------------------------------------------------------------

    def upload(self, data, replace: bool, client: str) -> tuple[StoredProfile, bool]:
        try:
            if not isinstance(data, dict):
                raise StoreError(422, "profile must be a JSON object")
            validate_for_model(data, self.fingerprint())
            if replace and self.store.get_uploaded_sha(data.get("name")) == self.active()["sha256"]:
                raise StoreError(409, f"profile {data.get('name')!r} is active; activate another "
                                      "profile before replacing it")
            stored, created = self.store.put(data, replace)
        except StoreError as e:
            self.audit("upload", client, name=_name_of(data), result="refused", detail=e.message)
            raise
        self.audit("upload", client, name=stored.name, sha256=stored.sha256,
                   result="created" if created else "unchanged")
        return stored, created

    async def activate(self, name: str, flush_cache: bool, client: str) -> dict:
        async with self._lock:  # one activation at a time
            try:
                result = await self._activate(name, client)
            except StoreError as e:
                self.audit("activate", client, name=name, result="refused", detail=e.message)
                raise
        result["flushed_cache"] = await self._flush_cache() if flush_cache else False
        return result

    async def _activate(self, name: str, client: str) -> dict:
        fp = self.fingerprint()
        stored = self.store.get(name)
        validate_for_model(stored.data, fp)
        before = self.active()
        previous = next(iter(self.schedulers().values()))["current"]
        generation = self._next_generation(before["generation"])
        ok, why = await self._request(generation, stored.data)
        if not ok:
            self.swaps["refused" if why.startswith("refused") else "timeout"] += 1
            rollback = self._next_generation(generation)
            await self._request(rollback, previous)  # everyone back on the profile they had
            raise StoreError(409 if why.startswith("refused") else 504,
                             f"activation of {name!r} failed ({why}); "
                             f"{before['name']!r} stays active")
        self.swaps["ok"] += 1
        entry = {"time": time.time(), "generation": generation, "name": name,
                 "sha256": stored.sha256, "previous": before["name"], "client": client}
        with self.history_file.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        self.audit("activate", client, name=name, sha256=stored.sha256, result="active",
                   detail=f"generation {generation}, previous {before['name']!r}")
        return {"active": name, "generation": generation, "previous": before["name"],
                "applies": "from the next batch boundary of every scheduler",
                "schedulers": self.active()["schedulers"]}

    def _next_generation(self, at_least: int) -> int:
        req = read_json(self.paths.request)
        last = req.get("generation", 0) if isinstance(req, dict) else 0
        return max(int(last) if isinstance(last, int) else 0, at_least) + 1

    async def _request(self, generation: int, profile: dict) -> tuple[bool, str]:
        """Write the request; wait until every live scheduler has staged or refused it."""
        write_json_atomic(self.paths.request, {"generation": generation, "profile": profile,
                                               "requested_at": time.time()})
        deadline = time.monotonic() + self.settings.activation_timeout_s
        while True:
            scheds = self.schedulers()
            refused = [f"{pid}: {s['rejected']['error']}" for pid, s in scheds.items()
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
        line = {"time": time.time(), "action": action, "client": client, **fields}
        ensure_dir(self.audit_file.parent)
        with self.audit_file.open("a") as f:
            f.write(json.dumps(line) + "\n")
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


def _name_of(data) -> Optional[str]:
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None
