"""``python -m sglang.bench_one_batch`` with this package's plugin loaded first.

SGLang 0.5.17's bench_one_batch never calls ``load_plugins()``, so ``--attention-backend kascade``
would be rejected by its argument parser; this runs the same module after loading the plugins.
Arguments are bench_one_batch's own.
"""

import runpy

from sglang.srt.plugins import load_plugins

if __name__ == "__main__":
    load_plugins()
    runpy.run_module("sglang.bench_one_batch", run_name="__main__", alter_sys=True)
