"""``python -m sglang_kascade.eval.sweep``: one server per configuration, the suite, the JSON.

    python -m sglang_kascade.eval.sweep --out docs/results/accuracy.json \\
        --report docs/results/accuracy.md                          # everything, default suite
    python -m sglang_kascade.eval.sweep --quick --policies kascade --budgets 0.1

Configurations: ``dense`` (the dense backend, ``--attention-backend torch_native`` on CPU) and,
for every policy in ``--policies`` and budget in ``--budgets``, ``--attention-backend kascade
--kascade-topk B [--kascade-policy P]`` labelled ``P@B``; or a JSON list given with
``--configs`` (``[{"label": .., "backend": .., "args": [..], "policy": .., "budget": ..}]``).
Policies the installed plugin does not know (``sglang_kascade.config.POLICIES``) are skipped
with a message. For each configuration the server is started, the suite runs against it and
its rows are merged into ``--out`` at once (an interrupted sweep keeps what it finished), then
the server is stopped. A kascade server gets a control directory in the log folder (unless its
arguments name one) so that the budget it actually spent (the backend's key counters, prefill
and decode apart) is recorded with its rows as ``spent``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
from pathlib import Path

from . import results as results_io
from .cli import build_parser as eval_parser
from .cli import parse_lengths, parse_tasks, print_summary, resolve_args, run_suite
from .client import server_info
from .launch import LaunchError, default_device, embedded_model_path, running_server

DEFAULT_POLICIES = ("kascade", "kascade_identity", "kascade_pooled", "oracle", "quest",
                    "streaming")
DEFAULT_BUDGETS = (0.05, 0.10, 0.20)


def known_policies():
    """Policies the installed backend accepts, or None when it has no --kascade-policy flag."""
    try:
        from .. import config
    except Exception:  # noqa: BLE001 - an older plugin
        return None
    table = getattr(config, "OPTION_TABLE", {})
    if "policy" not in table:
        return None
    return tuple(getattr(config, "POLICIES", ()))


def builtin_configs(policies, budgets, dense=True, dense_backend="torch_native", log=print):
    known = known_policies()
    configs = []
    if dense:
        configs.append({"label": "dense", "backend": dense_backend, "args": [],
                        "policy": "dense", "budget": 1.0})
    for pol in policies:
        if known is None and pol != "kascade":
            log(f"skip policy {pol}: this plugin has no --kascade-policy flag")
            continue
        if known is not None and pol not in known:
            log(f"skip policy {pol}: not among the plugin's policies {', '.join(known)}")
            continue
        for b in budgets:
            args = ["--kascade-topk", f"{b:g}"]
            if known is not None:
                args += ["--kascade-policy", pol]
            configs.append({"label": f"{pol}@{b:.2f}", "backend": "kascade", "args": args,
                            "policy": pol, "budget": b})
    return configs


def load_configs(path) -> list:
    configs = json.loads(Path(path).read_text())
    for c in configs:
        if "label" not in c or "backend" not in c:
            raise SystemExit(f"{path}: every configuration needs 'label' and 'backend': {c}")
        c.setdefault("args", [])
        c.setdefault("policy", "dense" if c["backend"] != "kascade" else c["label"])
        c.setdefault("budget", None)
    return configs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang_kascade.eval.sweep",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("configurations")
    g.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help="kascade policies to sweep, comma list (default: all; 'none' for none)")
    g.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS),
                   help="--kascade-topk values (default 0.05,0.1,0.2)")
    g.add_argument("--no-dense", action="store_true", help="leave out the dense baseline")
    g.add_argument("--dense-backend", default=None,
                   help="backend of the dense baseline (default torch_native on CPU, "
                        "flashinfer on CUDA)")
    g.add_argument("--configs", type=Path, default=None,
                   help="JSON list of configurations instead of the built-in ones")
    g.add_argument("--only", default=None, help="run only these labels (comma list)")
    g.add_argument("--skip-done", action="store_true",
                   help="skip a configuration whose every cell is already in --out")
    g = p.add_argument_group("servers")
    g.add_argument("--model-path", default=None, help="model (default: the embedded SmolLM2)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--max-total-tokens", type=int, default=None,
                   help="KV pool of each server (default: enough for --concurrency prompts "
                        "of the longest length, at least 24000)")
    g.add_argument("--server-arg", action="append", default=[],
                   help="extra launcher argument(s) for every server, e.g. "
                        "--server-arg=--kascade-k-min=64 (repeatable; split like a shell)")
    g.add_argument("--log-dir", type=Path, default=None,
                   help="server logs (default: a temporary folder)")
    g.add_argument("--startup-timeout", type=float, default=600)
    g.add_argument("--fail-fast", action="store_true",
                   help="stop at the first configuration whose server does not start")
    g = p.add_argument_group("suite (as python -m sglang_kascade.eval)")
    g.add_argument("--tasks", default=None)
    g.add_argument("--lengths", default=None)
    g.add_argument("-n", "--samples-per-cell", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quick", action="store_true")
    g.add_argument("--concurrency", type=int, default=4)
    g.add_argument("--prompt-format", choices=("auto", "chat", "plain"), default="auto")
    g.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=Path("docs/results/accuracy.json"),
                   help="results JSON (merged; default docs/results/accuracy.json)")
    p.add_argument("--report", type=Path, default=None,
                   help="also render this markdown page (and its PNG) at the end")
    p.add_argument("--dry-run", action="store_true", help="print the configurations and stop")
    return p


def eval_argv(args, label: str) -> list:
    """The suite's own arguments for one configuration (recorded, and parsed as the CLI's)."""
    argv = ["--label", label, "--seed", str(args.seed), "--concurrency", str(args.concurrency),
            "--prompt-format", args.prompt_format]
    if args.quick:
        argv.append("--quick")
    if args.tasks:
        argv += ["--tasks", args.tasks]
    if args.lengths:
        argv += ["--lengths", args.lengths]
    if args.samples_per_cell:
        argv += ["-n", str(args.samples_per_cell)]
    if args.no_progress:
        argv.append("--no-progress")
    return argv


def spent_budget(control_dir: Path) -> dict | None:
    """The budget a kascade server actually spent, from its schedulers' key counters
    (BackendStats.keys): per phase, keys read over candidate keys in the sparse layers (None
    where the phase read nothing), and the sums. Waits one stats interval first: the last
    forwards' counters are written by the scheduler's watcher once it has passed."""
    from ..control import STATS_EVERY_S, ControlPaths

    time.sleep(STATS_EVERY_S + 0.5)
    stats = list(ControlPaths(control_dir).live_stats().values())
    if not stats:
        return None
    keys = {phase: [sum(s.get("keys", {}).get(phase, {}).get(k, 0) for s in stats)
                    for k in ("read", "candidate")] for phase in ("extend", "decode")}
    out = {phase: (round(r / c, 4) if c else None) for phase, (r, c) in keys.items()}
    read, cand = (sum(v[i] for v in keys.values()) for i in (0, 1))
    out["all"] = round(read / cand, 4) if cand else None
    out["keys"] = keys
    return out


def control_args(config: dict, args: list, log_dir: Path) -> tuple[list, Path | None]:
    """``args`` with a control directory for a kascade server that names none (its counters
    give the budget spent), and that directory; a dense server's arguments as they are."""
    if config["backend"] != "kascade" or any(a.startswith("--kascade-control-dir")
                                             for a in args):
        return args, None
    safe = "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in config["label"])
    control = log_dir / f"{safe}.control"
    return args + ["--kascade-control-dir", str(control)], control


