"""KascadeAttnBackend's decode forward on CUDA: device path (Triton kernels, device_path.py) vs
its PyTorch path (``backend.device_path.enabled = False``), both against the float64 oracle.

Marker ``gpu``; skipped without CUDA. Fakes for SGLang's pools, dense backend and ForwardBatch
(on the GPU) as in test_backend_vs_reference.py. Per case: a 6-layer model, two decode forwards
on one backend (the second with more and longer requests, so the buffers grow), ragged lengths
(some requests short enough to be dense: k == seq_len), pages of 1 or 16 slots scattered over
the pool, a cached prefix shared by two requests (radix-cache hit), bf16 and fp16, head dim
64/128, GQA groups 1/4/8, roles dense / dense_anchor (selecting or not) / anchor / reuse with head
maps, policies kascade and oracle. The device path's buffers are poisoned (NaN, -7) before each
forward.

Checks per layer and request:
  * every selection (device and PyTorch) is a valid Top-k of the float64 pooled scores, up to
    1e-4 of the row's largest score (float near-ties), and the two are the same set unless such a
    tie was hit (counted; at most a few rows in a case);
  * each path's output against the float64 oracle over that path's own selections:
    ||out - oracle|| / ||oracle|| < 1e-2 (bf16) / 2e-3 (fp16), as the kernel tests;
  * device vs PyTorch outputs directly while their selections so far agree (2x that bound);
  * the device path ran (layers counted) and the dense backend was called only where expected.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import reference as ref
from test_backend_vs_reference import FakeLayer as Layer
from sglang_kascade import graph_nodes
from sglang_kascade.backend import KascadeAttnBackend
from sglang_kascade.config import PolicyConfig
from sglang_kascade.policies import DEVICE_POLICIES
from sglang_kascade.kernels import topk_triton
from sglang_kascade.profile import profile_from_dict

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
NUM_LAYERS = 6
REL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
TIE_REL = 1e-4


# ---- fakes (GPU) ---------------------------------------------------------------------------------


class ReqPool:
    def __init__(self, r2t):
        self.req_to_token = r2t


class KVPool:
    def __init__(self, k, v):
        self.k, self.v = k, v  # per layer [slots, Hkv, D]

    def get_key_buffer(self, lid):
        return self.k[lid]

    def get_value_buffer(self, lid):
        return self.v[lid]

    def set_kv_buffer(self, layer, loc, k, v, *a, **kw):
        lid = layer.layer_id
        self.k[lid][loc] = k.reshape(-1, *self.k[lid].shape[1:]).to(self.k[lid].dtype)
        self.v[lid][loc] = v.reshape(-1, *self.v[lid].shape[1:]).to(self.v[lid].dtype)


class DenseBackend:
    """Dense decode attention in fp32 on the GPU, one request at a time."""

    def __init__(self, r2t, kv):
        self.r2t, self.kv = r2t, kv
        self.calls = []

    def init_forward_metadata(self, fb):
        pass

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        self.calls.append(layer.layer_id)
        if save_kv_cache:
            self.kv.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        q3 = q.reshape(-1, hq, d)
        kb, vb = self.kv.get_key_buffer(layer.layer_id), self.kv.get_value_buffer(layer.layer_id)
        out = torch.empty(q3.shape[0], hq, layer.v_head_dim, dtype=q.dtype, device=q.device)
        for i, (row, n) in enumerate(zip(fb.req_pool_indices.tolist(), fb.seq_lens_cpu.tolist())):
            slots = self.r2t.req_to_token[row, :n].long()
            kk = kb[slots].float().repeat_interleave(hq // kb.shape[1], 1)  # [n, Hq, D]
            vv = vb[slots].float().repeat_interleave(hq // kb.shape[1], 1)
            p = (torch.einsum("hd,nhd->hn", q3[i].float(), kk) * layer.scaling).softmax(-1)
            out[i] = torch.einsum("hn,nhd->hd", p, vv).to(q.dtype)
        return out.reshape(q3.shape[0], -1)

    forward_extend = forward_decode


class Mode:
    def is_decode(self):
        return True

    def is_idle(self):
        return False


@dataclass
class Batch:
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    out_cache_loc: torch.Tensor
    forward_mode: Mode = Mode()
    extend_prefix_lens_cpu: list = None
    extend_seq_lens_cpu: list = None


# ---- cases ---------------------------------------------------------------------------------------

PROFILES = {
    # layer 0 dense + selecting anchor; anchors 2, 4; reuse 1, 3, 5 through head maps
    "a024": dict(dense=[0], anchors=[0, 2, 4]),
    # layer 0 dense_anchor not read (anchor 1 follows), plain dense layer 3, reuse 2, 4, 5
    "a01d3": dict(dense=[0, 3], anchors=[0, 1]),
}

# (profile, policy, lengths, Hkv, G, D, page, dtype, k_min, fraction)
CASES = [
    ("a024", "kascade", [37, 300, 5, 1500], 2, 4, 128, 1, torch.bfloat16, 16, 0.1),
    ("a024", "kascade", [37, 300, 5, 1500], 2, 4, 128, 16, torch.float16, 16, 0.1),
    ("a01d3", "kascade", [2100, 64, 700], 8, 1, 64, 16, torch.bfloat16, 32, 0.1),
    ("a024", "kascade", [900, 3000, 129], 1, 8, 64, 1, torch.float16, 32, 0.2),
    ("a024", "oracle", [400, 1200], 4, 4, 128, 16, torch.bfloat16, 16, 0.1),
    ("a01d3", "kascade", [5000, 48, 2048, 17, 777], 8, 4, 128, 16, torch.bfloat16, 64, 0.05),
    ("a024", "kascade", [20, 9, 30], 2, 4, 64, 16, torch.bfloat16, 64, 0.1),  # all dense
]


def case_id(c):
    return (f"{c[0]}-{c[1]}-L{max(c[2])}x{len(c[2])}-h{c[3]}g{c[4]}d{c[5]}p{c[6]}-"
            f"{str(c[7]).split('.')[-1]}")


@dataclass
class Setup:
    profile: object
    r2t: torch.Tensor
    k: list
    v: list
    rows: list
    slots: list  # per request [Lmax] slot of each position (device int64)
    forwards: list  # [(requests, seq_lens)]
    data: dict  # (forward, layer) -> (q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, D])


def build(case) -> Setup:
    prof, policy, lens, hkv, g, d, page, dtype, k_min, frac = case
    seed = zlib.crc32(case_id(case).encode())
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    nreq = len(lens)
    maxlen = max(lens) + 1
    pages_per = math.ceil(maxlen / page)
    n_pages = nreq * pages_per + 4
    page_ids = rng.sample(range(1, n_pages), nreq * pages_per)  # page 0 (slot 0) never used
    slots = []
    for r in range(nreq):
        pg = torch.tensor(page_ids[r * pages_per:(r + 1) * pages_per])
        pos = torch.arange(maxlen)
        slots.append(pg[pos // page] * page + pos % page)
    # radix-cache hit: request 1 shares request 0's first pages (its prefix K/V are request 0's)
    if nreq > 1:
        shared = (min(lens[0], lens[1]) - 2) // page * page
        slots[1][:shared] = slots[0][:shared]
    rows = rng.sample(range(nreq + 3), nreq)
    r2t = torch.full((nreq + 3, pages_per * page + 3), -1, dtype=torch.int32)
    for r in range(nreq):
        r2t[rows[r], :maxlen] = slots[r].to(torch.int32)
    n_slots = n_pages * page
    hq = hkv * g
    k = [torch.randn(n_slots, hkv, d, generator=gen).to(dtype) for _ in range(NUM_LAYERS)]
    v = [torch.randn(n_slots, hkv, d, generator=gen).to(dtype) for _ in range(NUM_LAYERS)]
    # forward 0: the first half of the requests, one token shorter; forward 1: all of them
    first = list(range(max(1, nreq // 2)))
    forwards = [(first, [lens[r] - 1 if lens[r] > 1 else 1 for r in first]),
                (list(range(nreq)), list(lens))]
    data = {}
    for f, (reqs, _) in enumerate(forwards):
        for lid in range(NUM_LAYERS):
            data[f, lid] = ((torch.randn(len(reqs), hq, d, generator=gen) * 3.0).to(dtype),
                            torch.randn(len(reqs), hkv, d, generator=gen).to(dtype),
                            torch.randn(len(reqs), hkv, d, generator=gen).to(dtype))
    ident = list(range(hkv))
    p = PROFILES[prof]
    head_map = []
    for lid in range(NUM_LAYERS):
        if lid in p["dense"] or lid in p["anchors"]:
            head_map.append(ident)
        else:  # a permutation or a many-to-one map
            head_map.append(rng.sample(ident, hkv) if lid % 2 else
                            [rng.randrange(hkv) for _ in ident])
    pd = {
        "schema_version": 1, "name": "gpu-test",
        "model": {"architecture": "FakeForCausalLM", "num_layers": NUM_LAYERS,
                  "num_q_heads": hq, "num_kv_heads": hkv, "head_dim": d},
        "dense_layers": p["dense"], "anchor_layers": p["anchors"], "head_map": head_map,
        "topk_fraction": frac, "k_min": k_min, "tile_size": 16, "granularity": "token",
        "page_tile_size": 16, "round_to": 1, "provenance": {"source": "test"},
    }
    return Setup(profile_from_dict(pd), r2t, k, v, rows, slots, forwards, data)


@dataclass
class Run:
    outputs: dict  # (forward, layer) -> [B, Hq, D] (CPU)
    selections: dict  # (forward, layer, request index) -> sorted positions per KV head
    dense_calls: list  # per forward: layer ids delegated to the dense backend
    backend: KascadeAttnBackend
    kv: KVPool


def poison(buf):
    for t in (buf.logits, buf.pooled, *buf.scratch.values()):
        t.fill_(float("nan"))
    for name in ("sel_pos", "sel_slot", "topk_hist", "topk_ctr"):
        getattr(buf, name).fill_(-7)


def run(setup: Setup, case, device_path: bool) -> Run:
    prof, policy, lens, hkv, g, d, page, dtype, *_ = case
    hq = hkv * g
    r2t = setup.r2t.to(DEV)
    kv = KVPool([t.to(DEV) for t in setup.k], [t.to(DEV) for t in setup.v])
    dense = DenseBackend(ReqPool(r2t), kv)
    be = KascadeAttnBackend(dense, ReqPool(r2t), kv, setup.profile, setup.profile.budget,
                            torch.device(DEV), policy=PolicyConfig(name=policy))
    be.device_path.enabled = device_path
    layers = [Layer(i, hq, hkv, hkv, d, d, d ** -0.5) for i in range(NUM_LAYERS)]
    outputs, sels, dense_calls = {}, {}, []
    for f, (reqs, seq) in enumerate(setup.forwards):
        fb = Batch(req_pool_indices=torch.tensor([setup.rows[r] for r in reqs], device=DEV),
                   seq_lens=torch.tensor(seq, device=DEV), seq_lens_cpu=torch.tensor(seq),
                   out_cache_loc=torch.stack([setup.slots[r][s - 1] for r, s in
                                              zip(reqs, seq)]).to(DEV))
        be.init_forward_metadata(fb)
        if device_path and policy in DEVICE_POLICIES:
            assert be.device_fwd is not None
            if not be.device_fwd.all_dense:
                poison(be.device_path._buffers(be.device_fwd, hq, hkv, d))
        else:
            assert be.device_fwd is None
        n_calls = len(dense.calls)
        for layer in layers:
            q, k, v = (t.to(DEV) for t in setup.data[f, layer.layer_id])
            out = be.forward(q.reshape(len(reqs), -1), k, v, layer, fb)
            assert out.shape == (len(reqs), hq * d) and out.dtype == dtype
            outputs[f, layer.layer_id] = out.reshape(len(reqs), hq, d).float().cpu()
            if be.layers.selects[layer.layer_id] and policy in DEVICE_POLICIES:
                for i, s in enumerate(seq):
                    sels[f, layer.layer_id, i] = selection_of(be, i, s, hkv)
        if DEV == "cuda":
            torch.cuda.synchronize()
        dense_calls.append(dense.calls[n_calls:])
    return Run(outputs, sels, dense_calls, be, kv)


def selection_of(be, i, seq_len, hkv):
    """[Hkv] sorted position tensors of request i's latest selection (all keys when dense)."""
    k = be.budget.k_for(seq_len)
    if k >= seq_len:
        return [torch.arange(seq_len)] * hkv
    if be.device_fwd is not None and be.device_fwd.has_selection:
        pos, kk = be.device_path.selection(be.device_fwd, i)
        assert kk == k
        return [pos[h].cpu().sort().values for h in range(hkv)]
    sel = be.plan.selections[i]
    assert not sel.dense
    return [sel.idx[h, 0][sel.valid[h, 0]].cpu().sort().values for h in range(hkv)]


