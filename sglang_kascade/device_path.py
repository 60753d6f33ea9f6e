"""Batched GPU path of KascadeAttnBackend: the Triton kernels, no per-request loop.

Used for decode and extend (prefill) forwards on a CUDA device under a token-granularity, per-KV-
head Top-k policy (``kascade``, ``kascade_identity``, ``oracle``); every other case keeps the
PyTorch path of backend.py. Semantics are the PyTorch path's (kernels/tiles.py): a decode query is
one tile whose candidates are all ``seq_len`` keys, ``k = budget.k_for(seq_len)``; a prefill query
tile starting at position s chooses ``k_for(s)`` of the s keys before it and also attends its
causal diagonal; ``k == candidates`` is dense ("select every key"). Reuse layer KV head h reads
the latest anchor's head ``head_map[layer][h]``.

Decode: a plan fills the step's rows, row offsets and budgets (``plan``: host tensors of an
eager step; ``plan_graph`` + ``fill_graph_rows``: static tensors a kernel at the head of a
captured graph fills from SGLang's static rows), then one run path, ``_forward_decode``, serves
eager steps and graph captures alike (``decode_kind`` says what a layer launches):
  * dense_anchor that selects: ``decode_dense_select`` (dense output and the selection from one
    pass over K and V: measured 3547 vs 4848 us for FlashInfer + a selection pass at B=16, 128K,
    docs/results/kernels-h100.md); one that does not select: SGLang's dense backend;
  * anchor: ``decode_select`` then the sparse attention over stored logits + selected V;
  * reuse: the sparse attention over the latest anchor's ``sel_slot`` through the layer's head map.
  The latest selection lives in ``DecodeBuffers.sel_pos / sel_slot``, token-indexed: request b's
  run starts at ``tok_off[b]`` (the exclusive cumsum of the step's lengths: planned on the host
  for eager steps, by a kernel at the head of a captured graph for replays).
  Eager buffers are allocated once and grown (to a power of two) when a batch, context, budget
  or summed context exceeds them; CUDA-graph buffers are sized once by the KV pool.
Prefill (``plan_prefill`` / the same ``forward``): query tiles of the ragged batch planned on the
host (kernels/prefill_plan.py), then per layer:
  * dense_anchor that selects: ``prefill_select`` (kernels/prefill_select_triton.py), and the
    output from SGLang's dense backend (FlashInfer);
  * anchor: ``prefill_select``, then ``prefill_sparse_attention`` over its own selection;
  * reuse: ``prefill_sparse_attention`` over the latest selection through the head map.
  The selection (``DevicePrefill.sel_slot``, [tiles, Hkv, kmax] int32 pool slots) is allocated
  per forward, at the first selecting layer.

When every request of the batch is dense (short contexts, fraction 1.0) the whole forward goes to
SGLang's dense backend, as on the PyTorch path. Triton is imported only on first use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import K_FOR_SLACK, DevSwitches
from .layers import LayerTable
from .policies import POLICY_TABLE

logger = logging.getLogger("sglang_kascade")


def _row_src(req_pool_indices, seq_lens) -> tuple:
    """Which static row tensors a decode graph's plan kernel reads (their storage)."""
    return req_pool_indices.data_ptr(), seq_lens.data_ptr()



