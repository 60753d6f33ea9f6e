"""graph_nodes.py on the CPU: the walk over captured nodes and the profile switch, against a
fake driver (the real CUDA driver calls run in tests/gpu/test_device_path_gpu.py)."""

from __future__ import annotations

import pytest

from sglang_kascade import graph_nodes
from sglang_kascade.graph_nodes import DriverError, NodeSwitch, nodes_between


class FakeDriver:
    """Graphs as {node: deps} (one dict for every graph), node types, and what each kernel node
    launches (a copy launches what its source does). ``fail``: the name of a call that raises
    (after ``fail_after`` successful calls of it)."""

    def __init__(self, deps: dict | None = None, kinds: dict | None = None):
        self.deps = {n: tuple(d) for n, d in (deps or {}).items()}
        self.kinds = kinds or {}
        self.graph = {}  # node -> graph handle (nodes made by the driver)
        self.launches = {}  # node -> label of the kernel it launches
        self.next = 10_000
        self.fail, self.fail_after, self.calls = None, 0, {}

    def _call(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.fail == name and self.calls[name] > self.fail_after:
            raise DriverError(f"{name} failed")

    def dependencies(self, node):
        self._call("dependencies")
        return self.deps[node]

    def dependents(self, node):
        return tuple(m for m, d in self.deps.items() if node in d)

    def is_kernel(self, node):
        return self.kinds.get(node, "kernel") == "kernel"

    def create_graph(self):
        self.next += 1
        return self.next

    def destroy_graph(self, graph):
        self._call("destroy_graph")

    def destroy_node(self, node):
        self._call("destroy_node")
        del self.deps[node]
        self.deps = {m: tuple(x for x in d if x != node) for m, d in self.deps.items()}

    def add_edges(self, graph, pairs):
        self._call("add_edges")
        for p, q in pairs:
            assert p not in self.deps[q], "duplicate edge"
            self.deps[q] += (p,)

    def remove_edges(self, graph, pairs):
        self._call("remove_edges")
        for p, q in pairs:
            assert p in self.deps[q], "no such edge"
            self.deps[q] = tuple(x for x in self.deps[q] if x != p)

    def copy_kernel(self, graph, deps, src):
        self._call("copy_kernel")
        self.next += 1
        self.deps[self.next] = tuple(deps)
        self.graph[self.next] = graph
        self.launches[self.next] = self.label(src)
        return self.next

    def label(self, node):
        return self.launches.get(node, node)

    def order(self, start=0):
        """Labels of the nodes reached from ``start`` along dependents, in launch order (the
        model graphs here are chains)."""
        out, node = [], start
        while True:
            out.append(self.label(node))
            nxt = self.dependents(node)
            if not nxt:
                return out
            assert len(nxt) == 1, nxt
            node = nxt[0]


class FakeGraph:
    """torch.cuda.CUDAGraph as the switch uses it (kept graph, instantiate)."""

    def __init__(self, handle, fail_instantiate: int = 0):
        self.handle = handle
        self.instantiations = 0
        self.fail_instantiate = fail_instantiate

    def raw_cuda_graph(self):
        return self.handle

    def instantiate(self):
        if self.fail_instantiate:
            self.fail_instantiate -= 1
            raise RuntimeError("CUDA error: instantiate failed")
        self.instantiations += 1


def chain(first: int, n: int, before=(0,)) -> dict:
    """Nodes first..first+n-1, each depending on the previous; the first on ``before``."""
    deps = {first: tuple(before)}
    for i in range(first + 1, first + n):
        deps[i] = (i - 1,)
    return deps


def test_nodes_between_walks_the_chain_oldest_first():
    drv = FakeDriver({**chain(1, 7)})
    assert nodes_between(drv, (0,), (7,)) == list(range(1, 8))
    assert nodes_between(drv, (3,), (7,)) == [4, 5, 6, 7]
    assert nodes_between(drv, (7,), (7,)) == []  # nothing captured in between


def test_nodes_between_stops_at_a_fork_join_tail():
    deps = {1: (10, 11), 2: (1,), 3: (2,)}  # the first node joins two tail nodes
    assert nodes_between(FakeDriver(deps), (10, 11), (3,)) == [1, 2, 3]


@pytest.mark.parametrize("bad", ["join", "memset", "runaway", "two_tails"])
def test_nodes_between_refuses_what_is_not_a_kernel_chain(bad):
    deps, kinds, after = chain(1, 4), {}, (4,)
    if bad == "join":
        deps[3] = (2, 99)
    elif bad == "memset":
        kinds[2] = "memset"
    elif bad == "runaway":
        deps = chain(1, graph_nodes.MAX_NODES_PER_LAYER + 5, before=(1000,))
        after = (graph_nodes.MAX_NODES_PER_LAYER + 4,)
    else:
        after = (3, 4)
    with pytest.raises(DriverError):
        nodes_between(FakeDriver(deps, kinds), (0,), after)


def model(layers: dict) -> dict:
    """A kept decode graph as one chain: node 0, then per layer its selection nodes and its
    attention node (layer * 100)."""
    deps, prev = {0: ()}, 0
    for layer, nodes in sorted(layers.items()):
        for n in nodes:
            deps[n], prev = (prev,), n
        deps[layer * 100], prev = (prev,), layer * 100
    return deps


LAYERS = {1: [11, 12], 2: [21, 22], 3: [31, 32]}
FULL = [0, 11, 12, 100, 21, 22, 200, 31, 32, 300]


def switch_with(layers: dict, handle=7, drv=None):
    """A switch that recorded ``layers`` ({layer: [nodes]}) for graph ``handle``, adopted."""
    drv = drv or FakeDriver(model(layers))
    sw = NodeSwitch(driver=drv)
    sw.pending[handle] = {k: list(v) for k, v in layers.items()}
    g = FakeGraph(handle)
    assert sw.adopt(g, handle)
    return sw, g, drv


def test_switch_takes_out_exactly_the_layers_that_do_not_select():
    sw, g, drv = switch_with(LAYERS)
    assert drv.order() == FULL and sw.disabled_nodes() == 0  # no profile yet: every chain in
    assert g.instantiations == 1  # adopt instantiates (capture_end did not: keep_graph)
    sw.apply([1, 1, 0, 1])  # layer 2 does not select: its attention follows layer 1's
    assert drv.order() == [0, 11, 12, 100, 200, 31, 32, 300]
    assert sw.disabled_nodes() == 2 and g.instantiations == 2
    sw.apply([1, 1, 0, 1])  # unchanged: no edit, no instantiation
    assert g.instantiations == 2
    sw.apply([1, 0, 1, 0])  # a hot swap: layers 1 and 3 out, 2 back in (copies of its kernels)
    assert drv.order() == [0, 100, 21, 22, 200, 300]
    assert sw.disabled_nodes() == 4 and g.instantiations == 3
    sw.apply([1, 1, 1, 1])
    assert drv.order() == FULL and sw.disabled_nodes() == 0


def test_a_chain_keeps_edges_that_were_there_before_it_went_out():
    deps = model({1: [11, 12]})
    deps[100] += (0,)  # the attention also depended on the chain's predecessor directly
    sw, g, drv = switch_with({1: [11, 12]}, drv=FakeDriver(deps))
    sw.apply([1, 0])
    assert drv.deps[100] == (0,)  # no duplicate edge
    sw.apply([1, 1])  # back in: the old direct edge stays, the chain's copy feeds it again
    assert [drv.label(n) for n in drv.deps[100]] == [0, 12]
    copy12 = drv.deps[100][1]
    assert [drv.label(n) for n in drv.deps[drv.deps[copy12][0]]] == [0]  # 0 -> 11 -> 12 -> 100


def test_adopt_fits_the_current_profile_and_ignores_unknown_graphs():
    drv = FakeDriver(model({1: [11], 2: [21]}))
    sw = NodeSwitch(driver=drv)
    sw.apply([1, 0, 1])
    sw.pending[5] = {1: [11], 2: [21]}
    assert not sw.adopt(FakeGraph(6), 6)  # not captured by this switch
    g = FakeGraph(5)
    assert sw.adopt(g, 5)
    assert drv.order() == [0, 100, 21, 200] and g.instantiations == 1 and sw.pending == {}
    other = FakeGraph(424242)  # captured with no switch recording it: instantiated as usual
    assert not graph_nodes.adopt(other) and other.instantiations == 1


def test_freed_or_reset_graphs_are_dropped():
    sw, g, drv = switch_with({1: [11]})
    g.handle = 99  # reset and recaptured by its owner: the recorded nodes are not its own
    sw.apply([1, 0])
    assert sw.graphs == [] and drv.order() == [0, 11, 100] and g.instantiations == 1
    sw3, g3, drv3 = switch_with({1: [13]}, handle=6)

    def reset():
        raise RuntimeError("You cannot access the raw cudaGraph_t instance")
    g3.raw_cuda_graph = reset  # torch after CUDAGraph.reset()
    sw3.apply([1, 0])
    assert sw3.graphs == [] and drv3.order() == [0, 13, 100]
    sw2, g2, drv2 = switch_with({1: [12]}, handle=8)
    del g2  # SGLang freed the graph
    sw2.apply([1, 0])
    assert sw2.graphs == [] and drv2.order() == [0, 12, 100]


def test_an_error_before_any_edit_leaves_the_graph_whole():
    drv = FakeDriver(model(LAYERS))
    drv.fail, drv.fail_after = "copy_kernel", 3  # the stash of the second layer fails
    sw = NodeSwitch(driver=drv)
    sw.apply([1, 0, 0, 0])
    sw.pending[7] = {k: list(v) for k, v in LAYERS.items()}
    g = FakeGraph(7)
    with pytest.raises(DriverError):
        sw.adopt(g, 7)
    graph_nodes.give_up(DriverError("adopt failed"))  # what the capture hook does
    assert drv.order() == FULL and g.instantiations == 1  # the graph as captured
    assert sw.broken and not sw.stuck and sw.disabled_nodes() == 0


@pytest.mark.parametrize("call", ["destroy_node", "add_edges", "remove_edges"])
def test_an_error_mid_edit_sends_decode_eager(call):
    sw, g, drv = switch_with(LAYERS)
    sw.apply([1, 1, 0, 1])
    drv.fail, drv.fail_after = call, drv.calls.get(call, 0)  # the next such call fails
    sw.apply([1, 0, 1, 1])  # layer 1 out (destroy, add edges), layer 2 back (remove edges)
    assert sw.broken and not sw.active
    assert sw.stuck  # a half-edited chain: no repair, the graphs must not replay
    drv.fail = None
    n = g.instantiations
    sw.apply([1, 1, 1, 1])  # switching stopped
    assert g.instantiations == n


@pytest.mark.parametrize("failures", [1, 2])
def test_a_failed_instantiation_puts_every_chain_back(failures):
    sw, g, drv = switch_with(LAYERS)
    g.fail_instantiate = failures
    sw.apply([1, 1, 0, 1])  # instantiate fails: give up, every chain back in, instantiate again
    assert sw.broken and drv.order() == FULL
    if failures == 1:
        assert not sw.stuck and g.instantiations == 2 and sw.disabled_nodes() == 0
    else:  # the executable graph is not the kept one: eager from now on
        assert sw.stuck and g.instantiations == 1


def test_give_up_puts_chains_back_when_the_driver_still_answers():
    sw, g, drv = switch_with(LAYERS)
    sw.apply([1, 0, 0, 0])
    sw._give_up(DriverError("capture info failed"))
    assert drv.order() == FULL and sw.disabled_nodes() == 0
    assert sw.broken and not sw.stuck  # the gates alone decide from now on


def test_switch_is_inert_without_a_driver():
    sw = NodeSwitch(enabled=False)  # config.DevSwitches.node_switch off
    assert not sw.active and sw.mark() is None
    sw.apply([1, 0])  # no error
    sw.record(1, None)
    assert sw.pending == {}


def test_a_stuck_switch_sends_decode_eager():
    from sglang_kascade.device_path import DevicePath

    dp = DevicePath("cpu")
    dp.node_switch = NodeSwitch(driver=FakeDriver({}))
    assert dp.graph_fits(10, 10)
    dp.node_switch.stuck = True
    assert not dp.graph_fits(10, 10)


def test_module_give_up_stops_every_live_switch():
    sw, g, drv = switch_with({1: [11]}, handle=9)
    sw.apply([1, 0])
    assert sw.disabled_nodes() == 1
    graph_nodes.give_up(RuntimeError("adopt failed"))
    assert not sw.active and drv.order() == [0, 11, 100] and not sw.stuck


class FakeTorchGraph:
    """torch.cuda.CUDAGraph's construction contract: keep_graph reaches __new__ AND __init__ (a
    pybind class reads it in __init__: a subclass passing it to __new__ only kept nothing)."""

    def __new__(cls, keep_graph=False):
        return super().__new__(cls)

    def __init__(self, keep_graph=False):
        self.keep = keep_graph
        self.instantiated = False

    def raw_cuda_graph(self):
        if not self.keep:
            raise RuntimeError("keep_graph=True required")
        return 1234

    def instantiate(self):
        self.instantiated = True


class FakeFullGraphBackend:
    """SGLang's FullCudaGraphBackend as the hook sees it: capture_one makes the graph with
    ``torch.cuda.CUDAGraph()`` and keeps it in ``_graphs[shape_key]``."""

    def __init__(self):
        self._graphs = {}

    def capture_one(self, shape_key, forward_fn):
        import torch

        g = torch.cuda.CUDAGraph()
        forward_fn()
        self._graphs[shape_key] = g
        return "captured"


@pytest.fixture
def fake_cuda_graph(monkeypatch):
    """A torch whose CUDAGraph is the fake, and the adapter's capture hook wired to
    graph_nodes as plugin.register wires it."""
    import torch

    from sglang_kascade import sglang_adapter

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeTorchGraph)
    monkeypatch.setattr(sglang_adapter.PACKAGE_HOOKS, "graph_editor", lambda: graph_nodes)
    return torch


