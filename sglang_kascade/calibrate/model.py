"""Loading the Hugging Face model and tokenizer, and the model's profile fingerprint."""

from __future__ import annotations

import torch

from ..profile import ModelFingerprint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def fingerprint(config) -> ModelFingerprint:
    """The fields of sglang_kascade.profile.ModelFingerprint, from a transformers config."""
    config = getattr(config, "get_text_config", lambda: config)()
    archs = getattr(config, "architectures", None) or ["unknown"]
    n_q = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
    return ModelFingerprint(
        architecture=archs[0],
        num_layers=config.num_hidden_layers,
        num_q_heads=n_q,
        num_kv_heads=n_kv,
        head_dim=head_dim,
    )


def load_model(path: str, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer) in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .stats import register_attention

    impl = register_attention()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype, device), attn_implementation=impl)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