def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def sel_width(kmax: int) -> int:
    """Last dimension of a prefill selection (``DevicePrefill.sel_slot``): the batch's largest
    budget padded to a multiple of 16, so the kernels' selection strides keep one specialization
    (divisible by 16) for every budget and no batch compiles a variant of its own (warmup.py)."""
    return -(-max(1, kmax) // 16) * 16


@dataclass
class DevicePrefill:
    """Host planning of one extend (prefill) forward for the kernels."""

    tiles: object  # kernels.prefill_plan.PrefillTiles (device int32 tensors)
    req_idx: torch.Tensor  # [B] int64 rows of req_to_token
    tile_row: torch.Tensor  # [nt] int64: req_idx of each tile's request
    tile_k: torch.Tensor  # [nt] int32 budgets, 0 <= tile_k <= tile start
    tile_size: int
    batch: int
    kmax: int  # largest budget of the batch
    max_start: int  # largest tile start (candidates scanned)
    all_dense: bool  # every tile selects all its candidates
    sel_slot: torch.Tensor | None = None  # [nt, Hkv, sel_width(kmax)] int32, 1st selecting layer
    has_selection: bool = False
    layers_run: int = 0
    noted: bool = False  # counted in the backend's stats
    graph: bool = False  # never captured


@dataclass
class DeviceForward:
    """Host planning of one decode forward for the kernels."""

    req_idx: torch.Tensor  # [B] int64 rows of req_to_token
    seq_lens: torch.Tensor  # [B] int32
    tok_off: torch.Tensor  # [B] int64 row starts in the token-indexed buffers
    topk: torch.Tensor  # [B] int32 budgets, 1 <= topk <= seq_lens
    batch: int
    lmax: int  # longest context of the batch
    kmax: int  # largest budget of the batch
    tokens: int  # summed context of the batch (the token-indexed buffers hold it)
    all_dense: bool  # every request selects all its keys
    has_selection: bool = False  # a layer of this forward selected (buf.sel_* are current)
    layers_run: int = 0  # layers of this forward the kernels computed
    noted: bool = False  # counted in the backend's stats (graph forwards: at replay)
    graph: bool = False  # planned for CUDA-graph capture/replay: static tensors, capacity grids
    rows_filled: bool = False  # graph: the in-graph plan kernel was launched (fill_graph_rows)


class DevicePath:
    def __init__(self, device, switches: DevSwitches | None = None):
        self.device = torch.device(device)
        self.switches = switches or DevSwitches()  # read once at start-up by the backend
        self.topk_launch = self.switches.topk_launch()  # the decode Top-k's launch overrides
        self.enabled = True  # False: the backend keeps the PyTorch path (tests compare both)
        self.buffers = None  # kernels.decode_plan.DecodeBuffers, grown when needed
        self.layers = LayerTable((), (), ())  # of the profile in force (set_profile); none yet
        self.layers_run = 0  # layers computed by the kernels, all forwards (tests, logging)
        self.graph_state = None  # static plan tensors + capacity for CUDA graphs, or None
        self.graph_buffers = None  # DecodeBuffers of the captured graphs (never reallocated)
        # The profile as device data, updated in place by set_profile (captured graphs read
        # these addresses, so a hot-swapped profile reaches them without a recapture):
        self.graph_selects = None  # [L] int32: 1 = the layer selects (gates decode_select)
        self.head_map_table = None  # [L, Hkv] int32: reuse rows = the head map, others identity
        self.graph_kinds: list | None = None  # per layer, what the capture launched (graph_kind)
        self.node_switch = None  # graph_nodes.NodeSwitch: selection kernels out where not selecting
        self.graph_budget_f = None  # [2] float64 fraction, slack of k_for (in-graph plan)
        self.graph_budget_i = None  # [2] int64 k_min, round_to
        self.graph_fracs_set = False  # graph_state["row_frac"] holds a request's own fraction
        self.graph_row_src: dict = {}  # batch size -> {(data_ptr of rows, of lengths)} captured
        self.warm = None  # warmup.WarmUp once warm_up ran (set_budget: a new tile size's prefill)

    # ---- profile (set_profile / hot swap) --------------------------------------------------------

    def set_profile(self, layers) -> None:
        """``layers``: the layers.LayerTable of the profile now in force."""
        self.layers = layers
        if self.device.type != "cuda":
            return
        sel, hm = layers.device_tables()
        if self.graph_selects is None or self.head_map_table.shape != hm.shape:
            self.graph_selects, self.head_map_table = sel.to(self.device), hm.to(self.device)
        else:  # in place: captured graphs read these addresses
            self.graph_selects.copy_(sel)
            self.head_map_table.copy_(hm)
        if self.node_switch is not None:  # after the gates: a chain taken out has its gate at 0
            self.node_switch.apply(self.layers.selects)

    def set_budget(self, budget) -> None:
        """The budget as device data, read by the in-graph plan kernel of captured decode graphs
        (fill_graph_rows); updated in place, so a hot-swapped budget reaches them."""
        f = torch.tensor([budget.topk_fraction, K_FOR_SLACK], dtype=torch.float64)
        i = torch.tensor([budget.k_min, budget.round_to], dtype=torch.int64)
        if self.graph_budget_f is None:
            self.graph_budget_f, self.graph_budget_i = f.to(self.device), i.to(self.device)
        else:  # stream-ordered before the next replay (set between forwards)
            self.graph_budget_f.copy_(f)
            self.graph_budget_i.copy_(i)
        if self.warm is not None:  # a hot-swapped tile size: its prefill variants, between batches
            self.warm.prefill(budget.tile_size)

    def warm_up(self, hq: int, hkv: int, d: int, dtype, tile_size: int, k_pool=None,
                v_pool=None, r2t_stride: int = 4096) -> int:
        """Compile every Triton kernel variant eager decode and prefill (at ``tile_size``) can
        launch for this model, so no request compiles one (warmup.py): head counts, head dim and
        dtype as served, the server's KV pool (read at slot 0 only) or a scratch one of its
        layout, ``req_to_token``'s row stride. Returns the variants compiled (0 when already
        compiled in this process, or under TRITON_INTERPRET)."""
        from .warmup import WarmUp

        self.warm = WarmUp(self.device, hq, hkv, d, dtype, k_pool, v_pool, r2t_stride)
        self.warm.run(tile_size)
        return self.warm.variants

    # ---- what a captured decode graph launches per layer -----------------------------------------

    @staticmethod
    def graph_kinds_of(roles, budget) -> list:
        """Per layer, the kernels a decode graph captures for these roles: "dense" (SGLang's
        dense backend), "fused" (layer 0: dense + selection in one pass, always selecting) or
        "sparse" (the selection gated by ``graph_selects``, then attention through
        ``head_map_table``). Anchors and reuse layers look alike, so profiles that differ only
        in which layers select, their head maps and the budget share one capture. A budget of
        every key (fraction 1.0) captures every layer dense: FlashInfer, as eager decode runs
        it (the same tokens as ``--attention-backend flashinfer``)."""
        if budget.topk_fraction >= 1.0:
            return ["dense"] * len(roles)
        kinds, selected = [], False
        for role in roles:
            if role == "dense_anchor":
                kinds.append("fused")
                selected = True
            elif role == "anchor" or (role == "reuse" and selected):
                kinds.append("sparse")
                selected = True
            else:  # dense, or a reuse layer before any selection (the PyTorch path: dense)
                kinds.append("dense")
        return kinds

    def graph_swap_problem(self, roles, budget) -> str | None:
        """Why a profile (its resolved roles and budget) cannot run in the decode graphs, or
        None (also when graphs are off)."""
        if self.graph_kinds is None:
            return None
        kinds = self.graph_kinds_of(roles, budget)
        if kinds != self.graph_kinds:
            diff = [i for i, (a, b) in enumerate(zip(kinds, self.graph_kinds)) if a != b]
            return (f"decode CUDA graphs were captured with other dense layers (layers {diff} "
                    f"would change kernels; a Top-k fraction of 1.0 captures every layer "
                    f"dense); restart with this profile")
        if budget.granularity != "token":
            return "decode CUDA graphs run token-granularity Top-k only"
        g = self.graph_state
        if budget.k_for(g["lmax"]) > g["kmax"]:
            return (f"Top-k {budget.k_for(g['lmax'])} at the captured context {g['lmax']} "
                    f"exceeds the captured buffers ({g['kmax']} keys); restart with this profile")
        return None

    # ---- per forward -----------------------------------------------------------------------------

    def applies(self, is_decode: bool, policy, budget) -> bool:
        """Whether this forward runs the Triton kernels. A prefill with a dense tail does not
        (its tiles' budgets are whole prefixes, beyond the selection buffers' width): the
        PyTorch path serves it."""
        return (self.enabled and self.device.type == "cuda"
                and POLICY_TABLE[policy.name].on_device and budget.granularity == "token"
                and (is_decode or not budget.dense_tail))

    def plan(self, pools, seq_lens, budget, fractions=None) -> DeviceForward:
        """``fractions``: [B] each request's own Top-k fraction or None (the server's)."""
        from .kernels.decode_plan import row_offsets

        fractions = fractions or [None] * len(seq_lens)
        ks = [budget.k_for(s, f) for s, f in zip(seq_lens, fractions)]
        dev = self.device
        return DeviceForward(
            req_idx=torch.tensor(pools, dtype=torch.int64).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            tok_off=torch.tensor(row_offsets(seq_lens), dtype=torch.int64).to(
                dev, non_blocking=True),
            topk=torch.tensor(ks, dtype=torch.int32).to(dev, non_blocking=True),
            batch=len(seq_lens), lmax=max(seq_lens), kmax=max(ks), tokens=sum(seq_lens),
            all_dense=all(k >= s for k, s in zip(ks, seq_lens)))

    def plan_prefill(self, pools, prefix_lens, extend_lens, budget,
                     fractions=None) -> DevicePrefill:
        """``fractions``: [B] each request's own Top-k fraction or None (the server's)."""
        from .kernels.prefill_plan import plan_prefill_tiles

        dev, t = self.device, budget.tile_size
        tiles = plan_prefill_tiles(prefix_lens, extend_lens, t, dev, budget.query_tail)
        starts = tiles.host_start
        first = tiles.req_first_tile
        fractions = fractions or [None] * len(pools)
        tile_frac = [fractions[b] for b in range(len(pools)) for _ in range(first[b], first[b + 1])]
        ks = [budget.k_for(s, f) for s, f in zip(starts, tile_frac)]
        req_idx = torch.tensor(pools, dtype=torch.int64).to(dev, non_blocking=True)
        return DevicePrefill(
            tiles=tiles, req_idx=req_idx, tile_row=req_idx[tiles.tile_req.long()],
            tile_k=torch.tensor(ks, dtype=torch.int32).to(dev, non_blocking=True),
            tile_size=t, batch=len(pools), kmax=max(ks), max_start=max(starts),
            all_dense=all(k >= s for k, s in zip(ks, starts)))

    # ---- CUDA graphs (decode) --------------------------------------------------------------------

    def init_graph_state(self, max_bs: int, lmax: int, tokens: int, pad_keys: int,
                         budget) -> None:
        """Static plan tensors for graphs of up to ``max_bs`` requests of up to ``lmax`` keys
        and ``tokens`` keys in all (``pad_keys`` of them for rows SGLang pads a batch with),
        and what the captures will launch per layer (``graph_kinds``, from the profile now).
        A kernel captured at each graph's head fills them from SGLang's static rows
        (fill_graph_rows); the kernels' grids are sized for the capacity and their loops by the
        lengths they load, so one capture serves every step. The graph buffers (allocated at
        the first capture) are token-indexed (kernels/decode_plan.py): ``tokens`` is the KV pool
        plus the padded rows, so only batches whose summed lengths exceed the pool (radix-
        shared prefixes) cannot replay (``graph_fits``; SGLang then runs them eagerly). Their
        Top-k capacity ``kmax`` is the budget at ``lmax``. From here on hot swaps are checked
        against both (graph_swap_problem)."""
        from .graph_nodes import NodeSwitch

        dev = self.device
        if self.graph_budget_f is None:
            self.set_budget(budget)
        self.graph_kinds = self.graph_kinds_of(self.layers.roles, budget)
        if self.node_switch is None:
            self.node_switch = NodeSwitch(enabled=self.switches.node_switch)
            self.node_switch.apply(self.layers.selects)
        self.graph_state = dict(
            max_bs=max_bs, lmax=lmax, tokens=tokens, pad_keys=pad_keys,
            kmax=min(lmax, _pow2(budget.k_for(lmax), 256)),
            req_idx=torch.zeros(max_bs, dtype=torch.int64, device=dev),
            seq_lens=torch.ones(max_bs, dtype=torch.int32, device=dev),
            tok_off=torch.zeros(max_bs, dtype=torch.int64, device=dev),
            topk=torch.ones(max_bs, dtype=torch.int32, device=dev),
            # Each row's own Top-k fraction (a request's RequestBudget; 0: the server's),
            # written on the host before a replay (set_graph_fractions), read by the plan
            # kernel at the graph's head.
            row_frac=torch.zeros(max_bs, dtype=torch.float64, device=dev),
            # Captured at fraction 1.0: every layer dense (graph_kinds_of), so a row asking for
            # fewer keys cannot be served by these graphs (graph_serves_fractions).
            captured_dense=budget.topk_fraction >= 1.0)

    def graph_fits(self, seq_lens_sum: int, max_seq_len: int) -> bool:
        """Whether a decode batch of these lengths fits the captured buffers, whatever rows
        SGLang pads it with (``pad_keys``: keys of max_bs padded rows, counted in ``tokens``)."""
        g = self.graph_state
        if self.node_switch is not None and self.node_switch.stuck:  # graph_nodes.py
            return False
        return g is None or (seq_lens_sum + g["pad_keys"] <= g["tokens"]
                             and max_seq_len <= g["lmax"])

    def plan_graph(self, seq_lens_cpu: list, replay_rows: tuple | None = None) -> DeviceForward:
        """Plan of a captured or replayed decode forward, on the host: the static tensors' views
        and the capacity. Their contents come from the in-graph plan kernel (fill_graph_rows),
        captured at the graph's head, so a replay copies nothing. Every request goes through the
        kernels (k == seq_len selects every key: the dense result), since a graph cannot switch
        paths per step. ``replay_rows`` (at replays: SGLang's static ``(req_pool_indices,
        seq_lens)``): checked to be tensors a graph of this batch size captured (else its plan
        kernel would read rows SGLang no longer writes: refused, not served stale)."""
        g = self.graph_state
        bs = len(seq_lens_cpu)
        src = self.graph_row_src.get(bs)
        if src and replay_rows is not None and _row_src(*replay_rows) not in src:
            raise RuntimeError("kascade: SGLang replays a decode graph with other row buffers "
                               "than it captured (its plan kernel reads the captured ones); "
                               "this SGLang version is not supported with decode graphs: start "
                               "with --disable-cuda-graph")
        total = sum(seq_lens_cpu)
        if total > g["tokens"] or max(seq_lens_cpu) > g["lmax"]:  # graph_fits sends these eager
            raise RuntimeError(f"kascade: decode batch of {total} keys (longest "
                               f"{max(seq_lens_cpu)}) exceeds the CUDA-graph buffers "
                               f"({g['tokens']} keys, rows of {g['lmax']})")
        return DeviceForward(req_idx=g["req_idx"][:bs], seq_lens=g["seq_lens"][:bs],
                             tok_off=g["tok_off"][:bs], topk=g["topk"][:bs], batch=bs,
                             lmax=g["lmax"], kmax=g["kmax"], tokens=g["tokens"],
                             all_dense=False, graph=True)

    def graph_serves_fractions(self, fractions) -> bool:
        """Whether the captured decode graphs serve rows with these own fractions (None: the
        server's): not where they were captured at fraction 1.0 (every layer dense) and a row
        asks for fewer keys; SGLang then runs that batch eagerly (backend.can_run_graph)."""
        g = self.graph_state
        return g is None or not g["captured_dense"] or all(
            f is None or f >= 1.0 for f in fractions)

    def set_graph_fractions(self, fractions) -> None:
        """Each row's own Top-k fraction (None: the server's) into ``row_frac`` before a replay
        (stream-ordered before it); nothing is copied while every row takes the server's and
        the table already says so."""
        g = self.graph_state
        if all(f is None for f in fractions):
            if self.graph_fracs_set:
                g["row_frac"].zero_()
                self.graph_fracs_set = False
            return
        # Rows past the batch (SGLang's padded rows: length 1, so k = 1 at any fraction) keep
        # whatever they hold.
        host = torch.tensor([0.0 if f is None else f for f in fractions], dtype=torch.float64)
        g["row_frac"][:host.shape[0]].copy_(host)
        self.graph_fracs_set = True

    def fill_graph_rows(self, fwd: DeviceForward, req_pool_indices, seq_lens) -> None:
        """The step's plan into the static tensors, from SGLang's static rows: launched inside
        the capture (backend.init_forward_metadata_in_graph), so every replay recomputes it on
        the device from the rows SGLang copied in and the rows' own fractions
        (set_graph_fractions). ``k_for`` at the server's fraction is clamped to the captured
        Top-k capacity (hot swaps beyond it are refused: graph_swap_problem); a row's own
        fraction only to its length (the token-indexed buffers hold ``seq_lens[b]`` selected
        entries per row; the kernels size their loops by ``topk[b]``)."""
        g = self.graph_state
        args = (req_pool_indices, seq_lens, g["req_idx"], g["seq_lens"], g["tok_off"],
                g["topk"], self.graph_budget_f, self.graph_budget_i, g["kmax"], g["row_frac"])
        if self.device.type == "cuda":
            from .kernels.graph_plan_triton import graph_rows
            graph_rows(*args)
        else:  # CPU tests of the plan (no graphs there)
            from .kernels.decode_plan import graph_rows_torch
            graph_rows_torch(*args)
        fwd.rows_filled = True
        self.graph_row_src.setdefault(seq_lens.shape[0], set()).add(
            _row_src(req_pool_indices, seq_lens))  # one pair per captured graph

    def _buffers(self, fwd: DeviceForward, hq: int, hkv: int, d: int):
        from .kernels.decode_plan import DecodeBuffers

        if fwd.graph:
            buf = self.graph_buffers
            if buf is None:
                g = self.graph_state
                buf = self.graph_buffers = DecodeBuffers(g["max_bs"], hq, hkv, d, g["lmax"],
                                                         g["kmax"], self.device,
                                                         tokens=g["tokens"])
                logger.info("kascade: decode CUDA-graph buffers %.1f MiB (%d rows, %d keys in "
                            "all, rows of up to %d keys, Top-k up to %d)", buf.nbytes() / 2**20,
                            g["max_bs"], g["tokens"], g["lmax"], g["kmax"])
            return buf
        buf = self.buffers
        if (buf is None or buf.q_heads != hq or buf.kv_heads != hkv or buf.head_dim != d
                or buf.batch < fwd.batch or buf.lmax < fwd.lmax or buf.kmax < fwd.kmax
                or buf.tokens < fwd.tokens):
            old = (0, 0, 0, 0) if buf is None else (buf.batch, buf.lmax, buf.kmax, buf.tokens)
            batch = _pow2(max(fwd.batch, old[0]), 8)
            lmax = _pow2(max(fwd.lmax, old[1]), 1024)
            kmax = min(_pow2(max(fwd.kmax, old[2]), 256), lmax)
            tokens = _pow2(max(fwd.tokens, old[3]), 4096)
            self.buffers = None  # free the old buffers first
            buf = self.buffers = DecodeBuffers(batch, hq, hkv, d, lmax, kmax, self.device,
                                               tokens=tokens)
        return buf

    # ---- per layer -------------------------------------------------------------------------------

    @staticmethod
    def layer_supported(q, k_buf, v_buf, hq: int, d: int, dv: int) -> bool:
        hkv = k_buf.shape[1]
        return (q.is_cuda and d == dv and d >= 16 and (d & (d - 1)) == 0 and hq % hkv == 0
                and k_buf.dtype == q.dtype and v_buf.dtype == q.dtype
                and q.dtype in (torch.float16, torch.bfloat16)
                and k_buf.stride(-1) == 1 and v_buf.stride(-1) == 1)

    def forward(self, fwd: DeviceForward, role: str, layer_id: int, q3, k_buf, v_buf,
                req_to_token, scale: float):
        """Output [B, Hq, Dv] of one layer, or None: run SGLang's dense backend instead."""
        if isinstance(fwd, DevicePrefill):
            return self._forward_prefill(fwd, role, layer_id, q3, k_buf, v_buf, req_to_token,
                                         scale)
        return self._forward_decode(fwd, role, layer_id, q3, k_buf, v_buf, req_to_token, scale)

    def decode_kind(self, fwd: DeviceForward, role: str, layer_id: int) -> str:
        """What a decode layer launches: "dense" (SGLang's dense backend), "fused" (layer 0:
        dense output and the selection from one pass) or "sparse" (attention over a selection,
        its own or the latest anchor's through the head map). A captured graph launches what
        its capture fixed (graph_kinds_of: any profile of the same dense layers replays it); an
        eager step follows the profile and this forward's state."""
        if fwd.graph:
            return self.graph_kinds[layer_id]
        if fwd.all_dense or role == "dense":
            return "dense"
        if role == "dense_anchor":
            return "fused" if self.layers.selects[layer_id] else "dense"
        if role == "anchor" or (role == "reuse" and fwd.has_selection):
            return "sparse"
        return "dense"  # a reuse layer whose anchor ran dense (a fallback layer): as the torch path

    def _forward_decode(self, fwd: DeviceForward, role, layer_id, q3, k_buf, v_buf,
                        req_to_token, scale):
        """One decode layer, eager or being captured (replays rerun these kernels with the
        profile tables as they are then). The plan (``plan``: host tensors; ``plan_graph`` +
        ``fill_graph_rows``: static tensors filled by a kernel at the graph's head) gives the
        rows, offsets and budgets; from there both run the same launches. In a capture every
        sparse layer launches its selection gated by ``graph_selects`` (so a hot-swapped profile
        replays without a recapture; graph_nodes.py takes the chains of layers that do not
        select out of the kept graph), and its attention reads the stored logits where the gate
        is open, decided on the device; an eager layer launches the selection only where the
        profile selects."""
        kind = self.decode_kind(fwd, role, layer_id)
        if kind == "dense":
            return None
        if fwd.graph and not fwd.rows_filled:  # replays would read a stale plan: refuse
            raise RuntimeError("kascade: decode graph captured without its plan (SGLang did not "
                               "call init_forward_metadata_in_graph inside the capture; see "
                               "sglang_adapter.py for the tested versions); start with "
                               "--disable-cuda-graph")
        from .kernels.decode_attention_triton import decode_sparse_attention
        from .kernels.decode_dense_triton import decode_dense_select
        from .kernels.decode_select_triton import decode_select

        q3, buf, out = self._begin_layer(fwd, q3, k_buf, v_buf)
        rows = (req_to_token, fwd.req_idx, fwd.seq_lens, fwd.tok_off, fwd.topk, scale, buf)
        launch = {"topk": self.topk_launch} if self.topk_launch else None
        if kind == "fused":
            decode_dense_select(q3, k_buf, v_buf, *rows, out, lscan=fwd.lmax, launch=launch)
            fwd.has_selection = True
            return out
        gate = self.graph_selects[layer_id:layer_id + 1] if fwd.graph else None
        selects = fwd.graph or role == "anchor"
        if selects:
            mark = (self.node_switch.mark() if fwd.graph and self.node_switch is not None
                    else None)
            decode_select(q3, k_buf, *rows, lscan=fwd.lmax, gate=gate, launch=launch)
            if mark is not None:  # this layer's selection chain, in or out by profile once adopted
                self.node_switch.record(layer_id, mark)
            fwd.has_selection = True
        # A layer that selected attends from its stored logits and the selected V (in a graph:
        # where its gate is open; its head-map row is then the identity); the others read K.
        extra = dict(sel_pos=buf.sel_pos, logits=buf.logits, logits_gate=gate) if selects else {}
        return decode_sparse_attention(q3, k_buf, v_buf, buf.sel_slot, fwd.tok_off, fwd.topk,
                                       self.head_map_table[layer_id], scale, buf, out, **extra)

    def _begin_layer(self, fwd: DeviceForward, q3, k_buf, v_buf):
        """A decode layer the kernels compute: (q3 with unit last stride, the buffers, the
        output [B, Hq, Dv] to fill); counts the layer."""
        b, hq, d = q3.shape
        buf = self._buffers(fwd, hq, k_buf.shape[1], d)
        fwd.layers_run += 1
        self.layers_run += 1
        if q3.stride(-1) != 1:
            q3 = q3.contiguous()
        return q3, buf, q3.new_empty(b, hq, v_buf.shape[-1])

    def _forward_prefill(self, fwd: DevicePrefill, role, layer_id, q3, k_buf, v_buf,
                         req_to_token, scale):
        """Output [N, Hq, Dv] of one layer of an extend forward, or None: the dense backend
        (a dense_anchor has selected first, when it selects)."""
        if fwd.all_dense or (role == "dense_anchor" and not self.layers.selects[layer_id]):
            return None
        from .kernels.prefill_attention_triton import prefill_sparse_attention
        from .kernels.prefill_select_triton import prefill_select

        hkv = k_buf.shape[1]
        if q3.stride(-1) != 1:
            q3 = q3.contiguous()
        fwd.layers_run += 1
        self.layers_run += 1
        if role in ("dense_anchor", "anchor"):
            if fwd.sel_slot is None:
                fwd.sel_slot = torch.empty(fwd.tiles.num_tiles, hkv, sel_width(fwd.kmax),
                                           dtype=torch.int32, device=self.device)
            prefill_select(q3, k_buf, req_to_token, fwd.req_idx, fwd.tiles, fwd.tile_size,
                           fwd.tile_k, fwd.tile_row, fwd.max_start, scale, fwd.sel_slot)
            fwd.has_selection = True
            if role == "dense_anchor":
                return None  # its output: SGLang's dense backend
        elif role == "reuse":
            if not fwd.has_selection:  # its anchor ran dense (a fallback layer)
                return None
        else:
            raise ValueError(f"role {role!r} has no device path")
        out = q3.new_empty(q3.shape[0], q3.shape[1], v_buf.shape[-1])
        return prefill_sparse_attention(q3, k_buf, v_buf, req_to_token, fwd.req_idx, fwd.tiles,
                                        fwd.tile_size, fwd.sel_slot, fwd.tile_k,
                                        self.head_map_table[layer_id], scale, out)

    def selection(self, fwd: DeviceForward, r: int):
        """(pos [Hkv, k] int64, k) of request r's latest selection (tests; reads the device)."""
        k, off = int(fwd.topk[r]), int(fwd.tok_off[r])
        buf = self.graph_buffers if fwd.graph else self.buffers
        return buf.sel_pos[:, off:off + k].long(), k