@pytest.mark.parametrize("adopt_fails", [False, True])
def test_capture_hook_keeps_the_graph_and_hands_it_over(fake_cuda_graph, monkeypatch,
                                                        adopt_fails):
    from sglang_kascade.sglang_adapter import _around_full_graph_capture_one

    sw = NodeSwitch(driver=FakeDriver(model({3: [31, 32]})))
    sw.pending[1234] = {3: [31, 32]}
    sw.apply([1, 1, 1, 0])
    if adopt_fails:
        def broken(g, handle):
            raise DriverError("adopt failed")
        monkeypatch.setattr(sw, "adopt", broken)
    be = FakeFullGraphBackend()
    out = _around_full_graph_capture_one(FakeFullGraphBackend.capture_one, be, 1, lambda: None)
    assert out == "captured"
    g = be._graphs[1]
    assert g.keep  # kept (both constructor halves)
    assert fake_cuda_graph.cuda.CUDAGraph is FakeTorchGraph  # restored after the capture
    if adopt_fails:  # the capture still succeeds; switching stops (torch's replay
        # instantiates a kept graph not yet instantiated)
        assert not sw.active and sw.graphs == []
    else:  # the layer's chain out, then instantiated
        assert g.instantiated and sw.disabled_nodes() == 2 and sw.pending == {}


