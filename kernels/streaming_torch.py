"""StreamingLLM selection in PyTorch: the ``streaming`` policy (Xiao et al. 2024, "Efficient
Streaming Language Models with Attention Sinks").

No scoring. A tile with start s and budget k (the same k as Kascade's) attends the first
``sinks = min(sink_tokens, k)`` positions (the attention sinks) and the ``k - sinks`` most recent
candidates ``[s - (k - sinks), s)``, plus the causal diagonal block as for every selection. Since
``k <= s`` the two ranges never overlap: exactly k candidate keys. Every KV head gets the same
selection. Decode: s = L, so the window ends at the newest key.
"""

from __future__ import annotations

import torch

from .selection_torch import Selection
from .tiles import RequestTiles


def select_streaming(tiles: RequestTiles, num_kv_heads: int, sink_tokens: int = 4) -> Selection:
    if tiles.all_dense:
        return Selection(dense=True)
    s, k = tiles.tile_start[:, None], tiles.tile_k[:, None]  # [nt, 1]
    sinks = k.clamp(max=sink_tokens)
    rank = torch.arange(int(k.max()), device=s.device)[None, :]  # [1, kmax]
    valid = rank < k
    pos = torch.where(rank < sinks, rank, s - k + rank)
    pos = torch.where(valid, pos, 0)
    shape = (num_kv_heads, -1, -1)
    return Selection(dense=False, idx=pos[None].expand(shape), valid=valid[None].expand(shape))