# ---- the oracle ----------------------------------------------------------------------------------


def request_kv(kv: KVPool, lid, slots):
    return kv.k[lid][slots].cpu(), kv.v[lid][slots].cpu()


def check_topk(chosen, scores, k):
    """chosen: sorted positions; scores [L] float64 pooled probabilities."""
    assert chosen.numel() == k and int(chosen.unique().numel()) == k, "size or duplicates"
    assert int(chosen.min()) >= 0 and int(chosen.max()) < scores.numel(), "out of range"
    tol = TIE_REL * float(scores.max())
    kth = float(scores.topk(k).values[-1])
    assert float(scores[chosen].min()) >= kth - tol
    left = torch.ones(scores.numel(), dtype=torch.bool)
    left[chosen] = False
    if left.any():
        assert float(scores[left].max()) <= float(scores[chosen].min()) + tol


def oracle_check(setup: Setup, case, res: Run, label: str):
    """Selections valid, outputs vs float64 oracle over res's own selections. Pools: res.kv
    (final state: every decode write of both forwards is in, so forward 0 is checked over the
    positions < its seq_len, which forward 1 did not touch)."""
    prof, policy, lens, hkv, g, d, page, dtype, *_ = case
    be = res.backend
    scale = d ** -0.5
    worst = 0.0
    for f, (reqs, seq) in enumerate(setup.forwards):
        cur = [None] * len(reqs)  # latest selection per request (None: none this forward)
        for lid in range(NUM_LAYERS):
            role = be.layers.roles[lid]
            q = setup.data[f, lid][0]
            for i, (r, s) in enumerate(zip(reqs, seq)):
                kk, vv = request_kv(res.kv, lid, setup.slots[r][:s].to(DEV))
                qi = q[i:i + 1]
                if be.layers.selects[lid]:
                    tiles = ref.oracle_decode_tiles(s, lambda n: n)
                    scores = ref.pooled_scores(qi, kk, tiles, scale)[:, 0]  # [Hkv, L]
                    sel = res.selections[f, lid, i]
                    k = be.budget.k_for(s)
                    for h in range(hkv):
                        check_topk(sel[h], scores[h], k)
                    cur[i] = sel
                if role == "dense" or (role == "dense_anchor") or cur[i] is None:
                    want = ref.dense_attention(qi, kk, vv, [s - 1], scale)[0]
                else:
                    hm = list(range(hkv)) if role == "anchor" else be.profile.head_map[lid]
                    mask = torch.zeros(hkv * g, 1, s, dtype=torch.bool)
                    for h in range(hkv):
                        mask[h * g:(h + 1) * g, 0, cur[i][hm[h]]] = True
                    want = ref.masked_attention(qi, kk, vv, mask, scale)[0]
                got = res.outputs[f, lid][i].double()
                err = float((got - want).norm() / want.norm())
                worst = max(worst, err)
                assert err < REL[dtype], (label, f, lid, role, i, s, err)
    return worst


