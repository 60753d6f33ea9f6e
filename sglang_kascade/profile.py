"""Anchor profiles: versioned JSON that gives every layer a role (see docs/profiles.md).

Roles, derived from ``dense_layers`` and ``anchor_layers``:
  * dense + anchor (layer 0, always): attends densely and selects Top-k for the next layers;
  * anchor: selects its own Top-k and attends over it;
  * dense only: attends densely, selects nothing;
  * reuse (every other layer): attends over the most recent anchor's selection, KV head h
    reading anchor KV head ``head_map[layer][h]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import (INT32_MAX, MAX_BUDGET_KEYS, MAX_PAGE_TILE_SIZE, MAX_TILE_SIZE, BudgetConfig,
                     KascadeConfigError, check_budget_fields)
from .tp import MAX_TP_SIZE, head_map_problem, tp_size_problem

SCHEMA_VERSION = 1
MAX_PROFILE_BYTES = 4 << 20
REQUIRED = ("schema_version", "model", "dense_layers", "anchor_layers", "head_map",
            "topk_fraction", "k_min", "tile_size", "granularity", "provenance")
OPTIONAL_DEFAULTS = {"page_tile_size": 16, "round_to": 1, "dense_tail": 0, "query_tail": 0,
                     "name": None, "tp_sizes": [1]}
FINGERPRINT_FIELDS = ("architecture", "num_layers", "num_q_heads", "num_kv_heads", "head_dim")
BUDGET_FIELDS = ("topk_fraction", "k_min", "tile_size", "granularity", "page_tile_size", "round_to",
                 "dense_tail", "query_tail")


@dataclass(frozen=True)
class ModelFingerprint:
    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in FINGERPRINT_FIELDS}


@dataclass(frozen=True)
class AnchorProfile:
    name: Optional[str]
    model: ModelFingerprint
    dense_layers: tuple
    anchor_layers: tuple
    head_map: tuple  # [num_layers][num_kv_heads]
    budget: BudgetConfig
    provenance: dict = field(default_factory=dict, compare=False)
    # TP sizes whose ranks the head map keeps every reuse head on (tp.py): validated, written by
    # calibration's --tp and by calibrate.tp_fit
    tp_sizes: tuple = (1,)

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def anchor_for(self, layer_id: int) -> int:
        """The most recent anchor at or before ``layer_id``."""
        return max(a for a in self.anchor_layers if a <= layer_id)

    def is_reuse(self, layer_id: int) -> bool:
        return layer_id not in self.dense_layers and layer_id not in self.anchor_layers

    def role(self, layer_id: int) -> str:
        if layer_id in self.dense_layers:
            return "dense_anchor" if layer_id in self.anchor_layers else "dense"
        return "anchor" if layer_id in self.anchor_layers else "reuse"

    def to_json(self) -> dict:
        b = self.budget
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "model": self.model.to_json(),
            "dense_layers": list(self.dense_layers),
            "anchor_layers": list(self.anchor_layers),
            "head_map": [list(r) for r in self.head_map],
            "topk_fraction": b.topk_fraction,
            "k_min": b.k_min,
            "tile_size": b.tile_size,
            "granularity": b.granularity,
            "page_tile_size": b.page_tile_size,
            "round_to": b.round_to,
            # prefill tails: written where set, so profiles without them keep their form
            **{f: getattr(b, f) for f in ("dense_tail", "query_tail") if getattr(b, f)},
            "tp_sizes": list(self.tp_sizes),
            "provenance": self.provenance,
        }

    def check_model(self, fp: ModelFingerprint) -> None:
        """Refuse a profile made for another model, naming the first field that differs."""
        for f in FINGERPRINT_FIELDS:
            mine, theirs = getattr(self.model, f), getattr(fp, f)
            if mine != theirs:
                raise KascadeConfigError(
                    f"profile {self.name or ''} is for another model: model.{f}={mine!r} "
                    f"but the served model has {theirs!r}"
                )


# The profile document as JSON Schema (the sidecar's OpenAPI shows it). It states types and
# ranges; what JSON Schema cannot say (layers in range of num_layers, sorted unique lists,
# head-map shape, a match with the served model) only profile_from_dict checks.
_INT_LIST = {"type": "array", "items": {"type": "integer", "minimum": 0}}
PROFILE_JSON_SCHEMA = {
    "type": "object",
    "title": "AnchorProfile",
    "required": list(REQUIRED),
    "additionalProperties": False,
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "name": {"type": ["string", "null"], "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
        "model": {
            "type": "object", "required": list(FINGERPRINT_FIELDS), "additionalProperties": True,
            "properties": {"architecture": {"type": "string", "minLength": 1},
                           **{f: {"type": "integer", "minimum": 1, "maximum": INT32_MAX}
                              for f in FINGERPRINT_FIELDS[1:]}},
        },
        "dense_layers": {**_INT_LIST, "description": "sorted, unique, must contain 0"},
        "anchor_layers": {**_INT_LIST, "description": "sorted, unique, must contain 0"},
        "head_map": {"type": "array", "items": _INT_LIST,
                     "description": "num_layers rows of num_kv_heads anchor-head indices"},
        "topk_fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "k_min": {"type": "integer", "minimum": 1, "maximum": MAX_BUDGET_KEYS},
        "tile_size": {"type": "integer", "minimum": 1, "maximum": MAX_TILE_SIZE},
        "granularity": {"type": "string", "enum": ["token", "page"]},
        "page_tile_size": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_TILE_SIZE},
        "round_to": {"type": "integer", "minimum": 1, "maximum": MAX_BUDGET_KEYS},
        "tp_sizes": {"type": "array", "minItems": 1,
                     "items": {"type": "integer", "minimum": 1, "maximum": MAX_TP_SIZE},
                     "description": "TP sizes the head map is rank-local for (sorted, unique)"},
        "dense_tail": {"type": "integer", "minimum": 0, "maximum": MAX_BUDGET_KEYS},
        "query_tail": {"type": "integer", "minimum": 0, "maximum": MAX_BUDGET_KEYS},
        "provenance": {"type": "object"},
    },
}


def _fail(field_name: str, why: str):
    raise KascadeConfigError(f"profile field {field_name!r}: {why}")


def _int_list(data: dict, name: str, n_layers: int) -> tuple:
    value = data[name]
    if not isinstance(value, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        _fail(name, "must be a list of integers")
    for x in value:
        if not 0 <= x < n_layers:
            _fail(name, f"layer {x} out of range [0, {n_layers})")
    if value != sorted(value):
        _fail(name, "must be sorted ascending")
    if len(set(value)) != len(value):
        _fail(name, "has duplicate layers")
    return tuple(value)


def profile_from_dict(data: Any) -> AnchorProfile:
    """Validate a parsed profile; every error names the offending field."""
    if not isinstance(data, dict):
        raise KascadeConfigError("profile must be a JSON object")
    for name in REQUIRED:
        if name not in data:
            _fail(name, "missing")
    known = set(REQUIRED) | set(OPTIONAL_DEFAULTS)
    unknown = sorted(set(data) - known)
    if unknown:
        _fail(unknown[0], "unknown field")
    version = data["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version != SCHEMA_VERSION:
        _fail("schema_version", f"{version!r} is not supported (expected {SCHEMA_VERSION})")

    model = data["model"]
    if not isinstance(model, dict):
        _fail("model", "must be an object")
    for f in FINGERPRINT_FIELDS:
        if f not in model:
            _fail(f"model.{f}", "missing")
    if not isinstance(model["architecture"], str) or not model["architecture"]:
        _fail("model.architecture", "must be a non-empty string")
    for f in FINGERPRINT_FIELDS[1:]:
        v = model[f]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= INT32_MAX:
            _fail(f"model.{f}", f"{v!r} must be an integer in 1..{INT32_MAX}")
    fp = ModelFingerprint(**{f: model[f] for f in FINGERPRINT_FIELDS})
    if fp.num_q_heads % fp.num_kv_heads:
        _fail("model.num_q_heads", "must be a multiple of model.num_kv_heads")

    dense = _int_list(data, "dense_layers", fp.num_layers)
    anchors = _int_list(data, "anchor_layers", fp.num_layers)
    if 0 not in dense:
        _fail("dense_layers", "must contain layer 0 (layer 0 is always dense)")
    if 0 not in anchors:
        _fail("anchor_layers", "must contain layer 0 (layer 0 selects for the layers after it)")

    head_map = data["head_map"]
    if not isinstance(head_map, list) or len(head_map) != fp.num_layers:
        _fail("head_map", f"must be a list of {fp.num_layers} rows (one per layer)")
    for i, row in enumerate(head_map):
        if not isinstance(row, list) or len(row) != fp.num_kv_heads:
            _fail(f"head_map[{i}]", f"must be a list of {fp.num_kv_heads} KV head indices")
        for h, x in enumerate(row):
            if not isinstance(x, int) or isinstance(x, bool):
                _fail(f"head_map[{i}][{h}]", "must be an integer")
            if not 0 <= x < fp.num_kv_heads:
                _fail(f"head_map[{i}][{h}]", f"{x} out of range [0, {fp.num_kv_heads})")
        if (i in dense or i in anchors) and row != list(range(fp.num_kv_heads)):
            _fail(f"head_map[{i}]", "must be the identity for dense and anchor layers")

    merged = {**OPTIONAL_DEFAULTS, **data}
    tp_sizes = _tp_sizes(merged["tp_sizes"], fp.num_kv_heads, head_map)
    for name in BUDGET_FIELDS:
        if merged[name] is None:  # check_budget_fields skips None (it means "unset" for options)
            _fail(name, "must not be null")
    check_budget_fields(
        where="profile",
        topk_fraction=merged["topk_fraction"],
        k_min=merged["k_min"],
        tile_size=merged["tile_size"],
        granularity=merged["granularity"],
        page_tile_size=merged["page_tile_size"],
        round_to=merged["round_to"],
        dense_tail=merged["dense_tail"],
        query_tail=merged["query_tail"],
    )
    if not isinstance(data["provenance"], dict):
        _fail("provenance", "must be an object")
    if merged["name"] is not None and not isinstance(merged["name"], str):
        _fail("name", "must be a string")
    budget = BudgetConfig(
        topk_fraction=float(merged["topk_fraction"]),
        k_min=merged["k_min"],
        tile_size=merged["tile_size"],
        granularity=merged["granularity"],
        page_tile_size=merged["page_tile_size"],
        round_to=merged["round_to"],
        dense_tail=merged["dense_tail"],
        query_tail=merged["query_tail"],
    )
    return AnchorProfile(
        name=merged["name"],
        model=fp,
        dense_layers=dense,
        anchor_layers=anchors,
        head_map=tuple(tuple(r) for r in head_map),
        budget=budget,
        provenance=data["provenance"],
        tp_sizes=tp_sizes,
    )


def _tp_sizes(value, num_kv_heads: int, head_map) -> tuple:
    """The validated ``tp_sizes`` field: a non-empty sorted list of distinct TP sizes, each one
    SGLang can split the model's KV heads over and at which the head map is rank-local."""
    if not isinstance(value, list) or not value or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in value):
        _fail("tp_sizes", "must be a non-empty list of integers")
    if value != sorted(set(value)):
        _fail("tp_sizes", "must be sorted ascending, without duplicates")
    for n in value:
        why = tp_size_problem(num_kv_heads, n) or head_map_problem(head_map, num_kv_heads, n)
        if why:
            _fail("tp_sizes", why)
    return tuple(value)


