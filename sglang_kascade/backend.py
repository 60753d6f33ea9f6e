"""KascadeAttnBackend: the SGLang attention backend registered as ``--attention-backend kascade``.

Per forward pass: ``init_forward_metadata`` plans requests and tiles on the host (plan.py). Per
layer, by the profile's role:
  * dense (layer 0 and any profile dense layer): delegated to SGLang's own dense backend
    (FlashInfer on a GPU, torch_native on CPU); layer 0 also selects for the reuse layers
    after it;
  * anchor: selects (exact Top-k from pooled post-softmax probabilities under the default
    policy), then attends over its selection;
  * reuse: attention over the last anchor's selection through the layer's head map.

The selection policy (``--kascade-policy``) is one record of policies.py: a profile
transformation (e.g. every layer an anchor) and the selection function anchors call; the rest of
the backend is shared, so policies are compared at equal budget on the same code.
"""

from __future__ import annotations

import logging

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from . import sglang_adapter as sa
from .backend_stats import BackendStats
from .device_path import DevicePath
from .config import (BudgetConfig, KascadeConfigError, KascadeOptions, PolicyConfig,
                     dense_prefill_below, DevSwitches, prefill_tile_problem)
from .kernels.sparse_attention_torch import sparse_attention
from .layers import LayerTable
from .plan import ForwardPlan, plan_forward, prefill_key_counts
from .profile import AnchorProfile
from .policies import DEVICE_POLICIES, POLICY_TABLE, apply_policy, budget_problem
from .resolve import resolve_budget, tp_problem
from .tp import TPLayout

logger = logging.getLogger("sglang_kascade")


