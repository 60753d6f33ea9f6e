"""KascadeAttnBackend driven directly (no server) against the float64 oracle in reference.py.

Small fakes stand in for SGLang's pools, dense backend, layers and ForwardBatch. A scenario runs a
6-layer model through ragged extend batches (cold prompts, a chunked-prefill continuation whose
prefix is not a multiple of T, a radix-cache hit that shares another request's prefix slots, a
prefix that was already in the pool), decode steps, and a late extend. Slots are laid out with page
size 1 or 16 (scattered pages). The oracle keeps its own per-request KV in position order, follows
the profile's roles itself (dense / anchor / reuse with head maps) and recomputes every selection
from the anchor layer's q and the request's keys.

Selections of the backend must be valid Top-k under the oracle's float64 scores and are in practice
equal to the oracle's; if a float near-tie ever makes them differ, the oracle continues with the
backend's (validated) selection so outputs are still compared exactly. Output tolerances: fp32
atol/rtol 1e-5, bf16 atol 3e-2 / rtol 2e-2.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch

import reference as ref
from sglang_kascade.backend import KascadeAttnBackend
from sglang_kascade.config import KascadeOptions, PolicyConfig
from sglang_kascade.kernels.selection_torch import Selection
from sglang_kascade.profile import profile_from_dict

# Tiny tensors: OpenMP threads only add synchronisation cost (10-40x slower on 2 busy cores).
torch.set_num_threads(1)

NUM_LAYERS = 6
MAX_CTX = 128
T = 16  # query tile
ATOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# ------------------------------------------------------------------------------------------------
# Fakes
# ------------------------------------------------------------------------------------------------


class FakeReqToTokenPool:
    def __init__(self, size: int, max_ctx: int, device="cpu"):
        self.req_to_token = torch.zeros(size, max_ctx, dtype=torch.int32, device=device)


class FakeKVPool:
    def __init__(self, num_layers, num_slots, hkv, d, dtype, device="cpu"):
        self.hkv, self.d = hkv, d
        self.k = [torch.zeros(num_slots, hkv, d, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.v = [torch.zeros(num_slots, hkv, d, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.writes = []  # (layer_id, number of slots written)

    def get_key_buffer(self, layer_id):
        return self.k[layer_id]

    def get_value_buffer(self, layer_id):
        return self.v[layer_id]

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, *args, **kwargs):
        lid = layer.layer_id
        self.k[lid][loc] = cache_k.reshape(-1, self.hkv, self.d).to(self.k[lid].dtype)
        self.v[lid][loc] = cache_v.reshape(-1, self.hkv, self.d).to(self.v[lid].dtype)
        self.writes.append((lid, int(loc.numel())))


class FakeDenseBackend:
    """Plain dense causal attention over req_to_token slots (float64 oracle, cast back)."""

    def __init__(self, req_to_token_pool, kv_pool):
        self.r2t = req_to_token_pool
        self.kv = kv_pool
        self.calls = []  # (layer_id, decode, save_kv_cache)
        self.inits = 0

    def init_forward_metadata(self, fb):
        self.inits += 1

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def support_triton(self):
        return False

    def _run(self, q, k, v, layer, fb, save_kv_cache, decode):
        self.calls.append((layer.layer_id, decode, save_kv_cache))
        if save_kv_cache:
            self.kv.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        q3 = q.reshape(-1, hq, d)
        kb, vb = self.kv.get_key_buffer(layer.layer_id), self.kv.get_value_buffer(layer.layer_id)
        out = torch.empty(q3.shape[0], hq, layer.v_head_dim, dtype=q.dtype, device=q.device)
        lo = 0
        seqs = fb.seq_lens_cpu.tolist()
        ext = [1] * len(seqs) if decode else list(fb.extend_seq_lens_cpu)
        for pool, seq, n in zip(fb.req_pool_indices.tolist(), seqs, ext):
            slots = self.r2t.req_to_token[pool, :seq].long()
            o = ref.dense_attention(q3[lo:lo + n].cpu(), kb[slots].cpu(), vb[slots].cpu(),
                                    list(range(seq - n, seq)), layer.scaling)
            out[lo:lo + n] = o.to(q.dtype)
            lo += n
        return out.reshape(q3.shape[0], -1)

    def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True, **kwargs):
        return self._run(q, k, v, layer, fb, save_kv_cache, decode=False)

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, **kwargs):
        return self._run(q, k, v, layer, fb, save_kv_cache, decode=True)


@dataclass
class FakeLayer:
    layer_id: int
    tp_q_head_num: int
    tp_k_head_num: int
    tp_v_head_num: int
    qk_head_dim: int
    v_head_dim: int
    scaling: float
    sliding_window_size: int = -1
    is_cross_attention: bool = False


@dataclass
class FakeForwardMode:
    decode: bool
    idle: bool = False

    def is_decode(self):
        return self.decode

    def is_idle(self):
        return self.idle

    def is_extend(self):
        return not self.decode and not self.idle

    def is_mixed(self):
        return False

    def is_decode_or_idle(self):
        return self.decode or self.idle


@dataclass
class FakeForwardBatch:
    forward_mode: FakeForwardMode
    req_pool_indices: torch.Tensor  # [B] int64
    seq_lens: torch.Tensor  # [B] int64
    seq_lens_cpu: torch.Tensor  # [B] int64
    extend_prefix_lens_cpu: list  # [B] (None for decode)
    extend_seq_lens_cpu: list
    out_cache_loc: torch.Tensor  # [N] int64 slots of the new tokens

    @property
    def batch_size(self):
        return int(self.req_pool_indices.numel())


# ------------------------------------------------------------------------------------------------
# Scenario: requests, slot layout, forwards, per-(forward, request, layer) inputs
# ------------------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str  # request
    prefix: int
    n: int  # new tokens (1 for decode)


@dataclass
class Forward:
    decode: bool
    steps: list


FORWARDS = [
    Forward(False, [Step("A", 0, 45), Step("B", 0, 1)]),
    # continuation (prefix 45, not a multiple of T), short-prompt continuation, radix-cache hit on
    # A's first 32 positions (shared slots), a request whose 50-token prefix is already pooled
    Forward(False, [Step("A", 45, 37), Step("B", 1, 70), Step("C", 32, 31), Step("D", 50, 19)]),
    Forward(True, [Step("A", 82, 1), Step("B", 71, 1), Step("C", 63, 1), Step("D", 69, 1)]),
    Forward(True, [Step("A", 83, 1), Step("B", 72, 1), Step("C", 64, 1), Step("D", 70, 1)]),
    Forward(True, [Step("B", 73, 1), Step("D", 71, 1)]),
    Forward(False, [Step("B", 74, 9), Step("A", 84, 1), Step("C", 65, 30)]),
]
SHARED = {"C": ("A", 32)}  # C's positions < 32 are A's slots (and A's KV)
PREPOOLED = {"D": 50}  # D's positions < 50 are already in the pool


@dataclass
class Model:
    hq: int
    hkv: int
    d: int
    dtype: torch.dtype

    @property
    def scale(self):
        return 1.0 / math.sqrt(self.d)


@dataclass
class Scenario:
    model: Model
    profile_dict: dict
    slot_page: int
    seed: int
    pool_index: dict = field(default_factory=dict)  # request -> req_to_token row
    slots: dict = field(default_factory=dict)  # request -> [MAX_CTX] int64 slot of each position
    prepooled_kv: dict = field(default_factory=dict)  # request -> [(k, v) per layer]
    data: dict = field(default_factory=dict)  # (forward, request, layer) -> (q, k, v)

    @property
    def num_slots(self):
        return 120 * 16


def make_scenario(model: Model, profile_dict: dict, slot_page: int, seed: int) -> Scenario:
    scn = Scenario(model, profile_dict, slot_page, seed)
    rng = random.Random(seed)
    names = ["A", "B", "C", "D"]
    for name, row in zip(names, rng.sample(range(8), len(names))):
        scn.pool_index[name] = row
    # scattered pages (page ids >= 1; slot 0 is SGLang's padding slot), all distinct
    n_pages = math.ceil(MAX_CTX / slot_page)
    page_ids = iter(rng.sample(range(1, scn.num_slots // slot_page), n_pages * len(names)))
    for name in names:
        pages = [next(page_ids) for _ in range(n_pages)]
        if name in SHARED:
            src, upto = SHARED[name]
            assert upto % slot_page == 0
            pages[: upto // slot_page] = [int(scn.slots[src][p * slot_page]) // slot_page
                                          for p in range(upto // slot_page)]
        pos = torch.arange(MAX_CTX)
        scn.slots[name] = torch.tensor(pages)[pos // slot_page] * slot_page + pos % slot_page
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, mult=1.0):
        return (torch.randn(*shape, generator=g) * mult).to(model.dtype)

    for name, n in PREPOOLED.items():
        scn.prepooled_kv[name] = [(rnd(n, model.hkv, model.d), rnd(n, model.hkv, model.d))
                                  for _ in range(NUM_LAYERS)]
    for f, fwd in enumerate(FORWARDS):
        for st in fwd.steps:
            for layer in range(NUM_LAYERS):
                scn.data[f, st.name, layer] = (rnd(st.n, model.hq, model.d, mult=1.5),
                                               rnd(st.n, model.hkv, model.d),
                                               rnd(st.n, model.hkv, model.d))
    return scn


def make_profile_dict(hkv, dense, anchors, head_maps, gran, page_tile):
    ident = list(range(hkv))
    return {
        "schema_version": 1,
        "name": "test",
        "model": {"architecture": "FakeForCausalLM", "num_layers": NUM_LAYERS,
                  "num_q_heads": 0, "num_kv_heads": hkv, "head_dim": 0},  # filled in below
        "dense_layers": dense,
        "anchor_layers": anchors,
        "head_map": [ident if i in dense or i in anchors else head_maps.get(i, ident)
                     for i in range(NUM_LAYERS)],
        "topk_fraction": 0.25,
        "k_min": 4,
        "tile_size": T,
        "granularity": gran,
        "page_tile_size": page_tile,
        "round_to": 2,
        "provenance": {"source": "test"},
    }


# ------------------------------------------------------------------------------------------------
# Running the backend
# ------------------------------------------------------------------------------------------------


@dataclass
class BackendRun:
    outputs: dict  # (forward, request, layer) -> [n, Hq, Dv]
    selections: dict  # (forward, request, anchor layer) -> Selection
    kv: FakeKVPool
    dense: FakeDenseBackend
    dense_layers_per_forward: list  # sets of layer ids delegated, one per backend forward
    backend: KascadeAttnBackend


def run_backend(scn: Scenario, batched: bool, policy: PolicyConfig = PolicyConfig(),
                control=None, hook=None, device="cpu", device_path=True,
                options: KascadeOptions = KascadeOptions(dense_prefill_below=0),
                tp=None) -> BackendRun:
    """``options`` default: sparse prefill at every length (the method under test; the CPU
    default runs prompts under 4096 tokens dense). ``hook(forward, layer_id, backend)`` runs
    before each layer (layer_id None: before the forward's init_forward_metadata); ``control``
    is a hot-swap channel (test_hot_swap_*); ``tp`` a TPLayout (test_tp.py: ``scn`` then holds
    that rank's heads).
    ``device="cuda"``: pools and inputs on the GPU (test_device_prefill_gpu.py), where
    ``device_path`` picks the Triton kernels or the PyTorch path; outputs come back to the CPU."""
    m = scn.model
    profile = profile_from_dict(scn.profile_dict)
    r2t = FakeReqToTokenPool(8, MAX_CTX, device)
    for name, row in scn.pool_index.items():
        r2t.req_to_token[row] = scn.slots[name].to(torch.int32)
    kv = FakeKVPool(NUM_LAYERS, scn.num_slots, m.hkv, m.d, m.dtype, device)
    for name, layers in scn.prepooled_kv.items():
        sl = scn.slots[name][: layers[0][0].shape[0]]
        for lid, (k, v) in enumerate(layers):
            kv.k[lid][sl], kv.v[lid][sl] = k.to(device), v.to(device)
    dense = FakeDenseBackend(r2t, kv)
    be = KascadeAttnBackend(dense, r2t, kv, profile, profile.budget, torch.device(device),
                            policy=policy, control=control, options=options, tp=tp)
    be.device_path.enabled = device_path
    layers = [FakeLayer(i, m.hq, m.hkv, m.hkv, m.d, m.d, m.scale) for i in range(NUM_LAYERS)]
    outputs, selections, delegated = {}, {}, []
    for f, fwd in enumerate(FORWARDS):
        groups = [fwd.steps] if batched else [[st] for st in fwd.steps]
        for group in groups:
            seq = [st.prefix + st.n for st in group]
            fb = FakeForwardBatch(
                forward_mode=FakeForwardMode(fwd.decode),
                req_pool_indices=torch.tensor([scn.pool_index[st.name] for st in group],
                                              device=device),
                seq_lens=torch.tensor(seq, device=device),
                seq_lens_cpu=torch.tensor(seq),
                extend_prefix_lens_cpu=None if fwd.decode else [st.prefix for st in group],
                extend_seq_lens_cpu=None if fwd.decode else [st.n for st in group],
                out_cache_loc=torch.cat([scn.slots[st.name][st.prefix:st.prefix + st.n]
                                         for st in group]).to(device),
            )
            if hook:
                hook(f, None, be)
            be.init_forward_metadata(fb)
            n_calls = len(dense.calls)
            for layer in layers:
                if hook:
                    hook(f, layer.layer_id, be)
                q, k, v = (torch.cat([scn.data[f, st.name, layer.layer_id][j] for st in group])
                           .to(device) for j in range(3))
                out = be.forward(q.reshape(q.shape[0], -1), k, v, layer, fb)
                assert out.shape == (q.shape[0], m.hq * m.d) and out.dtype == m.dtype
                out = out.reshape(q.shape[0], m.hq, m.d).cpu()
                lo = 0
                for i, st in enumerate(group):
                    outputs[f, st.name, layer.layer_id] = out[lo:lo + st.n].clone()
                    lo += st.n
                    if layer.layer_id in be.profile.anchor_layers:  # after the policy
                        selections[f, st.name, layer.layer_id] = latest_selection(be, i, st)
            delegated.append({c[0] for c in dense.calls[n_calls:]})
            assert all(c[1] == fwd.decode for c in dense.calls[n_calls:])
    return BackendRun(outputs, selections, kv, dense, delegated, be)


def latest_selection(be: KascadeAttnBackend, i: int, st: Step) -> Selection:
    """Request i's latest selection as a Selection (CPU), from the PyTorch path's plan or from the
    device path's buffers (pool slots mapped back to positions)."""
    fwd = be.device_fwd
    if fwd is None:
        return be.plan.selections[i]
    if not fwd.has_selection:
        return Selection(dense=True)
    if hasattr(fwd, "tiles"):  # prefill: [nt, Hkv, kmax] slots, entries [0, tile_k[t])
        lo, hi = fwd.tiles.req_first_tile[i], fwd.tiles.req_first_tile[i + 1]
        slots = fwd.sel_slot[lo:hi].long().cpu()
        row = be.req_to_token_pool.req_to_token[int(fwd.req_idx[i])].long().cpu()
        to_pos = {int(s): j for j, s in enumerate(row[: st.prefix + st.n])}
        idx = torch.tensor([[[to_pos.get(int(x), -1) for x in r] for r in t] for t in slots])
        ks = fwd.tile_k[lo:hi].long().cpu()
        valid = torch.arange(slots.shape[-1])[None, :] < ks[:, None]  # [nt, kmax]
        idx = idx.permute(1, 0, 2)  # [Hkv, nt, kmax]
        return Selection(False, torch.where(valid, idx, 0), valid.expand(idx.shape[0], -1, -1))
    pos, k = be.device_path.selection(fwd, i)  # decode: [Hkv, k] positions
    if k >= st.prefix + st.n:
        return Selection(dense=True)
    return Selection(False, pos.cpu()[:, None, :], torch.ones(pos.shape[0], 1, k, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# The oracle run (own KV store in position order, own roles, own selections)
# ------------------------------------------------------------------------------------------------


@dataclass
class OracleRun:
    outputs: dict
    masks: dict  # (forward, request, anchor layer) -> the selection the oracle continued with
    store: dict  # request -> per layer [K [S, Hkv, D], V]
    ties: list  # near-tie events (backend differs but is a valid Top-k)
    n_selections: int


def run_oracle(scn: Scenario, backend_sel: dict) -> OracleRun:
    m, pd = scn.model, scn.profile_dict
    kfn = lambda s: ref.budget_k(s, pd["topk_fraction"], pd["k_min"], pd["round_to"])  # noqa: E731
    gran, page = pd["granularity"], pd["page_tile_size"]
    store = {}
    for name, layers in scn.prepooled_kv.items():
        store[name] = [[k.clone(), v.clone()] for k, v in layers]
    outputs, masks, ties, n_sel = {}, {}, [], 0
    for f, fwd in enumerate(FORWARDS):
        for st in fwd.steps:
            if st.name not in store:
                if st.name in SHARED:
                    src, upto = SHARED[st.name]
                    store[st.name] = [[k[:upto].clone(), v[:upto].clone()] for k, v in store[src]]
                else:
                    store[st.name] = [[torch.zeros(0, m.hkv, m.d, dtype=m.dtype)] * 2
                                      for _ in range(NUM_LAYERS)]
            assert store[st.name][0][0].shape[0] == st.prefix, (f, st)
            if fwd.decode:
                tiles = ref.oracle_decode_tiles(st.prefix + 1, kfn)
            else:
                tiles = ref.oracle_extend_tiles(st.prefix, st.n, pd["tile_size"], kfn,
                                                pd.get("query_tail", 0))
            sel = None  # the most recent anchor's selection for this request, this forward
            for lid in range(NUM_LAYERS):
                q, k_new, v_new = scn.data[f, st.name, lid]
                kv = store[st.name][lid]
                kv[0] = torch.cat([kv[0], k_new])
                kv[1] = torch.cat([kv[1], v_new])
                K, V = kv
                if lid in pd["anchor_layers"]:
                    sel, scores = ref.select(q, K, tiles, m.scale, gran, page)
                    n_sel += 1
                    got = ref.mask_from_kernel(backend_sel[f, st.name, lid], tiles, m.hkv,
                                               K.shape[0])
                    bad = ref.topk_violations(got, scores, tiles, gran, page)
                    assert not bad, (f, st, lid, bad[:3])
                    if not torch.equal(got, sel):
                        ties.append((f, st.name, lid))
                        sel = got
                    masks[f, st.name, lid] = sel
                if lid in pd["dense_layers"]:
                    out = ref.dense_attention(q, K, V, tiles.q_pos, m.scale)
                elif lid in pd["anchor_layers"]:
                    out = ref.sparse_attention(q, K, V, tiles, sel, m.scale)
                else:
                    out = ref.sparse_attention(q, K, V, tiles, sel, m.scale,
                                               head_map=pd["head_map"][lid])
                outputs[f, st.name, lid] = out
    return OracleRun(outputs, masks, store, ties, n_sel)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

HEAD_MAPS = {
    2: {1: [1, 0], 3: [1, 1], 4: [1, 0], 5: [0, 0]},
    4: {1: [3, 2, 1, 0], 3: [1, 1, 0, 2], 4: [0, 3, 1, 2], 5: [2, 3, 3, 0]},
}
PROFILES = {
    # layer 0 dense+anchor, anchors 2 and 4, reuse 1, 3, 5 (head-mapped)
    "a024": dict(dense=[0], anchors=[0, 2, 4]),
    # a dense-only layer 3 between anchor 2 and its reuse layers 4, 5 (head-mapped)
    "a02d3": dict(dense=[0, 3], anchors=[0, 2]),
}

CASES = [
    # (profile, granularity, page_tile, slot_page, Hq, Hkv, D, dtype)
    ("a024", "token", 8, 1, 8, 2, 64, torch.float32),
    ("a024", "token", 8, 16, 8, 2, 64, torch.float32),
    ("a024", "page", 8, 1, 12, 4, 32, torch.float32),
    ("a024", "page", 8, 16, 8, 2, 64, torch.float32),
    ("a024", "token", 8, 16, 12, 4, 32, torch.float32),
    ("a02d3", "token", 8, 16, 8, 2, 64, torch.float32),
    ("a02d3", "page", 4, 1, 12, 4, 32, torch.float32),
    ("a024", "token", 8, 16, 8, 2, 64, torch.bfloat16),
]


def case_id(c):
    prof, gran, pt, sp, hq, hkv, d, dt = c
    return f"{prof}-{gran}{pt if gran == 'page' else ''}-slotpage{sp}-hq{hq}hkv{hkv}d{d}-" \
           f"{str(dt).split('.')[-1]}"


def build(case, seed=1234):
    prof, gran, pt, sp, hq, hkv, d, dtype = case
    p = PROFILES[prof]
    pd = make_profile_dict(hkv, p["dense"], p["anchors"], HEAD_MAPS[hkv], gran, pt)
    pd["model"].update(num_q_heads=hq, head_dim=d)
    return make_scenario(Model(hq, hkv, d, dtype), pd, sp, seed)


_RUNS = {}


def runs(case):
    """Backend (batched and one-request-at-a-time) and oracle runs, computed once per case."""
    key = case_id(case)
    if key not in _RUNS:
        scn = build(case)
        batched = run_backend(scn, batched=True)
        single = run_backend(scn, batched=False)
        oracle = run_oracle(scn, batched.selections)
        _RUNS[key] = (scn, batched, single, oracle)
    return _RUNS[key]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_layer_matches_oracle(case):
    scn, b, _, o = runs(case)
    dtype = scn.model.dtype
    assert set(b.outputs) == set(o.outputs)
    for key, want in o.outputs.items():
        got = b.outputs[key]
        torch.testing.assert_close(got.double(), want, atol=ATOL[dtype], rtol=RTOL[dtype],
                                   msg=lambda m: f"{key}: {m}")
    # selections are (almost always) exactly the oracle's; differences are validated near-ties
    assert len(o.ties) <= max(1, o.n_selections // 20), o.ties


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sparsity_really_happens(case):
    """The scenario exercises sparse selections, and sparse outputs differ from dense ones."""
    scn, b, _, o = runs(case)
    pd = scn.profile_dict
    sparse_sel = [key for key in o.masks if not b.selections[key].dense]
    assert len(sparse_sel) >= len(o.masks) // 2
    m = scn.model
    differs = 0
    for (f, name, lid), want in o.outputs.items():
        if lid in pd["dense_layers"]:
            continue
        st = next(s for s in FORWARDS[f].steps if s.name == name)
        K, V = o.store[name][lid][0][: st.prefix + st.n], o.store[name][lid][1][: st.prefix + st.n]
        q = scn.data[f, name, lid][0]
        dense = ref.dense_attention(q, K, V, list(range(st.prefix, st.prefix + st.n)), m.scale)
        differs += int((dense - want).abs().max() > 1e-3)
    assert differs >= 10


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reuse_layers_use_head_map(case):
    """Reuse outputs match the head-mapped oracle and NOT the identity-mapped one (somewhere)."""
    scn, b, _, o = runs(case)
    pd = scn.profile_dict
    m = scn.model
    reuse = [lid for lid in range(NUM_LAYERS)
             if lid not in pd["dense_layers"] and lid not in pd["anchor_layers"]
             and pd["head_map"][lid] != list(range(m.hkv))]
    assert reuse
    distinguished = 0
    for f, fwd in enumerate(FORWARDS):
        for st in fwd.steps:
            for lid in reuse:
                anchor = max(a for a in pd["anchor_layers"] if a <= lid)
                sel = o.masks[f, st.name, anchor]
                S = st.prefix + st.n
                K, V = o.store[st.name][lid][0][:S], o.store[st.name][lid][1][:S]
                q = scn.data[f, st.name, lid][0]
                kfn = lambda s: ref.budget_k(s, pd["topk_fraction"], pd["k_min"], pd["round_to"])  # noqa: E731
                tiles = (ref.oracle_decode_tiles(S, kfn) if fwd.decode else
                         ref.oracle_extend_tiles(st.prefix, st.n, T, kfn))
                ident = ref.sparse_attention(q, K, V, tiles, sel, m.scale)
                got = b.outputs[f, st.name, lid].double()
                if (ident - got).abs().max() > 10 * ATOL[m.dtype] + 1e-3:
                    distinguished += 1
    assert distinguished >= 5


def assert_same_selection(a, b) -> None:
    """Two selections of one request and layer choose the same keys (dense or not)."""
    assert a.dense == b.dense
    if not a.dense:
        assert torch.equal(a.valid, b.valid)
        assert torch.equal(a.idx[a.valid], b.idx[b.valid])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_batched_equals_one_request_at_a_time(case):
    scn, b, s, _ = runs(case)
    assert set(b.outputs) == set(s.outputs)
    for key in b.outputs:
        torch.testing.assert_close(b.outputs[key], s.outputs[key], atol=1e-6, rtol=0,
                                   msg=lambda m: f"{key}: {m}")
    for key in b.selections:
        assert_same_selection(b.selections[key], s.selections[key])


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "single"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kv_pool_and_dense_delegation(case, batched):
    """Every layer's KV lands in the request's slots, written once. Profile dense layers are always
    delegated to SGLang's dense backend (told not to write the KV again); any other layer only when
    every request of the batch has an all-dense selection (then dense == Kascade exactly)."""
    scn, b, s, o = runs(case)
    run = b if batched else s
    pd = scn.profile_dict
    for name, layers in o.store.items():
        for lid, (K, V) in enumerate(layers):
            sl = scn.slots[name][: K.shape[0]]
            assert torch.equal(run.kv.k[lid][sl], K) and torch.equal(run.kv.v[lid][sl], V), \
                (name, lid)
    groups = [(f, [st.name for st in fwd.steps] if batched else [st.name])
              for f, fwd in enumerate(FORWARDS) for st in (fwd.steps[:1] if batched else fwd.steps)]
    assert len(run.dense_layers_per_forward) == len(groups)
    for (f, names), delegated in zip(groups, run.dense_layers_per_forward):
        assert set(pd["dense_layers"]) <= delegated, (f, names)
        for lid in delegated - set(pd["dense_layers"]):
            anchor = max(a for a in pd["anchor_layers"] if a <= lid)
            assert all(run.selections[f, n, anchor].dense for n in names), (f, names, lid)
    assert all(save is False for _, _, save in run.dense.calls)
    assert run.dense.inits == len(groups)
    # each layer writes once per forward, exactly the new tokens
    n_new = sum(st.n for fwd in FORWARDS for st in fwd.steps)
    for lid in range(NUM_LAYERS):
        assert sum(n for l_, n in run.kv.writes if l_ == lid) == n_new


def test_idle_batch():
    scn = build(CASES[0])
    m = scn.model
    profile = profile_from_dict(scn.profile_dict)
    r2t = FakeReqToTokenPool(8, MAX_CTX)
    kv = FakeKVPool(NUM_LAYERS, scn.num_slots, m.hkv, m.d, m.dtype)
    be = KascadeAttnBackend(FakeDenseBackend(r2t, kv), r2t, kv, profile, profile.budget, "cpu")
    fb = FakeForwardBatch(FakeForwardMode(False, idle=True), torch.zeros(0, dtype=torch.int64),
                          torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                          [], [], torch.zeros(0, dtype=torch.int64))
    be.init_forward_metadata(fb)
    assert be.plan is None
    layer = FakeLayer(1, m.hq, m.hkv, m.hkv, m.d, m.d, m.scale)
    out = be.forward(torch.zeros(0, m.hq * m.d), torch.zeros(0, m.hkv, m.d),
                     torch.zeros(0, m.hkv, m.d), layer, fb)
    assert out.shape == (0, m.hq * m.d)
