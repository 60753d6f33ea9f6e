"""Host time a TP rank spends per batch boundary on hot-swap agreement (tp_sync.TPControl):
``take_staged`` with nothing staged, i.e. one 8-byte broadcast from rank 0 over a gloo group,
timed in N processes on this host.

  python bench/tp_sync_cost.py --ranks 2 --boundaries 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_kascade.tp_sync import TPControl  # noqa: E402


class IdleChannel:
    """Rank 0's control channel with nothing ever staged."""

    def take_staged(self):
        return None


def rank_main(rank: int, ranks: int, init: str, n: int, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=ranks)
    group = torch.distributed.new_group(backend="gloo")
    control = TPControl.create(IdleChannel() if rank == 0 else None, group, rank, ranks, None)
    for _ in range(100):  # warm-up
        control.take_staged()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        control.take_staged()
        times.append(time.perf_counter() - t)
    queue.put((rank, statistics.median(times) * 1e6, sorted(times)[int(0.99 * n)] * 1e6))
    torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--boundaries", type=int, default=2000)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        init = f"file://{d}/rendezvous"
        procs = [ctx.Process(target=rank_main, args=(r, args.ranks, init, args.boundaries, queue))
                 for r in range(args.ranks)]
        for p in procs:
            p.start()
        rows = sorted(queue.get(timeout=600) for _ in procs)
        for p in procs:
            p.join()
    for rank, p50, p99 in rows:
        print(f"rank {rank}: take_staged p50 {p50:.1f} us, p99 {p99:.1f} us "
              f"({args.boundaries} boundaries, {args.ranks} ranks, gloo)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
