"""Switch the selection kernels of captured decode graphs on and off by profile, without recapture.

A captured decode graph must serve any hot-swapped profile, so every sparse layer launches the
anchor selection (score, pool, Top-k: 7 kernels) gated by ``graph_selects[layer]`` on the device
(device_path.py): a layer that does not select still pays ~1.7 us per gated kernel node, 0.26-0.33
ms per step at batch 1 on Llama-3.1-8B shapes (bench/decode_step.py, docs/results/kernels-h100.md).

This module removes that cost where the driver allows it. During capture, DevicePath brackets each
sparse layer's selection with ``NodeSwitch.mark`` / ``record``: the CUDA driver's capture info
gives the stream's last graph node before and after, and the nodes in between (a chain walked
through their dependencies) are that layer's selection kernels. After SGLang's graph runner has
captured a graph (``sglang_adapter`` keeps its ``cudaGraph_t`` alive: ``keep_graph=True``),
``adopt`` instantiates it and hands it to the switch that recorded its nodes; from then on every
profile (``NodeSwitch.apply``) disables the selection nodes of the layers that do not select
(``cuGraphNodeSetEnabled``: a disabled node runs as an empty node) and enables the others, on
each executable graph, effective from its next launch. The gates stay: a node left enabled is
always correct, so any driver error re-enables every node and leaves the gates alone to decide
(logged once). Invariant: a disabled node belongs to a layer whose gate is 0.

CUDA driver entry points through ctypes (libcuda.so.1; the unsuffixed / ``_v2`` symbols keep
their first signatures in every driver since CUDA 11.6): no extra dependency. Off with
SGLANG_KASCADE_NODE_SWITCH=0 (gated launches only). Measured: docs/results/kernels-h100.md.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from dataclasses import dataclass, field

import torch

from .config import env_flag

logger = logging.getLogger("sglang_kascade")

KERNEL_NODE = 0  # CU_GRAPH_NODE_TYPE_KERNEL
CAPTURE_ACTIVE = 1  # CU_STREAM_CAPTURE_STATUS_ACTIVE
MAX_NODES_PER_LAYER = 64  # a selection launches 7 kernels; more means the walk went astray


class DriverError(RuntimeError):
    pass


class CudaDriver:
    """The few CUDA driver graph calls the switch needs (handles as Python ints)."""

    def __init__(self, lib=None):
        lib = lib or ctypes.CDLL("libcuda.so.1")
        P, V = ctypes.POINTER, ctypes.c_void_p
        self._info = lib.cuStreamGetCaptureInfo_v2  # (stream, status*, id*, graph*, deps**, n*)
        self._info.argtypes = [V, P(ctypes.c_int), P(ctypes.c_ulonglong), P(V), P(P(V)),
                               P(ctypes.c_size_t)]
        self._deps = lib.cuGraphNodeGetDependencies  # (node, deps*, n*)
        self._deps.argtypes = [V, P(V), P(ctypes.c_size_t)]
        self._type = lib.cuGraphNodeGetType  # (node, type*)
        self._type.argtypes = [V, P(ctypes.c_int)]
        self._set = lib.cuGraphNodeSetEnabled  # (exec, node, enabled)
        self._set.argtypes = [V, V, ctypes.c_uint]
        self._get = lib.cuGraphNodeGetEnabled  # (exec, node, enabled*)
        self._get.argtypes = [V, V, P(ctypes.c_uint)]

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != 0:
            raise DriverError(f"{what} failed: CUresult {rc}")

    def capture_tail(self, stream: int):
        """(graph, tail nodes) of a stream being captured, or None when it is not capturing."""
        status, cid = ctypes.c_int(), ctypes.c_ulonglong()
        graph, deps, n = ctypes.c_void_p(), ctypes.POINTER(ctypes.c_void_p)(), ctypes.c_size_t()
        self._check(self._info(stream, ctypes.byref(status), ctypes.byref(cid),
                               ctypes.byref(graph), ctypes.byref(deps), ctypes.byref(n)),
                    "cuStreamGetCaptureInfo_v2")
        if status.value != CAPTURE_ACTIVE:
            return None
        return graph.value, tuple(deps[i] for i in range(n.value))

    def dependencies(self, node: int) -> tuple:
        n = ctypes.c_size_t()
        self._check(self._deps(node, None, ctypes.byref(n)), "cuGraphNodeGetDependencies")
        arr = (ctypes.c_void_p * max(1, n.value))()
        self._check(self._deps(node, arr, ctypes.byref(n)), "cuGraphNodeGetDependencies")
        return tuple(arr[i] for i in range(n.value))

    def is_kernel(self, node: int) -> bool:
        t = ctypes.c_int()
        self._check(self._type(node, ctypes.byref(t)), "cuGraphNodeGetType")
        return t.value == KERNEL_NODE

    def set_enabled(self, graph_exec: int, node: int, on: bool) -> None:
        self._check(self._set(graph_exec, node, int(on)), "cuGraphNodeSetEnabled")

    def enabled(self, graph_exec: int, node: int) -> bool:
        out = ctypes.c_uint()
        self._check(self._get(graph_exec, node, ctypes.byref(out)), "cuGraphNodeGetEnabled")
        return bool(out.value)


def nodes_between(driver, before: tuple, after: tuple) -> list:
    """The chain of kernel nodes captured after the tail ``before`` up to the tail ``after``
    (oldest first); [] when nothing was captured in between. Raises DriverError when the nodes
    do not form a single chain of kernels (then the layer is left to its gates)."""
    stop = set(before)
    if not after or set(after) == stop:
        return []
    if len(after) != 1:
        raise DriverError(f"capture tail of {len(after)} nodes after the selection")
    chain, node = [], after[0]
    while node not in stop:
        if len(chain) >= MAX_NODES_PER_LAYER or not driver.is_kernel(node):
            raise DriverError("the selection's nodes are not a chain of kernels")
        chain.append(node)
        deps = driver.dependencies(node)
        if deps and set(deps) <= stop:
            break
        if len(deps) != 1:
            raise DriverError(f"a selection node with {len(deps)} dependencies")
        node = deps[0]
    return chain[::-1]


@dataclass
class _Captured:
    graph: weakref.ref  # the torch.cuda.CUDAGraph (SGLang owns it)
    handle: int  # its cudaGraph_t (the nodes belong to it)
    nodes: dict  # layer -> [node]
    enabled: dict = field(default_factory=dict)  # layer -> bool, as set on the executable


_SWITCHES: "weakref.WeakSet[NodeSwitch]" = weakref.WeakSet()


class NodeSwitch:
    """Per DevicePath: the selection nodes of its captured graphs, switched by profile."""

    def __init__(self, driver=None):
        self.driver = driver
        self.broken = None  # why switching stopped (gates only from then on), or None
        self.stuck = False  # broken with nodes perhaps still off: the graphs must not replay
        self.pending: dict = {}  # cudaGraph_t -> {layer: [node]} captured, not yet adopted
        self.graphs: list = []  # [_Captured], adopted
        self.selects: list = []  # the profile's layers that select (what apply last set)
        if driver is None and env_flag("SGLANG_KASCADE_NODE_SWITCH", default=True):
            try:
                self.driver = CudaDriver()
            except (OSError, AttributeError) as e:  # no driver library, or an old driver
                self.broken = f"CUDA driver graph calls unavailable ({e})"
        _SWITCHES.add(self)

    @property
    def active(self) -> bool:
        return self.driver is not None and self.broken is None

    def mark(self):
        """Before a layer's gated selection is launched: the capture's tail, or None."""
        if not self.active or not torch.cuda.is_current_stream_capturing():
            return None
        try:
            return self.driver.capture_tail(torch.cuda.current_stream().cuda_stream)
        except DriverError as e:
            self._give_up(e)
            return None

    def record(self, layer: int, mark) -> None:
        """After the selection: its nodes, kept for the graph being captured."""
        if mark is None or not self.active:
            return
        try:
            now = self.driver.capture_tail(torch.cuda.current_stream().cuda_stream)
            if now is None or now[0] != mark[0]:
                raise DriverError("the capture ended or changed graphs during a layer")
            nodes = nodes_between(self.driver, mark[1], now[1])
        except DriverError as e:
            self._give_up(e)
            return
        if nodes:
            self.pending.setdefault(mark[0], {})[layer] = nodes

    def adopt(self, graph, handle: int) -> bool:
        """Take the captured ``graph`` (instantiated; ``handle`` its cudaGraph_t) if its nodes
        were recorded here, and switch them for the current profile."""
        nodes = self.pending.pop(handle, None)
        if nodes is None:
            return False
        self.graphs.append(_Captured(weakref.ref(graph), handle, nodes,
                                     {layer: True for layer in nodes}))
        self.apply(self.selects)
        if len(self.graphs) == 1 and self.active:
            off = sum(1 for on in self.graphs[0].enabled.values() if not on)
            logger.info("kascade: decode CUDA graphs switch selection kernels by profile "
                        "(first graph: %d nodes in %d sparse layers, %d of these layers off)",
                        sum(map(len, nodes.values())), len(nodes), off)
        return True

    def apply(self, selects) -> None:
        """Enable the selection nodes of the layers that select, disable the others, on every
        adopted graph (from its next launch). Call after the gates hold the same profile."""
        self.selects = list(selects)
        if not self.active:
            return
        try:
            self._set_all(lambda layer: bool(self.selects[layer]) if layer < len(self.selects)
                          else True)
        except DriverError as e:
            self._give_up(e)

    def disabled_nodes(self) -> int:
        """Selection nodes disabled (or perhaps: a failed switch) now, over the live graphs."""
        return sum(len(c.nodes[layer]) for c in self.graphs if c.graph() is not None
                   for layer, on in c.enabled.items() if not on)

    @staticmethod
    def _exec_of(c: _Captured):
        """The executable graph of a captured one still as adopted, or None (freed, or reset or
        recaptured by its owner: then the recorded nodes are not its own)."""
        g = c.graph()
        if g is None:
            return None
        try:
            return g.raw_cuda_graph_exec() if g.raw_cuda_graph() == c.handle else None
        except RuntimeError:  # torch: reset, no graph kept
            return None

    def _set_all(self, want) -> None:
        live = []
        for c in self.graphs:
            ex = self._exec_of(c)
            if ex is None:
                continue
            live.append(c)
            for layer, nodes in c.nodes.items():
                on = want(layer)
                if c.enabled[layer] != on:
                    c.enabled[layer] = None  # unknown until every node is set
                    for node in nodes:
                        self.driver.set_enabled(ex, node, on)
                    c.enabled[layer] = on
        self.graphs = live

    def _give_up(self, err) -> None:
        if self.broken is not None:
            return
        logger.warning("kascade: selection nodes of decode CUDA graphs stay on (gated on the "
                       "device; correct, ~1.7 us per node): %s", err)
        try:
            self._set_all(lambda layer: True)
        except Exception:  # noqa: BLE001 - best effort, checked below
            pass
        self.broken = str(err)
        self.pending.clear()
        self.stuck = self.disabled_nodes() > 0
        if self.stuck:  # a later profile could select where a node stayed off: eager decode
            logger.error("kascade: selection nodes of decode CUDA graphs could not be turned "
                         "back on (%s): decode runs eagerly from now on", err)


def wanted() -> bool:
    """Whether a live switch may record nodes (sglang_adapter then keeps captured graphs)."""
    return any(s.active for s in list(_SWITCHES))


def give_up(err) -> None:
    """Every live switch stops switching (its nodes back on: the gates alone decide)."""
    for s in list(_SWITCHES):
        s._give_up(err)


def adopt(graph) -> bool:
    """A graph SGLang just captured with ``keep_graph=True``: instantiate it and give it to the
    switch that recorded its selection nodes. False (nothing to switch) otherwise."""
    handle = graph.raw_cuda_graph()
    graph.instantiate()
    return any(s.adopt(graph, handle) for s in list(_SWITCHES))
