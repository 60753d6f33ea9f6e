"""``python -m sglang_kascade.calibrate.prefill_loss``: where sparse prefill loses accuracy.

Offline, no server. Per evaluation prompt (``sglang_kascade.eval.tasks``, the held-out essays):

1. one dense forward of the Hugging Face model captures every layer's post-RoPE q, k, v
   (``stats.collecting`` with a ``LayerCapture``);
2. per variant (anchor profile, budget, tile size, cached prefix), the layers are walked with the
   backend's roles, selection policy and tiles on those dense inputs: each sparse layer's
   attention-mass kept and output error against dense (``attention_loss.layer_loss``), tile by
   tile, so every layer's own loss is measured on identical inputs for every variant;
3. per variant, the model runs end to end as the server would (``probe``'s attention: sparse
   prefill, in two extends after a cached prefix): the KL divergence of the first answer
   token's distribution from dense's and whether its argmax agrees with dense's; with
   ``--decode`` the answer is then decoded one token at a time (teacher forced) for its mean
   log-probability and exactness.

Variants: ``--variant "name=T64 tile=64"``; keys ``name``, ``profile`` (probe's configs:
``shipped``, ``oracle``, ``file:PATH``, ``anchors:A,B,..``, ``drop:L,..``), ``topk``,
``k_min``, ``tile``, ``tail`` / ``qtail`` (``BudgetConfig.dense_tail`` / ``query_tail``),
``policy`` (``--kascade-policy``), ``rerank`` (``--kascade-rerank``), ``prefix`` (a cached prefix:
``F+R`` = the tile boundary at or below fraction F of the prompt, plus R tokens; ``0`` none),
``mass`` (< 1: each selection keeps the fewest top keys holding that share of its tile's
attention, the budget's k as a cap; end-to-end runs only). Unset keys take the shipped
profile's. End to end, ``read`` is the share of candidate keys the sparse layers' prefill
queries actually read (``probe.read_share``; ``share`` is the budgets' k).

Tiles are *question* tiles if a query of theirs is after the haystack (the question and the
answer prefix), else *body* tiles; summaries count sparse tiles only (``tile_k < tile_start``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import BudgetConfig, PolicyConfig
from ..kernels.tiles import RequestTiles
from ..plan import request_tiles
from ..layers import LayerTable
from ..policies import POLICY_TABLE, apply_policy
from ..profile import AnchorProfile
from .attention_loss import budget_share, layer_loss
from .run_file import write_json

FORMAT = "sglang-kascade-prefill-loss/1"


@dataclass
class CapturedLayer:
    q: torch.Tensor  # [L, Hq, D] post-RoPE queries, float32
    k: torch.Tensor  # [L, Hkv, D] post-RoPE keys
    v: torch.Tensor  # [L, Hkv, Dv]
    scale: float


class LayerCapture:
    """A ``stats.collecting`` collector keeping every layer's q, k, v of one dense forward."""

    def __init__(self):
        self.layers: list = []

    def begin_sample(self, length: int) -> None:
        self.layers = []

    def end_sample(self) -> None:
        pass

    def on_attention(self, layer, query, key, scale, value=None) -> None:
        if layer != len(self.layers):
            raise RuntimeError(f"attention of layer {layer} arrived after {len(self.layers)}")

        def rows(x):  # [1, H, L, D] -> [L, H, D]
            return x[0].transpose(0, 1).float().contiguous()

        self.layers.append(CapturedLayer(rows(query), rows(key), rows(value), scale))

    def on_importance(self, layer, x, attn_out) -> None:
        pass


@dataclass(frozen=True)
class Variant:
    name: str
    profile: AnchorProfile  # the profile as the policy runs it
    budget: BudgetConfig
    policy: PolicyConfig
    prefix: str = "0"  # cached prefix rule (prefix_length)
    mass: float = 1.0  # < 1: mass-following selection (probe.use_profile), the budget's k a cap


