"""Options + profile -> the (profile, budget) the backend runs with, and the selection policy.

A policy (``--kascade-policy``) is a profile transformation (here) plus a selection function (in
backend.py). The profile's dense layers stay dense under every policy.
"""

from __future__ import annotations

import dataclasses
import logging

from .config import (DEFAULT_POLICY, DEFAULT_SINK_TOKENS, POLICIES, BudgetConfig,
                     KascadeOptions, PolicyConfig)
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


def identity_head_map(profile: AnchorProfile) -> AnchorProfile:
    """Same anchors; every reuse KV head reads the same-numbered anchor head."""
    ident = tuple(range(profile.model.num_kv_heads))
    return dataclasses.replace(profile, head_map=(ident,) * profile.num_layers)


def every_layer_selects(profile: AnchorProfile) -> AnchorProfile:
    """Every layer is an anchor (identity head map): no layer reuses another's selection."""
    return dataclasses.replace(identity_head_map(profile),
                               anchor_layers=tuple(range(profile.num_layers)))


# policy -> profile transformation. Each is idempotent; the profile's dense layers are kept.
PROFILE_TRANSFORMS = {
    "kascade": lambda profile: profile,
    "kascade_identity": identity_head_map,
    "kascade_pooled": lambda profile: profile,
    "oracle": every_layer_selects,  # exact Top-k in every layer
    "quest": every_layer_selects,  # each layer selects its own pages
    "streaming": every_layer_selects,  # each layer selects its sinks + recent window
}
assert tuple(PROFILE_TRANSFORMS) == POLICIES


def apply_policy(profile: AnchorProfile, policy: str) -> AnchorProfile:
    return PROFILE_TRANSFORMS[policy](profile)
