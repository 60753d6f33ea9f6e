"""layers.LayerTable: the one per-layer view of a profile that the backend, the device path and
the graph editor share."""

import pytest
import torch

from sglang_kascade.layers import LayerTable
from sglang_kascade.policies import apply_policy
from sglang_kascade.profile import load_profile


def test_shipped_profile_resolves_roles_selects_and_head_map():
    p = load_profile("smollm2-135m-instruct")
    t = LayerTable.of(p)
    assert t.num_layers == p.num_layers
    for i in range(p.num_layers):
        assert t.roles[i] == p.role(i)
        assert t.selects[i] == (i in p.anchor_layers and i > 0)
        ident = tuple(range(p.model.num_kv_heads))
        assert t.head_map[i] == (tuple(p.head_map[i]) if p.is_reuse(i) else ident)
    assert p.anchor_layers[:2] == (0, 1)  # layer 1 selects again: layer 0's selection unread
    counts = t.role_counts()
    assert sum(counts.values()) == p.num_layers and counts["dense_anchor"] == 1


def test_a_dense_anchor_nobody_reads_does_not_select():
    t = LayerTable.of(apply_policy(load_profile("smollm2-135m-instruct"), "oracle"))
    assert t.roles[0] == "dense_anchor" and not t.selects[0]  # every other layer selects
    assert all(t.selects[1:]) and "reuse" not in t.roles


def test_device_tables_match_the_rows():
    roles = ("dense_anchor", "anchor", "reuse")
    t = LayerTable(roles, (True, True, False), ((0, 1), (0, 1), (1, 1)))
    sel, hm = t.device_tables()
    assert sel.dtype == hm.dtype == torch.int32
    assert sel.tolist() == [1, 1, 0] and hm.tolist() == [[0, 1], [0, 1], [1, 1]]
    rows = t.head_map_rows("cpu")
    assert [r.tolist() for r in rows] == [[0, 1], [0, 1], [1, 1]] and rows[0].dtype == torch.int64


@pytest.mark.parametrize("roles,selects,maps,msg", [
    (("dense_anchor", "reuse"), (True, True), ((0,), (0,)), "reuse layer cannot select"),
    (("dense_anchor", "other"), (True, False), ((0,), (0,)), "unknown layer roles"),
    (("dense_anchor", "reuse"), (True,), ((0,), (0,)), "one entry per layer"),
])
def test_inconsistent_tables_are_refused(roles, selects, maps, msg):
    with pytest.raises(ValueError, match=msg):
        LayerTable(roles, selects, maps)
