"""The entry point registers the backend, its flags and its hooks with a real SGLang install."""

from __future__ import annotations

import pickle

import pytest


@pytest.fixture(scope="module")
def loaded():
    from sglang.srt.plugins import load_plugins

    load_plugins()


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("kascade") == "sglang_kascade.plugin:register"


def test_backend_choice_and_factory_registered(loaded):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES  # 0.5.17 to 0.5.23

    from sglang_kascade.plugin import create_backend

    assert "kascade" in ATTENTION_BACKEND_CHOICES
    assert ATTENTION_BACKENDS["kascade"] is create_backend


def test_flags_parse_and_travel_with_server_args(loaded):
    from sglang.srt.server_args import prepare_server_args

    from sglang_kascade.config import KascadeOptions
    from sglang_kascade.sglang_adapter import kascade_options

    args = prepare_server_args([
        "--model-path", "unused", "--attention-backend", "kascade",
        "--kascade-topk", "0.2", "--kascade-k-min", "64", "--kascade-granularity", "page",
        "--kascade-policy", "quest",
    ])
    assert args.attention_backend == "kascade"
    opts = kascade_options(pickle.loads(pickle.dumps(args)))  # as a scheduler process sees it
    assert opts == KascadeOptions(topk_fraction=0.2, k_min=64, granularity="page",
                                  policy="quest")


def test_out_of_range_flag_is_refused(loaded):
    from sglang.srt.server_args import prepare_server_args

    from sglang_kascade.config import KascadeConfigError

    with pytest.raises(KascadeConfigError, match="k_min"):
        prepare_server_args(["--model-path", "m", "--attention-backend", "kascade",
                             "--kascade-k-min", "0"])


def test_support_triton_follows_the_dense_backend(loaded):
    import torch
    from sglang.srt.utils import common

    from sglang_kascade.sglang_adapter import dense_backend_name

    assert common.support_triton("kascade") is common.support_triton(dense_backend_name())
    if not torch.cuda.is_available():  # torch_native: SGLang's torch allocation kernels
        assert common.support_triton("kascade") is False


def test_every_adapter_hook_is_applied(loaded):
    """Each target of the adapter's hook table resolves against this SGLang (a moved or renamed
    function would leave its hook unapplied, which SGLang only logs)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_kascade.sglang_adapter import hook_table

    assert [t for t, _, _ in hook_table() if t not in HookRegistry._patched] == []


@pytest.mark.parametrize("target", [
    # batches beyond kascade's captured buffers go to eager decode
    "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
    ".can_run_graph",
    # captured graphs kept for switching their selection nodes (graph_nodes.py)
    "sglang.srt.model_executor.runner_backend.full_cuda_graph_backend.FullCudaGraphBackend"
    ".capture_one",
])
def test_graph_runner_hooks_applied(loaded, target):
    """The graph-runner hooks resolve against this SGLang (a moved or renamed runner would leave
    them unapplied)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    assert target in HookRegistry._patched
