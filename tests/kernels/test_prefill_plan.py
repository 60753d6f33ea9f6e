"""The batch tile plan of the prefill kernels (kernels/prefill_plan.py) against kernels/tiles.py
(one request at a time), on the CPU."""

from __future__ import annotations


import pytest


@pytest.mark.parametrize("query_tail", [0, 1, 5, 40, 200])
def test_prefill_plan_matches_extend_tiles(query_tail):
    """The batch plan tiles each request exactly as kernels/tiles.py does (CPU, no Triton),
    its query tail (single-query tiles) included."""
    from sglang_kascade.kernels.prefill_plan import plan_prefill_tiles
    from sglang_kascade.kernels.tiles import extend_tiles

    prefix, ext, tile = [0, 45, 64, 31], [100, 70, 1, 2], 32
    tiles = plan_prefill_tiles(prefix, ext, tile, "cpu", query_tail)
    row0 = 0
    for b in range(len(prefix)):
        one = extend_tiles(prefix[b], ext[b], tile, lambda s: s, "cpu", query_tail=query_tail)
        sl = slice(tiles.req_first_tile[b], tiles.req_first_tile[b + 1])
        assert tiles.tile_start[sl].tolist() == one.tile_start.tolist()
        assert (tiles.tile_q_lo[sl] - row0).tolist() == list(one.tile_q_lo)
        assert tiles.tile_q_len[sl].tolist() == [h - lo for lo, h in zip(one.tile_q_lo,
                                                                           one.tile_q_hi)]
        assert tiles.tile_p_lo[sl].tolist() == [int(one.q_pos[lo]) for lo in one.tile_q_lo]
        assert bool((tiles.tile_req[sl] == b).all())
        row0 += ext[b]