def profile_from_json_text(text: str) -> AnchorProfile:
    if len(text.encode()) > MAX_PROFILE_BYTES:
        raise KascadeConfigError(f"profile is larger than {MAX_PROFILE_BYTES} bytes")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        # ValueError: JSONDecodeError, or an integer literal over Python's digit limit;
        # RecursionError: pathologically deep nesting.
        raise KascadeConfigError(f"profile is not valid JSON: {e}") from e
    return profile_from_dict(data)


def shipped_profiles_dir() -> Path:
    from . import profiles  # the repository's profiles/ folder, installed as package data

    return Path(profiles.__path__[0])


def load_profile(spec: str) -> AnchorProfile:
    """``spec`` is a path to a JSON file or the name of a shipped profile (without .json)."""
    path = Path(spec)
    if not path.exists():
        shipped = shipped_profiles_dir() / f"{spec}.json"
        if not shipped.exists():
            names = sorted(p.stem for p in shipped_profiles_dir().glob("*.json"))
            raise KascadeConfigError(
                f"profile {spec!r}: no such file, and no shipped profile of that name "
                f"(shipped: {names})"
            )
        path = shipped
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KascadeConfigError(f"{path}: profile is not UTF-8 text: {e}") from e
    except OSError as e:
        raise KascadeConfigError(f"profile {spec!r}: cannot read: {e}") from e
    try:
        return profile_from_json_text(text)
    except KascadeConfigError as e:
        raise KascadeConfigError(f"{path}: {e}") from e


