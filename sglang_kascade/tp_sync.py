"""Hot swaps under tensor parallelism: every rank of a TP group changes profile at the same batch
boundary, or none does.

The ranks of a TP group run the same forwards in lock step (SGLang broadcasts each batch from
rank 0), and each forward's layers all-reduce across them: a forward where one rank attends
with profile A and another with B is neither A nor B. So the control channel (control.py) is
opened by rank 0 alone; at every batch boundary (``take_staged``, called once per forward by
every rank's backend, in the same order) rank 0 broadcasts what it staged over the TP group's
CPU (gloo) group: the generation (0: nothing), then, only when there is one, the profile JSON.
Every rank then checks and applies it, and ``agree`` gathers each rank's refusal (None: applied):
if any rank refused, every rank keeps (or restores) the profile in force, and rank 0 reports the
first refusal to the sidecar; otherwise rank 0 reports it applied.

Cost: one broadcast of 8 bytes per forward on the CPU group (tens of microseconds over gloo on
one host, docs/design.md), two more collectives on the forward that swaps. The counters for the
sidecar's metrics (backend_stats.py) are published by rank 0 only: every rank serves the same
requests and forwards, so rank 0's counters are the group's (the sidecar sums them over the
scheduler processes that publish, i.e. over TP groups, not over ranks).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from .control import Staged

logger = logging.getLogger("sglang_kascade")


class TPControl:
    """The hot-swap channel of one rank of a TP group (the backend's ``control``): rank 0 wraps
    the control directory's SchedulerChannel, the other ranks have none. ``parse(profile_json)
    -> AnchorProfile`` turns the broadcast JSON into a profile on ranks > 0 (rank 0 validated
    it when staging)."""

    def __init__(self, channel, group, rank: int, size: int, parse: Callable):
        self.channel = channel  # SchedulerChannel on rank 0, None elsewhere
        self.group = group  # torch.distributed CPU group of the TP ranks
        self.rank, self.size = rank, size
        self._parse = parse
        self.boundaries = 0  # batch boundaries crossed (collectives issued): tests, logging

    @classmethod
    def create(cls, channel, group, rank: int, size: int, parse: Callable):
        """The rank's TPControl, or None on every rank when rank 0 has no channel (hot swap
        off, or its control directory unusable): decided by rank 0 and broadcast, so no rank
        waits at a boundary for a rank 0 that never sends. Every rank calls this once, at
        backend creation."""
        on = torch.tensor([int(rank != 0 or channel is not None)], dtype=torch.int64)
        torch.distributed.broadcast(on, group=group, group_src=0)
        if not int(on[0]):
            return None
        return cls(channel if rank == 0 else None, group, rank, size, parse)

    def take_staged(self) -> Optional[Staged]:
        """The profile every rank applies at this batch boundary, or None (the same on every
        rank). Every rank must call it once per forward."""
        self.boundaries += 1
        staged = self.channel.take_staged() if self.rank == 0 else None
        gen = torch.tensor([staged.generation if staged is not None else 0], dtype=torch.int64)
        torch.distributed.broadcast(gen, group=self.group, group_src=0)
        if not int(gen[0]):
            return None
        box = [staged.profile_json if staged is not None else None]
        torch.distributed.broadcast_object_list(box, group=self.group, group_src=0)
        if self.rank == 0:
            return staged
        return Staged(int(gen[0]), self._parse(box[0]), box[0])

    def agree(self, why: Optional[str]) -> Optional[str]:
        """After each rank tried the profile ``take_staged`` gave: None when every rank applied
        it, else the first refusal (named by rank), the same on every rank."""
        reasons = [None] * self.size
        torch.distributed.all_gather_object(reasons, why, group=self.group)
        for r, reason in enumerate(reasons):
            if reason:
                return reason if self.size == 1 else f"TP rank {r}: {reason}"
        return None

    # ---- reports and counters: rank 0's channel ---------------------------------------------

    def report_applied(self, generation: int) -> None:
        if self.channel is not None:
            self.channel.report_applied(generation)

    def report_refused(self, generation: int, error: str) -> None:
        if self.channel is not None:
            self.channel.report_refused(generation, error)

    def maybe_write_stats(self, stats, force: bool = False) -> None:
        if self.channel is not None:
            self.channel.maybe_write_stats(stats, force)
