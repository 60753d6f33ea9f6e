"""``python -m sglang_kascade.eval``: the long-context accuracy suite against a running server.

    python -m sglang_kascade.eval --url http://127.0.0.1:30000 --label kascade@0.10 \\
        --out docs/results/accuracy.json                       # default suite
    python -m sglang_kascade.eval --quick --out /tmp/quick.json # CI subset (minutes on CPU)

The server is whatever is listening at ``--url`` (any attention backend): the suite measures
the real serving path. Prompts are built client-side with the served model's tokenizer
(``/model_info`` -> ``model_path``) to exact token lengths and sent as token ids to
``/generate`` with greedy decoding, a few requests at a time so that the server batches them.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

from . import results as results_io
from .client import ServerError, generate, server_info
from .scoring import score
from .tasks import MAX_NEW_TOKENS, QUICK_TASKS, TASKS, TaskError, make_sample
from .text import Tokens, has_chat_template

DEFAULT_URL = "http://127.0.0.1:30000"
DEFAULT_LENGTHS = (1024, 2048, 4096)  # 8192 with --lengths: too slow for the CPU default
DEFAULT_SAMPLES = 3
QUICK_LENGTHS = (512, 1024)
QUICK_SAMPLES = 2


def csv_list(text: str) -> list:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_lengths(text: str) -> list:
    out = []
    for x in csv_list(text):
        mult = 1
        if x.lower().endswith("k"):
            x, mult = x[:-1], 1024
        try:
            out.append(int(float(x) * mult))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad length {x!r}") from None
    if not out or any(n < 64 for n in out):
        raise argparse.ArgumentTypeError("lengths must be >= 64 tokens")
    return out


def parse_tasks(text: str) -> list:
    if text.strip() in ("all", ""):
        return list(TASKS)
    tasks = csv_list(text)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad}: choose from {', '.join(TASKS)}")
    return tasks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_kascade.eval",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")
    p.add_argument("--tasks", type=parse_tasks, default=None,
                   help=f"comma list or 'all' (default all: {','.join(TASKS)}; "
                        f"--quick: {','.join(QUICK_TASKS)})")
    p.add_argument("--lengths", type=parse_lengths, default=None,
                   help="context lengths in tokens, e.g. 1024,2048,4k (default "
                        f"{','.join(map(str, DEFAULT_LENGTHS))}; --quick: "
                        f"{','.join(map(str, QUICK_LENGTHS))}); a length beyond the server's "
                        "context is lowered to the longest that fits")
    p.add_argument("-n", "--samples-per-cell", type=int, default=None,
                   help=f"samples per (task, length) (default {DEFAULT_SAMPLES}; --quick: "
                        f"{QUICK_SAMPLES})")
    p.add_argument("--seed", type=int, default=0, help="task generation seed (default 0)")
    p.add_argument("--quick", action="store_true",
                   help="CI subset: 2 tasks x 2 short lengths x 2 samples (explicit --tasks, "
                        "--lengths, -n still win)")
    p.add_argument("--label", default=None,
                   help="name of this configuration in the results (default: '<policy>@<budget>' "
                        "or 'dense', from the server's launch command)")
    p.add_argument("--policy", default=None,
                   help="policy name to record (default: from the server: 'dense' for a "
                        "non-kascade backend, else --kascade-policy or 'kascade')")
    p.add_argument("--budget", type=float, default=None,
                   help="Top-k fraction to record (default: the server's --kascade-topk; 1.0 "
                        "for dense)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON to merge the rows into (created if missing)")
    p.add_argument("--dump", type=Path, default=None,
                   help="also write every sample (question, answers, prediction, score) as JSONL")
    p.add_argument("--concurrency", type=int, default=4,
                   help="requests in flight at once (default 4)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer path (default: the server's model_path from /model_info)")
    p.add_argument("--prompt-format", choices=("auto", "chat", "plain"), default="auto",
                   help="chat template (auto: if the tokenizer has one) or plain text")
    p.add_argument("--wait", type=float, default=0,
                   help="seconds to wait for the server to become healthy (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_args(args) -> None:
    if args.tasks is None:
        args.tasks = list(QUICK_TASKS) if args.quick else list(TASKS)
    if args.lengths is None:
        args.lengths = list(QUICK_LENGTHS) if args.quick else list(DEFAULT_LENGTHS)
    if args.samples_per_cell is None:
        args.samples_per_cell = QUICK_SAMPLES if args.quick else DEFAULT_SAMPLES
    if args.samples_per_cell < 1:
        raise SystemExit("--samples-per-cell must be >= 1")
    if args.concurrency < 1:
        raise SystemExit("--concurrency must be >= 1")


def describe_policy(info, policy=None, budget=None, label=None):
    """(label, policy, budget) from the options, falling back on the server's launch command."""
    kascade = (info.attention_backend or "") == "kascade"
    if policy is None:
        policy = (info.flag("policy") or "kascade") if kascade else "dense"
    if budget is None:
        if kascade and info.flag("topk"):
            try:
                budget = float(info.flag("topk"))
            except ValueError:
                budget = None
        elif not kascade:
            budget = 1.0
    if label is None:
        if policy == "dense":
            label = "dense"
        else:
            label = policy if budget is None else f"{policy}@{budget:.2f}"
    return label, policy, budget


