"""Where a served decode step's time goes between the host and the GPU (bench_one_batch).

Installed by ``bench/one_batch.py`` when ``KASCADE_HOST_PROBE=1``; wraps, for every backend
alike:
- ``ModelRunner.forward``: the host clock at entry (the step's host work starts here);
- ``torch.cuda.CUDAGraph.replay``: the host clock at the call (host prep = replay - entry), and CUDA
  events around the replay (the graph's GPU time, measured apart from the host's);
- ``init_forward_metadata_out_graph`` of the attention backend classes, on replays (host time
  of the backend's per-step planning; kascade's includes any FlashInfer planning it calls).
At exit it prints one line ``host-probe {json}`` with medians in ms over the decode replays
(after the first ``SKIP`` replays, which include compilation and warm-up).
"""

import atexit
import json
import os
import statistics
import time

SKIP = int(os.environ.get("KASCADE_HOST_PROBE_SKIP", "8"))


def install() -> None:
    import torch
    from sglang.srt.model_executor.model_runner import ModelRunner

    state = {"entry": None}
    prep, meta, events = [], {}, []

    def wrap_forward(original):
        def forward(self, forward_batch, *args, **kwargs):
            state["entry"] = time.perf_counter()
            return original(self, forward_batch, *args, **kwargs)
        return forward

    def wrap_replay(original):
        def replay(self, *args, **kwargs):
            t = time.perf_counter()
            if state["entry"] is not None:
                prep.append(t - state["entry"])
                state["entry"] = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = original(self, *args, **kwargs)
            end.record()
            events.append((start, end))
            return out
        return replay

    def wrap_meta(cls):
        original = cls.init_forward_metadata_out_graph
        times = meta.setdefault(cls.__name__, [])

        def init_forward_metadata_out_graph(self, forward_batch, in_capture=False, **kwargs):
            t = time.perf_counter()
            out = original(self, forward_batch, in_capture=in_capture, **kwargs)
            if not in_capture:  # replays only
                times.append(time.perf_counter() - t)
            return out
        cls.init_forward_metadata_out_graph = init_forward_metadata_out_graph

    ModelRunner.forward = wrap_forward(ModelRunner.forward)
    torch.cuda.CUDAGraph.replay = wrap_replay(torch.cuda.CUDAGraph.replay)
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    from sglang_kascade.backend import KascadeAttnBackend
    for cls in (FlashInferAttnBackend, KascadeAttnBackend):
        wrap_meta(cls)

    def med_ms(xs):
        xs = xs[SKIP:]
        return round(1e3 * statistics.median(xs), 4) if xs else None

    def report():
        torch.cuda.synchronize()
        gpu = [s.elapsed_time(e) / 1e3 for s, e in events]
        print("host-probe " + json.dumps({
            "replays": len(events), "skip": SKIP,
            "host_prep_ms": med_ms(prep), "graph_gpu_ms": med_ms(gpu),
            "metadata_ms": {k: med_ms(v) for k, v in meta.items() if v},
            "metadata_calls": {k: len(v) for k, v in meta.items()}}), flush=True)

    atexit.register(report)
