"""KascadeConfig: the one frozen configuration threaded through backend, calibration and sidecar.

Values come from (highest first) the stock launcher's ``--kascade-*`` flags, the ``SGLANG_KASCADE_*``
environment variables (a fallback for the Python ``Engine`` API, which has no CLI), the anchor
profile, and the defaults below. ``None`` in a field means "take it from the profile".
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

GRANULARITIES = ("token", "page")
# Selection policies of the backend (docs/profiles.md). All select at the same budget k
# (BudgetConfig.k_for) per tile / decode step, so comparisons share every other line of code.
POLICIES = ("kascade", "kascade_identity", "kascade_pooled", "kascade_rerank", "oracle", "quest",
            "streaming")
DEFAULT_POLICY = "kascade"
DEFAULT_SINK_TOKENS = 4  # StreamingLLM's attention sinks (Xiao et al. 2024)
# kascade_rerank: an anchor keeps this many candidates per key a reuse layer attends (C * k).
# 2 as measured on the embedded model at 9.7% of the keys (docs/results/prefill-accuracy.md):
# C = 3 answered no more prompts, and each reuse layer scores C * k keys.
DEFAULT_RERANK = 2.0
# Its upper bound: at C * k >= the candidates a reuse layer scores every key, as an anchor does.
MAX_RERANK = 64.0
# Prefill below this many tokens runs dense on CUDA: there the anchors' selection (scoring every
# key twice) eats most of what the reuse layers save. Measured on the H100, Llama-3.1-8B shapes
# (docs/results/e2e-h100.md): sparse prefill TTFT 0.093 vs FlashInfer 0.096 s at 4K (3%, at an
# accuracy cost), 1.13x at 16K, 1.22x at 32K; per-layer kernels 1.07x at 4K, 1.43x at 8K.
DEFAULT_CUDA_DENSE_PREFILL_BELOW = 8192
# On the CPU (the PyTorch path), measured with the embedded SmolLM2 (docs/results/cpu-serving.md): sparse prefill TTFT 0.99x torch_native's at 2K (no gain), 1.35x at 4K, 1.93x at
# 8K; and the short prompts lose accuracy there (passkey at 1-2K: 1.00 / 0.17 dense, 0.33 / 0.00
# sparse prefill, 1.00 / 0.17 with dense prefill and sparse decode).
DEFAULT_CPU_DENSE_PREFILL_BELOW = 4096
# Upper bounds of every numeric option and profile field (check_budget_fields,
# check_policy_fields, KascadeOptions; docs/profiles.md#bounds). Counts reach int32 device tensors
# (plans, selection lengths) and int64 arithmetic such as k + round_to - 1 in the decode plan
# kernel; within these caps all of it stays exact.
INT32_MAX = 2**31 - 1
# k_min, round_to, sink_tokens (keys): a budget at or above a request's length already selects
# every key (BudgetConfig.k_for clamps to the visible keys), so a cap of 2**24 keys (16.7M, above
# any served context) refuses no budget that serves differently from a larger one.
MAX_BUDGET_KEYS = 1 << 24
# tile_size (queries): the Triton prefill kernels hold one tile's queries x the GQA group, each
# rounded up to a power of two, as one block of tl.dot rows. Measured on an H100 at head dim 128,
# bf16: blocks of 512 rows compile, 1024 rows exceed the 227 KiB of shared memory. 512 is the
# largest tile that compiles at all (group size 1); the limit for a model's group size and head
# dim is prefill_tile_problem, checked by the backend where those kernels run.
MAX_TILE_SIZE = 512
MAX_PREFILL_TILE_ROWS = 512  # at head dim 128; scaled down for larger head dims
# page_tile_size (keys per key tile): selection buffers hold ceil(k / P) * P index slots per query
# tile and KV head; larger tiles grow them by up to P per tile without selecting differently in
# kind. 1024 is 64x the default (16) and 64x Quest's published page size.
MAX_PAGE_TILE_SIZE = 1024
# BudgetConfig.k_for subtracts this before ceil, so fraction * visible that lands a rounding
# error above an integer does not add a key; the decode graphs' plan kernel uses the same value.
K_FOR_SLACK = 1e-9

WARMUP_CHOICES = ("on", "off")


class Setting(NamedTuple):
    """One user option: its launcher flag, the environment variable that is its fallback, its
    type, what it means, its default and its allowed values. ``default``: what applies when no
    flag, variable or profile gives a value (None: nothing, or a value computed where the help
    says). ``allowed``: (lo, hi) inclusive for integers, the choices for strings, None where a
    check of its own applies (the help says which); the checks below read it from here."""
    flag: str
    env: str
    type: type
    help: str
    default: object = None
    allowed: Optional[tuple] = None


# name -> Setting. One table, so flags, env vars, checks and docs cannot drift apart.
OPTION_TABLE = {
    "profile": Setting(
        "--kascade-profile", "SGLANG_KASCADE_PROFILE", str,
        "Anchor profile: a JSON path or the name of a shipped profile in sglang_kascade/profiles. "
        "Default: the shipped profile matching the model, else a derived default (with a warning).",
    ),
    "topk_fraction": Setting(
        "--kascade-topk", "SGLANG_KASCADE_TOPK", float,
        "Top-k budget as a fraction of the visible keys, in (0, 1]. Overrides the profile.",
        default=0.10,
    ),
    "k_min": Setting(
        "--kascade-k-min", "SGLANG_KASCADE_K_MIN", int,
        f"Smallest Top-k (keys), 1..{MAX_BUDGET_KEYS}. Overrides the profile.",
        default=128, allowed=(1, MAX_BUDGET_KEYS),
    ),
    "tile_size": Setting(
        "--kascade-tile-size", "SGLANG_KASCADE_TILE_SIZE", int,
        f"Prefill query tile T (tokens), 1..{MAX_TILE_SIZE} (on a GPU also within its prefill "
        "kernels' limit for the model). Overrides the profile.",
        default=32, allowed=(1, MAX_TILE_SIZE),
    ),
    "granularity": Setting(
        "--kascade-granularity", "SGLANG_KASCADE_GRANULARITY", str,
        "Selection granularity: 'token' (the paper) or 'page' (Top-k key tiles of page_tile_size).",
        default="token", allowed=GRANULARITIES,
    ),
    "page_tile_size": Setting(
        "--kascade-page-tile-size", "SGLANG_KASCADE_PAGE_TILE_SIZE", int,
        f"Keys per key tile when granularity is 'page', 1..{MAX_PAGE_TILE_SIZE}. Overrides the "
        "profile.",
        default=16, allowed=(1, MAX_PAGE_TILE_SIZE),
    ),
    "round_to": Setting(
        "--kascade-round-to", "SGLANG_KASCADE_ROUND_TO", int,
        f"Round each Top-k budget up to a multiple of this (kernels), 1..{MAX_BUDGET_KEYS}. "
        "Overrides the profile.",
        default=1, allowed=(1, MAX_BUDGET_KEYS),
    ),
    "dense_tail": Setting(
        "--kascade-dense-tail", "SGLANG_KASCADE_DENSE_TAIL", int,
        f"Prefill: the query tiles holding any of the last N positions of each extend forward "
        f"attend every key (dense), 0..{MAX_BUDGET_KEYS} (0: none). Overrides the profile.",
        default=0, allowed=(0, MAX_BUDGET_KEYS),
    ),
    "query_tail": Setting(
        "--kascade-query-tail", "SGLANG_KASCADE_QUERY_TAIL", int,
        f"Prefill: the last N positions of each extend forward select their Top-k one query at "
        f"a time, as decode does, at the same budget (the question at the end of a prompt), "
        f"0..{MAX_BUDGET_KEYS} (0: none). Overrides the profile.",
        default=0, allowed=(0, MAX_BUDGET_KEYS),
    ),
    "policy": Setting(
        "--kascade-policy", "SGLANG_KASCADE_POLICY", str,
        f"Selection policy, one of {', '.join(POLICIES)} (default {DEFAULT_POLICY}); every "
        "policy selects the same number of keys per tile.",
        default=DEFAULT_POLICY, allowed=POLICIES,
    ),
    "sink_tokens": Setting(
        "--kascade-sink-tokens", "SGLANG_KASCADE_SINK_TOKENS", int,
        f"Sink tokens of the 'streaming' policy, 0..{MAX_BUDGET_KEYS} (default "
        f"{DEFAULT_SINK_TOKENS}).",
        default=DEFAULT_SINK_TOKENS, allowed=(0, MAX_BUDGET_KEYS),
    ),
    "rerank": Setting(
        "--kascade-rerank", "SGLANG_KASCADE_RERANK", float,
        f"Candidates per attended key of the 'kascade_rerank' policy, in [1, {MAX_RERANK:g}] "
        f"(default {DEFAULT_RERANK:g}): anchors keep C * k keys, each reuse layer attends the k "
        "its own queries weigh most among them.",
        default=DEFAULT_RERANK,
    ),
    "dense_prefill_below": Setting(
        "--kascade-dense-prefill-below", "SGLANG_KASCADE_DENSE_PREFILL_BELOW", int,
        "Extend (prefill) forwards whose longest sequence is shorter than this many tokens run "
        "dense through the dense backend (sparsity does not pay there), >= 0; decode stays "
        f"sparse. Default: {DEFAULT_CUDA_DENSE_PREFILL_BELOW} on CUDA, "
        f"{DEFAULT_CPU_DENSE_PREFILL_BELOW} on CPU (measured break-even, "
        "docs/results/e2e-h100.md and cpu-serving.md); 0: sparse prefill at every length.",
        allowed=(0, INT32_MAX),
    ),
    "control_dir": Setting(
        "--kascade-control-dir", "SGLANG_KASCADE_CONTROL_DIR", str,
        "Control directory shared with the admin sidecar for profile hot-swap; 'off' disables "
        "hot-swap. Default: $XDG_RUNTIME_DIR/sglang-kascade/<server port>, else "
        "$TMPDIR/sglang-kascade-<uid>/<server port>.",
    ),
    "admin_port": Setting(
        "--kascade-admin-port", "SGLANG_KASCADE_ADMIN_PORT", int,
        "Also start the admin sidecar on this loopback port (token from "
        "--kascade-admin-token-file or SGLANG_KASCADE_ADMIN_TOKEN).",
        allowed=(1, 65535),
    ),
    "admin_token_file": Setting(
        "--kascade-admin-token-file", "SGLANG_KASCADE_ADMIN_TOKEN_FILE", str,
        "File holding the admin sidecar's bearer token (for --kascade-admin-port).",
    ),
    "warmup": Setting(
        "--kascade-warmup", "SGLANG_KASCADE_WARMUP", str,
        "'on' (default) or 'off': compile every Triton kernel variant at start-up, so no request "
        "compiles one (sglang_kascade/warmup.py).",
        default="on", allowed=WARMUP_CHOICES,
    ),
}
CONTROL_OFF = "off"  # --kascade-control-dir value that disables hot-swap
# The admin sidecar's bearer token, when no token file is given (server/auth.py, sidecar_launch.py)
ADMIN_TOKEN_ENV = "SGLANG_KASCADE_ADMIN_TOKEN"


class KascadeConfigError(ValueError):
    """A Kascade option or profile is invalid; the message names the offending field."""


@dataclass(frozen=True)
class KascadeOptions:
    """What the user asked for (flags / env). ``None`` = not given."""

    profile: Optional[str] = None
    topk_fraction: Optional[float] = None
    k_min: Optional[int] = None
    tile_size: Optional[int] = None
    granularity: Optional[str] = None
    page_tile_size: Optional[int] = None
    round_to: Optional[int] = None
    dense_tail: Optional[int] = None
    query_tail: Optional[int] = None
    policy: Optional[str] = None
    sink_tokens: Optional[int] = None
    rerank: Optional[float] = None
    dense_prefill_below: Optional[int] = None
    control_dir: Optional[str] = None
    admin_port: Optional[int] = None
    admin_token_file: Optional[str] = None
    warmup: Optional[str] = None

    def __post_init__(self):
        check_policy_fields(policy=self.policy, sink_tokens=self.sink_tokens,
                            rerank=self.rerank, where="option")
        for name in ("admin_port", "dense_prefill_below"):
            check_int_range(name, getattr(self, name), where="option")
        if self.warmup is not None and self.warmup.strip().lower() not in WARMUP_CHOICES:
            raise KascadeConfigError(f"option warmup={self.warmup!r}: must be 'on' or 'off'")
        if self.control_dir is not None and not self.control_dir.strip():
            raise KascadeConfigError("option control_dir='': give a directory or 'off'")
        check_budget_fields(
            topk_fraction=self.topk_fraction,
            k_min=self.k_min,
            tile_size=self.tile_size,
            granularity=self.granularity,
            page_tile_size=self.page_tile_size,
            round_to=self.round_to,
            dense_tail=self.dense_tail,
            query_tail=self.query_tail,
            where="option",
        )

    @classmethod
    def from_env(cls, environ=os.environ) -> "KascadeOptions":
        values = {}
        for name, setting in OPTION_TABLE.items():
            env, typ = setting.env, setting.type
            raw = environ.get(env)
            if raw is None or raw == "":
                continue
            try:
                values[name] = typ(raw)
            except ValueError as e:
                raise KascadeConfigError(f"{env}={raw!r}: expected {typ.__name__}") from e
        return cls(**values)

    def merged_over(self, fallback: "KascadeOptions") -> "KascadeOptions":
        """Fields set here win; unset fields come from ``fallback``."""
        return KascadeOptions(
            **{
                f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                else getattr(fallback, f.name)
                for f in dataclasses.fields(self)
            }
        )


def dense_prefill_below(options: KascadeOptions, device) -> int:
    """Extend forwards with a longest sequence below this run dense (0: never, by length)."""
    if options.dense_prefill_below is not None:
        return options.dense_prefill_below
    if str(device).startswith("cuda"):
        return DEFAULT_CUDA_DENSE_PREFILL_BELOW
    return DEFAULT_CPU_DENSE_PREFILL_BELOW


# Developer switches: environment only (A/B measurements and escape hatches, no launcher flag),
# read once at start-up (DevSwitches.from_env) and passed down; kernels never read the environment.
# name -> (env var, default, help)
DEV_SWITCH_TABLE = {
    "cuda_graph": ("SGLANG_KASCADE_CUDA_GRAPH", True,
                   "decode through SGLang's CUDA graphs (0: eager decode; --disable-cuda-graph "
                   "turns every graph off)"),
    "node_switch": ("SGLANG_KASCADE_NODE_SWITCH", True,
                    "take the selection kernels of layers that do not select out of captured "
                    "decode graphs (0: they stay in, gated off on the device)"),
    "dense_prefill": ("SGLANG_KASCADE_DENSE_PREFILL", False,
                      "every prefill dense through the dense backend; decode stays sparse"),
    "topk_collect": ("SGLANG_KASCADE_TOPK_COLLECT", True,
                     "decode Top-k in collect mode (0: the five-launch radix select)"),
    "topk_chunk": ("SGLANG_KASCADE_TOPK_CHUNK", 0,
                   "decode Top-k positions per program, fixed (0: kernels/topk_triton.py's rule)"),
}


@dataclass(frozen=True)
class DevSwitches:
    """The developer switches (DEV_SWITCH_TABLE), as read at start-up."""

    cuda_graph: bool = True
    node_switch: bool = True
    dense_prefill: bool = False
    topk_collect: bool = True
    topk_chunk: int = 0

    @classmethod
    def from_env(cls, environ=os.environ) -> "DevSwitches":
        values = {}
        for name, (env, default, _help) in DEV_SWITCH_TABLE.items():
            raw = environ.get(env, "").strip()
            if not raw:
                continue
            if isinstance(default, bool):
                values[name] = raw.lower() in ("1", "true", "yes")
            else:
                try:
                    values[name] = int(raw)
                except ValueError as e:
                    raise KascadeConfigError(f"{env}={raw!r}: expected an integer") from e
                if not 0 <= values[name] <= INT32_MAX:
                    raise KascadeConfigError(f"{env}={raw!r}: must be in 0..{INT32_MAX}")
        return cls(**values)

    def topk_launch(self) -> dict:
        """Overrides of the decode Top-k's launch (kernels/topk_triton.topk_select ``launch``)."""
        out = {} if self.topk_collect else {"collect": False}
        if self.topk_chunk:
            out["CHUNK"] = self.topk_chunk
        return out


