"""Start-up refusals and dense fallbacks decided by the SGLang adapter (fake ModelRunner parts)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_kascade import sglang_adapter as sa
from sglang_kascade.config import KascadeConfigError


def fake_runner(**args):
    server_args = SimpleNamespace(speculative_algorithm=None, enable_mixed_chunk=False,
                                  tp_size=1, dcp_size=1)
    model_config = SimpleNamespace(is_hybrid_swa=False, is_encoder_decoder=False,
                                   head_dim=64, v_head_dim=64)
    runner = SimpleNamespace(server_args=server_args, model_config=model_config,
                             use_mla_backend=False, is_hybrid_swa=False)
    for key, value in args.items():
        target = runner
        for part in key.split(".")[:-1]:
            target = getattr(target, part)
        setattr(target, key.split(".")[-1], value)
    return runner


@pytest.fixture(autouse=True)
def plain_resolved_args(monkeypatch):
    monkeypatch.setattr(sa, "resolved_args", lambda server_args: server_args)


def test_supported_configuration_passes():
    sa.check_supported(fake_runner())


@pytest.mark.parametrize("change, words", [
    ({"use_mla_backend": True}, "MLA"),
    ({"server_args.speculative_algorithm": "EAGLE"}, "speculative"),
    ({"server_args.enable_mixed_chunk": True}, "--enable-mixed-chunk"),
    ({"server_args.tp_size": 2}, "tensor/context parallelism"),
    ({"server_args.dcp_size": 2}, "tensor/context parallelism"),
    ({"model_config.is_hybrid_swa": True}, "sliding-window"),
    ({"model_config.is_encoder_decoder": True}, "encoder-decoder"),
    ({"model_config.v_head_dim": 128}, "head dims differ"),
])
def test_unsupported_configurations_are_refused_with_the_reason(change, words):
    with pytest.raises(KascadeConfigError, match=words):
        sa.check_supported(fake_runner(**change))


class FakeAttention(torch.nn.Module):
    def __init__(self, layer_id, window=-1, cross=False):
        super().__init__()
        self.layer_id, self.tp_k_head_num = layer_id, 2
        self.sliding_window_size, self.is_cross_attention = window, cross


def test_dense_fallback_layers_found_in_the_loaded_model():
    model = torch.nn.ModuleList([FakeAttention(0), FakeAttention(1, window=4096),
                                 FakeAttention(2), FakeAttention(3, cross=True)])
    found = sa.dense_fallback_layers(SimpleNamespace(model=model))
    assert found == {1: "sliding-window attention", 3: "cross-attention"}
    assert sa.dense_fallback_layers(SimpleNamespace(model=None)) == {}
