"""Take the selection kernels of captured decode graphs in and out by profile, without recapture.

A captured decode graph must serve any hot-swapped profile, so every sparse layer launches the
anchor selection (score, pool, Top-k: 7 kernels) gated by ``graph_selects[layer]`` on the device
(device_path.py): a layer that does not select still pays ~1.7 us per gated kernel node, 0.26-0.33
ms per step at batch 1 on Llama-3.1-8B shapes (bench/decode_step.py, docs/results/kernels-h100.md).

This module removes that cost. During capture, DevicePath brackets each sparse layer's selection
with ``NodeSwitch.mark`` / ``record``: the CUDA driver's capture info gives the stream's last graph
node before and after, and the nodes in between (a chain walked through their dependencies) are
that layer's selection kernels. After SGLang's graph runner has captured a graph
(``sglang_adapter`` keeps its ``cudaGraph_t``: ``keep_graph=True``), ``adopt`` copies each chain
into a small stash graph and hands the graph to the switch that recorded its nodes. From then on
every profile (``NodeSwitch.apply``) edits the kept graph: the chains of the layers that do not
select are taken out (their predecessors then feed their successors directly), those of the
layers that select are put back (copied from the stash: same kernels, arguments and launch
attributes), and torch re-instantiates the executable graph (``CUDAGraph.instantiate``; a graph
in flight finishes on the old one). Not a recapture: no Python runs, the graph's memory stays.
Measured: a disabled node (``cuGraphNodeSetEnabled``) still cost ~0.6 us; a removed
one costs nothing (docs/results/kernels-h100.md).

The gates stay: a chain left in is always correct, so any driver error puts every chain back and
leaves the gates alone to decide (logged once); if that fails too, the switch is ``stuck`` and
decode runs eagerly (DevicePath.graph_fits). Invariant: a removed chain belongs to a layer whose
gate is 0.

CUDA driver entry points through ctypes (libcuda.so.1, CUDA 12 drivers: the ``_v2`` kernel-node
calls): no extra dependency. Off with SGLANG_KASCADE_NODE_SWITCH=0 (gated launches only).
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from dataclasses import dataclass, field

import torch


logger = logging.getLogger("sglang_kascade")

KERNEL_NODE = 0  # CU_GRAPH_NODE_TYPE_KERNEL
CAPTURE_ACTIVE = 1  # CU_STREAM_CAPTURE_STATUS_ACTIVE
MAX_NODES_PER_LAYER = 64  # a selection launches up to 9 kernels; more means the walk went astray


class DriverError(RuntimeError):
    pass


class KernelNodeParams(ctypes.Structure):
    """CUDA_KERNEL_NODE_PARAMS_v2 (cuda.h, CUDA 12)."""

    _fields_ = [("func", ctypes.c_void_p),
                ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint),
                ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("kernelParams", ctypes.c_void_p),
                ("extra", ctypes.c_void_p), ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


class CudaDriver:
    """The few CUDA driver graph calls the switch needs (handles as Python ints)."""

    def __init__(self, lib=None):
        lib = lib or ctypes.CDLL("libcuda.so.1")
        P, V, N = ctypes.POINTER, ctypes.c_void_p, ctypes.c_size_t
        self._info = lib.cuStreamGetCaptureInfo_v2  # (stream, status*, id*, graph*, deps**, n*)
        self._info.argtypes = [V, P(ctypes.c_int), P(ctypes.c_ulonglong), P(V), P(P(V)), P(N)]
        self._deps = lib.cuGraphNodeGetDependencies  # (node, deps*, n*)
        self._deps.argtypes = [V, P(V), P(N)]
        self._dependents = lib.cuGraphNodeGetDependentNodes  # (node, nodes*, n*)
        self._dependents.argtypes = [V, P(V), P(N)]
        self._type = lib.cuGraphNodeGetType  # (node, type*)
        self._type.argtypes = [V, P(ctypes.c_int)]
        self._nodes = lib.cuGraphGetNodes  # (graph, nodes*, n*)
        self._nodes.argtypes = [V, P(V), P(N)]
        self._create = lib.cuGraphCreate  # (graph*, flags)
        self._create.argtypes = [P(V), ctypes.c_uint]
        self._destroy = lib.cuGraphDestroy  # (graph)
        self._destroy.argtypes = [V]
        self._destroy_node = lib.cuGraphDestroyNode  # (node)
        self._destroy_node.argtypes = [V]
        self._add_edges = lib.cuGraphAddDependencies  # (graph, from*, to*, n)
        self._add_edges.argtypes = [V, P(V), P(V), N]
        self._remove_edges = lib.cuGraphRemoveDependencies  # (graph, from*, to*, n)
        self._remove_edges.argtypes = [V, P(V), P(V), N]
        self._get_params = lib.cuGraphKernelNodeGetParams_v2  # (node, params*)
        self._get_params.argtypes = [V, P(KernelNodeParams)]
        self._add_kernel = lib.cuGraphAddKernelNode_v2  # (node*, graph, deps*, n, params*)
        self._add_kernel.argtypes = [P(V), V, P(V), N, P(KernelNodeParams)]
        self._copy_attrs = lib.cuGraphKernelNodeCopyAttributes  # (dst, src)
        self._copy_attrs.argtypes = [V, V]

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

    def _listed(self, fn, handle: int, what: str) -> tuple:
        n = ctypes.c_size_t()
        self._check(fn(handle, None, ctypes.byref(n)), what)
        if n.value == 0:  # (the driver refuses an array with a count of 0)
            return ()
        arr = (ctypes.c_void_p * n.value)()
        self._check(fn(handle, arr, ctypes.byref(n)), what)
        return tuple(arr[i] for i in range(n.value))

    def dependencies(self, node: int) -> tuple:
        return self._listed(self._deps, node, "cuGraphNodeGetDependencies")

    def dependents(self, node: int) -> tuple:
        return self._listed(self._dependents, node, "cuGraphNodeGetDependentNodes")

    def node_count(self, graph: int) -> int:
        return len(self._listed(self._nodes, graph, "cuGraphGetNodes"))

    def is_kernel(self, node: int) -> bool:
        t = ctypes.c_int()
        self._check(self._type(node, ctypes.byref(t)), "cuGraphNodeGetType")
        return t.value == KERNEL_NODE

    def create_graph(self) -> int:
        g = ctypes.c_void_p()
        self._check(self._create(ctypes.byref(g), 0), "cuGraphCreate")
        return g.value

    def destroy_graph(self, graph: int) -> None:
        self._check(self._destroy(graph), "cuGraphDestroy")

    def destroy_node(self, node: int) -> None:
        self._check(self._destroy_node(node), "cuGraphDestroyNode")

    def _edges(self, fn, graph: int, pairs: list, what: str) -> None:
        if pairs:
            a = (ctypes.c_void_p * len(pairs))(*[p for p, _ in pairs])
            b = (ctypes.c_void_p * len(pairs))(*[q for _, q in pairs])
            self._check(fn(graph, a, b, len(pairs)), what)

    def add_edges(self, graph: int, pairs: list) -> None:
        self._edges(self._add_edges, graph, pairs, "cuGraphAddDependencies")

    def remove_edges(self, graph: int, pairs: list) -> None:
        self._edges(self._remove_edges, graph, pairs, "cuGraphRemoveDependencies")

    def copy_kernel(self, graph: int, deps: tuple, src: int) -> int:
        """A kernel node in ``graph`` after ``deps`` launching what node ``src`` launches (its
        function, grid, arguments: copied by the driver; and its launch attributes)."""
        params = KernelNodeParams()
        self._check(self._get_params(src, ctypes.byref(params)), "cuGraphKernelNodeGetParams")
        node = ctypes.c_void_p()
        arr = (ctypes.c_void_p * len(deps))(*deps) if deps else None
        self._check(self._add_kernel(ctypes.byref(node), graph, arr, len(deps),
                                     ctypes.byref(params)), "cuGraphAddKernelNode")
        self._check(self._copy_attrs(node.value, src), "cuGraphKernelNodeCopyAttributes")
        return node.value


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
class _Chain:
    """One layer's selection in a kept graph: in it (``nodes``) or taken out."""

    nodes: list  # the chain's nodes in the kept graph now, oldest first ([] while out)
    stash: list  # copies of the chain in the stash graph (what putting it back copies)
    pred: tuple  # the chain's first node's dependencies (never selection nodes)
    succ: tuple  # the chain's last node's dependents (never selection nodes)
    added: list = field(default_factory=list)  # (pred, succ) edges added while out
    on: bool | None = True  # in the graph; None: unknown (an edit failed half-way)


