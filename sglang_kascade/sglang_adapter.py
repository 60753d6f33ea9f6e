"""Every SGLang internal that sglang-kascade touches, in one place.

Supports SGLang 0.5.17 through 0.5.23: tested with 0.5.23 on CPU machines (torch 2.13; CI) and
0.5.17 on GPU hosts (torch 2.11). Where the internals differ inside that range, the choice is made
by one named function per difference (``graph_resolution_hook``; ``_around_support_triton`` says
why it is harmless where it is not needed), tested with fakes of each side in
tests/unit/test_adapter.py. Each function says which SGLang object it reads or patches and why.
Nothing else in the package imports from ``sglang`` except ``backend.py`` (the AttentionBackend
base class). The other way round, this module calls into the package only through
``PACKAGE_HOOKS``, which ``plugin.register`` fills: the sidecar launcher and the graph editor hang
off the plugin, not off the adapter.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Optional

from .config import OPTION_TABLE, DevSwitches, KascadeConfigError, KascadeOptions
from .profile import ModelFingerprint

logger = logging.getLogger("sglang_kascade")

BACKEND_NAME = "kascade"
SUPPORTED_SGLANG = ((0, 5, 17), (0, 5, 23))  # inclusive; outside it start-up warns
_OPTIONS_ATTR = "_kascade_options"  # bookkeeping attribute on ServerArgs (survives pickling)


@dataclass
class PackageHooks:
    """What the SGLang hooks below call back into the package (plugin.register sets them)."""
    # launcher process, after a kascade server's flags are parsed: (options over the
    # environment, --host, --port) -> None (the admin sidecar starts here)
    launcher_parsed: Optional[Callable] = None
    # () -> the captured-graph editor (graph_nodes): wanted() -> bool, adopt(graph),
    # give_up(err); imported on first use, at the first capture
    graph_editor: Optional[Callable] = None


PACKAGE_HOOKS = PackageHooks()


def version_tuple(raw: str) -> tuple:
    """(major, minor, patch) of a version string; each part's leading digits ("23rc1" -> 23,
    "dev0" -> 0), missing parts 0."""
    parts = []
    for p in (raw.split(".") + ["0", "0"])[:3]:
        digits = re.match(r"\d*", p).group()
        parts.append(int(digits or 0))
    return tuple(parts)


def sglang_version() -> tuple:
    try:
        return version_tuple(version("sglang"))
    except PackageNotFoundError:
        return ()


def check_sglang_version(v: tuple | None = None) -> None:
    """Warn (never refuse) when the installed SGLang is outside SUPPORTED_SGLANG."""
    v = sglang_version() if v is None else v
    lo, hi = SUPPORTED_SGLANG
    if v and not lo <= v <= hi:
        logger.warning(
            "sglang-kascade supports SGLang %s..%s; this is %s. It may still work.",
            ".".join(map(str, lo)), ".".join(map(str, hi)), ".".join(map(str, v)),
        )


# --------------------------------------------------------------------------------------------
# Registration: backend choice, backend factory, command-line flags.
# --------------------------------------------------------------------------------------------


def register_backend(factory) -> None:
    """Add ``kascade`` to --attention-backend choices and map it to ``factory(model_runner)``."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    ATTENTION_BACKENDS[BACKEND_NAME] = factory


def add_kascade_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Kascade sparse attention (sglang-kascade)")
    for name, s in OPTION_TABLE.items():
        if any(s.flag in a.option_strings for a in parser._actions):
            continue
        group.add_argument(s.flag, dest=f"kascade_{name}", type=s.type, default=None,
                           help=f"{s.help} (env fallback: {s.env})")


def options_from_namespace(args: argparse.Namespace) -> KascadeOptions:
    values = {n: getattr(args, f"kascade_{n}", None) for n in OPTION_TABLE}
    return KascadeOptions(**{k: v for k, v in values.items() if v is not None})


def _after_add_cli_args(result, parser, *args, **kwargs):
    add_kascade_flags(parser)
    return result


