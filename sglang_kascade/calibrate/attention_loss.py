"""How far one layer's sparse attention is from dense attention, per query and per tile.

For one layer of one request: queries ``q [n, Hq, D]`` at positions ``tiles.q_pos``, keys and
values ``[S, Hkv, D]`` of every position, and a ``Selection`` already mapped to the layer's KV
heads (a reuse layer's ``for_heads``), as the backend attends with it.

* mass kept: per query and query head, the share of its dense softmax mass on the keys it
  attends (its tile's selected candidates and its causal diagonal block), averaged over the
  GQA group's heads: ``[Hkv, n]``, 1 for a dense selection. Averaged over a tile's queries it is
  the pooled-mass ratio the calibration's similarity uses (pooled probabilities are per-query
  probabilities summed).
* output error: the sparse output against the dense one as squared L2 norms per query and KV
  group (``err2``, ``ref2``), so any set of queries aggregates to a relative L2,
  ``sqrt(sum err2 / sum ref2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.selection_torch import Selection, block_bytes_for, query_probs, tile_blocks
from ..kernels.tiles import RequestTiles


def mass_kept(q, k_all, tiles: RequestTiles, sel: Selection, scale: float,
              block_bytes: int | None = None) -> torch.Tensor:
    """[Hkv, n] float32: each query's dense softmax mass on the keys ``sel`` lets it attend,
    averaged over the GQA group's query heads (1 for the dense tail's queries)."""
    n, hq = q.shape[0], q.shape[1]
    hkv = k_all.shape[1]
    if sel.dense:
        return torch.ones(hkv, n, device=q.device)
    block_bytes = block_bytes or block_bytes_for(q.device)
    out = torch.ones(hkv, n, device=q.device)
    tiles = tiles.selected()
    k_t = k_all.float().permute(1, 2, 0)  # [Hkv, D, S]
    for a, b in tile_blocks(tiles, row_bytes=8 * hq, block_bytes=block_bytes):
        probs = query_probs(q, k_all, tiles, a, b, scale, k_t)  # [Hkv, G, nb, L]
        lo, hi = tiles.tile_q_lo[a], tiles.tile_q_hi[b - 1]
        t = tiles.q_tile[lo:hi]  # [nb] tile of each query
        n_keys = probs.shape[-1]
        diag = torch.arange(n_keys, device=q.device)[None, :] >= tiles.tile_start[t][:, None]
        kept = (probs * diag).sum(-1)  # [Hkv, G, nb]: the causal diagonal block
        idx = sel.idx[:, t].clamp(max=n_keys - 1)  # [Hkv, nb, kmax]
        got = probs.gather(-1, idx[:, None].expand(-1, probs.shape[1], -1, -1))
        kept += (got * sel.valid[:, t][:, None]).sum(-1)  # selected candidates (< tile start)
        out[:, lo:hi] = kept.mean(1)
    return out


def output_error(out: torch.Tensor, ref: torch.Tensor, hkv: int) -> tuple:
    """(err2, ref2) [Hkv, n] float64: ||out - ref||^2 and ||ref||^2 over each query's GQA group
    (out, ref: [n, Hq, Dv])."""
    o, r = out.double().unflatten(1, (hkv, -1)), ref.double().unflatten(1, (hkv, -1))
    return (o - r).pow(2).sum((-1, -2)).T, r.pow(2).sum((-1, -2)).T


def tile_sums(x: torch.Tensor, tiles: RequestTiles) -> torch.Tensor:
    """[H, nt]: per-query values ``x [H, n]`` summed over each tile's queries."""
    out = x.new_zeros(x.shape[0], tiles.num_tiles)
    return out.index_add_(1, tiles.q_tile, x)


def tile_query_counts(tiles: RequestTiles) -> torch.Tensor:
    """[nt] float64: queries of each tile present in this extend."""
    return torch.tensor([hi - lo for lo, hi in zip(tiles.tile_q_lo, tiles.tile_q_hi)],
                        dtype=torch.float64)


@dataclass
class LayerLoss:
    """One sparse layer of one request. Per tile, over the tile's queries and all KV heads:
    ``mass`` (mean mass kept), ``err2`` / ``ref2`` (summed squared norms); ``own_mass``: the
    mass the layer's own Top-k at the same budget keeps (its oracle), where computed. ``last_*``:
    the extend's last query alone (the one whose logits give the first answer token)."""

    role: str
    mass: torch.Tensor  # [nt]
    err2: torch.Tensor  # [nt]
    ref2: torch.Tensor  # [nt]
    own_mass: torch.Tensor | None
    last_mass: float
    last_err: float


def layer_loss(role: str, q, k_all, v_all, tiles: RequestTiles, sel: Selection, scale: float,
               own: Selection | None = None) -> LayerLoss:
    """The loss of attending over ``sel`` in a layer with inputs q, k_all, v_all."""
    from ..kernels.sparse_attention_torch import dense_causal_attention, sparse_attention

    hkv = k_all.shape[1]
    counts = tile_query_counts(tiles)
    mass = mass_kept(q, k_all, tiles, sel, scale)
    ref = dense_causal_attention(q, k_all, v_all, tiles.q_pos, scale)
    err2, ref2 = output_error(sparse_attention(q, k_all, v_all, tiles, sel, scale), ref, hkv)
    own_mass = None
    if own is not None:
        own_mass = tile_sums(mass_kept(q, k_all, tiles, own, scale).double(), tiles).sum(0)
        own_mass /= counts * hkv
    return LayerLoss(
        role=role,
        mass=tile_sums(mass.double(), tiles).sum(0) / (counts * hkv),
        err2=tile_sums(err2, tiles).sum(0), ref2=tile_sums(ref2, tiles).sum(0),
        own_mass=own_mass,
        last_mass=float(mass[:, -1].mean()),
        last_err=float((err2[:, -1].sum() / ref2[:, -1].sum().clamp(min=1e-30)).sqrt()))


def budget_share(tiles: RequestTiles) -> float:
    """Share of the candidate keys an extend's queries read in a sparse layer: the sum over
    queries of their tile's budget k over the sum of their tile's start (1: dense; the causal
    diagonal, read by both, is left out)."""
    counts = tile_query_counts(tiles)
    cand = float((counts * tiles.tile_start.double()).sum())
    return float((counts * tiles.tile_k.double()).sum()) / cand if cand else 1.0
