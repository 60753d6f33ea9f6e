"""LayerTable: a profile resolved per layer, built once when a profile is set and shared by the
backend (PyTorch path), the device path (Triton kernels, decode-graph tables) and the graph
editor (graph_nodes.NodeSwitch), so "which layers select" and "which head a reuse layer reads"
exist in one place.

Roles (profile.py): ``dense`` (the dense backend), ``dense_anchor`` (layer 0: dense, and selects
for the layers after it), ``anchor`` (selects, attends over its selection), ``reuse`` (attends
over the last selecting layer's selection through ``head_map[layer]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROLES = ("dense", "dense_anchor", "anchor", "reuse")


@dataclass(frozen=True)
class LayerTable:
    roles: tuple  # [L] str, one of ROLES
    selects: tuple  # [L] bool: the layer computes a selection (an anchor; a dense anchor read)
    head_map: tuple  # [L][Hkv] int: the selecting layer's KV head a layer's head h reads;
                     # identity outside reuse layers

    @classmethod
    def of(cls, profile) -> "LayerTable":
        """``profile`` already under its policy (policies.apply_policy). A dense anchor selects
        only if a reuse layer reads it (layer 0 under "oracle", where every layer is an anchor,
        does not)."""
        n = profile.num_layers
        roles = tuple(profile.role(i) for i in range(n))
        read = {profile.anchor_for(i) for i in range(n) if profile.is_reuse(i)}
        selects = tuple(role == "anchor" or (role == "dense_anchor" and i in read)
                        for i, role in enumerate(roles))
        hkv = len(profile.head_map[0]) if profile.head_map else 0
        ident = tuple(range(hkv))
        head_map = tuple(tuple(int(x) for x in row) if role == "reuse" else ident
                         for row, role in zip(profile.head_map, roles))
        return cls(roles, selects, head_map)

    def __post_init__(self):
        if not len(self.roles) == len(self.selects) == len(self.head_map):
            raise ValueError("roles, selects and head_map must have one entry per layer")
        bad = [r for r in self.roles if r not in ROLES]
        if bad:
            raise ValueError(f"unknown layer roles {bad}")
        if any(sel and role == "reuse" for sel, role in zip(self.selects, self.roles)):
            raise ValueError("a reuse layer cannot select (graphs attend from a selecting "
                             "layer's own logits, through an identity head map)")

    @property
    def num_layers(self) -> int:
        return len(self.roles)

    def role_counts(self) -> dict:
        counts = dict.fromkeys(ROLES, 0)
        for role in self.roles:
            counts[role] += 1
        return counts

    def head_map_rows(self, device) -> list:
        """[L] int64 tensors [Hkv] on ``device``: the PyTorch path's Selection.for_heads."""
        return [torch.tensor(row, dtype=torch.int64, device=device) for row in self.head_map]

    def device_tables(self) -> tuple:
        """(selects [L] int32, head_map [L, Hkv] int32) on the CPU: the decode graphs' copies."""
        return (torch.tensor([int(x) for x in self.selects], dtype=torch.int32),
                torch.tensor([list(r) for r in self.head_map], dtype=torch.int32))
