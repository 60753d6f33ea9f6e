"""Options + profile -> the (profile, budget) the backend runs with."""

from __future__ import annotations

import dataclasses
import logging

from .config import BudgetConfig, KascadeOptions
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
    overrides = {
        f.name: getattr(options, f.name)
        for f in dataclasses.fields(BudgetConfig)
        if getattr(options, f.name, None) is not None
    }
    budget = dataclasses.replace(profile.budget, **overrides)
    return profile, budget