def test_capture_hook_passes_through_without_a_live_switch(fake_cuda_graph):
    import gc

    from sglang_kascade.sglang_adapter import _around_full_graph_capture_one

    gc.collect()  # switches of earlier tests
    for s in list(graph_nodes._SWITCHES):
        s.broken = "test: inactive"
    be = FakeFullGraphBackend()
    _around_full_graph_capture_one(FakeFullGraphBackend.capture_one, be, 2, lambda: None)
    assert type(be._graphs[2]) is FakeTorchGraph and not be._graphs[2].keep


def test_a_freed_graphs_stash_is_destroyed_once_even_when_a_later_graph_fails():
    deps = {**model({1: [11, 12]}), 1000: (), 1011: (1000,), 1012: (1011,), 1100: (1012,)}
    drv = FakeDriver(deps)
    sw = NodeSwitch(driver=drv)
    sw.pending[7] = {1: [11, 12]}
    sw.pending[8] = {1: [1011, 1012]}
    g1, g2 = FakeGraph(7), FakeGraph(8)
    assert sw.adopt(g1, 7) and sw.adopt(g2, 8)
    del g1  # SGLang freed the first graph
    g2.fail_instantiate = 1  # the second graph's re-instantiation fails once
    sw.apply([1, 0])  # drops the first (its stash destroyed), fails on the second, gives up:
    # every chain back in and the walk over the graphs again
    assert not sw.stuck and drv.calls["destroy_graph"] == 1 and g2.instantiations == 2
