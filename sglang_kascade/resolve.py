"""Options + profile -> the (profile, budget) the backend runs with, and the selection policy.

A policy (``--kascade-policy``) is one record of policies.py: its profile transformation, its
selection function and whether the Triton path serves it.
"""

from __future__ import annotations

import dataclasses
import logging

from .config import (DEFAULT_POLICY, OPTION_TABLE, BudgetConfig, KascadeConfigError,
                     KascadeOptions, PolicyConfig)
from .profile import (AnchorProfile, ModelFingerprint, derived_default_profile,
                      find_shipped_profile, load_profile)
from .policies import POLICY_TABLE, apply_policy
from .tp import TPLayout, fit_head_map

logger = logging.getLogger("sglang_kascade")


def resolve_profile(options: KascadeOptions, fp: ModelFingerprint,
                    model_path: str = "") -> tuple[AnchorProfile, BudgetConfig]:
    if options.profile:
        profile = load_profile(options.profile)
        profile.check_model(fp)
    else:
        profile = find_shipped_profile(fp, model_path)
        if profile is None:
            profile = derived_default_profile(fp)
            logger.warning(
                "kascade: no calibrated profile for %s (%d layers); using the derived default "
                "(anchors %s, identity head map). Calibrate one with "
                "`python -m sglang_kascade.calibrate` and pass --kascade-profile.",
                fp.architecture, fp.num_layers, list(profile.anchor_layers),
            )
    return profile, resolve_budget(profile, options)


def resolve_budget(profile: AnchorProfile, options: KascadeOptions) -> BudgetConfig:
    """The profile's budget with the flags / environment laid over it (also on a hot swap)."""
    overrides = {
        f.name: getattr(options, f.name)
        for f in dataclasses.fields(BudgetConfig)
        if getattr(options, f.name, None) is not None
    }
    return dataclasses.replace(profile.budget, **overrides)


# Options that only one policy reads: given under another policy, they are ignored, with a warning.
POLICY_OPTIONS = {"sink_tokens": "streaming", "rerank": "kascade_rerank"}


def resolve_policy(options: KascadeOptions) -> PolicyConfig:
    """The policy and its parameters; a parameter of another policy keeps its default (so the
    config says what runs) and is reported once."""
    name = options.policy or DEFAULT_POLICY
    given = {}
    for option, policy in POLICY_OPTIONS.items():
        value = getattr(options, option)
        if value is not None and name != policy:
            logger.warning("kascade: %s is ignored: only --kascade-policy %s reads it (this "
                           "server runs %s)", OPTION_TABLE[option].flag, policy, name)
        elif value is not None:
            given[option] = OPTION_TABLE[option].type(value)  # rerank 3 -> 3.0
    return PolicyConfig(name=name, **given)  # the others: PolicyConfig's defaults


def tp_problem(profile: AnchorProfile, policy: PolicyConfig, layout: TPLayout) -> str | None:
    """Why ``layout``'s TP size cannot serve ``profile`` under ``policy``, or None: a policy that
    pools over every KV head (a rank holds only its own: ``policy_tp_problem``), or a head map,
    as the policy transforms it, that crosses ranks (tp.py). Asked at start-up and before a hot
    swap."""
    why = policy_tp_problem(policy, layout)
    if why or layout.size == 1:
        return why
    why = layout.problem(apply_policy(profile, policy.name).head_map)
    return None if why is None else (f"profile {profile.name or ''} does not fit --tp-size "
                                     f"{layout.size}: {why}")


def policy_tp_problem(policy: PolicyConfig, layout: TPLayout) -> str | None:
    if layout.size > 1 and not POLICY_TABLE[policy.name].per_kv_head:
        return (f"policy {policy.name} pools the scores of every KV head, which --tp-size "
                f"{layout.size} splits over ranks")
    return None


def fit_profile_to_tp(profile: AnchorProfile, policy: PolicyConfig, layout: TPLayout,
                      explicit: bool) -> AnchorProfile:
    """The profile a TP group serves. A profile that fits is served as it is. One that does
    not: refused if the user named it (``explicit``), with the two ways to a fitting one;
    otherwise (shipped or derived) each crossing entry reads the reuse head's own anchor head
    (``tp.fit_head_map`` without a similarity: the identity), with a warning."""
    why = tp_problem(profile, policy, layout)
    if why is None:
        return profile
    if explicit or policy_tp_problem(policy, layout):
        raise KascadeConfigError(
            f"--attention-backend kascade: {why}. Calibrate with `python -m "
            f"sglang_kascade.calibrate ... --tp {layout.size}`, or write a rank-local copy with "
            f"`python -m sglang_kascade.calibrate.tp_fit PROFILE --tp {layout.size} --out "
            f"FITTED.json [--stats STATS.pt]`")
    sizes = tuple(sorted(set(profile.tp_sizes) | {layout.size}))
    rows, moved = fit_head_map(profile.head_map, profile.model.num_kv_heads, sizes)
    logger.warning("kascade: profile %s crosses ranks at --tp-size %d; serving it with %d "
                   "head-map entries set to the identity (rank-local). Calibrate with --tp %d "
                   "for a rank-local map chosen by similarity.", profile.name, layout.size,
                   moved, layout.size)
    return dataclasses.replace(profile, head_map=rows, tp_sizes=sizes)
