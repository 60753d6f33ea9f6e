"""``python -m sglang_kascade.calibrate.probe``: offline accuracy probe of anchor layouts.

A diagnostic, not the evaluation (that goes through the server: ``python -m
sglang_kascade.eval``). It runs the Hugging Face model with every layer's attention replaced by
the backend's own kernels (``select_topk``, ``sparse_attention``, the same tiles and roles as
``backend.py``) and reports, for a few evaluation prompts teacher forced with their answer,
the mean log-probability of the answer tokens and how many answers are argmax-exact. One
prefill per prompt, no server: minutes on CPU, so anchor sets, head maps and budgets can be
compared before a sweep.

    python -m sglang_kascade.calibrate.probe --model PATH \\
        --config dense --config oracle --config shipped --config anchors:0,2,4,6 \\
        --config drop:5 --config file:profiles/x.json [--topk 0.1] [--length 1024] [-n 2]

Configs: ``dense``; ``oracle`` (every layer an anchor); ``shipped`` (the profile the server
would pick); ``file:PATH``; ``anchors:A,B,..`` (identity head map); ``drop:L,..`` (every layer
an anchor except these, which reuse the previous anchor through the identity map).

``--selector quest:P`` makes every selecting layer choose with the ``quest`` policy's page
selection (``select_quest``, pages of P keys) instead of the pooled Top-k: with ``--config
oracle`` this is the Quest baseline of the evaluation (every layer but layer 0 selects).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from ..config import BudgetConfig, PolicyConfig
from ..kernels.sparse_attention_torch import sparse_attention
from ..kernels.tiles import decode_tiles
from ..plan import request_tiles
from ..layers import LayerTable
from ..policies import POLICY_TABLE
from ..profile import AnchorProfile, derived_default_profile, find_shipped_profile, load_profile
from .attention_loss import tile_query_counts

IMPL = "kascade_probe"
_STATE: dict = {}


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prof: AnchorProfile | None = _STATE.get("profile")
    li = module.layer_idx
    role = prof.role(li) if prof is not None else "dense"
    if role == "dense" and not (prof is not None and _STATE["selects"][li]):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kw)
    budget: BudgetConfig = _STATE["budget"]
    q, k_all, v_all = (t[0].transpose(0, 1) for t in (query, key, value))  # [n|S, H, D]
    n, s = q.shape[0], k_all.shape[0]
    tiles = (decode_tiles(s, budget.k_for, q.device) if n == 1 and s > 1
             else request_tiles(budget, s - n, n, budget.k_for, q.device))
    policy: PolicyConfig = _STATE["policy"]
    pol = POLICY_TABLE[policy.name]
    if _STATE["selects"][li]:
        mass = _STATE.get("mass", 1.0)  # < 1: a Top-k policy's mass-following selection
        extra = {} if mass == 1.0 else {"mass": mass, "mass_floor": budget.k_min}
        _STATE["sel"] = pol.select(q, k_all, tiles, scaling, budget, policy, **extra)
    if role in ("dense", "dense_anchor"):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kw)
    if role == "reuse":
        read = _STATE["sel"].for_heads(_STATE["head_maps"][li])
        sel = pol.reuse(read, q, k_all, tiles, scaling)
    else:
        sel = pol.attend(_STATE["sel"], tiles)
    if n > 1 and "keys" in _STATE:
        _count_keys(tiles.selected(), sel)
    return sparse_attention(q, k_all, v_all, tiles, sel, scaling).unsqueeze(0), None


def _count_keys(tiles, sel) -> None:
    """Adds one sparse layer's prefill keys to ``read_share``'s sums: per query, the keys its
    tile's selection holds (mean over KV heads) and its tile's candidates (the diagonal out)."""
    n_q = tile_query_counts(tiles)  # [nt]
    cand = float((n_q * tiles.tile_start.double()).sum())
    read = cand if sel.dense else float((n_q * sel.valid.double().sum(-1).mean(0)).sum())
    _STATE["keys"][0] += read
    _STATE["keys"][1] += cand


def read_share() -> float:
    """Keys the sparse layers' prefill queries read over their candidates, since
    ``use_profile`` (1.0 when nothing was sparse)."""
    read, cand = _STATE.get("keys", (0.0, 0.0))
    return read / cand if cand else 1.0


def use_profile(profile: AnchorProfile | None, budget: BudgetConfig,
                policy: PolicyConfig = PolicyConfig(), mass: float = 1.0) -> None:
    """Roles as backend.py: a dense anchor selects only if a reuse layer reads it. Selecting
    layers call ``policy``'s selection (policies.POLICY_TABLE); ``profile`` is taken as given
    (a policy's profile transformation is the caller's: ``config_profile``). ``mass`` < 1:
    selecting layers keep the fewest top keys holding that share of their tile's attention
    (select_topk), at least k_min and at most the budget's k."""
    _STATE.update(profile=profile, budget=budget, policy=policy, sel=None, mass=mass,
                  keys=[0.0, 0.0])
    if profile is None:
        return
    table = LayerTable.of(profile)
    _STATE["selects"] = table.selects
    _STATE["head_maps"] = table.head_map_rows("cpu")