def _after_from_cli_args(server_args, cls, args, *rest, **kwargs):
    # Validate flags in the launcher process, so a bad value fails before any model loads.
    options = options_from_namespace(args)
    if getattr(args, "attention_backend", None) == BACKEND_NAME:
        check_supported_flags(args)
    if getattr(args, "attention_backend", None) == BACKEND_NAME and options.profile:
        from .profile import load_profile

        load_profile(options.profile)  # raises KascadeConfigError naming the bad field
    # Bookkeeping attributes (leading underscore, not a field) travel with ServerArgs when it is
    # pickled into the scheduler processes (0.5.21-0.5.23: ServerArgs.__reduce__ keeps __dict__;
    # 0.5.17: a plain dataclass, pickled with its __dict__).
    setattr(server_args, _OPTIONS_ATTR, options)
    hook = PACKAGE_HOOKS.launcher_parsed
    if getattr(args, "attention_backend", None) == BACKEND_NAME and hook is not None:
        hook(options.merged_over(KascadeOptions.from_env()), getattr(args, "host", "127.0.0.1"),
             int(getattr(args, "port", 30000)))
    return server_args


def _around_support_triton(original, backend, *args, **kwargs):
    # Reason: support_triton(name) answers by name alone in 0.5.17-0.5.21 (True for every
    # backend but torch_native/intel_amx), which routes `kascade` on a CPU through Triton-only
    # allocation kernels. Answer for the dense backend kascade delegates to instead. 0.5.22+
    # also ask the platform (`current_platform.capabilities.supports_triton`, False on a CPU),
    # so there the answer for `kascade` is the same with or without this hook.
    if backend == BACKEND_NAME:
        backend = dense_backend_name()
    return original(backend, *args, **kwargs)


def decode_graphs_wanted(server_args) -> bool:
    """Decode CUDA graphs for kascade: on for CUDA devices (SGLang's default capture settings;
    ``--disable-cuda-graph`` still turns every graph off), off with SGLANG_KASCADE_CUDA_GRAPH=0.
    The device path (device_path.py) is capturable, profile hot-swaps included; its graph
    buffers are token-indexed, sized by the KV pool (backend.init_cuda_graph_state)."""
    device = str(getattr(server_args, "device", "cuda") or "cuda")
    return (DevSwitches.from_env().cuda_graph and device.startswith("cuda")
            and not getattr(server_args, "disable_cuda_graph", False))


def _log_graphs(decode_graphs: bool) -> None:
    if decode_graphs:
        logger.info("kascade: decode CUDA graphs on (device path); prefill CUDA graphs off "
                    "(SGLANG_KASCADE_CUDA_GRAPH=0 turns decode graphs off)")
    else:
        logger.warning("kascade: CUDA graphs are off (no CUDA device: the PyTorch path is not "
                       "capturable; or --disable-cuda-graph, SGLANG_KASCADE_CUDA_GRAPH=0)")


def _cuda_graphs_off_resolution_hooks(result, server_args, *args, **kwargs):
    # Reason: SGLang turns CUDA graphs off only for torch_native/flex; the PyTorch kascade path
    # syncs with the host (per-request loops), so it cannot be captured yet. 0.5.21-0.5.23
    # resolve in arg_groups/attention_hook.py and declare resolutions instead of writing the record.
    from sglang.srt.arg_groups.overrides import declare_resolution, resolved_view, resolving_view
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    if resolved_view(server_args).attention_backend == BACKEND_NAME:
        phases = (Phase.PREFILL,) if decode_graphs_wanted(server_args) else (Phase.DECODE,
                                                                                Phase.PREFILL)
        _log_graphs(len(phases) == 1)
        for phase in phases:
            graphs = with_phase(resolving_view(server_args).cuda_graph_config, phase,
                                backend=Backend.DISABLED)
            declare_resolution(server_args, "sglang_kascade", cuda_graph_config=graphs)
    return result


def _cuda_graphs_off_server_args_method(result, self, *args, **kwargs):
    # Same reason as above; 0.5.17 resolves in ServerArgs methods that write the record.
    from sglang.srt.model_executor.cuda_graph_config import Backend

    if resolved_args(self).attention_backend == BACKEND_NAME:
        decode_graphs = decode_graphs_wanted(self)
        _log_graphs(decode_graphs)
        if not decode_graphs:
            self.cuda_graph_config.decode.backend = Backend.DISABLED
        self.cuda_graph_config.prefill.backend = Backend.DISABLED
    return result