def fit_lengths(lengths, info, max_new: int) -> tuple[list, list]:
    """Lower lengths that do not fit the server (prompt + output); returns (lengths, notes)."""
    limits = []
    if info.context_length:
        limits.append(info.context_length - max_new)
    if info.max_input:
        limits.append(info.max_input - 1)
    limit = min(limits) if limits else None
    out, notes = [], []
    for n in lengths:
        m = n if limit is None or n <= limit else limit
        if m != n:
            notes.append(f"length {n} lowered to {m} (server context {info.context_length}, "
                         f"max prompt {info.max_input}, output {max_new})")
        if m not in out:
            out.append(m)
    return out, notes


def run_suite(args, info, tokenizer, log=print) -> tuple[list, dict, list]:
    """Build the samples, query the server, score. Returns (rows, run record, per-sample)."""
    from tqdm import tqdm

    tokens = Tokens(tokenizer)
    chat = (args.prompt_format == "chat"
            or (args.prompt_format == "auto" and has_chat_template(tokenizer)))
    label, policy, budget = describe_policy(info, args.policy, args.budget, args.label)
    max_new = max(MAX_NEW_TOKENS[t] for t in args.tasks)
    lengths, notes = fit_lengths(args.lengths, info, max_new)
    for note in notes:
        log(f"note: {note}")

    samples = []
    for length in lengths:
        for task in args.tasks:
            for i in range(args.samples_per_cell):
                try:
                    samples.append(make_sample(tokens, task, length, i, args.seed, chat))
                except TaskError as e:
                    raise SystemExit(f"cannot build {task}@{length}: {e}") from e

    t0 = time.time()
    outputs = [None] * len(samples)
    bar = tqdm(total=len(samples), desc=label, unit="req", disable=args.no_progress,
               file=sys.stderr, dynamic_ncols=True)
    with cf.ThreadPoolExecutor(args.concurrency) as pool:
        futures = {pool.submit(generate, info.url, s.input_ids, s.max_new_tokens): k
                   for k, s in enumerate(samples)}
        try:
            for fut in cf.as_completed(futures):
                outputs[futures[fut]] = fut.result()
                bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            bar.close()
    elapsed = time.time() - t0

    per_sample, cells = [], {}
    for s, out in zip(samples, outputs):
        text = out.get("text", "")
        exact, partial = score(text, s.answers, s.forbidden)
        meta = out.get("meta_info", {})
        rec = {"label": label, "task": s.task, "context_length": s.length, "index": s.index,
               "answers": s.answers, "forbidden": s.forbidden, "prediction": text,
               "score": exact, "partial": partial, "depths": s.depths,
               "documents": s.documents, "question": s.question,
               "prompt_tokens": meta.get("prompt_tokens"),
               "completion_tokens": meta.get("completion_tokens")}
        per_sample.append(rec)
        cells.setdefault((s.task, s.length), []).append(rec)

    model = Path(info.model_path or "").name or None
    rows = []
    for (task, length), recs in cells.items():
        n = len(recs)
        rows.append({
            "label": label, "policy": policy, "budget": budget, "task": task,
            "context_length": length, "score": round(sum(r["score"] for r in recs) / n, 4),
            "partial": round(sum(r["partial"] for r in recs) / n, 4), "n": n,
            "seed": args.seed, "model": model, "prompt_format": "chat" if chat else "plain",
            # each sample's exact score by index: the same (task, length, index, seed, format)
            # is the same prompt in every run, so reports can pair configurations sample by
            # sample (report.py, "Paired against ...")
            "outcomes": [r["score"] for r in sorted(recs, key=lambda r: r["index"])],
        })
    run = {
        "label": label, "policy": policy, "budget": budget,
        "command": getattr(args, "_argv", None)
                   or "python -m sglang_kascade.eval " + shlex.join(sys.argv[1:]),
        "server_launch_command": info.launch_command,
        "attention_backend": info.attention_backend,
        "model_path": info.model_path, "sglang_version": info.version,
        "tasks": list(args.tasks), "lengths": lengths, "samples_per_cell": args.samples_per_cell,
        "seed": args.seed, "prompt_format": "chat" if chat else "plain",
        "concurrency": args.concurrency, "requests": len(samples),
        "elapsed_s": round(elapsed, 1),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
    }
    return rows, run, per_sample


def print_summary(rows, log=print) -> None:
    lengths = sorted({r["context_length"] for r in rows})
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    by = {(r["task"], r["context_length"]): r for r in rows}
    log(f"{'task':<18}" + "".join(f"{n:>8}" for n in lengths))
    for t in tasks:
        log(f"{t:<18}" + "".join(
            f"{by[(t, n)]['score']:>8.2f}" if (t, n) in by else f"{'-':>8}" for n in lengths))
    if rows:
        log(f"{'average':<18}{sum(r['score'] for r in rows) / len(rows):>8.3f}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = "python -m sglang_kascade.eval " + shlex.join(argv)
    resolve_args(args)
    try:
        info = server_info(args.url, args.wait)
    except (ServerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or info.model_path)
    rows, run, per_sample = run_suite(args, info, tokenizer)
    print(f"{run['label']}: {run['requests']} requests in {run['elapsed_s']} s "
          f"({info.attention_backend} at {info.url})")
    print_summary(rows)
    if args.out:
        results_io.merge_into_file(args.out, rows, run)
        print(f"merged {len(rows)} rows into {args.out}")
    if args.dump:
        args.dump.parent.mkdir(parents=True, exist_ok=True)
        with open(args.dump, "a") as f:
            for rec in per_sample:
                f.write(json.dumps(rec) + "\n")
    return 0
