"""The start-up warm-up's enumeration (sglang_kascade/warmup.py), on the CPU.

* Every constexpr value the launchers compute from the step (the sparse attention's MERGE and
  S_CH from its split count, the combine's BLOCK_S) for batches 1..256, contexts and Top-k
  capacities up to 2^17 and more is among the values the warm-up launches.
* The run-time chunk arguments (Top-k positions per program, scoring chunk) take one
  specialization (a multiple of 16, never 1) for every batch and length.
* Every kernel's parameters are classified: a constexpr is fixed by the model / tile size /
  launch site or enumerated by the warm-up; a plain int is ``do_not_specialize`` or fixed by the
  model and server (strides of q, the pools, ``req_to_token``, outputs; constants). A new
  parameter fails here until it is classified (and, if it follows the request mix, handled).
* The warm-up runs every launcher under TRITON_INTERPRET (small shapes), as it does on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_kascade import warmup
from sglang_kascade.kernels.decode_attention_triton import (MERGE_MAX_SPLITS, combine_block,
                                                            merge_chunk)
from sglang_kascade.kernels.decode_plan import SCORE_CHUNKS, num_splits, score_chunk
from sglang_kascade.kernels.topk_triton import topk_chunk

ROOT = Path(__file__).resolve().parents[2]
KV_HEADS = (1, 2, 4, 8, 16, 32)
GROUPS = (1, 2, 4, 8)
# Top-k capacities: eager buffers (powers of two from 256), graph captures (any value).
KMAXES = sorted({256 << i for i in range(10)} | set(range(1, (1 << 17) + 1, 997)))

# Constexprs fixed per model (G, heads, head dim), per prefill tile size (BLOCK_T and the launch
# settings default_launch picks for it) or per launch site (the others).
FIXED_CONSTEXPRS = {"G", "BLOCK_G", "D", "DV", "BLOCK_N", "WITH_V", "NPASS", "BLOCK_C",
                    "BLOCK_P", "PREFETCH", "BLOCK_NL", "PREFETCH_L", "GP", "PASS", "SHIFT",
                    "WIDTH", "HI_SHIFT", "BLOCK", "RAGGED", "OVERFLOW", "BLOCK_T", "CHUNK",
                    "KEYS_MAJOR"}
# Constexprs that follow the step, enumerated by the warm-up (LOGITS: 0 reuse, 1 anchor, 2 in
# captured graphs only; BLOCK for the graph plan: per captured batch size, at capture).
ENUMERATED = {"_sparse_decode_kernel": {"LOGITS", "S_CH", "MERGE"},
              "_combine_kernel": {"BLOCK_S"}, "_graph_plan_kernel": {"BLOCK"}}
# Plain ints fixed by the model and server: strides of q, the pools, req_to_token, outputs and
# model-sized scratch (lse [N, Hq], logits' G-minor rows), constants, the scale (a float), and
# the chunk arguments shown below to be multiples of 16 (CHUNK); the prefill pooled rows and
# selection are padded to 16 (s_pt, s_ph, s_sr, s_st, s_sh: test_padded_strides).
FIXED_INTS = {"sm_scale_log2", "s_qb", "s_qh", "s_qn", "s_ks", "s_kh", "s_vs", "s_vh", "s_r2t",
              "s_ln", "s_lg", "s_ob", "s_oh", "s_oc", "s_os", "s_outb", "s_outh", "s_on",
              "s_en", "s_eh", "hkv", "short_row", "cand_max", "CHUNK", "s_sr", "s_pt", "s_ph",
              "s_st", "s_sh"}
# _combine_kernel / _score_kernel / _sparse_decode_kernel name the partials' strides alike:
# s_ob / s_oh are hq * n * dv and n * dv (divisible by 16 for any n: dv >= 16), kept; s_eb /
# s_eh (hq * n, n) are do_not_specialize there (checked per kernel below).
POINTERS = {"req_src", "seq_src", "req_dst", "seq_dst", "off_dst", "topk_dst", "budget_f",
            "budget_i", "row_frac"}  # the graph plan's (named without _ptr)
MUST_NOT_SPECIALIZE = {  # plain ints that follow the request mix, per kernel
    "decode_select_triton._score_kernel": {"n_hist_rows", "s_lh", "s_pb", "s_ph", "s_pg", "s_eb",
                                           "s_eh"},
    "decode_select_triton._pool_kernel": {"n_chunks", "s_lh", "s_pb", "s_ph", "s_pg", "s_oh"},
    "decode_attention_triton._sparse_decode_kernel": {"SPLITS", "s_sh", "s_lh", "s_eb", "s_eh"},
    "decode_attention_triton._combine_kernel": {"n_splits", "s_eb", "s_eh"},
    "topk_triton._hist_kernel": {"n_rows", "s_pr"},
    "topk_triton._compact_kernel": {"n_rows", "s_pr"},
    "topk_triton._collect_kernel": {"n_rows", "s_pr"},
    "topk_triton._cand_select_kernel": {"n_rows", "s_pr"},
    "graph_plan_triton._graph_plan_kernel": {"bs", "kmax"},
    "prefill_select_triton._pool_kernel": {"t0"},
}


def _names(fn, items) -> set:
    return {fn.params[i].name if isinstance(i, int) else i for i in items}


def test_split_counts_cover_every_launch():
    for hkv in KV_HEADS:
        for g in GROUPS:
            want = {(s <= MERGE_MAX_SPLITS, merge_chunk(g, s)) for s in warmup.split_counts(hkv, g)}
            blocks = {combine_block(n) for n in warmup.combine_counts()}
            for b in range(1, 257):
                for kmax in KMAXES:
                    s = num_splits(b, hkv, kmax)
                    assert (s <= MERGE_MAX_SPLITS, merge_chunk(g, s)) in want, (hkv, g, b, kmax)
                    if s > MERGE_MAX_SPLITS:  # unmerged: _combine_kernel over the splits
                        assert combine_block(s) in blocks


def test_combine_counts_cover_every_block():
    blocks = {combine_block(n) for n in warmup.combine_counts()}
    assert blocks == {combine_block(n) for n in range(1, 1 << 17)}
    assert len(warmup.combine_counts()) == len(blocks)  # one launch per value


def test_chunk_arguments_take_one_specialization():
    lengths = list(range(1, 1 << 17, 61)) + [1 << 17]
    for rows in [1, 2, 3, 8, 16, 31, 64, 100, 128, 256, 512, 1024, 2048, 8192]:
        for lscan in lengths:
            c = topk_chunk(rows, lscan)
            assert c % 16 == 0 and c != 1
    assert all(c % 16 == 0 for c in SCORE_CHUNKS)
    for hkv in KV_HEADS:
        for b in range(1, 257):
            for lmax in (1024, 4096, 1 << 17):
                assert score_chunk(b, hkv, lmax) in SCORE_CHUNKS


def test_padded_strides():
    from sglang_kascade.device_path import sel_width

    for k in list(range(0, 5000)) + [13_108, 131_071]:
        w = sel_width(k)
        assert w % 16 == 0 and w >= max(1, k) and w - max(1, k) < 16


def test_every_kernel_parameter_is_classified():
    kernels = warmup.kernels()
    assert len(kernels) == 12, sorted(kernels)
    for full, fn in kernels.items():
        name = full.split(".")[1]
        dns = _names(fn, fn.do_not_specialize)
        for p in fn.params:
            if p.is_constexpr:
                assert p.name in FIXED_CONSTEXPRS | ENUMERATED.get(name, set()), (full, p.name)
            elif p.name.endswith("_ptr") or p.name in POINTERS:
                continue
            elif p.name in MUST_NOT_SPECIALIZE.get(full, set()):
                assert p.name in dns, (full, p.name)
            else:
                assert p.name in FIXED_INTS, (full, p.name, "a new int: classify it")
        assert dns <= {p.name for p in fn.params}, full  # no stale names
        assert _names(fn, fn.do_not_specialize_on_alignment) <= {p.name for p in fn.params}


def test_warmup_option():
    from sglang_kascade.config import KascadeConfigError, KascadeOptions

    assert warmup.enabled(KascadeOptions())
    assert warmup.enabled(KascadeOptions(warmup="on"))
    assert not warmup.enabled(KascadeOptions(warmup="OFF"))
    with pytest.raises(KascadeConfigError, match="warmup"):  # refused when the options are read
        KascadeOptions(warmup="maybe")


def test_warmup_runs_every_launcher_interpreted():
    """The warm-up's launches (and a hot-swapped tile size's) under TRITON_INTERPRET on small
    shapes: every launcher accepts the inputs it builds. A subprocess: the interpreter is chosen
    when Triton is imported."""
    code = (
        "import torch\n"
        "from sglang_kascade.device_path import DevicePath\n"
        "dp = DevicePath('cpu')\n"
        "dp.warm_up(hq=4, hkv=2, d=16, dtype=torch.float16, tile_size=16, r2t_stride=1000)\n"
        "dp.warm.prefill(8)\n"
        "assert dp.warm.tiles == {16, 8}, dp.warm.tiles\n"
        "print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_workloads_after_warm_up_add_no_specialization_key():
    """tests/helpers/warmup_keys.py under TRITON_INTERPRET: the keys a compiled launch would look
    up, computed by Triton's own binder, for decode and prefill workloads of other batch sizes,
    lengths (1-token extends, cached prefixes, lengths not multiples of 16), budgets and growing
    eager buffers, are all keys the warm-up launched (the GPU twin: test_no_compile_gpu.py)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = ROOT / "tests" / "helpers" / "warmup_keys.py"
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), (
        res.stdout[-3000:] + res.stderr[-3000:])
    assert "37 keys" in res.stdout  # the warm-up's variants at these shapes (G = 4)
