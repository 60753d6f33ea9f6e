"""Every Triton kernel variant the device path launches compiles for Hopper (sm_90), checked on a
machine without a GPU (tests/helpers/sm90_variants.py): the variants the start-up warm-up
compiles (eager decode and prefill) and those a captured decode graph launches, recorded under
the interpreter for served model shapes and compiled to cubins with this machine's Triton.
Each variant must compile and fit a Hopper block's shared memory. The prefill tile limit
(config.prefill_tile_problem, measured on an H100) is checked from both sides: the largest tile
it allows fits, the next one it refuses does not.

Not a GPU test (no marker): the kernels' values are checked by the GPU tests in tests/gpu/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_kascade.config import prefill_tile_problem

pytest.importorskip("triton")

from sm90_variants import SM90_SMEM_BYTES  # tests/helpers (pythonpath in pyproject.toml)

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "sm90_variants.py"

# What a served model launches (the served dtype): every kernel of the device path.
KERNELS = {"_score_kernel", "_pool_kernel", "_hist_kernel", "_collect_kernel",
           "_cand_select_kernel", "_compact_kernel", "_combine_kernel", "_sparse_decode_kernel",
           "_lse_kernel", "_prefill_sparse_kernel", "_graph_plan_kernel"}


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return Path(get_ptxas(90).path).exists()
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _ptxas_available(),
                                reason="Triton's NVIDIA backend (ptxas) is not installed")


def variants(tmp_path, hq, hkv, d, tile, dtype="bfloat16") -> list:
    """Record under the interpreter, compile with it off: one result per variant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rec, out = tmp_path / "variants.json", tmp_path / "compiled.json"
    steps = (["record", str(rec), "--hq", str(hq), "--hkv", str(hkv), "--d", str(d),
              "--dtype", dtype, "--tile", str(tile)], ["compile", str(rec), str(out)])
    for step, extra in zip(steps, ({"TRITON_INTERPRET": "1"}, {})):
        res = subprocess.run([sys.executable, str(HELPER), *step], env={**env, **extra},
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("hq,hkv,d,tile", [
    (32, 8, 128, 32),  # Llama-3.1-8B, the default tile
    (9, 3, 64, 16),  # SmolLM2-135M (the embedded model): group 3, head dim 64, tiles of 16
    (8, 1, 128, 32),  # Llama-3.1-70B, one TP-8 rank
    (32, 8, 128, 128),  # the largest tile prefill_tile_problem allows at group 4, head dim 128
], ids=["llama-8b", "smollm2", "llama-70b-tp8-rank", "llama-8b-tile128"])
def test_every_variant_compiles_for_sm90_and_fits_shared_memory(tmp_path, hq, hkv, d, tile):
    assert prefill_tile_problem(tile, hq // hkv, d) is None
    got = variants(tmp_path, hq, hkv, d, tile)
    assert {v["name"] for v in got} == KERNELS
    failed = [f"{v['name']} {v['constexprs']}: {v['error']}" for v in got if not v["ok"]]
    assert failed == [], "\n".join(failed)
    over = [(v["name"], v["shared"]) for v in got if v["shared"] > SM90_SMEM_BYTES]
    assert over == [], over


def test_the_first_tile_refused_needs_more_shared_memory_than_a_block_has(tmp_path):
    """Tile 256 at group 4, head dim 128: 1,024 query rows per prefill block, refused at
    start-up; compiled, its prefill kernels need more than a Hopper block's shared memory (or
    do not compile), which is what the refusal prevents."""
    assert prefill_tile_problem(256, 4, 128) is not None
    got = variants(tmp_path, 32, 8, 128, 256)
    prefill = [v for v in got if v["name"] in ("_prefill_sparse_kernel", "_lse_kernel",
                                               "_pool_kernel")]
    assert prefill and any(not v["ok"] or v["shared"] > SM90_SMEM_BYTES for v in prefill)