def prefix_length(rule: str, length: int, tile_size: int) -> int:
    """Cached prefix of a prompt of ``length`` tokens: ``F+R`` is the tile boundary at or below
    ``F * length`` plus ``R`` tokens; ``0`` is none."""
    frac, _, extra = rule.partition("+")
    if float(frac) == 0 and not extra:
        return 0
    p = int(float(frac) * length) // tile_size * tile_size + int(extra or 0)
    if not 0 < p < length:
        raise ValueError(f"prefix {rule!r}: {p} tokens is not inside a {length}-token prompt")
    return p


def walk(layers: list, variant: Variant, prefix: int = 0, own: bool = True) -> list:
    """[num_layers] LayerLoss of every sparse layer (None for dense ones), on captured inputs:
    the extend holds the queries from ``prefix`` on; keys are every position's."""
    profile, budget, policy = variant.profile, variant.budget, variant.policy
    table = LayerTable.of(profile)
    roles, selects = table.roles, table.selects
    pol = POLICY_TABLE[policy.name]
    length = layers[0].q.shape[0]
    tiles = request_tiles(budget, prefix, length - prefix, budget.k_for, "cpu")
    out, current = [], None
    for li, (role, lay) in enumerate(zip(roles, layers)):
        q = lay.q[prefix:]
        if selects[li]:
            current = pol.select(q, lay.k, tiles, lay.scale, budget, policy)
        if role in ("dense", "dense_anchor"):
            out.append(None)
            continue
        if role == "anchor":
            sel, own_sel = pol.attend(current, tiles), None
        else:
            sel = pol.reuse(current.for_heads(torch.tensor(profile.head_map[li])), q, lay.k,
                            tiles, lay.scale)
            own_sel = (pol.attend(pol.select(q, lay.k, tiles, lay.scale, budget, policy), tiles)
                       if own else None)
        loss = layer_loss(role, q, lay.k, lay.v, tiles, sel, lay.scale, own_sel)
        if role == "anchor":
            loss.own_mass = loss.mass
        out.append(loss)
    return out


def _rel(err2, ref2) -> float:
    return float((err2.sum() / ref2.sum().clamp(min=1e-30)).sqrt())


def summarize(losses: list, tiles: RequestTiles, question_from: int, prefix: int) -> dict:
    """Per layer and per tile figures of one prompt (``question_from``: first question
    position). Groups: ``body`` / ``question`` (sparse tiles), ``first`` (the extend's first tile,
    partial after a cached prefix), ``last`` (the extend's last query)."""
    sparse = tiles.tile_k < tiles.tile_start
    last_pos = torch.tensor([int(tiles.q_pos[hi - 1]) for hi in tiles.tile_q_hi])
    question = last_pos >= question_from
    groups = {"body": sparse & ~question, "question": sparse & question}
    if prefix:
        groups["first"] = torch.arange(tiles.num_tiles) == 0
    layers, mass_sum, err2_sum, ref2_sum, n_sparse = [], 0.0, 0.0, 0.0, 0
    for li, loss in enumerate(losses):
        if loss is None:
            layers.append({"layer": li, "role": "dense"})
            continue
        row = {"layer": li, "role": loss.role, "last_mass": round(loss.last_mass, 5),
               "last_err": round(loss.last_err, 5)}
        for g, m in groups.items():
            if not bool(m.any()):
                continue
            row[f"{g}_mass"] = round(float(loss.mass[m].mean()), 5)
            row[f"{g}_err"] = round(_rel(loss.err2[m], loss.ref2[m]), 5)
            if loss.own_mass is not None:
                row[f"{g}_own_mass"] = round(float(loss.own_mass[m].mean()), 5)
        layers.append(row)
        mass_sum = mass_sum + loss.mass
        err2_sum, ref2_sum = err2_sum + loss.err2, ref2_sum + loss.ref2
        n_sparse += 1
    tile_mass = (mass_sum / max(1, n_sparse)).tolist() if n_sparse else []
    tile_err = (err2_sum / ref2_sum.clamp(min=1e-30)).sqrt().tolist() if n_sparse else []
    per_tile = {} if not n_sparse else {  # per tile only where layers were walked
        "start": tiles.tile_start.tolist(), "sparse": sparse.tolist(),
        "question": question.tolist(),
        "queries": [hi - lo for lo, hi in zip(tiles.tile_q_lo, tiles.tile_q_hi)],
        "mass": [round(x, 5) for x in tile_mass], "err": [round(x, 5) for x in tile_err]}
    return {"prefix": prefix, "layers": layers, "tiles": per_tile,
            "budget": {"share": round(budget_share(tiles), 5)}}


