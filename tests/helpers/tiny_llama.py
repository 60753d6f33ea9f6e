"""A tiny random-weight LlamaForCausalLM with a byte-level BPE tokenizer, saved as a Hugging Face
folder (no download): for calibration and served tests on the CPU."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the cat sat on a mat while dogs ran across fields of green grass under a blue sky "
         "and birds sang").split()


def tiny_config(num_kv_heads: int = 2, num_q_heads: int = 4, hidden: int = 64, layers: int = 4,
                max_positions: int = 512):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=num_q_heads,
                      num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def save_tiny_llama(out: Path, config=None, seed: int = 0) -> Path:
    """Weights from ``torch.manual_seed(seed)`` and a 320-token tokenizer trained on WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    LlamaForCausalLM(config or tiny_config()).save_pretrained(out)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                            unk_token="<unk>").save_pretrained(out)
    return out