def done(out: Path, label: str, tasks, lengths, n: int) -> bool:
    """Every task of the label has as many lengths as asked, each with at least n samples
    (lengths may have been lowered to the server's context, so they are counted, not matched)."""
    rows = [r for r in results_io.load(out)["rows"] if r.get("label") == label]
    per_task = {t: [r for r in rows if r["task"] == t] for t in tasks}
    return all(len(rs) >= len(lengths) and all(r.get("n", 0) >= n for r in rs)
               for rs in per_task.values())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.tasks:
        parse_tasks(args.tasks)
    if args.lengths:
        parse_lengths(args.lengths)
    device = args.device or default_device()
    if args.configs:
        configs = load_configs(args.configs)
    else:
        policies = [] if args.policies.strip() in ("", "none") else \
            [x.strip() for x in args.policies.split(",") if x.strip()]
        budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
        dense_backend = args.dense_backend or ("torch_native" if device == "cpu"
                                               else "flashinfer")
        configs = builtin_configs(policies, budgets, not args.no_dense, dense_backend)
    if args.only:
        only = {x.strip() for x in args.only.split(",")}
        configs = [c for c in configs if c["label"] in only]
    extra_all = [a for s in args.server_arg for a in shlex.split(s)]
    for c in configs:
        print(f"{c['label']:<24} --attention-backend {c['backend']} "
              f"{' '.join(c['args'] + extra_all)}")
    if args.dry_run or not configs:
        return 0

    model_path = args.model_path or embedded_model_path()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    log_dir = args.log_dir
    if log_dir is None:
        import tempfile

        log_dir = Path(tempfile.mkdtemp(prefix="kascade-sweep-"))
    sweep_record = {
        "command": "python -m sglang_kascade.eval.sweep " + shlex.join(argv),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device, "model_path": model_path,
    }
    failed = []
    t_start = time.time()
    for c in configs:
        ev = eval_parser().parse_args(eval_argv(args, c["label"]) + [
            "--policy", c["policy"]] + ([] if c.get("budget") is None
                                        else ["--budget", str(c["budget"])]))
        resolve_args(ev)
        ev._argv = ("python -m sglang_kascade.eval --url URL "
                    + shlex.join(eval_argv(args, c["label"])))
        if args.skip_done and done(args.out, c["label"], ev.tasks, ev.lengths,
                                   ev.samples_per_cell):
            print(f"== {c['label']}: already in {args.out}, skipped")
            continue
        longest = max(ev.lengths)
        mtt = args.max_total_tokens or max(24000, ev.concurrency * (longest + 128) + 1024)
        print(f"== {c['label']}: starting a server (log {log_dir / (c['label'] + '.log')})",
              flush=True)
        t0 = time.time()
        server_args, control = control_args(c, list(c["args"]) + extra_all, Path(log_dir))
        try:
            with running_server(c["backend"], server_args, model_path, device,
                                max_total_tokens=mtt, log_path=log_dir / f"{c['label']}.log",
                                startup_timeout_s=args.startup_timeout) as server:
                print(f"   ready in {time.time() - t0:.0f} s at {server.url}", flush=True)
                info = server_info(server.url)
                rows, run, _ = run_suite(ev, info, tokenizer)
                spent = spent_budget(control) if control is not None else None
        except LaunchError as e:
            print(f"   FAILED to start: {e}", file=sys.stderr, flush=True)
            failed.append(c["label"])
            if args.fail_fast:
                break
            continue
        run["config_wall_s"] = round(time.time() - t0, 1)  # server start + suite + stop
        if spent is not None:
            run["spent"] = spent
            for r in rows:  # the configuration's figure, over all of its cells
                r["spent"] = {k: v for k, v in spent.items() if k != "keys"}
            print(f"   budget spent: prefill {spent['extend']}, decode {spent['decode']}",
                  flush=True)
        print_summary(rows)
        results_io.merge_into_file(args.out, rows, run, {"sweep": sweep_record})
        print(f"   {run['requests']} requests in {run['elapsed_s']} s; merged into {args.out}",
              flush=True)
    print(f"sweep finished in {time.time() - t_start:.0f} s"
          + (f"; servers that did not start: {', '.join(failed)}" if failed else ""))
    if args.report and args.out.exists():
        from .report import main as report_main

        report_main(["--in", str(args.out), "--out", str(args.report)])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