def _around_decode_graph_can_run(original, runner, forward_batch, *args, **kwargs):
    # Reason: kascade's captured decode graphs hold token-indexed buffers sized by the KV pool; a
    # batch whose summed lengths exceed it (requests sharing a radix-cached prefix) must run
    # eagerly. SGLang asks the attention backend only with padding disabled (backend.can_run),
    # so the runner's own check is extended here. Same method in 0.5.17 through 0.5.23.
    ok = original(runner, forward_batch, *args, **kwargs)
    backend = getattr(runner, "attn_backend", None) or getattr(
        getattr(runner, "model_runner", None), "attn_backend", None)
    if ok and getattr(backend, "kascade_backend", False):
        return bool(backend.can_run_graph(forward_batch))
    return ok


def _graphs_can_be_kept(torch) -> bool:
    """Whether this torch has what graph_nodes uses: CUDAGraph(keep_graph=...), raw_cuda_graph
    and instantiate (2.11 on the GPU hosts and 2.13 on CPU machines do)."""
    import inspect

    try:
        params = inspect.signature(torch.cuda.CUDAGraph.__new__).parameters
    except (TypeError, ValueError):
        return False
    return "keep_graph" in params and all(hasattr(torch.cuda.CUDAGraph, name)
                                          for name in ("raw_cuda_graph", "instantiate"))


def _around_full_graph_capture_one(original, graph_backend, shape_key, *args, **kwargs):
    # Reason: taking a captured graph's selection kernels out by profile (graph_nodes.py) edits
    # the graph's cudaGraph_t and re-instantiates it, and torch destroys the cudaGraph_t at
    # instantiation unless the CUDAGraph was made with keep_graph=True;
    # FullCudaGraphBackend.capture_one makes it with ``torch.cuda.CUDAGraph()`` and keeps it in
    # ``_graphs[shape_key]`` (same in 0.5.17 through 0.5.23). Only while a kascade NodeSwitch is
    # live; other backends capture as before.
    import torch

    graph_nodes = PACKAGE_HOOKS.graph_editor() if PACKAGE_HOOKS.graph_editor else None
    if graph_nodes is None or not graph_nodes.wanted() or not _graphs_can_be_kept(torch):
        return original(graph_backend, shape_key, *args, **kwargs)
    plain = torch.cuda.CUDAGraph

    class KeptGraph(plain):  # torch's class passes keep_graph to both (pybind reads __init__'s)
        def __new__(cls, keep_graph: bool = True):
            return super().__new__(cls, keep_graph)

        def __init__(self, keep_graph: bool = True):
            super().__init__(keep_graph)

    torch.cuda.CUDAGraph = KeptGraph
    try:
        result = original(graph_backend, shape_key, *args, **kwargs)
    finally:
        torch.cuda.CUDAGraph = plain
    graph = getattr(graph_backend, "_graphs", {}).get(shape_key)
    if isinstance(graph, KeptGraph):
        try:
            graph_nodes.adopt(graph)  # instantiates it (as capture_end would have)
        except Exception as e:  # noqa: BLE001 - never fail a capture over an optimisation
            graph_nodes.give_up(e)  # gates only; replay instantiates the graph if need be
    return result


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


# Where SGLang switches CUDA graphs per attention backend: 0.5.21-0.5.23 in this module (it
# declares resolutions), 0.5.17 in a ServerArgs method that writes the record. Chosen by whether
# the module exists, not by version number.
ATTENTION_HOOK_MODULE = "sglang.srt.arg_groups.attention_hook"


def graph_resolution_hook(module_exists=_module_exists) -> tuple:
    """(target, AFTER hook) that turns kascade's CUDA graphs off where they cannot run."""
    if module_exists(ATTENTION_HOOK_MODULE):
        return (ATTENTION_HOOK_MODULE + ".handle_attention_backend_compatibility",
                _cuda_graphs_off_resolution_hooks)
    return ("sglang.srt.server_args.ServerArgs._handle_attention_backend_compatibility",
            _cuda_graphs_off_server_args_method)


