"""Options + profile -> the (profile, budget) the backend runs with, and the selection policy.

A policy (``--kascade-policy``) is one record of policies.py: its profile transformation, its
selection function and whether the Triton path serves it.
"""

from __future__ import annotations

import dataclasses
import logging

from .config import DEFAULT_POLICY, DEFAULT_SINK_TOKENS, BudgetConfig, KascadeOptions, PolicyConfig
from .profile import (AnchorProfile, ModelFingerprint, derived_default_profile,
                      find_shipped_profile, load_profile)

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


def resolve_policy(options: KascadeOptions) -> PolicyConfig:
    return PolicyConfig(
        name=options.policy or DEFAULT_POLICY,
        sink_tokens=DEFAULT_SINK_TOKENS if options.sink_tokens is None else options.sink_tokens,
    )
