"""Tensor parallelism: which KV heads a rank holds, and head maps that stay on one rank.

SGLang's TP splits a model's ``H`` KV heads over ``N`` ranks (``QKVParallelLinear``): with
``N <= H`` (``H % N == 0``) rank ``r`` holds the contiguous heads ``[r*H/N, (r+1)*H/N)``; with
``N > H`` (``N % H == 0``) every head is replicated ``N/H`` times and rank ``r`` holds head
``r // (N/H)`` alone. A rank's KV pool, queries and attention output hold only its own heads.

A reuse layer's KV head ``h`` reads the selection of anchor KV head ``head_map[layer][h]``. The
backend serves head maps that are *rank-local* for the served TP size: every head reads an
anchor head on its own rank, so no selection crosses ranks and a rank runs the TP-1 code on its
slice of the heads (the same keys, the same outputs, head for head). Heads fall in
``min(N, H)`` blocks of ``H // min(N, H)`` consecutive heads; a map fits ``N`` when every
entry stays in its block. Fitting ``N`` implies fitting every divisor of ``N`` (coarser blocks).

Pure Python: used by profile validation, the serving path and calibration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

MAX_TP_SIZE = 1024  # far above any served TP group; bounds profile fields


def tp_size_problem(num_kv_heads: int, tp_size: int) -> Optional[str]:
    """Why SGLang cannot split ``num_kv_heads`` over ``tp_size`` ranks, or None."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or not (
            1 <= tp_size <= MAX_TP_SIZE):
        return f"TP size {tp_size!r} must be an integer in 1..{MAX_TP_SIZE}"
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        return (f"TP size {tp_size} neither divides nor is a multiple of the model's "
                f"{num_kv_heads} KV heads")
    return None


def head_block(head: int, num_kv_heads: int, tp_size: int) -> int:
    """Which block of rank-local heads ``head`` falls in at ``tp_size`` (its rank when
    ``tp_size <= num_kv_heads``; its replica group otherwise)."""
    return head // (num_kv_heads // min(tp_size, num_kv_heads))


def same_rank(h2: int, h1: int, num_kv_heads: int, tp_sizes) -> bool:
    """Whether heads ``h2`` and ``h1`` share a rank at every TP size of ``tp_sizes``."""
    return all(head_block(h2, num_kv_heads, n) == head_block(h1, num_kv_heads, n)
               for n in tp_sizes)


def head_map_problem(head_map, num_kv_heads: int, tp_size: int) -> Optional[str]:
    """Why ``head_map`` ([layers][num_kv_heads]) is not rank-local at ``tp_size``, naming the
    first entry that crosses ranks, or None."""
    for layer, row in enumerate(head_map):
        for h2, h1 in enumerate(row):
            if not same_rank(h2, h1, num_kv_heads, (tp_size,)):
                return (f"head_map[{layer}][{h2}]={h1} reads KV head {h1}, which TP "
                        f"{tp_size} puts on another rank than head {h2} (rank-local maps "
                        f"only: heads {_block_text(h2, num_kv_heads, tp_size)} share a rank)")
    return None


def _block_text(head: int, num_kv_heads: int, tp_size: int) -> str:
    size = num_kv_heads // min(tp_size, num_kv_heads)
    lo = head_block(head, num_kv_heads, tp_size) * size
    return f"{lo}..{lo + size - 1}" if size > 1 else f"{lo} alone"


def fit_head_map(head_map, num_kv_heads: int, tp_sizes,
                 score: Optional[Callable[[int, int, int], float]] = None) -> tuple:
    """(rows, moved): ``head_map`` made rank-local at every size of ``tp_sizes``. An entry that
    crosses ranks is replaced by the same-rank anchor head of the highest ``score(layer, h2,
    h1)`` (the calibration similarity; ties to ``h2`` itself, then the lowest index), or by
    ``h2`` itself without a score (the identity: always on the same rank). Entries already
    rank-local are kept. ``moved``: how many entries changed."""
    rows, moved = [], 0
    for layer, row in enumerate(head_map):
        out = []
        for h2, h1 in enumerate(row):
            if not same_rank(h2, h1, num_kv_heads, tp_sizes):
                h1 = h2
                if score is not None:
                    for c in range(num_kv_heads):
                        if (same_rank(h2, c, num_kv_heads, tp_sizes)
                                and score(layer, h2, c) > score(layer, h2, h1)):
                            h1 = c
                moved += 1
            out.append(h1)
        rows.append(tuple(out))
    return tuple(rows), moved


@dataclass(frozen=True)
class TPLayout:
    """The KV heads of one rank of a TP group of ``size`` ranks (``rank`` in the attention TP
    group), for a model of ``num_kv_heads`` KV heads."""

    rank: int
    size: int
    num_kv_heads: int

    def __post_init__(self):
        why = tp_size_problem(self.num_kv_heads, self.size)
        if why:
            raise ValueError(why)
        if not 0 <= self.rank < self.size:
            raise ValueError(f"TP rank {self.rank} outside 0..{self.size - 1}")

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.size)

    @property
    def first_head(self) -> int:
        """The global index of this rank's first KV head."""
        if self.size <= self.num_kv_heads:
            return self.rank * self.local_kv_heads
        return self.rank // (self.size // self.num_kv_heads)

    def problem(self, head_map) -> Optional[str]:
        """Why this TP size cannot serve ``head_map``, or None."""
        return head_map_problem(head_map, self.num_kv_heads, self.size)

    def local_head_map(self, head_map) -> tuple:
        """This rank's slice of a rank-local ``head_map``: [layers][local_kv_heads] indices of
        its own heads (the global index minus ``first_head``). Raises ValueError for a map that
        is not rank-local (``problem``)."""
        why = self.problem(head_map)
        if why:
            raise ValueError(why)
        lo, n = self.first_head, self.local_kv_heads
        return tuple(tuple(h1 - lo for h1 in row[lo:lo + n]) for row in head_map)

    def local_profile(self, profile):
        """``profile`` as this rank serves it: the same layers and budget, ``head_map`` sliced
        to the rank's heads (``local_head_map``). The fingerprint stays the model's."""
        if self.size == 1:
            return profile
        return dataclasses.replace(profile, head_map=self.local_head_map(profile.head_map))

