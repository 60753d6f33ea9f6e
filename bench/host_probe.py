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
``KASCADE_HOST_PROBE_KERNELS=N``: also the GPU time of every kernel name inside N replays after
the first ``SKIP`` (torch.profiler / CUPTI), per replay, under ``kernels`` (where the captured
step's time goes, the same graph the server replays).
"""

import atexit
import json
import os
import statistics
import time

SKIP = int(os.environ.get("KASCADE_HOST_PROBE_SKIP", "8"))
KERNEL_REPLAYS = int(os.environ.get("KASCADE_HOST_PROBE_KERNELS", "0"))


def install() -> None:
    import torch
    from sglang.srt.model_executor.model_runner import ModelRunner

    state = {"entry": None}
    prep, meta, events = [], {}, []
    kernels = {"replays": 0, "us": {}}  # name -> (launches, GPU us) over the profiled replays

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
            if SKIP <= len(events) < SKIP + KERNEL_REPLAYS:
                return profiled(self, *args, **kwargs)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = original(self, *args, **kwargs)
            end.record()
            events.append((start, end))
            return out

        def profiled(self, *args, **kwargs):  # one replay under CUPTI (not in graph_gpu_ms)
            from torch.profiler import ProfilerActivity, profile
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                out = original(self, *args, **kwargs)
                torch.cuda.synchronize()
            kernels["replays"] += 1
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
                    n, t = kernels["us"].get(e.name[:60], (0, 0.0))
                    kernels["us"][e.name[:60]] = (n + 1, t + e.device_time)
            events.append(None)
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
        gpu = [ev[0].elapsed_time(ev[1]) / 1e3 for ev in events if ev is not None]
        line = {"replays": len(events), "skip": SKIP,
                "host_prep_ms": med_ms(prep), "graph_gpu_ms": med_ms(gpu),
                "metadata_ms": {k: med_ms(v) for k, v in meta.items() if v},
                "metadata_calls": {k: len(v) for k, v in meta.items()}}
        if kernels["replays"]:
            r = kernels["replays"]
            per = {name: dict(launches=n / r, us=round(t / r, 1)) for name, (n, t) in
                   sorted(kernels["us"].items(), key=lambda kv: -kv[1][1])}
            line["kernels"] = dict(replays=r, busy_us=round(sum(v["us"] for v in per.values()), 1),
                                   per_kernel=per)
        print("host-probe " + json.dumps(line), flush=True)

    atexit.register(report)