def find_shipped_profile(fp: ModelFingerprint, model_path: str = "") -> Optional[AnchorProfile]:
    """The shipped profile for this model: fingerprint match, ties broken by name in model path."""
    matches = []
    for p in sorted(shipped_profiles_dir().glob("*.json")):
        prof = load_profile(str(p))
        if prof.model == fp:
            matches.append(prof)
    if len(matches) > 1:
        hint = [m for m in matches if m.name and m.name.lower() in model_path.lower()]
        matches = hint or matches[:1]
    return matches[0] if matches else None


def derived_default_profile(fp: ModelFingerprint) -> AnchorProfile:
    """The profile used when no calibrated one exists (documented in docs/profiles.md).

    Anchors: layer 0, layer 2 and the layers at 1/4, 1/2 and 3/4 of the depth (the published
    Llama-3.1-8B set {0,2,8,13,14} also puts anchors early and mid-depth), identity head map,
    the paper's budget (10%, k_min 128, tile 32, token granularity).
    """
    n = fp.num_layers
    anchors = sorted({a for a in (0, 2, n // 4, n // 2, (3 * n) // 4) if a < n})
    ident = tuple(range(fp.num_kv_heads))
    return AnchorProfile(
        name="derived-default",
        model=fp,
        dense_layers=(0,),
        anchor_layers=tuple(anchors),
        head_map=tuple(ident for _ in range(n)),
        budget=BudgetConfig(),
        provenance={"source": "derived default (uncalibrated); run sglang_kascade.calibrate"},
    )