def hook_table(module_exists=_module_exists) -> list:
    """The hooks register_hooks installs: (target, hook, HookType name). The same targets exist
    in 0.5.17 through 0.5.23 but for graph_resolution_hook's."""
    return [
        ("sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, "AFTER"),
        ("sglang.srt.server_args.ServerArgs.from_cli_args", _after_from_cli_args, "AFTER"),
        ("sglang.srt.utils.common.support_triton", _around_support_triton, "AROUND"),
        ("sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
         ".can_run_graph", _around_decode_graph_can_run, "AROUND"),
        ("sglang.srt.model_executor.runner_backend.full_cuda_graph_backend.FullCudaGraphBackend"
         ".capture_one", _around_full_graph_capture_one, "AROUND"),
        (*graph_resolution_hook(module_exists), "AFTER"),
    ]


def register_hooks(launcher_parsed: Optional[Callable] = None,
                   graph_editor: Optional[Callable] = None) -> None:
    """Install hook_table's hooks; ``launcher_parsed`` and ``graph_editor``: PackageHooks."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    PACKAGE_HOOKS.launcher_parsed, PACKAGE_HOOKS.graph_editor = launcher_parsed, graph_editor

    for target, hook, kind in hook_table():
        HookRegistry.register(target, hook, getattr(HookType, kind))


# --------------------------------------------------------------------------------------------
# What the backend reads from a ModelRunner / ForwardBatch.
# --------------------------------------------------------------------------------------------


def dense_backend_name() -> str:
    """SGLang backend that runs kascade's dense layers: FlashInfer on a GPU, torch_native on CPU."""
    import torch

    return "flashinfer" if torch.cuda.is_available() else "torch_native"


def make_dense_backend(model_runner):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    return ATTENTION_BACKENDS[dense_backend_name()](model_runner)


def server_port(model_runner) -> int:
    """The HTTP port of this server (names the default control directory of the sidecar)."""
    return int(getattr(model_runner.server_args, "port", 30000))


def resolved_args(server_args):
    try:
        from sglang.srt.arg_groups.overrides import resolved_view

        return resolved_view(server_args)
    except (ImportError, Exception):  # 0.5.17: plain dataclass, fields are final
        return server_args


def kascade_options(server_args) -> KascadeOptions:
    """Flags given to the launcher, over SGLANG_KASCADE_* environment variables."""
    flags = getattr(server_args, _OPTIONS_ATTR, None) or KascadeOptions()
    return flags.merged_over(KascadeOptions.from_env())


def model_fingerprint(model_runner) -> ModelFingerprint:
    mc = model_runner.model_config
    archs = getattr(mc.hf_config, "architectures", None) or ["unknown"]
    return ModelFingerprint(
        architecture=archs[0],
        num_layers=mc.num_hidden_layers,
        num_q_heads=mc.num_attention_heads,
        num_kv_heads=mc.get_total_num_kv_heads(),
        head_dim=mc.head_dim,
    )


# KV cache dtypes the backend reads: the Triton kernels load the pool in its own dtype and are
# tested in bf16 and fp16 (the PyTorch path also in fp32, the CPU's); FP8 / FP4 pools (scaled,
# packed) would be read as if they held plain values.
KV_CACHE_DTYPE_FLAGS = ("auto", "bf16", "bfloat16", "fp16", "float16")
KV_POOL_DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32")


def _kv_pool_dtype(runner) -> str:
    """The KV pool's dtype as SGLang resolved it (``--kv-cache-dtype auto`` follows the model
    or its quantization config), or '' where the runner does not say."""
    dtype = getattr(runner, "kv_cache_dtype", None)
    return str(dtype) if dtype is not None and str(dtype).startswith("torch.") else ""


# Server options and model kinds the backend does not serve: (what, refused when (args, model
# config, model runner) -> bool, why). check_supported refuses the first that applies at
# start-up; README "Not supported" lists them; tests/unit/test_adapter.py has one case per row.
UNSUPPORTED = (
    ("MLA models", lambda a, mc, r: bool(getattr(r, "use_mla_backend", False)),
     "MLA models are not supported (Kascade selects over per-KV-head keys)"),
    ("--speculative-algorithm", lambda a, mc, r: bool(getattr(a, "speculative_algorithm", None)),
     "speculative decoding is not supported yet (verify batches need tree masks)"),
    ("--enable-mixed-chunk", lambda a, mc, r: bool(getattr(a, "enable_mixed_chunk", False)),
     "--enable-mixed-chunk is not supported yet (mixed prefill+decode batches)"),
    ("--dcp-size", lambda a, mc, r: (getattr(a, "dcp_size", 1) or 1) != 1,
     "decode context parallelism is not supported (a rank holds part of each request's keys; "
     "the Top-k ranks them all)"),
    ("--enable-dp-attention", lambda a, mc, r: bool(getattr(a, "enable_dp_attention", False)),
     "data-parallel attention is not supported (tensor parallelism is: --tp-size)"),
    ("--pp-size", lambda a, mc, r: (getattr(a, "pp_size", 1) or 1) != 1,
     "pipeline parallelism is not supported (a reuse layer reads the selection of an anchor "
     "layer that may run on another pipeline stage)"),
    ("--kv-cache-dtype",
     lambda a, mc, r: str(getattr(a, "kv_cache_dtype", None) or "auto") not in KV_CACHE_DTYPE_FLAGS,
     "--kv-cache-dtype {kv} is not supported (FP8/FP4 KV caches are not read by the sparse "
     "kernels; use auto, the model's dtype, or bf16)"),
    ("KV pool dtype", lambda a, mc, r: _kv_pool_dtype(r) not in ("",) + KV_POOL_DTYPES,
     "a KV cache of {pool} is not supported (quantized KV caches are not read by the sparse "
     "kernels; serve with a bf16 or fp16 KV cache)"),
    ("hybrid sliding-window models",
     lambda a, mc, r: bool(getattr(mc, "is_hybrid_swa", False)
                           or getattr(r, "is_hybrid_swa", False)),
     "hybrid sliding-window models are not supported (separate SWA KV pool)"),
    ("encoder-decoder models", lambda a, mc, r: bool(getattr(mc, "is_encoder_decoder", False)),
     "encoder-decoder models are not supported"),
    ("key and value head dims differ",
     lambda a, mc, r: getattr(mc, "head_dim", 0) != getattr(mc, "v_head_dim",
                                                            getattr(mc, "head_dim", 0)),
     "models whose key and value head dims differ are not supported"),
)


# Rows decided by the launcher's flags alone: checked in the launcher too, before SGLang loads
# the model (some of these options fail later inside SGLang with a message about something else,
# e.g. an FP8 KV cache on a CPU without AMX).
LAUNCHER_ROWS = ("--pp-size", "--kv-cache-dtype")


def check_supported(model_runner) -> None:
    """Configurations the method does not cover fail here, at start-up, with the reason
    (the UNSUPPORTED table)."""
    _refuse_unsupported(resolved_args(model_runner.server_args), model_runner.model_config,
                        model_runner, [row[0] for row in UNSUPPORTED])


def check_supported_flags(args) -> None:
    """The LAUNCHER_ROWS of UNSUPPORTED on the parsed launcher flags (argparse namespace)."""
    _refuse_unsupported(args, None, None, LAUNCHER_ROWS)


def _refuse_unsupported(args, mc, runner, rows) -> None:
    for what, refused, why in UNSUPPORTED:
        if what in rows and refused(args, mc, runner):
            raise KascadeConfigError("--attention-backend kascade: " + why.format(
                kv=getattr(args, "kv_cache_dtype", None), pool=_kv_pool_dtype(runner)))


def attention_tp_group():
    """SGLang's attention TP group (a GroupCoordinator: ``rank_in_group``, ``world_size``,
    ``cpu_group``, a gloo group), whose ranks split the KV heads; None when SGLang's
    distributed runtime is not initialised (a backend built without a server: tests).
    ``runtime_context.get_parallel().attn_tp_group`` in 0.5.17 through 0.5.23 (with DP
    attention refused it is the TP group)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        return get_parallel().attn_tp_group
    except (ImportError, AssertionError, AttributeError, RuntimeError, ValueError):
        return None  # not initialised: 0.5.17 asserts, 0.5.23 raises RuntimeError


def tp_rank_size() -> tuple:
    """(rank, size) of this process in the attention TP group; (0, 1) without one."""
    group = attention_tp_group()
    if group is None:
        return 0, 1
    return int(group.rank_in_group), int(group.world_size)


def kv_pool_heads(model_runner):
    """KV heads the runner's pool holds per layer (this rank's), or None where it does not say."""
    n = getattr(getattr(model_runner, "token_to_kv_pool", None), "head_num", None)
    return int(n) if isinstance(n, int) else None


def layer_needs_dense_fallback(layer) -> str:
    """Why a layer must run densely (sliding window, cross-attention, encoder-only), or ''."""
    if getattr(layer, "is_cross_attention", False):
        return "cross-attention"
    attn_type = getattr(layer, "attn_type", None)
    if attn_type is not None and getattr(attn_type, "name", "") == "ENCODER_ONLY":
        return "encoder-only attention"
    window = getattr(layer, "sliding_window_size", None)
    if window is not None and window > -1:
        return "sliding-window attention"
    return ""


def dense_fallback_layers(model_runner) -> dict:
    """{layer_id: reason} for the loaded model's attention layers that must run dense."""
    model = getattr(model_runner, "model", None)
    found = {}
    if model is None:
        return found
    for module in model.modules():
        if hasattr(module, "layer_id") and hasattr(module, "tp_k_head_num"):  # RadixAttention
            why = layer_needs_dense_fallback(module)
            if why:
                found[module.layer_id] = why
    return found


