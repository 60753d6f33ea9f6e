"""Profiles the sidecar can activate: the shipped ones (read-only) and uploaded ones (a folder).

Uploaded profiles are parsed with ``json.loads`` and checked by the same validator the backend
uses (sglang_kascade/profile.py); nothing uploaded is ever executed or imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sglang_kascade.control import ensure_dir, read_json, write_json_atomic
from sglang_kascade.profile import (AnchorProfile, ModelFingerprint, profile_from_dict,
                                    shipped_profiles_dir)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # matched whole (fullmatch)


class StoreError(Exception):
    """A request the store refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def canonical_sha256(data: dict) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StoreError(422, f"profile field 'name': {name!r} must match {NAME_RE.pattern} "
                              "(letters, digits, '.', '_', '-'; at most 64 characters)")
    return name


def validate_for_model(data, fp: Optional[ModelFingerprint]) -> AnchorProfile:
    """Parse + validate (schema, ranges, then the served model). Raises StoreError(422)."""
    from sglang_kascade.config import KascadeConfigError

    try:
        profile = profile_from_dict(data)
        if fp is not None:
            profile.check_model(fp)
    except KascadeConfigError as e:
        raise StoreError(422, str(e)) from e
    return profile


@dataclass(frozen=True)
class StoredProfile:
    name: str
    source: str  # "shipped" | "uploaded"
    data: dict

    @property
    def sha256(self) -> str:
        return canonical_sha256(self.data)


@dataclass
class _Entry:
    """What a listing needs of one stored file, read and validated once per change of the file
    (its stamp: inode, size, mtime), not per request."""
    name: str
    source: str
    path: Path
    stamp: tuple
    sha256: str
    size: int
    anchor_layers: Optional[list]
    topk_fraction: Optional[float]
    compat: dict  # fingerprint key -> (compatible, problem)


def _fp_key(fp: Optional[ModelFingerprint]) -> str:
    return "none" if fp is None else json.dumps(fp.to_json(), sort_keys=True)


def stored_bytes(data: dict) -> int:
    """The size of the file ``write_json_atomic`` writes for ``data``."""
    return len(json.dumps(data).encode("utf-8"))