class KascadeAttnBackend(AttentionBackend):
    kascade_backend = True  # recognised by sglang_adapter's graph-runner hook

    def __init__(self, dense: AttentionBackend, req_to_token_pool, token_to_kv_pool,
                 profile: AnchorProfile, budget: BudgetConfig, device,
                 dense_fallback: dict | None = None, policy: PolicyConfig = PolicyConfig(),
                 options: KascadeOptions = KascadeOptions(), control=None,
                 tp: TPLayout | None = None):
        super().__init__()
        # This rank's KV heads under --tp-size N (None: TP 1, every head): head maps are sliced
        # to them (tp.py); q, k, v and the KV pool SGLang hands over already are.
        self.tp = tp
        self.dense = dense
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool = token_to_kv_pool
        self.device = device
        self.plan: ForwardPlan | None = None
        self._fallback_warned: set = set(dense_fallback or ())  # already warned at start-up
        self._device_logged: set = set()  # "decode" / "prefill": device path logged once
        self.dense_forward = False  # this forward runs dense in every layer (a short prefill)
        self.capturing = False  # a decode graph's capture is running the layers
        self.dense_in_graphs = False  # some captured layer calls the dense backend
        self.options = options  # flags / env: laid over every profile, also a hot-swapped one
        self.control = control  # control.SchedulerChannel of the admin sidecar, or None
        self.stats = BackendStats()
        switches = DevSwitches.from_env()  # developer switches, read once (config.py)
        self.device_path = DevicePath(device, switches)  # batched Triton kernels (CUDA)
        self.device_fwd = None  # its plan of this forward, or None: the PyTorch path
        # Extend forwards (prefill) whose longest sequence is shorter than this run dense through
        # the dense backend; decode stays sparse (--kascade-dense-prefill-below; CUDA default
        # from the measured break-even). DevSwitches.dense_prefill: every prefill dense (a
        # measurement / operating mode, docs/results/e2e-h100.md).
        self.dense_prefill_below = dense_prefill_below(options, device)
        self.dense_prefill = switches.dense_prefill
        self.graphs_unused = False  # decode graphs captured dense for a non-Triton policy
        self._eager_overflow_logged = False
        # Each request's own Top-k fraction of this forward ([B], None: the server's budget;
        # sglang_adapter.request_fractions), and those of the decode batch SGLang is about to
        # replay in a graph (can_run_graph, read at the replay's init_forward_metadata_out_graph).
        self._fractions: list | None = None
        self._graph_fractions: list | None = None
        self._graph_fractions_logged = False
        why = self.serve_problem(profile, budget, policy)
        if why:  # at start-up: the server does not start (the reason names the field)
            raise KascadeConfigError(f"--attention-backend kascade: profile "
                                     f"{profile.name or ''}: {why}")
        self.set_profile(profile, budget, policy)

    def set_profile(self, profile: AnchorProfile, budget: BudgetConfig,
                    policy: PolicyConfig | None = None) -> None:
        """Takes effect from the next forward pass (called between batches). ``policy=None``
        keeps the current policy (the default policy on the first call). All or nothing: if
        any step raises, the profile, budget and policy in force before the call are restored
        (host attributes and the device path's tables) and the exception propagates."""
        if policy is None:
            policy = getattr(self, "policy", PolicyConfig())
        # Everything that can fail on the host, before any state changes.
        profile = apply_policy(profile, policy.name)
        layers = LayerTable.of(self._local(profile))  # head map: this rank's KV heads
        head_maps = layers.head_map_rows(self.device)
        before = getattr(self, "layers", None)
        try:
            self.device_path.set_profile(layers)
            self.device_path.set_budget(budget)
        except BaseException:
            if before is not None:  # the device tables back to the profile in force
                self.device_path.set_profile(before)
                self.device_path.set_budget(self.budget)
            raise
        self.profile, self.budget, self.policy = profile, budget, policy
        self.layers, self.head_maps = layers, head_maps  # head_maps: [L] int64 [Hkv], this device

    def _local(self, profile: AnchorProfile) -> AnchorProfile:
        """``profile`` with its head map sliced to this rank's KV heads (itself at TP 1)."""
        return profile if self.tp is None else self.tp.local_profile(profile)

    # ---- per forward (host planning) ----------------------------------------------------------

    def init_forward_metadata(self, forward_batch):
        self._at_batch_boundary()
        self.capturing = False
        self.dense.init_forward_metadata(forward_batch)
        self.device_fwd = None
        self.dense_forward = False
        if forward_batch.forward_mode.is_idle():
            self.plan = None
            return
        pools, prefix, extend, seq = sa.batch_view(forward_batch)
        is_decode = forward_batch.forward_mode.is_decode()
        fracs = self._fractions = sa.request_fractions(forward_batch)
        if not is_decode:
            self.stats.record_requests(sa.request_ids(forward_batch), fracs or [None] * len(seq))
        if not is_decode and self._prefill_runs_dense(seq):
            self.dense_forward = True
            self.plan = None
            self._plan_args = None
            self.stats.record_forward(False, [0] * len(seq), [0] * len(seq))
            self.stats.record_keys(False, *prefill_key_counts(self.budget, prefix, extend,
                                                              dense=True))
            return
        if self.device_path.applies(is_decode, self.policy, self.budget):
            if is_decode:
                self.device_fwd = self.device_path.plan(pools, seq, self.budget, fracs)
            else:
                self.device_fwd = self.device_path.plan_prefill(pools, prefix, extend,
                                                                self.budget, fracs)
            self.plan = None  # planned on first use by a layer the device path does not take
            self._plan_args = (pools, prefix, extend, seq, is_decode)
        else:
            self.plan = plan_forward(self.req_to_token_pool.req_to_token, pools, prefix, extend,
                                     seq, is_decode, self.budget, fracs)
        self._count(is_decode, seq, fracs, prefix, extend)

    def _prefill_runs_dense(self, seq_lens) -> bool:
        return self.dense_prefill or max(seq_lens) < self.dense_prefill_below

    # ---- CUDA graphs (decode only, on CUDA by default; see sglang_adapter.py) -------------------

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Plan the decode graphs: rows of up to the request-pool width, and as many keys in all
        as the KV pool holds, plus one per padded row (token-indexed buffers, device_path.py)."""
        self.dense.init_cuda_graph_state(max_bs, max_num_tokens)
        r2t = self.req_to_token_pool.req_to_token
        pool = int(getattr(self.token_to_kv_pool, "size", r2t.shape[0] * r2t.shape[1]))
        lmax = min(int(r2t.shape[1]), pool)
        pad_keys = max_bs * max(1, int(self.get_cuda_graph_seq_len_fill_value() or 1))
        self._at_batch_boundary()  # a profile staged during start-up: the graphs are made for it
        self.graphs_unused = not self.device_path.applies(True, self.policy, self.budget)
        if self.graphs_unused:  # captured dense (harmless), never replayed: can_run_graph
            logger.warning(
                "kascade: decode CUDA graphs unused: they run the Triton path, which serves the "
                "policies %s at token granularity, and this server has policy %r, granularity "
                "%r; decode runs eagerly. Start with --disable-cuda-graph to skip capturing them.",
                ", ".join(DEVICE_POLICIES), self.policy.name, self.budget.granularity)
            return
        self.device_path.init_graph_state(max_bs, lmax, pool + pad_keys, pad_keys, self.budget)

    def can_run_graph(self, forward_batch) -> bool:
        """Whether a decode batch SGLang would replay fits the captured buffers (its summed
        lengths within the KV pool: not so when requests share a radix-cached prefix beyond
        it) and the rows' own fractions (graphs captured at fraction 1.0 are dense: a row
        asking for fewer keys runs eagerly); SGLang runs the others eagerly
        (sglang_adapter.py hooks its graph runner, which asks right before a replay: the rows'
        fractions are kept for it, init_forward_metadata_out_graph)."""
        if self.graphs_unused:
            return False
        fracs = sa.request_fractions(forward_batch)
        self._graph_fractions = fracs
        if fracs is not None and not self.device_path.graph_serves_fractions(fracs):
            return False
        seq_sum = getattr(forward_batch, "seq_lens_sum", None)
        cpu = getattr(forward_batch, "seq_lens_cpu", None)
        lens = cpu if cpu is not None else forward_batch.seq_lens
        if seq_sum is None:
            seq_sum = int(lens.sum())
        fits = self.device_path.graph_fits(int(seq_sum), int(lens.max()))
        if not fits and not self._eager_overflow_logged:
            self._eager_overflow_logged = True
            logger.info("kascade: a decode batch of %d keys in all exceeds the CUDA-graph "
                        "buffers (sized by the KV pool; requests share a cached prefix): it "
                        "runs eagerly (logged once)", int(seq_sum))
        return fits

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Capture or replay of a decode graph: a staged profile applied (its roles, head maps
        and budget land in the device tables the captured kernels read: device_path.py), the
        dense backend's metadata, and the host's part of this step's plan (views of the static
        tensors, which the captured plan kernel fills: init_forward_metadata_in_graph). The
        layers' Python runs only at capture."""
        self._at_batch_boundary()
        if in_capture or self.dense_in_graphs:
            # Replays skip the dense backend's planning (FlashInfer's, host time on every
            # step) when no captured layer calls it: noted by _dense during the captures.
            self.dense.init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)
        fb = forward_batch
        self.capturing = in_capture
        self.plan = None
        self._plan_args = None
        self.device_fwd = None
        self.dense_forward = self.graphs_unused  # captured dense, never replayed
        if self.graphs_unused:
            return
        if not fb.forward_mode.is_decode() or self.device_path.graph_state is None or not (
                self.device_path.applies(True, self.policy, self.budget)):
            raise RuntimeError("kascade: CUDA graphs only for decode under a token-granularity "
                               "Top-k policy on CUDA (start with --disable-cuda-graph)")
        seq = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        # filled in the graph (init_forward_metadata_in_graph); replays: rows checked
        self.device_fwd = self.device_path.plan_graph(
            seq, None if in_capture else (fb.req_pool_indices, fb.seq_lens))
        if not in_capture:
            rows = len(seq) - int(getattr(fb, "num_padding", 0) or 0)  # padding rows not counted
            fracs = self._replay_fractions(rows)
            self.device_path.set_graph_fractions(fracs)
            self._count(True, seq[:rows], fracs + [None] * (rows - len(fracs)))
            self._note_device_forward(len(seq), graph=True, decode=True)

    def _replay_fractions(self, rows: int) -> list:
        """The own fractions of a replayed decode graph's ``rows`` requests, as can_run_graph
        kept them for this replay (SGLang's ModelRunner asks it right before each replay). None
        kept (no per-request budgets on this batch, or no can_run_graph before the replay): the
        server's budget for every row; kept for another number of rows: the same, with a
        warning (logged once)."""
        fracs, self._graph_fractions = self._graph_fractions, None
        if fracs is None or len(fracs) != rows:
            if fracs is not None and not self._graph_fractions_logged:
                self._graph_fractions_logged = True
                logger.warning("kascade: a decode graph replay of %d rows without its requests' "
                               "own budgets (SGLang did not ask can_run_graph for it); it runs "
                               "at the server's budget (logged once)", rows)
            return [None] * rows
        return list(fracs)

    def serve_problem(self, profile: AnchorProfile, budget: BudgetConfig,
                      policy: PolicyConfig) -> str | None:
        """Why this process cannot serve ``profile`` at ``budget`` under ``policy``, or None:
        what the field checks of a profile (config.check_budget_fields) cannot know, because it
        depends on the device and the model. On CUDA, the Triton prefill kernels' tile limit
        (config.prefill_tile_problem). What a policy needs of a budget (policies.budget_problem)."""
        why = budget_problem(policy, budget)
        if why:
            return why
        if self.device_path.enabled and self.device_path.applies(False, policy, budget):
            m = profile.model
            return prefill_tile_problem(budget.tile_size, m.num_q_heads // m.num_kv_heads,
                                        m.head_dim)
        return None

    def hot_swap_problem(self, profile: AnchorProfile) -> str | None:
        """Why ``profile`` cannot be applied in this process, or None: serve_problem, and
        captured decode graphs (same dense layers, Top-k within the captured buffers); asked by
        the control channel's validator before a profile is staged (a refusal there is the
        sidecar's 409), and again when it is applied. The roles are computed as set_profile
        computes them, so a profile whose roles cannot be built is refused here too."""
        budget = resolve_budget(profile, self.options)
        why = self.serve_problem(profile, budget, self.policy) or (
            None if self.tp is None else tp_problem(profile, self.policy, self.tp))
        if why:
            return why
        layers = LayerTable.of(apply_policy(profile, self.policy.name))
        return self.device_path.graph_swap_problem(layers.roles, budget)

    def _note_device_forward(self, batch: int, graph: bool, decode: bool) -> None:
        self.stats.device_forwards += 1
        mode = "decode" if decode else "prefill"
        if mode not in self._device_logged:
            self._device_logged.add(mode)
            logger.info("kascade: device %s path active (Triton kernels%s, batch %d)", mode,
                        " in a CUDA graph" if graph else "", batch)

    def init_forward_metadata_in_graph(self, forward_batch):
        """Inside a decode graph's capture: the dense backend's recordable prep, and the kernel
        that computes this step's plan on the device from SGLang's static rows (replays run it
        with the rows SGLang copied in: no host planning per step)."""
        self.dense.init_forward_metadata_in_graph(forward_batch)
        fwd = self.device_fwd
        if fwd is not None and fwd.graph:
            self.device_path.fill_graph_rows(fwd, forward_batch.req_pool_indices,
                                             forward_batch.seq_lens)

    def _at_batch_boundary(self) -> None:
        """Apply a profile the sidecar staged: all layers of this forward pass use it. Under TP
        (tp_sync.TPControl) every rank takes the same staged profile here, and ``agree`` makes
        the outcome the same on every rank: all apply it or all keep the profile in force."""
        if self.control is None:
            return
        staged = self.control.take_staged()
        if staged is None:
            return
        before = (self.profile, self.budget)
        try:
            why = self.hot_swap_problem(staged.profile)
            if not why:
                self.set_profile(staged.profile, resolve_budget(staged.profile, self.options))
        except Exception as e:  # noqa: BLE001  the second line of defence: never fail the batch
            # Validation at staging refuses what it knows; anything else raised while applying
            # leaves the profile in force (set_profile is all or nothing) and is reported.
            logger.exception("kascade: staged profile %s (generation %d) not applied; profile "
                             "%s stays active", staged.profile.name, staged.generation,
                             self.profile.name)
            why = f"applying it failed: {type(e).__name__}: {e}"
        why = self.control.agree(why)
        if why and self.profile is not before[0]:  # applied here, refused by another TP rank
            self.set_profile(*before)
        if why:  # validated before the decode graphs were planned (a start-up race): keep ours
            logger.error("kascade: staged profile %s not applied: %s", staged.profile.name, why)
            self.stats.swaps_refused += 1
            self._publish_stats()  # the counters first: /metrics never lags the acknowledgement
            self.control.report_refused(staged.generation, f"hot-swap refused: {why}")
            return
        self.stats.swaps_applied += 1
        self._publish_stats()
        self.control.report_applied(staged.generation)
        logger.info("kascade: profile %s active (generation %d)", staged.profile.name,
                    staged.generation)

    def _count(self, is_decode: bool, seq_lens: list, fracs: list | None = None,
               prefix_lens=None, extend_lens=None) -> None:
        # Keys selected by each request's last query (tile), and by all of its queries
        # (record_keys): host arithmetic, no device reads. Extends pass their prefix and extend
        # lengths; decode needs neither.
        b = self.budget
        if not is_decode:
            self.stats.record_keys(False, *prefill_key_counts(b, prefix_lens, extend_lens,
                                                              fracs))
        if is_decode:
            visible = list(seq_lens)
        elif b.query_tail:  # the last query is a tile of its own
            visible = [s - 1 for s in seq_lens]
        else:
            visible = [((s - 1) // b.tile_size) * b.tile_size for s in seq_lens]  # last tile's
        fracs = fracs or [None] * len(visible)
        dense_tail = b.dense_tail and not is_decode  # the last tile reads every candidate
        ks = [v if dense_tail else b.k_for(v, f) for v, f in zip(visible, fracs)]
        self.stats.record_forward(is_decode, ks, visible)
        if is_decode:  # a decode query's tile is itself: the last-query counts are all of it
            self.stats.record_keys(True, sum(ks), sum(visible))
        if self.control is not None:
            self.control.maybe_write_stats(self._stats_snapshot)

    def _stats_snapshot(self) -> dict:
        return self.stats.snapshot({"roles": self.role_counts()})

    def _publish_stats(self) -> None:
        """Write the counters now (a swap's outcome), not at the next STATS_EVERY_S tick."""
        self.control.maybe_write_stats(self._stats_snapshot, force=True)

    def role_counts(self) -> dict:
        counts = self.layers.role_counts()
        counts["dense_fallback_layers"] = len(self._fallback_warned)
        return counts

    def get_cuda_graph_seq_len_fill_value(self):
        return self.dense.get_cuda_graph_seq_len_fill_value()

    def support_triton(self):
        return self.dense.support_triton()

    # ---- per layer ------------------------------------------------------------------------------

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, decode=False, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, decode=True, **kwargs)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache, decode, **kwargs):
        layer_id = layer.layer_id
        role = self.layers.roles[layer_id]
        if self.dense_forward:  # a short prefill (_prefill_runs_dense), or unused graphs
            return self._dense(q, k, v, layer, forward_batch, save_kv_cache, decode, **kwargs)
        why_dense = sa.layer_needs_dense_fallback(layer)
        if why_dense:
            self._warn_fallback(layer_id, why_dense)
            return self._dense(q, k, v, layer, forward_batch, save_kv_cache, decode, **kwargs)
        if save_kv_cache and k is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        if role == "dense":
            return self._dense(q, k, v, layer, forward_batch, False, decode, **kwargs)

        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        q3 = q.reshape(-1, hq, d)
        k_buf = self.token_to_kv_pool.get_key_buffer(layer_id)  # [slots, Hkv, D]
        v_buf = self.token_to_kv_pool.get_value_buffer(layer_id)
        if self.device_fwd is not None and self.device_path.layer_supported(
                q3, k_buf, v_buf, hq, d, layer.v_head_dim):
            fwd = self.device_fwd
            out = self.device_path.forward(fwd, role, layer_id, q3, k_buf, v_buf,
                                           self.req_to_token_pool.req_to_token, layer.scaling)
            if fwd.layers_run and not (fwd.graph or fwd.noted):  # its first kernel layer
                fwd.noted = True
                self._note_device_forward(fwd.batch, graph=False, decode=decode)
            if out is None:  # every request dense, nothing selected to reuse, or a dense_anchor
                return self._dense(q, k, v, layer, forward_batch, False, decode, **kwargs)
            return out.reshape(q3.shape[0], hq * layer.v_head_dim)
        if self.plan is None:  # the device path planned this forward but not for this layer
            self.plan = plan_forward(self.req_to_token_pool.req_to_token, *self._plan_args,
                                     self.budget, self._fractions)
        plan = self.plan
        policy = POLICY_TABLE[self.policy.name]
        sels = []
        for r, req in enumerate(plan.requests):
            q_req = q3[req.q_lo:req.q_hi]
            if self.layers.selects[layer_id]:  # scores every key: the request's keys gathered whole
                k_all = k_buf.index_select(0, req.slots)  # [S, Hkv, D]
                plan.selections[r] = policy.select(q_req, k_all, req.tiles, layer.scaling,
                                                   self.budget, self.policy)
                sels.append(policy.attend(plan.selections[r], req.tiles))
            elif role == "reuse":
                read = plan.selections[r].for_heads(self.head_maps[layer_id])
                sels.append(policy.reuse(read, q_req, k_buf, req.tiles, layer.scaling,
                                         slots=req.slots))
        if role == "dense_anchor" or all(sel.dense for sel in sels):
            # Layer 0, or nothing to skip (short contexts, fraction 1.0): SGLang's dense kernel.
            return self._dense(q, k, v, layer, forward_batch, False, decode, **kwargs)
        out = q.new_empty(q3.shape[0], hq, layer.v_head_dim)
        for req, sel in zip(plan.requests, sels):  # gathers only the keys each tile attends
            out[req.q_lo:req.q_hi] = sparse_attention(
                q3[req.q_lo:req.q_hi], k_buf, v_buf, req.tiles, sel, layer.scaling,
                slots=req.slots)
        return out.reshape(q3.shape[0], hq * layer.v_head_dim)

    def _dense(self, q, k, v, layer, forward_batch, save_kv_cache, decode, **kwargs):
        if self.capturing:
            self.dense_in_graphs = True
        fn = self.dense.forward_decode if decode else self.dense.forward_extend
        return fn(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)

    def _warn_fallback(self, layer_id: int, why: str) -> None:
        if layer_id not in self._fallback_warned:
            self._fallback_warned.add(layer_id)
            logger.warning("kascade: layer %d runs dense (%s)", layer_id, why)