def batch_view(forward_batch):
    """(req_pool_indices, prefix_lens, extend_lens, seq_lens) as host lists for planning."""
    fb = forward_batch
    seq_lens = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
    pools = fb.req_pool_indices.tolist()
    if fb.forward_mode.is_decode():
        return pools, [s - 1 for s in seq_lens], [1] * len(seq_lens), seq_lens
    prefix = list(fb.extend_prefix_lens_cpu)
    extend = list(fb.extend_seq_lens_cpu)
    return pools, prefix, extend, seq_lens


# --------------------------------------------------------------------------------------------
# A request's own budget: SGLang's custom sampling parameters (config.parse_request_budget).
# --------------------------------------------------------------------------------------------

_REQ_FRACTION_ATTR = "_kascade_fraction"  # on a Req: its parsed fraction (parsed once)
_UNPARSED = object()
_asked = False  # some request of this process asked for its own budget (decode skips until then)


class RequestIds(list):
    """``ForwardBatch.rids`` with each row's own fraction attached (``fractions``: [B] fraction or
    None). SGLang's runners copy a ForwardBatch with ``dataclasses.replace`` (the eager runner's
    static buffers; 0.5.21), which keeps declared fields only: the rids list travels by
    reference, an attribute of the ForwardBatch would not."""

    fractions: list | None = None


