"""PyTorch kernels (tiles, select_topk, sparse_attention) against the float64 oracle in reference.py.

Selections are checked for being a valid Top-k under the oracle's float64 pooled scores (robust to
float near-ties) and, in practice, for being equal to the oracle's. Outputs are compared given the
SAME selection (the kernel's, turned into an oracle mask), so a near-tie can never fail an output
check. Tolerances: fp32 inputs atol 1e-5 (rtol 1e-5); bf16 inputs atol 3e-2; fp16 inputs atol 4e-3
(outputs are rounded to the input dtype by the kernel; the oracle reads the same rounded inputs).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch

import reference as ref
from sglang_kascade.config import BudgetConfig
from sglang_kascade.kernels.rerank_torch import rerank_selection
from sglang_kascade.kernels.selection_torch import Selection, select_topk
from sglang_kascade.kernels.sparse_attention_torch import dense_causal_attention, sparse_attention
from sglang_kascade.kernels.tiles import decode_tiles, extend_tiles

# Tiny tensors: OpenMP threads only add synchronisation cost (10-40x slower on 2 busy cores).
torch.set_num_threads(1)

ATOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@dataclass(frozen=True)
class Case:
    d: int  # head dim
    g: int  # group size Hq / Hkv
    hkv: int
    prefix: int  # cached tokens (extend) ; for decode: seq_len - 1
    n: int  # new tokens (extend); 1 for decode
    decode: bool = False
    tile: int = 16
    fraction: float = 0.25
    k_min: int = 4
    round_to: int = 1
    gran: str = "token"
    page: int = 16
    block_bytes: int = 256 << 20

    @property
    def seq(self) -> int:
        return self.prefix + self.n

    @property
    def budget(self) -> BudgetConfig:
        return BudgetConfig(topk_fraction=self.fraction, k_min=self.k_min, tile_size=self.tile,
                            granularity=self.gran, page_tile_size=self.page,
                            round_to=self.round_to)

    def kfn(self, visible):
        return ref.budget_k(visible, self.fraction, self.k_min, self.round_to)

    def __str__(self):
        kind = f"dec{self.seq}" if self.decode else f"p{self.prefix}+{self.n}"
        return (f"d{self.d}g{self.g}h{self.hkv}-{kind}-T{self.tile}-f{self.fraction}-km{self.k_min}"
                f"-r{self.round_to}-{self.gran}{self.page if self.gran == 'page' else ''}"
                f"-bb{self.block_bytes}")


TINY = 1  # forces one tile per block
SMALL = 40_000  # a few tiles per block

EXTEND_CASES = [
    # head dims 64/128, group sizes 1/3/4/8, ragged sizes, cached prefixes (aligned or not)
    Case(64, 1, 2, 0, 1),
    Case(64, 4, 2, 0, 31),
    Case(64, 4, 2, 0, 33, tile=8, k_min=4),
    Case(128, 3, 2, 0, 97, tile=16, fraction=0.1),
    Case(64, 8, 1, 0, 300, tile=32, fraction=0.1, k_min=8, block_bytes=SMALL * 8),
    Case(128, 4, 2, 31, 1, tile=8),  # one query, prefix not a multiple of T
    Case(64, 4, 2, 32, 33, tile=16),  # aligned prefix
    Case(64, 1, 4, 45, 97, tile=16, fraction=0.1, round_to=4),
    Case(128, 8, 1, 100, 57, tile=32, k_min=16, round_to=8, block_bytes=TINY),
    Case(64, 3, 3, 17, 83, tile=16, k_min=4, round_to=3, block_bytes=SMALL),
    Case(64, 4, 2, 5, 120, tile=1, fraction=0.25, k_min=4, block_bytes=SMALL),  # T = 1
    # page granularity
    Case(64, 4, 2, 0, 97, gran="page", page=8),
    Case(128, 3, 2, 45, 83, tile=16, fraction=0.1, k_min=12, gran="page", page=16,
         block_bytes=TINY),
    Case(64, 8, 1, 0, 300, tile=32, fraction=0.1, k_min=8, gran="page", page=16,
         block_bytes=SMALL * 8),
    Case(64, 1, 4, 33, 31, tile=8, k_min=5, round_to=2, gran="page", page=4),
    Case(64, 4, 2, 7, 60, tile=16, k_min=4, gran="page", page=3, block_bytes=SMALL),  # odd P
    Case(64, 4, 2, 0, 64, tile=16, k_min=16, gran="page", page=16),  # k == one whole page
    # key tiles straddling tile starts (P does not divide T): only the candidate part is selected
    Case(64, 4, 2, 0, 97, tile=16, fraction=0.5, k_min=4, gran="page", page=5),
    Case(64, 2, 2, 3, 70, tile=8, fraction=0.5, k_min=6, gran="page", page=3, block_bytes=TINY),
]

DECODE_CASES = [
    Case(64, 4, 2, 0, 1, decode=True),  # L = 1
    Case(64, 4, 2, 30, 1, decode=True),  # L = 31
    Case(128, 3, 2, 32, 1, decode=True, fraction=0.1),  # L = 33
    Case(64, 8, 1, 96, 1, decode=True, fraction=0.1, k_min=8, round_to=4),  # L = 97
    Case(128, 1, 4, 299, 1, decode=True, fraction=0.1, k_min=16),  # L = 300
    Case(64, 4, 2, 96, 1, decode=True, gran="page", page=8),
    Case(128, 4, 2, 299, 1, decode=True, fraction=0.1, k_min=4, gran="page", page=16),
    Case(64, 3, 2, 60, 1, decode=True, k_min=5, round_to=3, gran="page", page=5),
]

ALL_CASES = EXTEND_CASES + DECODE_CASES


def make_inputs(case: Case, seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    hq = case.g * case.hkv
    # Spread logits a bit (x1.5) so probabilities are peaked, like real attention.
    q = (torch.randn(case.n, hq, case.d) * 1.5).to(dtype)
    k = torch.randn(case.seq, case.hkv, case.d).to(dtype)
    v = torch.randn(case.seq, case.hkv, case.d).to(dtype)
    return q, k, v, 1.0 / math.sqrt(case.d)


def kernel_tiles(case: Case):
    b = case.budget
    if case.decode:
        return decode_tiles(case.seq, b.k_for, torch.device("cpu"))
    return extend_tiles(case.prefix, case.n, case.tile, b.k_for, torch.device("cpu"))


def oracle_tiles(case: Case):
    if case.decode:
        return ref.oracle_decode_tiles(case.seq, case.kfn)
    return ref.oracle_extend_tiles(case.prefix, case.n, case.tile, case.kfn)


def seed_of(case: Case, salt: int = 0) -> int:
    return (zlib.crc32(str(case).encode()) + salt) % (2**31)


def is_sparse(ot: ref.OracleTiles) -> bool:
    return any(k < s for k, s in zip(ot.ks, ot.starts))


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("visible", [0, 1, 3, 4, 5, 15, 16, 17, 25, 30, 31, 33, 50, 97, 100, 180,
                                     300, 1000, 4097])
@pytest.mark.parametrize("fraction,k_min,round_to", [
    (0.1, 128, 1), (0.1, 4, 1), (0.25, 4, 1), (0.1, 16, 8), (0.3, 5, 3), (1.0, 1, 1),
    (0.05, 1, 128), (0.7, 2, 4),
    # fraction * visible lands a hair above an integer in floating point (0.07 * 100 = 7.000...01)
    (0.07, 1, 1), (0.14, 1, 1), (0.28, 1, 1), (0.55, 1, 1),
])
def test_budget_k_matches_spec(visible, fraction, k_min, round_to):
    b = BudgetConfig(topk_fraction=fraction, k_min=k_min, round_to=round_to)
    want = ref.budget_k(visible, fraction, k_min, round_to)
    assert b.k_for(visible) == want
    assert 0 <= want <= visible
    if visible > 0 and want < visible:
        assert want % round_to == 0 and want >= k_min


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_tiles_match_oracle(case):
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    assert kt.q_pos.tolist() == ot.q_pos
    assert kt.q_tile.tolist() == ot.q_tile
    assert kt.tile_start.tolist() == ot.starts
    assert kt.tile_k.tolist() == ot.ks
    # each tile's query range is exactly the queries mapped to it
    for t in range(ot.nt):
        members = [i for i, tt in enumerate(ot.q_tile) if tt == t]
        assert (kt.tile_q_lo[t], kt.tile_q_hi[t]) == (members[0], members[-1] + 1)
    assert kt.all_dense == (not is_sparse(ot))


def test_cases_really_are_sparse():
    """Guard against a case list that silently exercises only the dense path."""
    sparse = [c for c in ALL_CASES if is_sparse(oracle_tiles(c))]
    assert len(sparse) >= len(ALL_CASES) - 4
    for c in sparse:
        ot = oracle_tiles(c)
        assert any(k <= s / 2 for k, s in zip(ot.ks, ot.starts)) or c.seq < 40, str(c)


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_selection_is_valid_topk(case):
    seed = seed_of(case)
    q, k, v, scale = make_inputs(case, seed)
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    sel = select_topk(q, k, kt, scale, case.gran, case.page, block_bytes=case.block_bytes)
    assert sel.dense == (not is_sparse(ot))
    got = ref.mask_from_kernel(sel, ot, case.hkv, case.seq)
    want, scores = ref.select(q, k, ot, scale, case.gran, case.page)
    bad = ref.topk_violations(got, scores, ot, case.gran, case.page)
    assert not bad, bad[:5]
    # The oracle's own choice passes the same check (sanity of the checker).
    assert not ref.topk_violations(want, scores, ot, case.gran, case.page)
    # Random inputs have no near-ties at the cut: the sets are (almost always) identical.
    same = (got == want).all(-1).float().mean().item()
    assert same >= 0.95, f"only {same:.0%} of (head, tile) selections equal the oracle's"
    if not sel.dense:
        # token mode: exactly k entries valid per (head, tile)
        if case.gran == "token":
            assert sel.valid.sum(-1).tolist() == [ot.ks] * case.hkv


MASS_CASES = [c for c in EXTEND_CASES if c.gran == "token"][:6] + DECODE_CASES[:4]


@pytest.mark.parametrize("mass,floor", [(0.5, 0), (0.9, 3), (0.99, 0)])
@pytest.mark.parametrize("case", MASS_CASES, ids=str)
def test_mass_selection_matches_oracle(case, mass, floor):
    """select_topk(mass=, mass_floor=) keeps each (head, tile)'s fewest top keys holding the mass
    (at least the floor, at most the tile's k): the oracle's set, but where float32 and float64
    sums part at the cut, and then by one key at most."""
    q, k, _, scale = make_inputs(case, seed_of(case, 2))
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    sel = select_topk(q, k, kt, scale, mass=mass, mass_floor=floor,
                      block_bytes=case.block_bytes)
    if sel.dense:
        assert not is_sparse(ot)
        return
    got = ref.mask_from_kernel(sel, ot, case.hkv, case.seq)
    _, scores = ref.select(q, k, ot, scale)
    want = ref.select_mass(scores, ot, case.g, mass, floor)
    same = (got == want).all(-1).float().mean().item()
    assert same >= 0.95, f"only {same:.0%} of (head, tile) selections equal the oracle's"
    assert (got.sum(-1) - want.sum(-1)).abs().max() <= 1
    ks = torch.tensor(ot.ks)
    assert (got.sum(-1) <= ks).all() and (got.sum(-1) >= ks.clamp(max=floor)).all()
    # what is kept is the top of the pooled scores: a valid Top-(its count)
    cand = ref.candidate_mask(ot, case.seq)  # [nt, S]
    for h in range(case.hkv):
        for t in range(ot.nt):
            n = int(got[h, t].sum())
            if 0 < n < ot.ks[t]:
                worst_in = scores[h, t][got[h, t]].min()
                best_out = scores[h, t][cand[t] & ~got[h, t]].max()
                assert worst_in >= best_out * (1 - 1e-6)


def test_mass_one_is_the_top_k():
    case = EXTEND_CASES[3]
    q, k, _, scale = make_inputs(case, seed_of(case))
    a = select_topk(q, k, kernel_tiles(case), scale)
    b = select_topk(q, k, kernel_tiles(case), scale, mass=1.0, mass_floor=5)
    assert torch.equal(a.idx, b.idx) and torch.equal(a.valid, b.valid)


RERANK_CASES = ([c for c in EXTEND_CASES if c.gran == "token"][:7] + DECODE_CASES[:4]
                + [c for c in EXTEND_CASES if c.gran == "token" and c.block_bytes == TINY][:1])


@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged"])
@pytest.mark.parametrize("widen", [1.5, 3.0])
@pytest.mark.parametrize("case", RERANK_CASES, ids=str)
def test_rerank_matches_oracle(case, widen, paged):
    """Policy kascade_rerank: an anchor keeps ceil(widen * k) keys; a reuse layer (other q, k;
    a permuted head map) keeps its own k of them by its softmax over candidates + diagonal."""
    q_a, k_a, _, scale = make_inputs(case, seed_of(case, 3))
    q, k, _, _ = make_inputs(case, seed_of(case, 4))
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    wide = select_topk(q_a, k_a, kt, scale, widen=widen, block_bytes=case.block_bytes)
    if wide.dense:
        assert not is_sparse(ot)
        return
    head_map = torch.arange(case.hkv).flip(0)
    read = wide.for_heads(head_map)
    cand = ref.mask_from_kernel(read, ot, case.hkv, case.seq)  # [Hkv, nt, S]
    assert (cand.sum(-1) == torch.tensor([min(math.ceil(widen * kk - 1e-9), s) for kk, s in
                                          zip(ot.ks, ot.starts)])).all()
    slots = None
    k_in = k
    if paged:  # the keys in a pool of 2S rows, at shuffled slots
        torch.manual_seed(seed_of(case, 5))
        slots = torch.randperm(2 * case.seq)[:case.seq]
        k_in = torch.randn(2 * case.seq, case.hkv, case.d)
        k_in[slots] = k
    got_sel = rerank_selection(q, k_in, kt, read, scale, block_bytes=case.block_bytes,
                               slots=slots)
    got = ref.mask_from_kernel(got_sel, ot, case.hkv, case.seq)
    want = ref.rerank(q, k, ot, scale, cand)
    assert not (got & ~cand).any(), "a re-ranked key outside the candidates"
    assert got.sum(-1).tolist() == [[min(kk, c) for kk, c in zip(ot.ks, row)]
                                    for row in cand.sum(-1).tolist()]
    same = (got == want).all(-1).float().mean().item()
    assert same >= 0.95, f"only {same:.0%} of (head, tile) selections equal the oracle's"


def test_rerank_over_every_key_is_the_own_top_k():
    """Candidates = every key: the re-ranked k are the layer's own Top-k (the softmax over
    candidates + diagonal is then the whole causal row)."""
    case = EXTEND_CASES[3]
    q, k, _, scale = make_inputs(case, seed_of(case))
    kt = kernel_tiles(case)
    own = select_topk(q, k, kt, scale)
    every = select_topk(q, k, kt, scale, widen=1e6)
    got = rerank_selection(q, k, kt, every, scale)
    ot = oracle_tiles(case)
    a, b = (ref.mask_from_kernel(s, ot, case.hkv, case.seq) for s in (own, got))
    assert (a == b).all(-1).float().mean().item() >= 0.95


def test_narrow_of_a_wide_selection_is_the_top_k():
    for case in EXTEND_CASES[:6] + DECODE_CASES[:3]:
        if case.gran != "token":
            continue
        q, k, _, scale = make_inputs(case, seed_of(case))
        kt, ot = kernel_tiles(case), oracle_tiles(case)
        own = select_topk(q, k, kt, scale)
        narrowed = select_topk(q, k, kt, scale, widen=2.5).narrow(kt.tile_k)
        assert torch.equal(ref.mask_from_kernel(own, ot, case.hkv, case.seq),
                           ref.mask_from_kernel(narrowed, ot, case.hkv, case.seq)), str(case)


def test_widen_is_token_granularity_only():
    case = EXTEND_CASES[3]
    q, k, _, scale = make_inputs(case, seed_of(case))
    with pytest.raises(ValueError, match="token granularity"):
        select_topk(q, k, kernel_tiles(case), scale, granularity="page", widen=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_sparse_attention_matches_oracle_given_selection(case, dtype):
    q, k, v, scale = make_inputs(case, seed_of(case, 1), dtype)
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    sel = select_topk(q, k, kt, scale, case.gran, case.page, block_bytes=case.block_bytes)
    if dtype != torch.float32:  # the low-precision selection is still a valid Top-k
        _, scores = ref.select(q, k, ot, scale, case.gran, case.page)
        got = ref.mask_from_kernel(sel, ot, case.hkv, case.seq)
        assert not ref.topk_violations(got, scores, ot, case.gran, case.page)
    mask = ref.mask_from_kernel(sel, ot, case.hkv, case.seq)
    out = sparse_attention(q, k, v, kt, sel, scale, block_bytes=case.block_bytes)
    assert out.dtype == dtype and out.shape == (case.n, case.g * case.hkv, case.d)
    want = ref.sparse_attention(q, k, v, ot, mask, scale)
    torch.testing.assert_close(out.double(), want, atol=ATOL[dtype], rtol=RTOL[dtype])
    if is_sparse(ot) and dtype == torch.float32:
        # the sparse result is genuinely different from dense attention (the test has teeth)
        dense = ref.dense_attention(q, k, v, ot.q_pos, scale)
        assert (want - dense).abs().max() > 1e-4


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_full_fraction_equals_dense(case):
    """fraction 1.0: every tile is dense, select_topk says so, the output is dense attention."""
    full = Case(**{**case.__dict__, "fraction": 1.0})
    q, k, v, scale = make_inputs(full, seed_of(full, 2))
    kt, ot = kernel_tiles(full), oracle_tiles(full)
    assert ot.ks == ot.starts
    sel = select_topk(q, k, kt, scale, full.gran, full.page, block_bytes=full.block_bytes)
    assert sel.dense
    out = sparse_attention(q, k, v, kt, sel, scale, block_bytes=full.block_bytes)
    want = ref.dense_attention(q, k, v, ot.q_pos, scale)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    out2 = dense_causal_attention(q, k, v, kt.q_pos, scale, block_bytes=full.block_bytes)
    torch.testing.assert_close(out2.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.gran == "token"], ids=str)
def test_explicit_full_selection_equals_dense(case):
    """A non-dense Selection listing every candidate (+ the diagonal) is exactly dense attention.

    Exercises the sparse code path (gather + diagonal block) rather than the dense shortcut.
    """
    q, k, v, scale = make_inputs(case, seed_of(case, 3))
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    kmax = max(1, max(ot.starts))
    idx = torch.zeros(case.hkv, ot.nt, kmax, dtype=torch.int64)
    valid = torch.zeros(case.hkv, ot.nt, kmax, dtype=torch.bool)
    for t, s in enumerate(ot.starts):
        idx[:, t, :s] = torch.randperm(s)  # order must not matter
        valid[:, t, :s] = True
    out = sparse_attention(q, k, v, kt, Selection(False, idx, valid), scale,
                           block_bytes=case.block_bytes)
    want = ref.dense_attention(q, k, v, ot.q_pos, scale)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


REUSE_CASES = [c for c in ALL_CASES if c.hkv >= 2 and is_sparse(oracle_tiles(c))]


def head_maps(hkv):
    """Non-identity head maps: a reversal, a collapse to one head, a rotation with repeats."""
    rev = list(reversed(range(hkv)))
    maps = [rev, [hkv - 1] * hkv, [(h + 1) % hkv for h in range(hkv)]]
    if hkv >= 3:
        maps.append([0, 0] + list(range(1, hkv - 1)))
    return maps


@pytest.mark.parametrize("case", REUSE_CASES, ids=str)
def test_reuse_layer_reads_mapped_heads(case):
    """Selection.for_heads(head_map) + sparse_attention on another layer's q/k/v == oracle."""
    q, k, v, scale = make_inputs(case, seed_of(case, 4))
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    sel = select_topk(q, k, kt, scale, case.gran, case.page, block_bytes=case.block_bytes)
    assert not sel.dense
    anchor_mask = ref.mask_from_kernel(sel, ot, case.hkv, case.seq)
    # the reuse layer has its own q/k/v
    q2, k2, v2, _ = make_inputs(case, seed_of(case, 5))
    outs = []
    for hm in head_maps(case.hkv):
        mapped = sel.for_heads(torch.tensor(hm))
        out = sparse_attention(q2, k2, v2, kt, mapped, scale, block_bytes=case.block_bytes)
        want = ref.sparse_attention(q2, k2, v2, ot, anchor_mask, scale, head_map=hm)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        outs.append(out)
    # the head map matters: the identity map gives a different answer from the reversal
    ident = sparse_attention(q2, k2, v2, kt, sel, scale, block_bytes=case.block_bytes)
    if not torch.equal(anchor_mask[0], anchor_mask[-1]):
        assert (ident - outs[0]).abs().max() > 1e-4


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.block_bytes != TINY][:8], ids=str)
def test_block_size_does_not_change_result(case):
    """Tiny blocks (one tile per block) and the default give the same selection and output."""
    q, k, v, scale = make_inputs(case, seed_of(case, 6))
    kt, ot = kernel_tiles(case), oracle_tiles(case)
    s_big = select_topk(q, k, kt, scale, case.gran, case.page)
    s_tiny = select_topk(q, k, kt, scale, case.gran, case.page, block_bytes=TINY)
    m_big = ref.mask_from_kernel(s_big, ot, case.hkv, case.seq)
    m_tiny = ref.mask_from_kernel(s_tiny, ot, case.hkv, case.seq)
    _, scores = ref.select(q, k, ot, scale, case.gran, case.page)
    assert not ref.topk_violations(m_tiny, scores, ot, case.gran, case.page)
    assert (m_big == m_tiny).all(-1).float().mean() >= 0.95
    o_big = sparse_attention(q, k, v, kt, s_big, scale)
    o_tiny = sparse_attention(q, k, v, kt, s_big, scale, block_bytes=TINY)
    torch.testing.assert_close(o_tiny, o_big, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_pool_with_slots_equals_position_order(case, dtype):
    """Keys and values read from a KV pool through the request's slots (as the backend passes
    them: only the attended keys gathered) give the same output as the position-ordered copy,
    for the sparse path and for a dense selection. The pool holds other requests' keys around
    the request's (poison: NaN), in shuffled slots."""
    q, k, v, scale = make_inputs(case, seed_of(case, 7), dtype)
    kt = kernel_tiles(case)
    g = torch.Generator().manual_seed(seed_of(case, 8))
    pool_size = 3 * case.seq + 5
    slots = torch.randperm(pool_size, generator=g)[:case.seq]
    k_pool = torch.full((pool_size,) + k.shape[1:], float("nan"), dtype=dtype)
    v_pool = torch.full((pool_size,) + v.shape[1:], float("nan"), dtype=dtype)
    k_pool[slots], v_pool[slots] = k, v
    sel = select_topk(q, k, kt, scale, case.gran, case.page, block_bytes=case.block_bytes)
    for s in (sel, Selection(dense=True)):
        want = sparse_attention(q, k, v, kt, s, scale, block_bytes=case.block_bytes)
        got = sparse_attention(q, k_pool, v_pool, kt, s, scale, block_bytes=case.block_bytes,
                               slots=slots)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, atol=0, rtol=0)