def check_int_range(name: str, value, *, where: str) -> None:
    """``value`` (None: unset) an integer within OPTION_TABLE[name].allowed."""
    lo, hi = OPTION_TABLE[name].allowed
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not lo <= value <= hi):
        raise KascadeConfigError(f"{where} {name}={value!r}: must be an integer in {lo}..{hi}")


def check_policy_fields(*, where: str, policy=None, sink_tokens=None, rerank=None) -> None:
    """Range checks of the policy options. ``None`` values are skipped."""
    if policy is not None and policy not in OPTION_TABLE["policy"].allowed:
        raise KascadeConfigError(f"{where} policy={policy!r}: must be one of {POLICIES}")
    check_int_range("sink_tokens", sink_tokens, where=where)
    if rerank is not None and (isinstance(rerank, bool) or not isinstance(rerank, (int, float))
                               or not 1.0 <= rerank <= MAX_RERANK):
        raise KascadeConfigError(f"{where} rerank={rerank!r}: must be a number in "
                                 f"[1, {MAX_RERANK:g}]")


def check_budget_fields(*, where: str, topk_fraction=None, k_min=None, tile_size=None,
                        granularity=None, page_tile_size=None, round_to=None,
                        dense_tail=None, query_tail=None) -> None:
    """Range checks shared by options (start-up flags and environment), profiles (start-up,
    the scheduler's staging of a hot swap, the sidecar's upload and activation) and every
    BudgetConfig. ``None`` values are skipped. The upper bounds are what the backend can serve
    (constants above); each error names the field, the value and the allowed range."""

    def bad(field, value, why):
        raise KascadeConfigError(f"{where} {field}={value!r}: {why}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if topk_fraction is not None:
        if isinstance(topk_fraction, bool) or not isinstance(topk_fraction, (int, float)):
            bad("topk_fraction", topk_fraction, "must be a number")
        # No float() here: a huge JSON integer would raise OverflowError. NaN fails the test.
        if not (0 < topk_fraction <= 1):
            bad("topk_fraction", topk_fraction, "must be in (0, 1]")
    for field, value in (("k_min", k_min), ("tile_size", tile_size),
                         ("page_tile_size", page_tile_size), ("round_to", round_to)):
        if value is None:
            continue
        least, most = OPTION_TABLE[field].allowed
        if not is_int(value):
            bad(field, value, "must be an integer")
        if value < least:
            bad(field, value, f"must be >= {least} (allowed: {least}..{most})")
        if value > most:
            bad(field, value, f"must be at most {most} (allowed: {least}..{most}; "
                              "docs/profiles.md#bounds)")
    if granularity is not None and granularity not in OPTION_TABLE["granularity"].allowed:
        bad("granularity", granularity, f"must be one of {GRANULARITIES}")
    for field, value in (("dense_tail", dense_tail), ("query_tail", query_tail)):
        check_int_range(field, value, where=where)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prefill_tile_problem(tile_size: int, group: int, head_dim: int) -> str | None:
    """Why the Triton prefill kernels cannot run query tiles of ``tile_size`` for a model with
    ``group`` query heads per KV head and ``head_dim``, or None. Their block holds
    pow2(tile) x pow2(group) query rows (at least 16) of head_dim values in shared memory
    (kernels/prefill_select_triton.py ``_rows``, prefill_attention_triton.py); the limit is the
    one measured at head dim 128 (MAX_PREFILL_TILE_ROWS), scaled by 128 / head_dim above it."""
    rows = max(_pow2(tile_size) * _pow2(group), 16)
    most = MAX_PREFILL_TILE_ROWS * 128 // max(128, _pow2(head_dim))
    if rows <= most:
        return None
    fits = max(1, most // _pow2(group))
    return (f"tile_size={tile_size} with {group} query heads per KV head and head dim {head_dim} "
            f"needs {rows} query rows per block of the GPU prefill kernels, which fit at most "
            f"{most}; use tile_size <= {fits}")


@dataclass(frozen=True)
class BudgetConfig:
    """The resolved selection budget: profile values with option overrides applied."""

    topk_fraction: float = OPTION_TABLE["topk_fraction"].default  # 0.10
    k_min: int = OPTION_TABLE["k_min"].default  # 128
    tile_size: int = OPTION_TABLE["tile_size"].default  # 32
    granularity: str = OPTION_TABLE["granularity"].default  # "token"
    page_tile_size: int = OPTION_TABLE["page_tile_size"].default  # 16
    round_to: int = OPTION_TABLE["round_to"].default  # 1
    # The tiles holding any of an extend's last dense_tail positions attend every key (the
    # question at the end of a prompt, exact); 0: none. Prefill only.
    dense_tail: int = OPTION_TABLE["dense_tail"].default  # 0
    # An extend's last query_tail positions are tiles of one query each, selecting per query
    # as decode does; 0: none. Prefill only.
    query_tail: int = OPTION_TABLE["query_tail"].default  # 0

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value is None:  # check_budget_fields treats None as "unset"; a budget is complete
                raise KascadeConfigError(f"budget {name}=None: must be set")
        check_budget_fields(where="budget", **dataclasses.asdict(self))

    def k_for(self, visible: int, fraction: float | None = None) -> int:
        """Top-k for a query (tile) that can choose among ``visible`` keys.

        k = clamp(ceil(fraction * visible), k_min, visible), rounded up to ``round_to`` and
        clamped to ``visible`` again. ``visible <= k_min`` gives k == visible: dense.
        ``fraction``: a request's own Top-k fraction (``RequestBudget``), in place of
        ``topk_fraction``; None: the server's. 1.0 gives k == visible (a dense request).
        """
        if visible <= 0:
            return 0
        f = self.topk_fraction if fraction is None else fraction
        k = max(math.ceil(f * visible - K_FOR_SLACK), self.k_min)
        k = -(-k // self.round_to) * self.round_to
        return min(k, visible)


@dataclass(frozen=True)
class PolicyConfig:
    """The resolved selection policy (``--kascade-policy``) and its parameters."""

    name: str = DEFAULT_POLICY
    sink_tokens: int = DEFAULT_SINK_TOKENS  # used by "streaming" only
    rerank: float = DEFAULT_RERANK  # used by "kascade_rerank" only

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value is None:
                raise KascadeConfigError(f"policy {name}=None: must be set")
        check_policy_fields(where="PolicyConfig", policy=self.name, sink_tokens=self.sink_tokens,
                            rerank=self.rerank)


# ---- a request's own budget (SGLang's custom sampling parameters) ---------------------------

# The key of SGLang's ``custom_params`` (a sampling parameter of /generate; a top-level field of
# the OpenAI-compatible routes' body, e.g. the OpenAI client's ``extra_body``) under which one
# request asks for its own budget: {"kascade": {"topk": 0.05}} or {"kascade": {"dense": true}}.
REQUEST_PARAM_KEY = "kascade"
REQUEST_FIELDS = ("topk", "dense")
# A request's budget class (backend_stats counters, the response's meta info): the server's
# budget, its own fraction, or dense (its own fraction 1.0, or dense: true).
BUDGET_CLASSES = ("default", "custom", "dense")


@dataclass(frozen=True)
class RequestBudget:
    """What one request asked for. ``topk_fraction`` replaces the server's fraction (flags over
    environment over profile) for this request only; k_min, round_to, the tile size and the
    policy stay the server's (``BudgetConfig.k_for(visible, fraction)``). Dense is fraction 1.0:
    k = every visible key."""

    topk_fraction: float

    @property
    def budget_class(self) -> str:
        return budget_class(self.topk_fraction)


def budget_class(fraction: float | None) -> str:
    """The class of a request's fraction (None: the server's budget)."""
    if fraction is None:
        return "default"
    return "dense" if fraction >= 1.0 else "custom"


def _shown(value, most: int = 40) -> str:
    """A client's value in an error message, cut to ``most`` characters."""
    text = repr(value)
    return text if len(text) <= most else text[:most - 3] + "..."


def parse_request_budget(custom_params) -> RequestBudget | None:
    """The budget a request's SGLang ``custom_params`` ask for, or None: the server's (no
    ``kascade`` key, ``null``, ``{}`` or ``{"dense": false}``). Bad values raise
    KascadeConfigError (a ValueError) with the message the client gets: SGLang answers 400 with
    it when ``SamplingParams.verify`` raises it (sglang_adapter hooks verify). Refused: a value
    that is not an object, unknown fields, a ``topk`` that is not a number in (0, 1] (NaN,
    infinities, booleans and strings included), a ``dense`` that is not a boolean, and both
    ``topk`` and ``dense: true`` at once."""
    if not isinstance(custom_params, dict):
        return None
    asked = custom_params.get(REQUEST_PARAM_KEY)
    where = f"custom_params.{REQUEST_PARAM_KEY}"
    if asked is None:
        return None
    if not isinstance(asked, dict):
        raise KascadeConfigError(f"{where}={_shown(asked)}: must be an object, "
                                 '{"topk": <fraction in (0, 1]>} or {"dense": true}')
    unknown = sorted(str(k) for k in asked if k not in REQUEST_FIELDS)
    if unknown:
        raise KascadeConfigError(f"{where}: unknown field(s) {', '.join(map(_shown, unknown))} "
                                 f"(allowed: {', '.join(REQUEST_FIELDS)})")
    dense, topk = asked.get("dense"), asked.get("topk")
    if dense is not None and not isinstance(dense, bool):
        raise KascadeConfigError(f"{where}.dense={_shown(dense)}: must be true or false")
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, (int, float)):
            raise KascadeConfigError(f"{where}.topk={_shown(topk)}: must be a number in (0, 1]")
        if not 0 < topk <= 1:  # NaN fails too; no float() first: a huge integer would overflow
            raise KascadeConfigError(f"{where}.topk={_shown(topk)}: must be in (0, 1]")
        if dense:
            raise KascadeConfigError(f"{where}: give topk or dense: true, not both")
        return RequestBudget(float(topk))
    return RequestBudget(1.0) if dense else None