def request_fraction(req) -> float | None:
    """The own Top-k fraction of a scheduler ``Req`` (1.0: dense), or None: the server's budget.
    ``req.sampling_params.custom_params`` is the request's, validated in the tokenizer process
    (_after_sampling_params_verify); parsed once per Req."""
    global _asked
    cached = getattr(req, _REQ_FRACTION_ATTR, _UNPARSED)
    if cached is not _UNPARSED:
        return cached
    from .config import REQUEST_PARAM_KEY, parse_request_budget

    params = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    frac = None
    if isinstance(params, dict) and params.get(REQUEST_PARAM_KEY) is not None:
        budget = parse_request_budget(params)
        frac = None if budget is None else budget.topk_fraction
        _asked = _asked or frac is not None
    try:
        setattr(req, _REQ_FRACTION_ATTR, frac)
    except AttributeError:  # a Req with slots: parsed again next time
        pass
    return frac


def _after_forward_batch_init(forward_batch, cls, batch, *args, **kwargs):
    # Reason: the attention backend sees a ForwardBatch, which carries no sampling parameters
    # (sampling_info.custom_params only with --enable-custom-logit-processor); init_new reads the
    # ScheduleBatch whose ``reqs`` are its rows, in order, and fills ``rids`` from them (0.5.17 to
    # 0.5.23). A request enters through an extend forward (prefill, or again after a
    # retraction), so decode forwards are skipped until some request asked. Host values only.
    reqs = getattr(batch, "reqs", None)
    mode = getattr(forward_batch, "forward_mode", None)
    if not reqs or forward_batch is None or (
            not _asked and mode is not None and mode.is_decode()):
        return forward_batch
    fracs = [request_fraction(r) for r in reqs]
    rids = getattr(forward_batch, "rids", None)
    if (isinstance(rids, list) and len(rids) == len(fracs)
            and any(f is not None for f in fracs)):  # else: rids as SGLang made them
        rids = forward_batch.rids = RequestIds(rids)
        rids.fractions = fracs
    return forward_batch


