"""Server options the backend does not serve are refused at start-up with the reason (issue 20):
one case per row of sglang_adapter.UNSUPPORTED on a fake ModelRunner, plus one real launcher
for the KV cache dtype (the FP8 pool the kernels would otherwise read as plain values)."""

from __future__ import annotations

import pytest
import torch

from sglang_kascade import sglang_adapter as sa
from sglang_kascade.config import KascadeConfigError
from test_adapter import fake_runner

# (row of UNSUPPORTED, change to a supported fake runner, words of the message)
REFUSALS = [
    ("MLA models", {"use_mla_backend": True}, "MLA"),
    ("--speculative-algorithm", {"server_args.speculative_algorithm": "EAGLE"}, "speculative"),
    ("--enable-mixed-chunk", {"server_args.enable_mixed_chunk": True}, "--enable-mixed-chunk"),
    ("--dcp-size", {"server_args.dcp_size": 2}, "decode context parallelism"),
    ("--enable-dp-attention", {"server_args.enable_dp_attention": True},
     "data-parallel attention"),
    ("--pp-size", {"server_args.pp_size": 2}, "pipeline parallelism"),
    ("--kv-cache-dtype", {"server_args.kv_cache_dtype": "fp8_e4m3"},
     "--kv-cache-dtype fp8_e4m3 is not supported"),
    ("KV pool dtype", {"kv_cache_dtype": torch.float8_e4m3fn},
     "KV cache of torch.float8_e4m3fn is not supported"),
    ("hybrid sliding-window models", {"model_config.is_hybrid_swa": True}, "sliding-window"),
    ("encoder-decoder models", {"model_config.is_encoder_decoder": True}, "encoder-decoder"),
    ("key and value head dims differ", {"model_config.v_head_dim": 128}, "head dims differ"),
]


@pytest.fixture(autouse=True)
def plain_resolved_args(monkeypatch):
    monkeypatch.setattr(sa, "resolved_args", lambda server_args: server_args)


def test_every_row_of_the_table_has_a_case():
    assert [row[0] for row in sa.UNSUPPORTED] == [case[0] for case in REFUSALS]


@pytest.mark.parametrize("row, change, words", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_each_refusal_names_the_option_and_why(row, change, words):
    with pytest.raises(KascadeConfigError) as e:
        sa.check_supported(fake_runner(**change))
    message = str(e.value)
    assert message.startswith("--attention-backend kascade: ") and words in message
    # only this row applies to the change
    runner = fake_runner(**change)
    args, mc = runner.server_args, runner.model_config
    assert [r[0] for r in sa.UNSUPPORTED if r[1](args, mc, runner)] == [row]


@pytest.mark.parametrize("flag", ["fp8_e4m3", "fp8_e5m2", "mxfp8", "nvfp4", "fp4_mx_block16"])
def test_quantized_kv_cache_flags_are_refused(flag):
    with pytest.raises(KascadeConfigError, match=f"--kv-cache-dtype {flag} is not supported"):
        sa.check_supported(fake_runner(**{"server_args.kv_cache_dtype": flag}))


@pytest.mark.parametrize("flag", ["auto", "bf16", "bfloat16", None])
@pytest.mark.parametrize("pool", [torch.bfloat16, torch.float16, torch.float32, None])
def test_plain_kv_caches_pass(flag, pool):
    change = {"server_args.kv_cache_dtype": flag, "server_args.pp_size": 1}
    if pool is not None:
        change["kv_cache_dtype"] = pool
    sa.check_supported(fake_runner(**change))


@pytest.mark.parametrize("pool", [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8])
def test_quantized_kv_pools_are_refused_whatever_the_flag(pool):
    """``--kv-cache-dtype auto`` follows the checkpoint: a quantized model's FP8 cache too."""
    with pytest.raises(KascadeConfigError, match=f"KV cache of {pool}"):
        sa.check_supported(fake_runner(**{"server_args.kv_cache_dtype": "auto",
                                          "kv_cache_dtype": pool}))


@pytest.mark.server
def test_real_server_refuses_an_fp8_kv_cache():
    from server_utils import run_server_expecting_failure

    code, out = run_server_expecting_failure("kascade", ["--kv-cache-dtype", "fp8_e4m3"])
    assert code is not None and code != 0  # never became healthy
    assert "--kv-cache-dtype fp8_e4m3 is not supported" in out


@pytest.mark.parametrize("flags, words", [
    ({"kv_cache_dtype": "fp8_e5m2"}, "--kv-cache-dtype fp8_e5m2 is not supported"),
    ({"pp_size": 2}, "pipeline parallelism"),
])
def test_launcher_refuses_flag_rows_before_the_model_loads(flags, words):
    from types import SimpleNamespace

    args = SimpleNamespace(**{"kv_cache_dtype": "auto", "pp_size": 1, **flags})
    with pytest.raises(KascadeConfigError, match=words):
        sa.check_supported_flags(args)
    sa.check_supported_flags(SimpleNamespace(kv_cache_dtype="bf16", pp_size=1))


def test_launcher_rows_are_rows_of_the_table():
    assert set(sa.LAUNCHER_ROWS) <= {row[0] for row in sa.UNSUPPORTED}
