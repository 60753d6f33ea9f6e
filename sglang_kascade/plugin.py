"""Entry point of the ``sglang.srt.plugins`` group: registers ``--attention-backend kascade``.

SGLang calls ``register()`` in every process (launcher, each scheduler), before argument parsing
in the launcher. It only registers names and hooks; nothing heavy runs until the backend is built.
"""

from __future__ import annotations

import logging

from . import sglang_adapter as sa
from .config import KascadeConfigError

logger = logging.getLogger("sglang_kascade")


def register() -> None:
    sa.check_sglang_version()
    sa.register_backend(create_backend)
    sa.register_hooks(launcher_parsed=_launcher_parsed, graph_editor=_graph_editor)
    sa.register_request_budget_hooks()
    from .cpu_workarounds import patch_sglang_paged_allocation

    patch_sglang_paged_allocation()  # no-op unless torch is a CPU build


def _launcher_parsed(options, host: str, port: int) -> None:
    """The launcher of a kascade server parsed its flags: start the admin sidecar if asked."""
    if options.admin_port:
        from .sidecar_launch import start_sidecar

        start_sidecar(options, host, port)


def _graph_editor():
    from . import graph_nodes  # ctypes on libcuda: loaded at the first graph capture only

    return graph_nodes


def create_backend(model_runner):
    """Factory called by SGLang's ModelRunner: resolve options + profile, then build."""
    from .backend import KascadeAttnBackend
    from .resolve import fit_profile_to_tp, resolve_policy, resolve_profile

    sa.check_supported(model_runner)
    options = sa.kascade_options(model_runner.server_args)
    fingerprint = sa.model_fingerprint(model_runner)
    profile, budget = resolve_profile(options, fingerprint,
                                      str(getattr(model_runner.model_config, "model_path", "")))
    policy = resolve_policy(options)
    layout = tp_layout(model_runner, fingerprint)
    if layout is not None:  # rank-local head maps only (tp.py); the budget is unchanged
        profile = fit_profile_to_tp(profile, policy, layout, explicit=bool(options.profile))
    fallback = sa.dense_fallback_layers(model_runner)
    if fallback:
        logger.warning("kascade: these layers run dense: %s",
                       ", ".join(f"{i} ({why})" for i, why in sorted(fallback.items())))
    logger.info(
        "kascade: profile %s; anchors %s; dense %s; budget %s; %s",
        profile.name, list(profile.anchor_layers), list(profile.dense_layers), budget, policy,
    )
    backend = KascadeAttnBackend(
        options=options,
        dense=sa.make_dense_backend(model_runner),
        req_to_token_pool=model_runner.req_to_token_pool,
        token_to_kv_pool=model_runner.token_to_kv_pool,
        profile=profile,
        budget=budget,
        device=model_runner.device,
        dense_fallback=fallback,
        policy=policy,
        tp=layout,
    )
    channel = None
    if layout is None or layout.rank == 0:  # under TP, rank 0 reads the control directory
        channel = open_control_channel(options, sa.server_port(model_runner), fingerprint,
                                       profile, check=backend.hot_swap_problem)
    backend.control = channel if layout is None else tp_control(channel, layout)
    from .warmup import warm_up_backend

    # Every Triton kernel variant compiled now, before SGLang captures its graphs and serves
    # (a first long prefill would otherwise compile for seconds): warmup.py.
    warm_up_backend(backend, model_runner, options)
    return backend


def tp_layout(model_runner, fingerprint):
    """This rank's TPLayout under ``--tp-size N`` > 1 (tp.py), or None at TP 1. Refuses a KV
    pool whose head count is not the layout's (a head split this module does not know)."""
    from .tp import TPLayout

    rank, size = sa.tp_rank_size()
    try:
        layout = TPLayout(rank, size, fingerprint.num_kv_heads)
    except ValueError as e:
        raise KascadeConfigError(f"--attention-backend kascade with --tp-size {size}: {e}") from e
    heads = sa.kv_pool_heads(model_runner)
    if heads is not None and heads != layout.local_kv_heads:
        raise KascadeConfigError(
            f"--attention-backend kascade with --tp-size {size}: the KV pool holds {heads} KV "
            f"heads per rank, but {fingerprint.num_kv_heads} heads over {size} ranks give "
            f"{layout.local_kv_heads}")
    if size == 1:
        return None
    logger.info("kascade: TP rank %d of %d: KV heads %d..%d of %d", rank, size,
                layout.first_head, layout.first_head + layout.local_kv_heads - 1,
                fingerprint.num_kv_heads)
    return layout


def tp_control(channel, layout):
    """Every rank's hot-swap channel under TP (tp_sync.py): rank 0's control directory,
    broadcast at each batch boundary over the TP group's CPU group; None on every rank when
    rank 0 has none."""
    from .profile import profile_from_dict
    from .tp_sync import TPControl

    group = sa.attention_tp_group()
    return TPControl.create(channel, group.cpu_group, layout.rank, layout.size,
                            profile_from_dict)


def profile_validator(fingerprint, check=None):
    """``validate(profile_json) -> AnchorProfile`` of the control channel: a profile for this
    model, or KascadeConfigError. ``check(profile) -> reason or None``: why this process cannot
    apply that profile (the backend's ``hot_swap_problem``: captured decode graphs); the
    activation is then refused with that reason, and the sidecar rolls back."""
    from .profile import profile_from_dict

    def validate(data):
        p = profile_from_dict(data)
        p.check_model(fingerprint)
        why = check(p) if check is not None else None
        if why:
            raise KascadeConfigError(f"hot-swap refused: {why}")
        return p

    return validate


def open_control_channel(options, port: int, fingerprint, profile, check=None):
    """The hot-swap channel of this scheduler process (control.py), or None if turned off.

    On by default, so a sidecar can be attached to a running server later; its cost is one
    ``stat`` call every 50 ms in a daemon thread. ``check``: see profile_validator.
    """
    from pathlib import Path

    from .config import CONTROL_OFF
    from .control import SchedulerChannel, default_control_dir

    if options.control_dir == CONTROL_OFF:
        return None
    root = Path(options.control_dir) if options.control_dir else default_control_dir(port)

    try:
        validate = profile_validator(fingerprint, check)
        channel = SchedulerChannel(root, fingerprint.to_json(), validate, profile.to_json())
    except OSError as e:
        if options.control_dir:  # asked for explicitly: fail loudly
            raise KascadeConfigError(f"--kascade-control-dir {root}: {e}") from e
        logger.warning("kascade: profile hot-swap is off (control dir %s: %s)", root, e)
        return None
    logger.info("kascade: control dir %s (profile hot-swap)", root)
    return channel.start()