@dataclass
class _Captured:
    graph: weakref.ref  # the torch.cuda.CUDAGraph (SGLang owns it)
    handle: int  # its cudaGraph_t (the nodes belong to it)
    stash: int  # a cudaGraph_t holding copies of the chains
    chains: dict  # layer -> _Chain
    live: bool = False  # the executable graph matches the kept graph's chains


_SWITCHES: "weakref.WeakSet[NodeSwitch]" = weakref.WeakSet()


class NodeSwitch:
    """Per DevicePath: the selection chains of its captured graphs, in or out by profile."""

    def __init__(self, driver=None, enabled: bool = True):
        self.driver = driver
        self.broken = None  # why switching stopped (gates only from then on), or None
        self.stuck = False  # broken with chains perhaps still out: the graphs must not replay
        self.pending: dict = {}  # cudaGraph_t -> {layer: [node]} captured, not yet adopted
        self.graphs: list = []  # [_Captured], adopted
        self.selects: list = []  # the profile's layers that select (what apply last set)
        if driver is None and enabled:  # config.DevSwitches.node_switch
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
        """Take the captured, not yet instantiated ``graph`` (``handle`` its cudaGraph_t) if its
        nodes were recorded here: stash its chains, fit it to the current profile and
        instantiate it."""
        layers = self.pending.pop(handle, None)
        if layers is None:
            return False
        d = self.driver
        ours = {n for nodes in layers.values() for n in nodes}
        stash = d.create_graph()
        cap = _Captured(weakref.ref(graph), handle, stash, {})
        self.graphs.append(cap)  # from here on a failure puts every chain back (_give_up)
        for layer, nodes in layers.items():
            pred, succ = d.dependencies(nodes[0]), d.dependents(nodes[-1])
            if ours & (set(pred) | set(succ)):
                raise DriverError("selection chains of two layers touch")
            copies = []
            for n in nodes:
                copies.append(d.copy_kernel(stash, tuple(copies[-1:]), n))
            cap.chains[layer] = _Chain(list(nodes), copies, pred, succ)
        self.apply(self.selects)
        if len(self.graphs) == 1 and self.active:
            out = sum(1 for c in cap.chains.values() if not c.on)
            logger.info("kascade: decode CUDA graphs switch selection kernels by profile "
                        "(first graph: %d nodes in %d sparse layers, %d of these layers out)",
                        sum(map(len, layers.values())), len(layers), out)
        return True

    def apply(self, selects) -> None:
        """Put the chains of the layers that select in, take the others out, on every adopted
        graph (re-instantiated where anything changed). Call after the gates hold the same
        profile."""
        self.selects = list(selects)
        if not self.active:
            return
        try:
            self._set_all(lambda layer: bool(self.selects[layer]) if layer < len(self.selects)
                          else True)
        except (DriverError, RuntimeError) as e:  # torch raises RuntimeError on instantiate
            self._give_up(e)

    def disabled_nodes(self) -> int:
        """Selection nodes out of the executable graphs (or perhaps: a failed edit), live
        graphs."""
        return sum(len(ch.stash) for c in self.graphs if c.graph() is not None
                   for ch in c.chains.values() if not (c.live and ch.on))

    @staticmethod
    def _graph_of(c: _Captured):
        """The torch graph of a captured one still as adopted, or None (freed, or reset or
        recaptured by its owner: then the recorded nodes are not its own)."""
        g = c.graph()
        if g is None:
            return None
        try:
            return g if g.raw_cuda_graph() == c.handle else None
        except RuntimeError:  # torch: reset, no graph kept
            return None

    def _take_out(self, handle: int, ch: _Chain) -> None:
        d = self.driver
        for n in reversed(ch.nodes):
            d.destroy_node(n)  # and its edges
        ch.nodes = []
        have = {s: set(d.dependencies(s)) for s in ch.succ}
        ch.added = [(p, s) for s in ch.succ for p in ch.pred if p not in have[s]]
        d.add_edges(handle, ch.added)

    def _put_back(self, handle: int, ch: _Chain) -> None:
        d = self.driver
        d.remove_edges(handle, ch.added)
        ch.added = []
        deps = ch.pred
        for src in ch.stash:
            ch.nodes.append(d.copy_kernel(handle, deps, src))
            deps = (ch.nodes[-1],)
        d.add_edges(handle, [(ch.nodes[-1], s) for s in ch.succ])

    def _set_all(self, want) -> None:
        live = []
        for c in self.graphs:
            g = self._graph_of(c)
            if g is None:
                self._drop(c)
                continue
            live.append(c)
            changed = False
            for layer, ch in c.chains.items():
                on = want(layer)
                if ch.on != on:
                    changed = True
                    c.live = False
                    if ch.on is None:
                        raise DriverError(f"layer {layer}'s chain was left half-edited")
                    ch.on = None  # unknown until the edit completes
                    (self._put_back if on else self._take_out)(c.handle, ch)
                    ch.on = on
            if changed or not c.live:
                c.live = False
                g.instantiate()  # torch replaces its executable graph
                c.live = True
        self.graphs = live

    def _drop(self, c: _Captured) -> None:
        """Free the stash of a graph its owner freed or reset (once)."""
        stash, c.stash = c.stash, 0
        if stash:
            try:
                self.driver.destroy_graph(stash)
            except DriverError:
                pass

    def _give_up(self, err) -> None:
        if self.broken is not None:
            return
        logger.warning("kascade: selection kernels of decode CUDA graphs stay in (gated on the "
                       "device; correct, ~1.7 us per node): %s", err)
        # A chain left half-edited cannot be repaired safely (a stray histogram kernel would
        # count twice): then decode goes eager. Otherwise every chain goes back in.
        half = any(ch.on is None for c in self.graphs for ch in c.chains.values())
        if not half:
            try:
                self._set_all(lambda layer: True)
            except Exception:  # noqa: BLE001 - best effort, checked below
                pass
        self.broken = str(err)
        self.pending.clear()
        self.stuck = half or self.disabled_nodes() > 0
        if self.stuck:  # a later profile could select where a chain stayed out: eager decode
            logger.error("kascade: selection kernels of decode CUDA graphs could not be put "
                         "back (%s): decode runs eagerly from now on", err)


def wanted() -> bool:
    """Whether a live switch may record nodes (sglang_adapter then keeps captured graphs)."""
    return any(s.active for s in list(_SWITCHES))


def give_up(err) -> None:
    """Every live switch stops switching (its nodes back on: the gates alone decide)."""
    for s in list(_SWITCHES):
        s._give_up(err)


def adopt(graph) -> bool:
    """A graph SGLang just captured with ``keep_graph=True``: give it to the switch that
    recorded its selection nodes (which instantiates it), or instantiate it as capture_end
    would have. False (nothing to switch) in the second case."""
    handle = graph.raw_cuda_graph()
    if any(s.adopt(graph, handle) for s in list(_SWITCHES)):
        return True
    graph.instantiate()
    return False
