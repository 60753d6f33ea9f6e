"""Run a Hugging Face causal LM over calibration samples and stream per-layer statistics.

The model runs with its own code; only the attention function is swapped, through
transformers' ``AttentionInterface``, for one that hands the post-RoPE queries and keys of each
layer to a ``StatsCollector`` and then computes the normal output with transformers' SDPA
function (so the residual stream is the model's own). Per sample, per layer, per KV head and
per query tile (tiles of T tokens aligned to positions t*T, as in ``kernels/tiles.py``):

* pooled probabilities A_l[h, t, :]: the softmax rows of the GQA group's query heads and the
  tile's queries, summed (``kernels.selection_torch.pooled_tile_probs``), computed one block of
  tiles at a time (at most ``block_bytes`` of scores) and dropped after the block;
* the oracle Top-k selection I_l[h, t] among the tile's candidates (keys before the tile's
  start), budget ``BudgetConfig.k_for(tile_start)``, token or page granularity, exactly as
  ``select_topk`` chooses it;
* the diagonal-tile mass D_l[h, t] (the tile's own keys, always attended);
* layer importance: 1 - cos(x_l, x_l + attn_out_l) per token, x_l the residual stream entering
  layer l and attn_out_l the attention block's output (after o_proj).

A, I and D go straight into a ``SimilarityAccumulator``; nothing of size L x L is kept.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import BudgetConfig
from ..kernels.selection_torch import DEFAULT_BLOCK_BYTES, pooled_tile_probs, tile_blocks
from ..kernels.tiles import RequestTiles, extend_tiles
from .similarity import SimilarityAccumulator

ATTN_IMPLEMENTATION = "kascade_calibrate"
NEG_INF = float("-inf")

_ACTIVE: Optional["StatsCollector"] = None


# ------------------------------------------------------------------------------------------
# Per-block pieces (pure functions, unit-tested against kernels.selection_torch.select_topk)
# ------------------------------------------------------------------------------------------
def selection_units(budget: BudgetConfig, tiles: RequestTiles) -> tuple[torch.Tensor, int, int]:
    """(k_units [nt], page, kmax): Top-k per tile in tokens (page=1) or key tiles, and the
    widest selection in positions."""
    page = budget.page_tile_size if budget.granularity == "page" else 1
    k_units = (tiles.tile_k + page - 1) // page
    kmax = int(k_units.max()) * page if k_units.numel() else 0
    return k_units, page, kmax


def block_selection(pooled: torch.Tensor, starts: torch.Tensor, k_units: torch.Tensor,
                    page: int, sentinel: int) -> torch.Tensor:
    """Top-k key positions of each tile of a block: [Hkv, nb, k] with ``sentinel`` in unused
    slots. Same rule (and same ``topk`` calls) as ``select_topk``: candidates are keys before
    the tile start; page mode picks whole key tiles of ``page`` keys by summed score."""
    hkv, nb, n_keys = pooled.shape
    dev = pooled.device
    key_pos = torch.arange(n_keys, device=dev)
    candidate = key_pos[None, :] < starts[:, None]  # [nb, L]
    if page == 1:
        kb = min(int(k_units.max()), n_keys)
        if kb == 0:
            return torch.full((hkv, nb, 0), sentinel, dtype=torch.int64, device=dev)
        top = pooled.masked_fill(~candidate, NEG_INF).topk(kb, dim=-1).indices
        ok = torch.arange(kb, device=dev)[None, :] < k_units[:, None]
        return torch.where(ok, top, sentinel)
    n_pages = math.ceil(n_keys / page)
    padded = F.pad(pooled.masked_fill(~candidate, 0.0), (0, n_pages * page - n_keys))
    page_scores = padded.unflatten(-1, (n_pages, page)).sum(-1)  # [Hkv, nb, P]
    page_start = torch.arange(n_pages, device=dev) * page
    page_scores.masked_fill_(~(page_start[None, :] < starts[:, None]), NEG_INF)
    kp = min(int(k_units.max()), n_pages)
    if kp == 0:
        return torch.full((hkv, nb, 0), sentinel, dtype=torch.int64, device=dev)
    top_pages = page_scores.topk(kp, dim=-1).indices
    pos = (top_pages[..., None] * page + torch.arange(page, device=dev)).flatten(-2)
    rank_ok = torch.arange(kp, device=dev)[None, :] < k_units[:, None]
    ok = rank_ok.repeat_interleave(page, dim=-1)[None] & (pos < starts[None, :, None])
    return torch.where(ok, pos, sentinel)


def diagonal_mass(pooled: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """D[h, t]: pooled mass on keys at or after the tile start (the tile's own keys)."""
    key_pos = torch.arange(pooled.shape[-1], device=pooled.device)
    return (pooled * (key_pos[None, :] >= starts[:, None])).sum(-1)


def token_importance_sum(x: torch.Tensor, attn_out: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of 1 - cos(x, x + attn_out), number of tokens); x: [..., hidden]."""
    x = x.float().reshape(-1, x.shape[-1])
    y = x + attn_out.float().reshape(-1, x.shape[-1])
    cos = F.cosine_similarity(x, y, dim=-1, eps=1e-12)
    return float((1.0 - cos).sum()), int(cos.numel())


# ------------------------------------------------------------------------------------------
# The collector
# ------------------------------------------------------------------------------------------
class StatsCollector:
    """Receives each layer's q/k (and residual/attention output) for one sample at a time."""

    def __init__(self, num_layers: int, num_q_heads: int, num_kv_heads: int,
                 budget: BudgetConfig, device="cpu", block_bytes: int = DEFAULT_BLOCK_BYTES,
                 score_last_tiles: Optional[int] = None, score_tile_size: Optional[int] = None):
        """``score_last_tiles``: None scores every sparse tile; N scores only the sample's last N
        tiles (the question and answer of a retrieval window); the others are not computed.
        ``score_tile_size``: the query tile of the statistics if not ``budget.tile_size`` (1 =
        one query per tile, as a decode step selects); the budget rule is unchanged."""
        self.num_layers, self.num_q_heads, self.num_kv_heads = num_layers, num_q_heads, num_kv_heads
        if score_last_tiles is not None and score_last_tiles < 1:
            raise ValueError(f"score_last_tiles={score_last_tiles}: must be >= 1")
        self.score_last_tiles = score_last_tiles
        if score_tile_size is not None and score_tile_size < 1:
            raise ValueError(f"score_tile_size={score_tile_size}: must be >= 1")
        self.tile_size = budget.tile_size if score_tile_size is None else score_tile_size
        self.budget = budget
        self.device = torch.device(device)
        self.block_bytes = block_bytes
        self.sim = SimilarityAccumulator(num_layers, num_kv_heads, device)
        self.imp_sum = torch.zeros(num_layers, dtype=torch.float64)
        self.imp_count = torch.zeros(num_layers, dtype=torch.float64)
        # diagnostics: mean over sparse tiles and heads of a layer's own Top-k + diagonal mass
        self.recall_sum = torch.zeros(num_layers, dtype=torch.float64)
        self.recall_count = torch.zeros(num_layers, dtype=torch.float64)
        self.num_sparse_tiles = 0
        self.num_tiles = 0
        self._tiles = None
        self._layers_seen: list[int] = []
        self.on_layer_done: Optional[Callable[[int], None]] = None

    def begin_sample(self, length: int) -> None:
        tiles = extend_tiles(0, length, self.tile_size, self.budget.k_for, self.device)
        self._tiles = tiles
        self._length = length
        self._k_units, self._page, kmax = selection_units(self.budget, tiles)
        self._sparse = tiles.tile_k < tiles.tile_start
        self._first_scored = 0
        if self.score_last_tiles is not None:
            self._first_scored = max(0, tiles.num_tiles - self.score_last_tiles)
            self._sparse[: self._first_scored] = False
        self.sim.begin_sample(tiles.num_tiles, kmax, sentinel=length)
        self._layers_seen = []
        self.num_tiles += tiles.num_tiles
        self.num_sparse_tiles += int(self._sparse.sum())  # the tiles that are scored

    def end_sample(self) -> None:
        if self._layers_seen != list(range(self.num_layers)):
            raise RuntimeError(
                f"attention statistics arrived for layers {self._layers_seen}, expected 0.."
                f"{self.num_layers - 1} in order: does this model call transformers' "
                f"AttentionInterface for every layer?")
        self.sim.end_sample()
        self._tiles = None

    def on_attention(self, layer: int, query: torch.Tensor, key: torch.Tensor,
                     scale: float, value: Optional[torch.Tensor] = None) -> None:
        """query [1, Hq, L, D], key [1, Hkv, L, D] (post-RoPE, the model's layout); ``value``
        (the layer's values, same layout as key) is not read by the statistics."""
        if query.shape[0] != 1:
            raise RuntimeError("calibration runs one sample (batch 1) at a time")
        tiles, length = self._tiles, self._length
        if query.shape[2] != length or key.shape[2] != length:
            raise RuntimeError(f"layer {layer}: expected {length} queries and keys")
        q = query[0].transpose(0, 1).to(self.device)  # [L, Hq, D]
        k = key[0].transpose(0, 1).to(self.device)  # [L, Hkv, D]
        for a, b in tile_blocks(tiles, row_bytes=8 * self.num_q_heads,
                                block_bytes=self.block_bytes):
            if b <= self._first_scored:
                continue  # no scored tile: neither its selection nor its mass is ever read
            a = max(a, self._first_scored)
            pooled = pooled_tile_probs(q, k, tiles, a, b, scale)  # [Hkv, nb, Lb]
            starts = tiles.tile_start[a:b]
            idx = block_selection(pooled, starts, self._k_units[a:b], self._page, length)
            D = diagonal_mass(pooled, starts)
            A = F.pad(pooled, (0, length + 1 - pooled.shape[-1]))  # zero sentinel column L
            sparse = self._sparse[a:b]
            self.sim.add_block(layer, a, b, A, D, idx, sparse)
            if bool(sparse.any()):
                kept = torch.gather(A, 2, idx).sum(-1) + D  # [Hkv, nb]
                recall = (kept / A.sum(-1))[:, sparse]
                self.recall_sum[layer] += float(recall.double().sum())
                self.recall_count[layer] += recall.numel()
            del pooled, A
        self._layers_seen.append(layer)
        if self.on_layer_done is not None:
            self.on_layer_done(layer)

    def on_importance(self, layer: int, x: torch.Tensor, attn_out: torch.Tensor) -> None:
        s, n = token_importance_sum(x, attn_out)
        self.imp_sum[layer] += s
        self.imp_count[layer] += n

    # -- results ----------------------------------------------------------------------------
    def similarity(self) -> torch.Tensor:
        return self.sim.result()

    def importance(self) -> torch.Tensor:
        """imp[l] = 1 - mean over tokens and samples of cos(x_l, x_l + attn_out_l)."""
        return self.imp_sum / self.imp_count.clamp(min=1)

    def topk_recall(self) -> torch.Tensor:
        """Mean share of a layer's pooled mass that its own Top-k (plus diagonal) keeps."""
        return self.recall_sum / self.recall_count.clamp(min=1)


# ------------------------------------------------------------------------------------------
# Hooking a Hugging Face model
# ------------------------------------------------------------------------------------------
def _calibration_attention(module, query, key, value, attention_mask, dropout=0.0,
                           scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        _ACTIVE.on_attention(module.layer_idx, query, key, scale, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def register_attention() -> str:
    """Register the calibration attention function with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _calibration_attention)
    return ATTN_IMPLEMENTATION


def decoder_layers(model) -> list:
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(l, "self_attn") for l in layers):
        raise RuntimeError(f"{type(model).__name__}: expected base_model.layers[i].self_attn")
    return list(layers)


@contextmanager
def collecting(model, collector: StatsCollector):
    """Route the model's attention calls and residual streams to ``collector``: any object
    with ``on_attention(layer, query, key, scale, value)`` and ``on_importance(layer, x,
    attn_out)`` (``run_sample`` also calls ``begin_sample(length)`` and ``end_sample()``)."""
    global _ACTIVE
    register_attention()
    previous_impl = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    residual = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        attn_idx = getattr(layer.self_attn, "layer_idx", i)
        if attn_idx != i:
            raise RuntimeError(f"decoder layer {i} has self_attn.layer_idx={attn_idx}")

        def pre_hook(mod, args, kwargs, i=i):
            residual[i] = args[0] if args else kwargs["hidden_states"]

        def attn_hook(mod, args, kwargs, output, i=i):
            out = output[0] if isinstance(output, tuple) else output
            collector.on_importance(i, residual.pop(i), out)

        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(attn_hook, with_kwargs=True))
    _ACTIVE = collector
    try:
        yield collector
    finally:
        _ACTIVE = None
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous_impl)


@torch.inference_mode()
def run_sample(model, collector: StatsCollector, input_ids: list) -> None:
    """One forward pass of the base model (no LM head) over one sample."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    base = getattr(model, model.base_model_prefix, model)
    collector.begin_sample(ids.shape[1])
    base(input_ids=ids, use_cache=False)
    collector.end_sample()
