"""Offline calibration of Kascade anchor profiles (docs/calibration.md).

    python -m sglang_kascade.calibrate --model PATH --out profiles/NAME.json

Modules, one job each: ``data`` (development text and the calibration / evaluation split),
``model`` (loading, fingerprint), ``stats`` (runs the model and streams per-layer statistics),
``similarity`` (sim[l1, l2, h2, h1]), ``dp`` (anchor choice), ``headmap`` (reuse head map),
``pipeline`` (ties them together, builds the profile), ``cli``.
"""

from ..corpus import calibration_documents, heldout_documents

__all__ = ["calibration_documents", "heldout_documents"]
