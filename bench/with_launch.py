"""Run a bench script with the sparse attention's default launch changed (A/B of a default
before it ships): python3 -P bench/with_launch.py '{"PREFETCH": true}' bench/decode_step.py ARGS"""

import json
import runpy
import sys

from sglang_kascade.kernels import decode_attention_triton

decode_attention_triton.LAUNCH.update(json.loads(sys.argv[1]))
print(f"sparse attention launch defaults: {decode_attention_triton.LAUNCH}", flush=True)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
