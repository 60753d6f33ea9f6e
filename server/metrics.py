"""Prometheus exposition of the sidecar's /metrics, built fresh on every scrape.

Scheduler-side counters come from the live schedulers' ``stats/<pid>.json`` snapshots
(sglang_kascade/backend_stats.py) and are summed over schedulers; the sidecar adds its own swap
counters. A scheduler that restarts starts its counters from zero (Prometheus' rate() copes).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)

ROLES = ("dense", "dense_anchor", "anchor", "reuse")
BUDGET_CLASSES = ("default", "custom", "dense")  # sglang_kascade.config.BUDGET_CLASSES


class SidecarCollector:
    def __init__(self, state_fn):
        self._state_fn = state_fn  # () -> dict, see SidecarState.metrics_view (app.py)

    def collect(self):
        view = self._state_fn()
        stats = list(view["stats"].values())
        active = view["active"]

        info = InfoMetricFamily("kascade_active_profile", "Profile the schedulers serve with")
        if active:
            info.add_metric([], {"name": str(active.get("name")), "sha256": active["sha256"],
                                 "generation": str(active["generation"])})
        yield info
        yield GaugeMetricFamily("kascade_schedulers", "Live scheduler processes with kascade",
                                value=len(view["schedulers"]))
        swaps = CounterMetricFamily("kascade_swaps", "Profile activations by the sidecar",
                                    labels=["result"])
        for result, n in sorted(view["swaps"].items()):
            swaps.add_metric([result], n)
        yield swaps
        yield CounterMetricFamily("kascade_swaps_applied",
                                  "Staged profiles applied at a batch boundary (all schedulers)",
                                  value=sum(s.get("swaps_applied", 0) for s in stats))
        yield CounterMetricFamily("kascade_swaps_refused",
                                  "Staged profiles a batch boundary could not apply; the "
                                  "previous profile kept serving (all schedulers)",
                                  value=sum(s.get("swaps_refused", 0) for s in stats))

        roles = GaugeMetricFamily("kascade_layers", "Layers per role in the active profile",
                                  labels=["role"])
        for role in ROLES:
            roles.add_metric([role], max((s.get("roles", {}).get(role, 0) for s in stats),
                                         default=0))
        yield roles
        yield GaugeMetricFamily("kascade_dense_fallback_layers",
                                "Layers that always run dense (sliding window, cross-attention)",
                                value=max((s.get("roles", {}).get("dense_fallback_layers", 0)
                                           for s in stats), default=0))

        fwd = CounterMetricFamily("kascade_forwards", "Forward passes planned", labels=["mode"])
        for mode in ("decode", "extend"):
            fwd.add_metric([mode], sum(s.get("forwards", {}).get(mode, 0) for s in stats))
        yield fwd
        yield CounterMetricFamily("kascade_sparse_forwards",
                                  "Forward passes where some request attended sparsely",
                                  value=sum(s.get("sparse_forwards", 0) for s in stats))
        yield CounterMetricFamily(
            "kascade_dense_fallback_forwards",
            "Forward passes that ran dense because every request was within its budget",
            value=sum(s.get("dense_fallback_forwards", 0) for s in stats))
        yield CounterMetricFamily(
            "kascade_device_forwards",
            "Forward passes (decode and prefill) served by the Triton kernels (CUDA; the rest: "
            "PyTorch path or dense)",
            value=sum(s.get("device_forwards", 0) for s in stats))
        for name, key, text in (
                ("kascade_keys_read", "read", "Keys a sparse layer read, summed over queries "
                 "(prefill: every query; decode: every request); over kascade_keys_candidate "
                 "it is the budget actually spent"),
                ("kascade_keys_candidate", "candidate", "Keys those queries could have read "
                 "(the causal diagonal left out)")):
            keys = CounterMetricFamily(name, text, labels=["phase"])
            for phase in ("extend", "decode"):
                keys.add_metric([phase], sum(s.get("keys", {}).get(phase, {}).get(key, 0)
                                             for s in stats))
            yield keys
        budgets = CounterMetricFamily(
            "kascade_requests", "Requests by budget class: the server's budget (default), their "
            "own Top-k fraction (custom) or dense, asked through custom_params",
            labels=["budget"])
        for cls in BUDGET_CLASSES:
            budgets.add_metric([cls], sum(s.get("request_budgets", {}).get(cls, 0)
                                          for s in stats))
        yield budgets
        yield self._selection_histogram(stats)

    @staticmethod
    def _selection_histogram(stats):
        hist = HistogramMetricFamily("kascade_selection_keys",
                                     "Keys selected per request per forward pass (last tile)")
        buckets = next((s["selection"]["buckets"] for s in stats if "selection" in s), [])
        counts = [0] * (len(buckets) + 1)
        total = 0
        for s in stats:
            sel = s.get("selection")
            if sel and sel["buckets"] == buckets:
                counts = [a + b for a, b in zip(counts, sel["counts"])]
                total += sel["sum"]
        cumulative, running = [], 0
        for bound, n in zip([*map(str, buckets), "+Inf"], counts):
            running += n
            cumulative.append((bound, running))
        hist.add_metric([], cumulative, sum_value=total)
        return hist


def render(state_fn) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(state_fn))
    return generate_latest(registry)
