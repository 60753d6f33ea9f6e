"""graph_nodes.py on the CPU: the walk over captured nodes and the profile switch, against a
fake driver (the real CUDA driver calls run in tests/test_device_path_gpu.py)."""

from __future__ import annotations

import pytest

from sglang_kascade import graph_nodes
from sglang_kascade.graph_nodes import DriverError, NodeSwitch, nodes_between


class FakeDriver:
    """A captured graph as {node: deps}; node types; the executable's enabled flags."""

    def __init__(self, deps: dict, kinds: dict | None = None):
        self.deps = deps
        self.kinds = kinds or {}
        self.flags = {}  # (exec, node) -> bool
        self.sets = 0
        self.fail_set = False

    def dependencies(self, node):
        return self.deps[node]

    def is_kernel(self, node):
        return self.kinds.get(node, "kernel") == "kernel"

    def set_enabled(self, ex, node, on):
        if self.fail_set:
            raise DriverError("set failed")
        self.sets += 1
        self.flags[(ex, node)] = on

    def enabled(self, ex, node):
        return self.flags.get((ex, node), True)


class FakeGraph:
    def __init__(self, handle, ex):
        self.handle, self.ex = handle, ex

    def raw_cuda_graph(self):
        return self.handle

    def raw_cuda_graph_exec(self):
        return self.ex


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


def switch_with(drv, layers: dict, handle=7, ex=70):
    """A switch that recorded ``layers`` ({layer: [nodes]}) for graph ``handle``, adopted."""
    sw = NodeSwitch(driver=drv)
    sw.pending[handle] = {k: list(v) for k, v in layers.items()}
    g = FakeGraph(handle, ex)
    assert sw.adopt(g, handle)
    return sw, g


def test_switch_disables_exactly_the_layers_that_do_not_select():
    drv = FakeDriver({})
    layers = {1: [11, 12], 2: [21, 22], 3: [31, 32]}
    sw, g = switch_with(drv, layers)
    assert drv.sets == 0 and sw.disabled_nodes() == 0  # no profile yet: every node on
    sw.apply([1, 1, 0, 1])  # layer 2 does not select
    assert {n: drv.enabled(70, n) for n in (11, 12, 21, 22, 31, 32)} == {
        11: True, 12: True, 21: False, 22: False, 31: True, 32: True}
    assert sw.disabled_nodes() == 2 and drv.sets == 2
    sw.apply([1, 1, 0, 1])  # unchanged: no driver calls
    assert drv.sets == 2
    sw.apply([1, 0, 1, 0])  # a hot swap: layers 1 and 3 off, 2 back on
    assert [drv.enabled(70, n) for n in (11, 12, 21, 22, 31, 32)] == [
        False, False, True, True, False, False]
    assert sw.disabled_nodes() == 4


def test_adopt_applies_the_current_profile_and_ignores_unknown_graphs():
    drv = FakeDriver({})
    sw = NodeSwitch(driver=drv)
    sw.apply([1, 0, 1])
    sw.pending[5] = {1: [11], 2: [21]}
    assert not sw.adopt(FakeGraph(6, 60), 6)  # not captured by this switch
    g = FakeGraph(5, 50)
    assert sw.adopt(g, 5)
    assert drv.enabled(50, 11) is False and drv.enabled(50, 21) is True
    assert sw.pending == {}


def test_freed_or_reset_graphs_are_dropped():
    drv = FakeDriver({})
    sw, g = switch_with(drv, {1: [11]})
    g.handle = 99  # reset and recaptured by its owner: the recorded nodes are not its own
    sw.apply([1, 0])
    assert drv.sets == 0 and sw.graphs == []
    sw3, g3 = switch_with(drv, {1: [13]}, handle=6, ex=60)

    def reset():
        raise RuntimeError("You cannot access the raw cudaGraph_t instance")
    g3.raw_cuda_graph = reset  # torch after CUDAGraph.reset()
    sw3.apply([1, 0])
    assert drv.sets == 0 and sw3.graphs == []
    sw2, g2 = switch_with(drv, {1: [12]}, handle=8, ex=80)
    del g2  # SGLang freed the graph
    sw2.apply([1, 0])
    assert sw2.graphs == [] and drv.sets == 0


def test_a_driver_error_turns_every_node_back_on_and_stops_switching():
    drv = FakeDriver({})
    sw, g = switch_with(drv, {1: [11], 2: [21]})
    sw.apply([1, 0, 0])
    assert sw.disabled_nodes() == 2
    drv.fail_set = True
    sw.apply([1, 1, 0])  # fails: give up, best-effort re-enable (fails too here)
    assert sw.broken and not sw.active
    assert sw.stuck and sw.disabled_nodes() == 2  # state unknown: counted as off
    drv.fail_set = False
    sw.apply([1, 0, 0])  # switching stopped: no more driver calls
    assert drv.sets == 2


def test_give_up_re_enables_when_the_driver_still_answers():
    drv = FakeDriver({})
    sw, g = switch_with(drv, {1: [11], 2: [21]})
    sw.apply([1, 0, 0])
    sw._give_up(DriverError("capture info failed"))
    assert drv.enabled(70, 11) and drv.enabled(70, 21) and sw.disabled_nodes() == 0
    assert sw.broken and not sw.stuck  # the gates alone decide from now on


def test_switch_is_inert_without_a_driver(monkeypatch):
    monkeypatch.setenv("SGLANG_KASCADE_NODE_SWITCH", "0")
    sw = NodeSwitch()
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
    drv = FakeDriver({})
    sw, g = switch_with(drv, {1: [11]}, handle=9, ex=90)
    sw.apply([1, 0])
    assert sw.disabled_nodes() == 1
    graph_nodes.give_up(RuntimeError("adopt failed"))
    assert not sw.active and drv.enabled(90, 11) and not sw.stuck


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

    def raw_cuda_graph_exec(self):
        return 5678

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
    import torch

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeTorchGraph)
    return torch


@pytest.mark.parametrize("adopt_fails", [False, True])
def test_capture_hook_keeps_the_graph_and_hands_it_over(fake_cuda_graph, monkeypatch,
                                                        adopt_fails):
    from sglang_kascade.sglang_adapter import _around_full_graph_capture_one

    sw = NodeSwitch(driver=FakeDriver({}))
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
    assert g.keep and g.instantiated  # kept (both constructor halves), then instantiated
    assert fake_cuda_graph.cuda.CUDAGraph is FakeTorchGraph  # restored after the capture
    if adopt_fails:  # the capture still succeeds; switching stops, every node on
        assert not sw.active and sw.graphs == []
    else:
        assert sw.disabled_nodes() == 2 and sw.pending == {}


def test_capture_hook_passes_through_without_a_live_switch(fake_cuda_graph):
    import gc

    from sglang_kascade.sglang_adapter import _around_full_graph_capture_one

    gc.collect()  # switches of earlier tests
    for s in list(graph_nodes._SWITCHES):
        s.broken = "test: inactive"
    be = FakeFullGraphBackend()
    _around_full_graph_capture_one(FakeFullGraphBackend.capture_one, be, 2, lambda: None)
    assert type(be._graphs[2]) is FakeTorchGraph and not be._graphs[2].keep
