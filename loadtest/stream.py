"""One streamed ``/v1/chat/completions`` call: SSE parsing and the per-request record.

Kept free of locust and of the network so it can be tested with canned streams.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional


class StreamError(Exception):
    """The stream broke or ended without a usable answer (a failed request)."""


@dataclass
class StreamResult:
    text: str = ""
    content_times: list = field(default_factory=list)  # perf_counter of each content chunk
    usage: Optional[dict] = None
    finish_reason: Optional[str] = None
    done: bool = False


def parse_sse(lines: Iterable[tuple]) -> StreamResult:
    """``lines``: (perf_counter, raw line bytes or str) as they arrived.

    Raises StreamError on a server-side error event, malformed JSON, a missing ``[DONE]``,
    an empty answer, or missing ``usage`` (requested with ``stream_options.include_usage``).
    """
    res, parts = StreamResult(), []
    for t, raw in lines:
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        line = line.strip()
        if not line or line.startswith(":"):
            continue
        if not line.startswith("data:"):
            raise StreamError(f"unexpected line in stream: {line[:200]!r}")
        data = line[5:].strip()
        if data == "[DONE]":
            res.done = True
            break
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError as e:
            raise StreamError(f"bad JSON in stream: {data[:200]!r}") from e
        if "error" in chunk:
            raise StreamError(f"server error in stream: {json.dumps(chunk['error'])[:300]}")
        if chunk.get("usage"):
            res.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            piece = delta.get("content")
            if piece:
                parts.append(piece)
                res.content_times.append(t)
            if choice.get("finish_reason"):
                res.finish_reason = choice["finish_reason"]
    res.text = "".join(parts)
    if not res.done:
        raise StreamError("stream ended without [DONE]")
    if not res.text.strip():
        raise StreamError(f"empty answer (finish_reason={res.finish_reason})")
    if not res.usage:
        raise StreamError("no usage chunk (stream_options.include_usage)")
    return res


@dataclass
class Record:
    """One request as the load test saw it; one JSON line in records.jsonl."""

    cls: str                 # user class: chat, agent, rag
    t_start: float           # wall-clock seconds (time.time()) when the request was sent
    ok: bool
    error: str = ""
    latency_ms: float = 0.0  # request sent -> stream finished
    ttft_ms: Optional[float] = None   # request sent -> first content chunk
    itl_ms: list = field(default_factory=list)  # gaps between successive content chunks
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0   # usage.prompt_tokens_details.cached_tokens (radix-cache hit)
    messages: int = 0        # messages in the conversation sent
    interrupted: bool = False  # cut by the end of the run (locust stopped the user): not a failure

    @property
    def decode_tokens_per_s(self) -> Optional[float]:
        """Tokens after the first, over the time from first to last content chunk."""
        span = sum(self.itl_ms)
        if self.completion_tokens < 2 or span <= 0:
            return None
        return (self.completion_tokens - 1) / (span / 1000.0)

    def to_json(self) -> dict:
        return asdict(self)


def record_from_stream(cls: str, t_start_wall: float, t_start: float, t_end: float,
                       res: StreamResult, messages: int) -> Record:
    times = res.content_times
    usage = res.usage or {}
    details = usage.get("prompt_tokens_details") or {}
    return Record(
        cls=cls, t_start=t_start_wall, ok=True,
        latency_ms=(t_end - t_start) * 1000.0,
        ttft_ms=(times[0] - t_start) * 1000.0 if times else None,
        itl_ms=[(b - a) * 1000.0 for a, b in zip(times, times[1:])],
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
        messages=messages,
    )