def config_profile(spec: str, shipped: AnchorProfile) -> AnchorProfile | None:
    n = shipped.num_layers
    ident = (tuple(range(shipped.model.num_kv_heads)),) * n
    if spec == "dense":
        return None
    if spec == "shipped":
        return shipped
    if spec == "oracle":
        return dataclasses.replace(shipped, anchor_layers=tuple(range(n)), head_map=ident)
    if spec.startswith("file:"):
        return load_profile(spec[5:])
    if spec.startswith("anchors:"):
        anchors = tuple(sorted({0, *(int(x) for x in spec[8:].split(","))}))
        return dataclasses.replace(shipped, anchor_layers=anchors, head_map=ident)
    if spec.startswith("drop:"):
        drop = {int(x) for x in spec[5:].split(",")} - {0}
        return dataclasses.replace(shipped, anchor_layers=tuple(
            i for i in range(n) if i not in drop), head_map=ident)
    raise SystemExit(f"unknown --config {spec!r}")


def _quest_pages(selector: str) -> int | None:
    if selector == "topk":
        return None
    name, _, pages = selector.partition(":")
    if name != "quest" or not pages.isdigit() or int(pages) < 1:
        raise SystemExit(f"--selector {selector!r}: expected topk or quest:P (P >= 1)")
    return int(pages)


@torch.inference_mode()
def answer_logprob(model, ids: list, answer: list) -> tuple[float, bool]:
    x = torch.tensor([ids + answer])
    logp = model(input_ids=x).logits[0, len(ids) - 1: len(ids) - 1 + len(answer)].log_softmax(-1)
    tgt = torch.tensor(answer)
    return logp.gather(1, tgt[:, None]).mean().item(), bool((logp.argmax(-1) == tgt).all())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_kascade.calibrate.probe",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--topk", type=float, default=0.1)
    p.add_argument("--k-min", type=int, default=128)
    p.add_argument("--tasks", default="passkey,single_needle")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("-n", type=int, default=2, help="prompts per task (default 2)")
    p.add_argument("--seed", type=int, default=0,
                   help="task seed (default 0, the evaluation's own prompts; another seed "
                        "draws prompts the evaluation does not use)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--selector", default="topk",
                   help="topk (default: the pooled Top-k of kascade) or quest:P (Quest pages of P "
                        "keys)")
    args = p.parse_args(argv)
    pages = _quest_pages(args.selector)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from ..eval.tasks import make_sample
    from ..eval.text import Tokens
    from .model import fingerprint

    AttentionInterface.register(IMPL, _attention)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation=IMPL).eval()
    tokens = Tokens(AutoTokenizer.from_pretrained(args.model))
    fp = fingerprint(model.config)
    shipped = find_shipped_profile(fp, args.model) or derived_default_profile(fp)
    budget = dataclasses.replace(shipped.budget, topk_fraction=args.topk, k_min=args.k_min,
                                 page_tile_size=pages or shipped.budget.page_tile_size)
    policy = PolicyConfig("quest") if pages else PolicyConfig()
    prompts = []
    for task in args.tasks.split(","):
        for i in range(args.n):
            s = make_sample(tokens, task, args.length, i, args.seed, True)
            prompts.append((s.input_ids, tokens.encode(" " + s.answers[0])))
    for spec in args.config:
        use_profile(config_profile(spec, shipped), budget, policy)
        t0 = time.time()
        res = [answer_logprob(model, ids, ans) for ids, ans in prompts]
        print(json.dumps({"config": spec, "selector": args.selector, "topk": args.topk,
                          "length": args.length, "seed": args.seed,
                          "mean_logprob": round(sum(r[0] for r in res) / len(res), 3),
                          "exact": sum(r[1] for r in res), "n": len(res),
                          "per_prompt": [round(r[0], 2) for r in res],
                          "s": round(time.time() - t0)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
