"""SGLang's one-batch benchmark with this package's plugin loaded first.

SGLang 0.5.17's bench_one_batch never calls ``load_plugins()``, so ``--attention-backend kascade``
would be rejected by its argument parser; this runs the same module after loading the plugins.
The module is ``sglang.bench_one_batch`` up to 0.5.20 and ``sglang.benchmark.one_batch`` from 0.5.21
(ONE_BATCH_MODULES, the first found). Arguments are that module's own. ``KASCADE_HOST_PROBE=1`` adds bench/host_probe.py's
host / GPU split of the decode steps (one ``host-probe`` line at exit).
"""

import importlib.util
import os
import runpy
import sys

from sglang.srt.plugins import load_plugins

ONE_BATCH_MODULES = ("sglang.benchmark.one_batch", "sglang.bench_one_batch")


def one_batch_module() -> str:
    for name in ONE_BATCH_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ModuleNotFoundError:  # the parent package is absent in this version
            continue
    raise SystemExit(f"none of {ONE_BATCH_MODULES} is in this SGLang")

if __name__ == "__main__":
    load_plugins()
    if os.environ.get("KASCADE_HOST_PROBE") == "1":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import host_probe
        host_probe.install()
    runpy.run_module(one_batch_module(), run_name="__main__", alter_sys=True)
