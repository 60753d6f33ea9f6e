"""bench/plot_side_by_side.py renders the committed raw results (the results pages' PNGs are made
by these commands): each mode on its files, a PNG written. CPU only, a few seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RES = ROOT / "bench" / "results"

CASES = {
    "prefill": ["prefill_kernels_h200_untuned.json", "prefill_kernels_h200_tuned.json"],
    "step": ["e2e_h100.json"],
    "decode": ["16", "decode_kernels_h100_five_launch.json", "decode_kernels_h100_collect.json"],
}


@pytest.mark.parametrize("mode", sorted(CASES))
def test_plot_side_by_side_renders_committed_results(mode, tmp_path):
    out = tmp_path / f"{mode}.png"
    args = [a if a.isdigit() else str(RES / a) for a in CASES[mode]]
    subprocess.run([sys.executable, str(ROOT / "bench" / "plot_side_by_side.py"), mode, str(out),
                    *args], check=True, cwd=tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_side_by_side_decode_rejects_a_batch_not_measured(tmp_path):
    """A batch size the files do not hold is an error, not an empty chart."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "plot_side_by_side.py"), "decode",
                        str(tmp_path / "x.png"), "7",
                        str(RES / "decode_kernels_h100_collect.json")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "batch 7" in r.stderr
    assert not (tmp_path / "x.png").exists()