def request_fractions(forward_batch) -> list | None:
    """[B] each row's own Top-k fraction (None: the server's budget), or None: every row at the
    server's (no request asked, or a ForwardBatch not built by ForwardBatch.init_new)."""
    return getattr(getattr(forward_batch, "rids", None), "fractions", None)


def request_ids(forward_batch) -> list | None:
    """[B] SGLang's request ids of the rows (``ForwardBatch.rids``), or None."""
    return getattr(forward_batch, "rids", None)


def _after_sampling_params_verify(result, sampling_params, *args, **kwargs):
    # Reason: SGLang validates a request's sampling parameters in the tokenizer process
    # (TokenizerManager._create_tokenized_object calls verify) and answers a ValueError from it
    # with HTTP 400 and the message (/generate and the OpenAI routes), before the request
    # reaches a scheduler. KascadeConfigError is a ValueError.
    from .config import parse_request_budget

    parse_request_budget(getattr(sampling_params, "custom_params", None))
    return result


def response_budget_info(custom_params) -> dict:
    """The ``kascade`` entry of a response's meta info: the budget class (config.BUDGET_CLASSES)
    and, for a request's own fraction, ``topk``."""
    from .config import parse_request_budget

    budget = parse_request_budget(custom_params)
    if budget is None:
        return {"budget": "default"}
    info = {"budget": budget.budget_class}
    if budget.budget_class == "custom":
        info["topk"] = budget.topk_fraction
    return info


def _around_wait_one_response(original, manager, obj, *args, **kwargs):
    # Reason: a response's meta info is assembled in TokenizerManager._handle_batch_output with
    # no hook for a plugin; _wait_one_response yields each output dict (streamed chunks and the
    # final one) of one request, whose sampling parameters (validated) are at hand here.
    gen = original(manager, obj, *args, **kwargs)
    try:
        if resolved_args(manager.server_args).attention_backend != BACKEND_NAME:
            return gen
        sp = getattr(obj, "sampling_params", None)
        if not isinstance(sp, dict):  # an embedding request, or a batch not yet split
            return gen
        preferred = getattr(manager, "preferred_sampling_params", None) or {}
        info = response_budget_info({**preferred, **sp}.get("custom_params"))
    except Exception:  # noqa: BLE001 - never fail a response over its meta info
        logger.debug("kascade: no budget meta info for this response", exc_info=True)
        return gen
    return _with_budget_meta(gen, info)


async def _with_budget_meta(gen, info: dict):
    try:
        async for out in gen:
            meta = out.get("meta_info") if isinstance(out, dict) else None
            if isinstance(meta, dict):
                meta.setdefault("kascade", dict(info))
            yield out
    finally:
        await gen.aclose()


def register_request_budget_hooks() -> None:
    """Per-request budgets: validated where SGLang validates sampling parameters (HTTP 400),
    handed to the backend with each ForwardBatch, reported in each response's meta info."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.sampling.sampling_params.SamplingParams.verify",
                          _after_sampling_params_verify, HookType.AFTER)
    HookRegistry.register(
        "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
        _after_forward_batch_init, HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.tokenizer_manager.TokenizerManager"
                          "._wait_one_response", _around_wait_one_response, HookType.AROUND)