class ProfileStore:
    """Shipped profiles (read-only) and uploaded ones (``upload_dir``), with a quota on the
    uploaded ones: at most ``max_profiles`` files and ``max_bytes`` bytes together.

    Listing is served from a cache of ``_Entry``: a list stats each file (one ``stat`` per
    profile) and re-reads only those that changed, so each profile is parsed and validated once
    per upload (or per change of the served model), however often it is listed. Thread-safe:
    the sidecar calls it from worker threads, off the event loop.
    """

    def __init__(self, upload_dir: Path, shipped_dir: Optional[Path] = None,
                 max_profiles: int = 100, max_bytes: int = 64 << 20):
        self.upload_dir = ensure_dir(Path(upload_dir))
        self.shipped_dir = Path(shipped_dir) if shipped_dir else shipped_profiles_dir()
        self.max_profiles = max_profiles
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._cache: dict = {}  # (source, name) -> _Entry

    # ---- the cache -------------------------------------------------------------------------

    def _scan_folder(self, folder: Path, source: str) -> dict:
        found = {}
        try:
            with os.scandir(folder) as it:
                files = sorted(it, key=lambda e: e.name)
        except OSError:
            return found
        for f in files:
            name = f.name[:-5] if f.name.endswith(".json") else None
            if name is None or not NAME_RE.fullmatch(name):
                continue  # stray file (or a name the API would never write)
            try:
                st = f.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            entry = self._cache.get((source, name))
            if entry is None or entry.stamp != stamp:
                data = read_json(Path(f.path))
                if not isinstance(data, dict):
                    continue
                entry = self._entry(name, source, Path(f.path), stamp, data)
            found[(source, name)] = entry
        return found

    @staticmethod
    def _entry(name, source, path, stamp, data, compat=None) -> _Entry:
        anchors = data.get("anchor_layers")
        fraction = data.get("topk_fraction")
        return _Entry(name, source, path, stamp, canonical_sha256(data), stamp[1],
                      anchors if isinstance(anchors, list) else None,
                      fraction if isinstance(fraction, (int, float))
                      and not isinstance(fraction, bool) else None,
                      dict(compat or {}))

    def _scan(self) -> dict:
        """{name: _Entry}, uploaded and shipped (a shipped name cannot be shadowed)."""
        with self._lock:
            cache = {**self._scan_folder(self.upload_dir, "uploaded"),
                     **self._scan_folder(self.shipped_dir, "shipped")}
            self._cache = cache
            out = {}
            for (source, name), entry in cache.items():
                if source == "shipped" or name not in out:
                    out[name] = entry
            return out

    def summaries(self, fp: Optional[ModelFingerprint], active_sha: Optional[str]) -> list:
        key = _fp_key(fp)
        out = []
        for name, e in sorted(self._scan().items()):
            if key not in e.compat:  # first list since the file changed, or another model
                data = read_json(e.path)
                try:
                    validate_for_model(data, fp)
                    e.compat[key] = (True if fp is not None else None, None)
                except StoreError as err:
                    e.compat[key] = (False, err.message)
            compatible, problem = e.compat[key]
            out.append({"name": name, "source": e.source, "sha256": e.sha256,
                        "anchor_layers": e.anchor_layers, "topk_fraction": e.topk_fraction,
                        "compatible": compatible, "problem": problem,
                        "active": e.sha256 == active_sha})
        return out

    # ---- reading ---------------------------------------------------------------------------

    def all(self) -> dict:
        return {name: StoredProfile(name, e.source, read_json(e.path))
                for name, e in self._scan().items()}

    def get(self, name: str) -> StoredProfile:
        entry = self._scan().get(name) if isinstance(name, str) else None
        data = read_json(entry.path) if entry is not None else None
        if not isinstance(data, dict):
            raise StoreError(404, f"no profile named {name!r}")
        return StoredProfile(name, entry.source, data)

    def get_uploaded_sha(self, name) -> Optional[str]:
        entry = self._scan().get(name) if isinstance(name, str) else None
        return entry.sha256 if entry is not None and entry.source == "uploaded" else None

    def usage(self) -> tuple[int, int]:
        """(uploaded profiles, their bytes)."""
        with self._lock:
            self._scan()
            up = [e for (source, _), e in self._cache.items() if source == "uploaded"]
            return len(up), sum(e.size for e in up)

    # ---- changes ---------------------------------------------------------------------------

    def put(self, data: dict, replace: bool = False,
            fp: Optional[ModelFingerprint] = None) -> tuple[StoredProfile, bool]:
        """Store a validated profile under its ``name``. Returns (profile, created). ``fp``: the
        model it was validated against (its listing then needs no second validation)."""
        name = check_name(data.get("name"))
        new = StoredProfile(name, "uploaded", data)
        with self._lock:
            found = self._scan()
            if name in found and found[name].source == "shipped":
                raise StoreError(409, f"profile name {name!r} is a shipped profile; "
                                      "choose another")
            existing = found.get(name)
            if existing is not None:
                if existing.sha256 == new.sha256:
                    return StoredProfile(name, "uploaded", data), False
                if not replace:
                    raise StoreError(409, f"profile {name!r} exists with other content "
                                          "(upload with ?replace=true to overwrite it)")
            count, used = self.usage()
            size = stored_bytes(data)
            if existing is not None:
                count, used = count - 1, used - existing.size
            if count + 1 > self.max_profiles:
                raise StoreError(409, f"the store holds {count} uploaded profiles, the most "
                                      f"allowed (--max-profiles {self.max_profiles}); delete one "
                                      "(DELETE /v1/profiles/NAME) first")
            if used + size > self.max_bytes:
                raise StoreError(413, f"storing {name!r} ({size} bytes) would bring uploaded "
                                      f"profiles to {used + size} bytes, over --max-store-bytes "
                                      f"{self.max_bytes}; delete one (DELETE /v1/profiles/NAME) "
                                      "first")
            path = self.upload_dir / f"{name}.json"
            write_json_atomic(path, data)
            st = path.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            compat = {_fp_key(fp): (True, None)} if fp is not None else None
            self._cache[("uploaded", name)] = self._entry(name, "uploaded", path, stamp, data,
                                                          compat)
        return new, True

    def delete(self, name: str) -> StoredProfile:
        """Remove an uploaded profile. 404 unknown; 409 shipped."""
        with self._lock:
            stored = self.get(name)
            if stored.source == "shipped":
                raise StoreError(409, f"profile {name!r} is shipped; it cannot be deleted")
            (self.upload_dir / f"{name}.json").unlink(missing_ok=True)
            self._cache.pop(("uploaded", name), None)
            return stored
