"""Small shared settings of the load test (no locust import)."""

from __future__ import annotations

CLASSES = ("chat", "agent", "rag")


def parse_mix(text: str) -> dict:
    """'chat=2,agent=1,rag=1' -> {'chat': 2, 'agent': 1, 'rag': 1}; unnamed classes get 0."""
    mix = dict.fromkeys(CLASSES, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.partition("=")
        name = name.strip()
        if name not in mix:
            raise ValueError(f"--mix: unknown class {name!r} (known: {', '.join(CLASSES)})")
        try:
            mix[name] = int(weight) if sep else 1
        except ValueError:
            raise ValueError(f"--mix: weight of {name!r} must be an integer, got {weight!r}")
        if mix[name] < 0:
            raise ValueError(f"--mix: weight of {name!r} must be >= 0")
    if not any(mix.values()):
        raise ValueError(f"--mix {text!r}: no class with a positive weight")
    return mix
