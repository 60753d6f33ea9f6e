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


def test_tensor_parallelism_is_served():
    sa.check_supported(fake_runner(**{"server_args.tp_size": 4}))


def test_tp_rank_size_without_a_distributed_runtime():
    assert sa.tp_rank_size() == (0, 1)


@pytest.mark.parametrize("change, words", [
    ({"use_mla_backend": True}, "MLA"),
    ({"server_args.speculative_algorithm": "EAGLE"}, "speculative"),
    ({"server_args.enable_mixed_chunk": True}, "--enable-mixed-chunk"),
    ({"server_args.dcp_size": 2}, "decode context parallelism"),
    ({"server_args.enable_dp_attention": True}, "data-parallel attention"),
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


# --------------------------------------------------------------------------------------------
# Where SGLang's internals differ inside the supported range (0.5.17 to 0.5.23), each side is
# exercised here with fakes, whichever SGLang is installed.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, parsed", [
    ("0.5.23", (0, 5, 23)), ("0.5.17", (0, 5, 17)), ("0.5.23.post1", (0, 5, 23)),
    ("0.5.24rc1", (0, 5, 24)), ("0.6", (0, 6, 0)), ("0.5.dev0", (0, 5, 0)),
])
def test_version_strings_parse_to_their_release(raw, parsed):
    assert sa.version_tuple(raw) == parsed


@pytest.mark.parametrize("v, warns", [
    ((0, 5, 16), True), ((0, 5, 17), False), ((0, 5, 21), False), ((0, 5, 23), False),
    ((0, 5, 24), True), ((), False),
])
def test_start_up_warns_only_outside_the_supported_range(caplog, v, warns):
    with caplog.at_level("WARNING", logger="sglang_kascade"):
        sa.check_sglang_version(v)
    assert ("supports SGLang 0.5.17..0.5.23" in caplog.text) is warns


def test_graph_hook_targets_follow_where_sglang_resolves_graphs():
    # 0.5.19 to 0.5.23: arg_groups/attention_hook.py declares resolutions.
    target, hook = sa.graph_resolution_hook(lambda name: True)
    assert target == ("sglang.srt.arg_groups.attention_hook"
                      ".handle_attention_backend_compatibility")
    assert hook is sa._cuda_graphs_off_resolution_hooks
    # 0.5.17 and 0.5.18: a ServerArgs method writes the record.
    target, hook = sa.graph_resolution_hook(lambda name: False)
    assert target == "sglang.srt.server_args.ServerArgs._handle_attention_backend_compatibility"
    assert hook is sa._cuda_graphs_off_server_args_method
    # Every other hook is the same on both sides.
    new, old = sa.hook_table(lambda name: True), sa.hook_table(lambda name: False)
    assert new[:-1] == old[:-1] and len({t for t, _, _ in new}) == len(new)


def test_a_missing_parent_package_reads_as_no_module():
    assert sa._module_exists("sglang_kascade_no_such_package.attention_hook") is False
    assert sa._module_exists("sglang_kascade.sglang_adapter") is True


def fake_server_args(device, backend="kascade", disable_cuda_graph=False):
    phase = lambda: SimpleNamespace(backend="full")  # noqa: E731
    return SimpleNamespace(attention_backend=backend, device=device,
                           disable_cuda_graph=disable_cuda_graph,
                           cuda_graph_config=SimpleNamespace(decode=phase(), prefill=phase()))


@pytest.mark.parametrize("device, decode", [("cuda", "full"), ("cpu", "disabled")])
def test_graphs_switched_off_by_writing_the_record(monkeypatch, device, decode):
    """The 0.5.17 side: the hook edits ServerArgs.cuda_graph_config in place."""
    monkeypatch.delenv("SGLANG_KASCADE_CUDA_GRAPH", raising=False)
    args = fake_server_args(device)
    assert sa._cuda_graphs_off_server_args_method(None, args) is None
    assert (args.cuda_graph_config.decode.backend, args.cuda_graph_config.prefill.backend) == (
        decode, "disabled")
    other = fake_server_args(device, backend="flashinfer")
    sa._cuda_graphs_off_server_args_method(None, other)
    assert other.cuda_graph_config.prefill.backend == "full"  # other backends untouched


@pytest.mark.parametrize("device, phases", [("cuda", ["prefill"]), ("cpu", ["decode", "prefill"])])
def test_graphs_switched_off_by_declared_resolutions(monkeypatch, device, phases):
    """The 0.5.19-0.5.23 side: the hook declares one resolution per phase to switch off."""
    pytest.importorskip("sglang.srt.arg_groups.attention_hook")  # SGLang 0.5.19+
    from sglang.srt.arg_groups import overrides
    from sglang.srt.model_executor import cuda_graph_config

    monkeypatch.delenv("SGLANG_KASCADE_CUDA_GRAPH", raising=False)
    declared = []
    monkeypatch.setattr(overrides, "resolved_view", lambda a: a)
    monkeypatch.setattr(overrides, "resolving_view", lambda a: a)
    monkeypatch.setattr(overrides, "declare_resolution",
                        lambda a, source, **fields: declared.append((source, fields)))
    monkeypatch.setattr(cuda_graph_config, "with_phase",
                        lambda cfg, phase, **changes: (phase, changes["backend"]))
    sa._cuda_graphs_off_resolution_hooks(None, fake_server_args(device))
    assert declared == [("sglang_kascade", {"cuda_graph_config": (p, "disabled")})
                        for p in phases]
    declared.clear()
    sa._cuda_graphs_off_resolution_hooks(None, fake_server_args(device, backend="flashinfer"))
    assert declared == []


def test_support_triton_is_asked_for_the_dense_backend():
    asked = []

    def original(backend):
        asked.append(backend)
        return backend == "flashinfer"

    answer = sa._around_support_triton(original, "kascade")
    assert asked == [sa.dense_backend_name()]
    assert answer is (sa.dense_backend_name() == "flashinfer")
    assert sa._around_support_triton(original, "flashinfer") is True  # other names untouched
    assert asked[-1] == "flashinfer"