@torch.inference_mode()
def answer_rows(model, ids: list, answer: list, prefix: int = 0, decode: bool = False) -> list:
    """Log-probabilities [V] of the first answer position and, with ``decode``, of every answer
    position, as a server computes them: the prompt prefilled (``ids[:prefix]`` then the rest,
    when ``prefix``), then the answer fed back one token at a time (teacher forced) through the
    KV cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if prefix:
        model(input_ids=torch.tensor([ids[:prefix]]), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    out = model(input_ids=torch.tensor([ids[prefix:]]), past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    rows = [out.logits[0, -1].float().log_softmax(-1)]
    for tok in (answer[:-1] if decode else []):
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        rows.append(out.logits[0, -1].float().log_softmax(-1))
    return rows


def answer_scores(rows: list, dense_rows: list, answer: list) -> dict:
    """KL(dense || variant) of the first answer token, argmax agreement with dense there and the
    gold first token's log-probability; with every answer row (``answer_rows(decode=True)``),
    also the answer's mean log-probability and argmax exactness (teacher forced)."""
    p, q = dense_rows[0], rows[0]
    out = {"kl_first": round(float((p.exp() * (p - q)).sum()), 5),
           "agree_first": bool(p.argmax() == q.argmax()),
           "first_logprob": round(float(q[answer[0]]), 4)}
    if len(rows) == len(answer):
        lp = [float(r[t]) for r, t in zip(rows, answer)]
        out.update(logprob=round(sum(lp) / len(lp), 4),
                   exact=all(int(r.argmax()) == t for r, t in zip(rows, answer)))
    return out


