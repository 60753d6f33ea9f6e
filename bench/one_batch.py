"""``python -m sglang.bench_one_batch`` with this package's plugin loaded first.

SGLang 0.5.17's bench_one_batch never calls ``load_plugins()``, so ``--attention-backend kascade``
would be rejected by its argument parser; this runs the same module after loading the plugins.
Arguments are bench_one_batch's own. ``KASCADE_HOST_PROBE=1`` adds bench/host_probe.py's
host / GPU split of the decode steps (one ``host-probe`` line at exit).
"""

import os
import runpy
import sys

from sglang.srt.plugins import load_plugins

if __name__ == "__main__":
    load_plugins()
    if os.environ.get("KASCADE_HOST_PROBE") == "1":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import host_probe
        host_probe.install()
    runpy.run_module("sglang.bench_one_batch", run_name="__main__", alter_sys=True)
