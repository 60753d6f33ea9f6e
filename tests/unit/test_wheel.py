"""The wheel users install into their own SGLang environment: built from a copy of the checkout
with pip, then read (contents, entry point, metadata) and installed into a scratch folder."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What a fresh clone lacks (.gitignore) plus version control: not copied into the build.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".gpu-stack*", ".whl", "build", "dist",
                                    "*.egg-info", "__pycache__", ".pytest_cache", "*.log")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "sglang-kascade"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: builds with this environment's setuptools, no index needed.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("sglang_kascade-*-py3-none-any.whl")
    return built


@pytest.fixture(scope="module")
def names(wheel) -> set:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def dist_info(wheel, names, leaf: str) -> str:
    (path,) = [n for n in names if re.fullmatch(r"sglang_kascade-[^/]+\.dist-info/" + leaf, n)]
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(path).decode()


def source_files(folder: str, pattern: str) -> set:
    return {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob(pattern)
            if "__pycache__" not in p.parts}


@pytest.mark.parametrize("folder, installed_as, pattern", [
    ("sglang_kascade", "sglang_kascade", "*.py"),  # calibrate/ and eval/ included
    ("kernels", "sglang_kascade/kernels", "*.py"),
    ("server", "sglang_kascade/server", "*.py"),
    ("profiles", "sglang_kascade/profiles", "*.json"),
])
def test_every_package_file_is_in_the_wheel(names, folder, installed_as, pattern):
    expected = {f"{installed_as}/{rel}" for rel in source_files(folder, pattern)}
    assert expected and expected <= names, sorted(expected - names)


def test_nothing_but_the_package_is_in_the_wheel(names):
    stray = sorted(n for n in names if not n.startswith("sglang_kascade/")
                   and not re.match(r"sglang_kascade-[^/]+\.dist-info/", n))
    assert stray == []
    assert not [n for n in names if re.search(r"(^|/)(tests|bench|docs|loadtest|scripts|results)/",
                                              n)]


def test_entry_point_registers_the_plugin(wheel, names):
    eps = configparser.ConfigParser()
    eps.read_string(dist_info(wheel, names, "entry_points.txt"))
    assert dict(eps["sglang.srt.plugins"]) == {"kascade": "sglang_kascade.plugin:register"}


def test_installing_never_touches_torch_or_sglang(wheel, names):
    """No hard requirement at all, and each extra gives lower bounds only: installing the wheel
    or an extra never downgrades (or pins) what the environment has."""
    meta = Parser().parsestr(dist_info(wheel, names, "METADATA"))
    requires = meta.get_all("Requires-Dist") or []
    assert requires and all("extra ==" in r for r in requires), requires
    bounded = [r for r in requires if re.search(r"==|<|~=|!=|===", r.split(";")[0])]
    assert bounded == []
    serve = [r.split(";")[0].replace(" ", "") for r in requires if "'serve'" in r or '"serve"' in r]
    assert serve == ["sglang>=0.5.17"]


def test_installed_wheel_serves_the_plugin(wheel, tmp_path):
    """Installed on its own (no checkout on the path), the package finds its kernels, server,
    shipped profiles and entry point."""
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                           "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = (
        "import importlib.metadata as md, sglang_kascade, sglang_kascade.kernels.tiles, "
        "sglang_kascade.server.app\n"
        "from sglang_kascade.profile import load_profile, shipped_profiles_dir\n"
        "(ep,) = [e for e in md.entry_points(group='sglang.srt.plugins') if e.name == 'kascade']\n"
        "print(sglang_kascade.__file__); print(shipped_profiles_dir())\n"
        "print(ep.dist.locate_file(''))\n"
        "print(load_profile('smollm2-135m-instruct').num_layers)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    module, profiles, dist, layers = run.stdout.split()
    for path in (module, profiles, dist):
        assert Path(path).resolve().is_relative_to(target.resolve()), path
    assert int(layers) == 30
