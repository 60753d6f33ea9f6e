"""A run's results JSON on disk: gzip-compressed when the path ends in ``.gz`` (the per-layer
figures of a prefill-loss run are about 8 KB per prompt and variant; results pages in git keep
them compressed), plain JSON otherwise."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def write_json(path, data) -> None:
    raw = json.dumps(data).encode()
    Path(path).write_bytes(gzip.compress(raw, mtime=0) if str(path).endswith(".gz") else raw)


def read_json(path):
    raw = Path(path).read_bytes()
    return json.loads(gzip.decompress(raw) if str(path).endswith(".gz") else raw)
