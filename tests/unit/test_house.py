"""The tree describes the product, not its history: no development-session numbers in code, docs
or file names (results pages show the current figures; earlier ones live in git)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HISTORY = re.compile(r"\bsession[ _-]?\d+\b", re.IGNORECASE)
RUN_NUMBER_NAME = re.compile(r"(_s\d+|[_-]run\d+)(\.|_|$)", re.IGNORECASE)
TEXT = {".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".yml", ".yaml"}


def tracked_files() -> list:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split("\n")
        return [ROOT / f for f in out if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts
                and ".git" not in p.parts]


def test_no_session_numbers_in_the_tree():
    hits = []
    for path in tracked_files():
        if path.suffix not in TEXT or not path.exists() or path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert hits == [], "\n".join(hits)


def test_no_run_numbers_in_file_names():
    named = [str(p.relative_to(ROOT)) for p in tracked_files() if RUN_NUMBER_NAME.search(p.name)]
    assert named == []


def test_the_patterns_catch_what_they_are_for():
    # Samples built at run time, so this file itself holds no line the check would flag.
    assert HISTORY.search("measured in Session " + "12")
    assert HISTORY.search("session-" + "3 figures")
    assert not HISTORY.search("a session of the sidecar")
    assert RUN_NUMBER_NAME.search("decode_kernels_s7.json") and RUN_NUMBER_NAME.search("e2e_run3.md")
    assert not RUN_NUMBER_NAME.search("served_h100.json")


def test_readme_stays_a_front_page():
    """What it is, the two commands, using it, the flags, one results table, links: details live
    in docs/ (docs/status.md holds what works and what is refused)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 120, len(lines)
    assert lines[0] == "# sglang-kascade"


def test_relative_links_in_markdown_resolve():
    """Every relative link of a tracked Markdown file names a file or folder that exists."""
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for path in tracked_files():
        if path.suffix != ".md" or not path.exists():
            continue
        for target in link.findall(path.read_text(errors="replace")):
            if "://" not in target and not target.startswith("mailto:") and not (
                    path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert broken == [], "\n".join(broken)