def parse_variant(spec: str, shipped: AnchorProfile) -> Variant:
    from .probe import config_profile

    kv = dict(item.split("=", 1) for item in spec.split())
    unknown = set(kv) - {"name", "profile", "topk", "k_min", "tile", "tail", "qtail", "prefix",
                         "policy", "rerank", "mass"}
    if unknown:
        raise SystemExit(f"--variant {spec!r}: unknown keys {sorted(unknown)}")
    profile = config_profile(kv.get("profile", "shipped"), shipped)
    if profile is None:
        raise SystemExit(f"--variant {spec!r}: dense is the reference, not a variant")
    b = profile.budget
    budget = dataclasses.replace(
        b, topk_fraction=float(kv.get("topk", b.topk_fraction)),
        k_min=int(kv.get("k_min", b.k_min)), tile_size=int(kv.get("tile", b.tile_size)),
        dense_tail=int(kv.get("tail", b.dense_tail)),
        query_tail=int(kv.get("qtail", b.query_tail)))
    policy = PolicyConfig(kv.get("policy", "kascade"),
                          rerank=float(kv.get("rerank", PolicyConfig.rerank)))
    mass = float(kv.get("mass", 1.0))
    top_k = policy.name in ("kascade", "kascade_identity", "kascade_pooled", "oracle")
    if mass < 1.0 and not (top_k and budget.granularity == "token"):
        raise SystemExit(f"--variant {spec!r}: mass applies to the Top-k policies at token "
                         "granularity")
    if not 0 < mass <= 1:
        raise SystemExit(f"--variant {spec!r}: mass must be in (0, 1]")
    return Variant(name=kv.get("name", spec), profile=apply_policy(profile, policy.name),
                   budget=budget, policy=policy, prefix=kv.get("prefix", "0"),
                   mass=mass)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    from ..eval.cli import parse_lengths, parse_tasks

    p = argparse.ArgumentParser(prog="python -m sglang_kascade.calibrate.prefill_loss",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Hugging Face folder (default: the embedded "
                                                 "model)")
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--tasks", type=parse_tasks, default=parse_tasks("all"))
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("2048"))
    p.add_argument("-n", type=int, default=1, help="prompts per task and length (default 1)")
    p.add_argument("--seed", type=int, default=1,
                   help="task seed (default 1: prompts the evaluation, seed 0, does not use)")
    p.add_argument("--no-own", action="store_true",
                   help="skip the reuse layers' own Top-k (their oracle mass)")
    p.add_argument("--no-walk", action="store_true",
                   help="skip the attention-level walk (end-to-end figures and budgets only)")
    p.add_argument("--no-answer", action="store_true", help="skip the end-to-end runs")
    p.add_argument("--decode", action="store_true",
                   help="end to end: also decode the whole answer (default: its first token)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True,
                   help="results JSON, gzip-compressed if it ends in .gz (written after every "
                        "prompt)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from ..embedded_model import ensure_converted
    from ..eval.tasks import make_sample
    from ..eval.text import Tokens
    from ..profile import derived_default_profile, find_shipped_profile
    from . import probe
    from .model import fingerprint
    from .stats import collecting, run_sample

    model_path = args.model or str(ensure_converted())
    AttentionInterface.register(probe.IMPL, probe._attention)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation=probe.IMPL).eval()
    tokens = Tokens(AutoTokenizer.from_pretrained(model_path))
    fp = fingerprint(model.config)
    shipped = find_shipped_profile(fp, model_path) or derived_default_profile(fp)
    variants = [parse_variant(s, shipped) for s in args.variant]
    data = {"format": FORMAT, "command": "python -m sglang_kascade.calibrate.prefill_loss "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": _commit(), "cpu": _cpu(), "threads": torch.get_num_threads(),
            "model": Path(model_path).name, "seed": args.seed,
            "variants": [{"name": v.name, "spec": s, "anchors": list(v.profile.anchor_layers),
                          "topk": v.budget.topk_fraction, "k_min": v.budget.k_min,
                          "tile": v.budget.tile_size, "prefix": v.prefix}
                         for v, s in zip(variants, args.variant)],
            "prompts": []}
    for length in args.lengths:
        for task in args.tasks:
            for i in range(args.n):
                t0 = time.time()
                s = make_sample(tokens, task, length, i, args.seed, True)
                ids, answer = s.input_ids, tokens.encode(" " + s.answers[0])
                cap = LayerCapture()
                probe.use_profile(None, shipped.budget)
                with collecting(model, cap):
                    run_sample(model, cap, ids)
                model.set_attn_implementation(probe.IMPL)
                dense_rows = (None if args.no_answer
                              else answer_rows(model, ids, answer, 0, args.decode))
                prompt = {"task": task, "length": length, "index": i,
                          "question_from": s.body[1], "variants": {}}
                if dense_rows is not None:
                    prompt["dense_answer"] = answer_scores(dense_rows, dense_rows, answer)
                for v in variants:
                    pre = prefix_length(v.prefix, length, v.budget.tile_size)
                    losses = [] if args.no_walk else walk(cap.layers, v, pre,
                                                           own=not args.no_own)
                    tiles = request_tiles(v.budget, pre, length - pre, v.budget.k_for, "cpu")
                    res = summarize(losses, tiles, s.body[1], pre)
                    if dense_rows is not None:
                        probe.use_profile(v.profile, v.budget, v.policy, v.mass)
                        rows = answer_rows(model, ids, answer, pre, args.decode)
                        res["answer"] = answer_scores(rows, dense_rows, answer)
                        res["budget"]["read"] = round(probe.read_share(), 5)
                    prompt["variants"][v.name] = res
                del cap
                data["prompts"].append(prompt)
                write_json(args.out, data)
                print(json.dumps({"task": task, "length": length, "index": i,
                                  "s": round(time.time() - t0, 1), **{
                                      k: {**r["budget"], **r.get("answer", {})}
                                      for k, r in prompt["variants"].items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