_CACHE = {}


def runs(case):
    key = case_id(case)
    if key not in _CACHE:
        setup = build(case)
        _CACHE.clear()
        _CACHE[key] = (setup, run(setup, case, True), run(setup, case, False))
    return _CACHE[key]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_device_path_matches_torch_path(case):
    check_device_path(case)


# The cases' rows (<= 5,000 keys) are under topk_triton.SHORT_ROW, so their Top-k is the one
# program per short row; with SHORT_ROW lowered the rows above it go through the radix passes.
LONG_ROW_CASES = [CASES[0], CASES[5]]


@pytest.mark.parametrize("collect", [True, False], ids=["collect", "five-launch"])
@pytest.mark.parametrize("case", LONG_ROW_CASES, ids=case_id)
def test_device_path_radix_passes(case, collect, monkeypatch):
    """As above with SHORT_ROW at 64: every longer row's Top-k through the radix passes, in
    collect mode (the default) or through the five launches."""
    monkeypatch.setattr(topk_triton, "SHORT_ROW", 64)
    monkeypatch.setattr(topk_triton, "COLLECT", collect)
    check_device_path(case)


def check_device_path(case):
    setup, dev, cpu_path = runs(case)
    prof, policy, lens, hkv, g, d, page, dtype, *_ = case
    be = dev.backend
    oracle_check(setup, case, dev, "device")
    oracle_check(setup, case, cpu_path, "torch")
    # same selections, except float near-ties (both are valid Top-k above)
    rows = diff = 0
    for key, sel in dev.selections.items():
        for h in range(hkv):
            rows += 1
            diff += not torch.equal(sel[h], cpu_path.selections[key][h])
    assert diff <= max(2, rows // 50), f"{diff} of {rows} selection rows differ"
    # outputs directly, while the selections so far agree
    for f, (reqs, seq) in enumerate(setup.forwards):
        agree = [True] * len(reqs)
        for lid in range(NUM_LAYERS):
            for i in range(len(reqs)):
                if be.layers.selects[lid]:
                    agree[i] = agree[i] and all(
                        torch.equal(a, b) for a, b in zip(dev.selections[f, lid, i],
                                                         cpu_path.selections[f, lid, i]))
                if agree[i]:
                    a, b = dev.outputs[f, lid][i].double(), cpu_path.outputs[f, lid][i].double()
                    err = float((a - b).norm() / b.norm())
                    assert err < 2 * REL[dtype], (f, lid, i, err)
    # where the device path ran: every selecting or sparse layer of a forward with a sparse
    # request, and no dense-backend call for them
    for f, (reqs, seq) in enumerate(setup.forwards):
        sparse = any(be.budget.k_for(s) < s for s in seq)
        expect_dense = set()
        for lid in range(NUM_LAYERS):
            role = be.layers.roles[lid]
            if not sparse or role == "dense" or (role == "dense_anchor" and not be.layers.selects[lid]):
                expect_dense.add(lid)
            elif role == "reuse" and not any(be.layers.selects[a] for a in range(lid)):
                expect_dense.add(lid)
        assert set(dev.dense_calls[f]) == expect_dense, (f, dev.dense_calls[f], expect_dense)
    n_sparse = sum(any(be.budget.k_for(s) < s for s in seq) for _, seq in setup.forwards)
    assert (be.device_path.layers_run > 0) == (n_sparse > 0)
    assert be.stats.device_forwards == n_sparse


def test_device_path_not_planned_for_other_policies():
    """quest / streaming select pages or windows: their decode forwards keep the PyTorch path."""
    case = CASES[0]
    setup = build(case)
    for policy in ("quest", "streaming"):
        res = run(setup, (case[0], policy) + case[2:], True)
        assert res.backend.device_path.layers_run == 0


# ---- CUDA graphs ---------------------------------------------------------------------------------


class GraphDense(DenseBackend):
    """The fake dense backend with SGLang's graph hooks, capturable: fixed shapes (every column
    of req_to_token, masked by the device seq_lens), no host reads."""

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        self.calls.append(layer.layer_id)
        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        q3 = q.reshape(-1, hq, d).float()
        kb, vb = self.kv.get_key_buffer(layer.layer_id), self.kv.get_value_buffer(layer.layer_id)
        slots = self.r2t.req_to_token[fb.req_pool_indices].long().clamp(min=0)  # [B, C]
        g = hq // kb.shape[1]
        kk = kb[slots].float().repeat_interleave(g, 2)  # [B, C, Hq, D]
        vv = vb[slots].float().repeat_interleave(g, 2)
        logits = torch.einsum("bhd,bchd->bhc", q3, kk) * layer.scaling
        pos = torch.arange(slots.shape[1], device=q.device)
        logits = logits.masked_fill(pos[None, None, :] >= fb.seq_lens[:, None, None],
                                    float("-inf"))
        out = torch.einsum("bhc,bchd->bhd", logits.softmax(-1), vv).to(q.dtype)
        return out.reshape(q3.shape[0], -1)

    def init_cuda_graph_state(self, max_bs, max_num_tokens):
        pass

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def init_forward_metadata_out_graph(self, fb, in_capture=False):
        self.out_graph_calls = getattr(self, "out_graph_calls", []) + [in_capture]

    def init_forward_metadata_in_graph(self, fb):
        pass


GRAPH_CASES = [CASES[0], CASES[2], CASES[4]]


SWAP_ANCHORS = {"a024": [0, 3], "a01d3": [0, 4]}  # same dense layers, other anchors


def swapped_profile(profile, prof):
    """Another profile with the same dense layers: other anchors, new head maps, a smaller
    budget. Captured decode graphs must serve it after a hot swap, without a recapture."""
    d = profile.to_json()
    rng = random.Random(11)
    hkv = d["model"]["num_kv_heads"]
    anchors = SWAP_ANCHORS[prof]
    d["anchor_layers"] = anchors
    d["head_map"] = [list(range(hkv)) if i in d["dense_layers"] or i in anchors
                     else rng.sample(range(hkv), hkv) for i in range(NUM_LAYERS)]
    d["topk_fraction"] = d["topk_fraction"] / 2
    d["name"] = "swapped"
    return profile_from_dict(d)


@pytest.mark.parametrize("nodes", ["switched", "gated"])
@pytest.mark.parametrize("swap", [False, True], ids=["captured-profile", "hot-swapped"])
@pytest.mark.parametrize("case", GRAPH_CASES, ids=case_id)
def test_cuda_graph_replay_equals_eager(case, swap, nodes, monkeypatch):
    check_graph_replay(case, swap, nodes, monkeypatch)


@pytest.mark.parametrize("case", GRAPH_CASES[:1], ids=case_id)
def test_cuda_graph_replay_radix_passes(case, monkeypatch):
    """As below (hot swap, chains switched) with topk_triton.SHORT_ROW at 64: the captured Top-k
    runs the radix passes in collect mode on every row longer than 64 keys."""
    monkeypatch.setattr(topk_triton, "SHORT_ROW", 64)
    monkeypatch.setattr(topk_triton, "COLLECT", True)
    check_graph_replay(case, True, "switched", monkeypatch)


def check_graph_replay(case, swap, nodes, monkeypatch):
    """One decode forward captured (the backend's capture hooks, as SGLang's decode graph runner
    calls them), replayed for two steps of different lengths and inputs; each replay equals the
    eager device path on a twin backend (same pools, same inputs). The second step is shorter
    than the first, so stale buffer contents past a request's end would show. ``swap``: after
    the capture the graph backend gets another profile (same dense layers; other anchors, head
    maps and budget) through the control channel's staging, and the eager twin runs that
    profile: the replays must follow it with no recapture. ``nodes``: "switched" captures as
    SGLang's runner does through the adapter (keep_graph, graph_nodes.adopt), so the selection
    kernels of layers that do not select are taken out of the graph, which is re-instantiated
    (node counts checked through the driver); "gated" turns the switch off
    (SGLANG_KASCADE_NODE_SWITCH=0): gates alone."""
    if nodes == "gated":
        monkeypatch.setenv("SGLANG_KASCADE_NODE_SWITCH", "0")
    setup = build(case)
    prof, policy, lens, hkv, g, d, page, dtype, *_ = case
    hq = hkv * g
    nreq = len(lens)
    gen = torch.Generator().manual_seed(7)
    steps = []
    for seq in ([s for s in lens], [max(1, s - 1) for s in lens]):
        data = [((torch.randn(nreq, hq, d, generator=gen) * 3).to(dtype),
                 torch.randn(nreq, hkv, d, generator=gen).to(dtype),
                 torch.randn(nreq, hkv, d, generator=gen).to(dtype)) for _ in range(NUM_LAYERS)]
        steps.append((seq, data))

    def backend_for(dense_cls):
        r2t = setup.r2t.to(DEV)
        kv = KVPool([t.to(DEV) for t in setup.k], [t.to(DEV) for t in setup.v])
        dense = dense_cls(ReqPool(r2t), kv)
        be = KascadeAttnBackend(dense, ReqPool(r2t), kv, setup.profile, setup.profile.budget,
                                torch.device(DEV), policy=PolicyConfig(name=policy))
        return be

    def batch(seq):
        return Batch(req_pool_indices=torch.tensor(setup.rows, device=DEV),
                     seq_lens=torch.tensor(seq, device=DEV), seq_lens_cpu=torch.tensor(seq),
                     out_cache_loc=torch.stack([setup.slots[r][s - 1] for r, s in
                                                enumerate(seq)]).to(DEV))

    layers = [Layer(i, hq, hkv, hkv, d, d, d ** -0.5) for i in range(NUM_LAYERS)]
    new = swapped_profile(setup.profile, prof) if swap else None
    # eager twin
    eager = backend_for(DenseBackend)
    if swap:
        eager.set_profile(new, new.budget)
    want = []
    for seq, data in steps:
        fb = batch(seq)
        eager.init_forward_metadata(fb)
        outs = [eager.forward(data[l][0].to(DEV).reshape(nreq, -1), data[l][1].to(DEV),
                              data[l][2].to(DEV), layers[l], fb) for l in range(NUM_LAYERS)]
        want.append([o.float().cpu() for o in outs])
    # graph: static inputs, capture with the first step's batch, replay both steps
    be = backend_for(GraphDense)
    be.init_cuda_graph_state(nreq, 0)
    static_q = [torch.zeros(nreq, hq * d, dtype=dtype, device=DEV) for _ in layers]
    static_k = [torch.zeros(nreq, hkv, d, dtype=dtype, device=DEV) for _ in layers]
    static_v = [torch.zeros(nreq, hkv, d, dtype=dtype, device=DEV) for _ in layers]
    fb = batch(steps[0][0])
    static_loc = fb.out_cache_loc.clone()
    static_pool = fb.req_pool_indices.clone()
    static_seq = fb.seq_lens.clone()

    def load(seq, data):
        b = batch(seq)
        for l in range(NUM_LAYERS):
            static_q[l].copy_(data[l][0].reshape(nreq, -1))
            static_k[l].copy_(data[l][1])
            static_v[l].copy_(data[l][2])
        static_loc.copy_(b.out_cache_loc)
        static_pool.copy_(b.req_pool_indices)
        static_seq.copy_(b.seq_lens)
        return Batch(req_pool_indices=static_pool, seq_lens=static_seq,
                     seq_lens_cpu=b.seq_lens_cpu, out_cache_loc=static_loc)

    sfb = load(*steps[0])
    assert be.can_run_graph(sfb)  # the test pool holds every step's keys
    be.init_forward_metadata_out_graph(sfb, in_capture=True)
    assert be.device_fwd.graph

    def body():
        be.init_forward_metadata_in_graph(sfb)
        return [be.forward(static_q[l], static_k[l], static_v[l], layers[l], sfb)
                for l in range(NUM_LAYERS)]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()  # warm-up (compiles); writes the same KV the replay writes
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph(keep_graph=nodes == "switched")
    with torch.cuda.graph(graph):
        outs = body()
    sw = be.device_path.node_switch
    assert sw.active == (nodes == "switched")
    if nodes == "switched":
        captured_nodes = sw.driver.node_count(graph.raw_cuda_graph())
        assert graph_nodes.adopt(graph)
    poison(be.device_path.graph_buffers)
    if swap:
        assert be.hot_swap_problem(new) is None
        be.control = StagedOnce(new)  # applied by the next out_graph hook, as a sidecar swap is
    for (seq, data), ref_outs in zip(steps, want):
        sfb = load(seq, data)
        be.init_forward_metadata_out_graph(sfb, in_capture=False)
        graph.replay()
        torch.cuda.synchronize()
        for l in range(NUM_LAYERS):
            got = outs[l].float().cpu()
            assert torch.isfinite(got).all(), l
            err = float((got - ref_outs[l]).norm() / ref_outs[l].norm())
            assert err < 2 * REL[dtype], (seq, l, err)
    assert be.stats.device_forwards == len(steps)
    # The dense backend plans each replay only when a captured layer calls it
    dense_layers = "dense" in be.device_path.graph_kinds
    assert be.dense_in_graphs == dense_layers
    assert be.dense.out_graph_calls == [True] + [False] * (len(steps) if dense_layers else 0)
    if swap:
        assert be.profile.name == "swapped" and be.stats.swaps_applied == 1
    if nodes == "switched":  # the kept graph's selection chains follow the profile now served
        (cap,) = sw.graphs
        sparse = [i for i, k in enumerate(be.device_path.graph_kinds) if k == "sparse"]
        per_layer = {len(cap.chains[i].stash) for i in sparse}  # the selection's kernels
        assert sorted(cap.chains) == sparse and len(per_layer) == 1 and min(per_layer) >= 3
        assert cap.live and all(cap.chains[i].on == bool(be.layers.selects[i]) for i in sparse)
        out = min(per_layer) * sum(not be.layers.selects[i] for i in sparse)
        assert sw.disabled_nodes() == out
        assert sw.driver.node_count(graph.raw_cuda_graph()) == captured_nodes - out


class StagedOnce:
    """The control channel's side the backend sees: one staged profile, then nothing."""

    def __init__(self, profile):
        self.staged = SimpleNamespace(profile=profile, generation=1)

    def take_staged(self):
        staged, self.staged = self.staged, None
        return staged

    def report_applied(self, generation):
        pass

    def report_refused(self, generation, error):
        raise AssertionError(error)

    def maybe_write_stats(self, stats, force=False):
        pass
