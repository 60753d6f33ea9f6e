"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

import sglang_kascade.profile as profile_mod


@pytest.fixture
def shipped_dir(tmp_path, monkeypatch):
    """An isolated shipped-profiles directory (the real one may gain profiles)."""
    d = tmp_path / "shipped"
    d.mkdir()
    monkeypatch.setattr(profile_mod, "shipped_profiles_dir", lambda: d)
    return d
