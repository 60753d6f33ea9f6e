"""Counters one scheduler's backend keeps for the sidecar's Prometheus /metrics.

Everything is counted on the host from numbers the planner already has (sequence lengths and
budgets), so counting never reads a device tensor. The snapshot is plain JSON (control.py writes
it to ``stats/<pid>.json``; server/metrics.py sums the live schedulers' snapshots).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field

from .config import BUDGET_CLASSES, budget_class

# Upper bounds of the selection-size histogram (keys selected per request per forward pass).
SELECTION_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
# Request ids remembered to count a request once over the extend forwards of its prompt (chunked
# prefill): far more than run at once, and bounded.
RECENT_REQUESTS = 65536


@dataclass
class BackendStats:
    forwards: dict = field(default_factory=lambda: {"decode": 0, "extend": 0})
    sparse_forwards: int = 0  # forward passes where at least one request attended sparsely
    dense_fallback_forwards: int = 0  # every request short enough that k >= visible keys: dense
    swaps_applied: int = 0
    swaps_refused: int = 0  # staged profiles the batch boundary could not apply (previous kept)
    device_forwards: int = 0  # forwards (decode, prefill) where a layer ran on the Triton path
    selection_buckets: list = field(default_factory=lambda: [0] * (len(SELECTION_BUCKETS) + 1))
    selection_sum: int = 0
    selection_count: int = 0
    visible_sum: int = 0  # keys each request could have attended to (for the mean density)
    # Per phase, summed over every query of every forward (prefill: each query of each tile;
    # decode: each request): [keys a sparse layer reads, candidate keys]. A dense prefill counts
    # read == candidate. Their ratio is the budget actually spent (kernels/tiles.py,
    # extend_key_counts: the causal diagonal is left out of both).
    keys: dict = field(default_factory=lambda: {"extend": [0, 0], "decode": [0, 0]})
    # Requests by budget class (config.BUDGET_CLASSES: the server's budget, their own fraction,
    # dense), counted at their first extend forward (record_requests).
    request_budgets: dict = field(default_factory=lambda: dict.fromkeys(BUDGET_CLASSES, 0))
    _recent: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def record_requests(self, rids, fractions: list) -> None:
        """The requests of an extend forward: ``rids`` (None: unknown, every row counts) and
        each one's own fraction (None: the server's budget). A request prefilled over several
        forwards (chunked prefill) counts once while its id is among the RECENT_REQUESTS last
        seen."""
        for i, frac in enumerate(fractions):
            rid = rids[i] if rids is not None and i < len(rids) else None
            if rid is not None:
                if rid in self._recent:
                    continue
                self._recent[rid] = None
                if len(self._recent) > RECENT_REQUESTS:
                    self._recent.popitem(last=False)
            self.request_budgets[budget_class(frac)] += 1

    def record_forward(self, is_decode: bool, ks: list, visible: list) -> None:
        """``ks[i]`` keys selected of ``visible[i]`` candidates for request i (its last tile)."""
        self.forwards["decode" if is_decode else "extend"] += 1
        if all(k >= v for k, v in zip(ks, visible)):
            self.dense_fallback_forwards += 1
        else:
            self.sparse_forwards += 1
        for k, v in zip(ks, visible):
            self.selection_buckets[bisect.bisect_left(SELECTION_BUCKETS, k)] += 1
            self.selection_sum += k
            self.selection_count += 1
            self.visible_sum += v

    def record_keys(self, is_decode: bool, read: int, candidate: int) -> None:
        phase = self.keys["decode" if is_decode else "extend"]
        phase[0] += read
        phase[1] += candidate

    def snapshot(self, extra: dict) -> dict:
        return {
            "forwards": dict(self.forwards),
            "sparse_forwards": self.sparse_forwards,
            "dense_fallback_forwards": self.dense_fallback_forwards,
            "swaps_applied": self.swaps_applied,
            "swaps_refused": self.swaps_refused,
            "device_forwards": self.device_forwards,
            "request_budgets": dict(self.request_budgets),
            "keys": {phase: {"read": r, "candidate": c} for phase, (r, c) in self.keys.items()},
            "selection": {
                "buckets": list(SELECTION_BUCKETS),
                "counts": list(self.selection_buckets),
                "sum": self.selection_sum,
                "count": self.selection_count,
                "visible_sum": self.visible_sum,
            },
            **extra,
        }
