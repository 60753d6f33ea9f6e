"""Profiles the sidecar can activate: the shipped ones (read-only) and uploaded ones (a folder).

Uploaded profiles are parsed with ``json.loads`` and checked by the same validator the backend
uses (sglang_kascade/profile.py); nothing uploaded is ever executed or imported.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sglang_kascade.control import ensure_dir, read_json, write_json_atomic
from sglang_kascade.profile import (AnchorProfile, ModelFingerprint, profile_from_dict,
                                    shipped_profiles_dir)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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
    if not isinstance(name, str) or not NAME_RE.match(name):
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


class ProfileStore:
    def __init__(self, upload_dir: Path, shipped_dir: Optional[Path] = None):
        self.upload_dir = ensure_dir(Path(upload_dir))
        self.shipped_dir = Path(shipped_dir) if shipped_dir else shipped_profiles_dir()

    def _shipped(self) -> dict:
        found = {}
        for p in sorted(self.shipped_dir.glob("*.json")):
            data = read_json(p)
            if isinstance(data, dict):
                found[p.stem] = StoredProfile(p.stem, "shipped", data)
        return found

    def _uploaded(self) -> dict:
        found = {}
        for p in sorted(self.upload_dir.glob("*.json")):
            data = read_json(p)
            if isinstance(data, dict) and NAME_RE.match(p.stem):
                found[p.stem] = StoredProfile(p.stem, "uploaded", data)
        return found

    def all(self) -> dict:
        return {**self._uploaded(), **self._shipped()}  # a shipped name cannot be shadowed

    def get(self, name: str) -> StoredProfile:
        found = self.all().get(name)
        if found is None:
            raise StoreError(404, f"no profile named {name!r}")
        return found

    def put(self, data: dict, replace: bool = False) -> tuple[StoredProfile, bool]:
        """Store a validated profile under its ``name``. Returns (profile, created)."""
        name = check_name(data.get("name"))
        if name in self._shipped():
            raise StoreError(409, f"profile name {name!r} is a shipped profile; choose another")
        existing = self._uploaded().get(name)
        new = StoredProfile(name, "uploaded", data)
        if existing is not None:
            if existing.sha256 == new.sha256:
                return existing, False
            if not replace:
                raise StoreError(409, f"profile {name!r} exists with other content "
                                      "(upload with ?replace=true to overwrite it)")
        write_json_atomic(self.upload_dir / f"{name}.json", data)
        return new, True

    def get_uploaded_sha(self, name) -> Optional[str]:
        stored = self._uploaded().get(name) if isinstance(name, str) else None
        return stored.sha256 if stored else None
