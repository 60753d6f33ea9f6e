"""Locust users against SGLang's OpenAI-compatible API, streaming.

Classes: ``ChatUser`` (multi-turn chat under one shared system prompt), ``AgentUser`` (context
grows with tool outputs), ``RagUser`` (different questions over the same long documents).
Every call streams ``/v1/chat/completions``; besides the request itself, each success fires
``TTFT`` (ms), ``ITL`` (mean gap of the request, ms) and ``TOKENS/S`` (decode tokens per second,
stored in locust's response-time columns) events, and every request is appended to
``LOADTEST_RECORDS`` (JSON lines) for the summary.

Environment (set by loadtest.run / loadtest.soak): LOADTEST_PROMPTS (prompts.json; built with
seed 0 when unset), LOADTEST_RECORDS, LOADTEST_MIX ("chat=1,agent=1,rag=1"), LOADTEST_MODEL,
LOADTEST_MAX_TOKENS, LOADTEST_THINK_S ("min,max"), LOADTEST_CHAT_TURNS, LOADTEST_AGENT_STEPS,
LOADTEST_RAG_QUESTIONS, LOADTEST_REQUEST_TIMEOUT_S.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `loadtest` from a checkout

import requests  # noqa: E402  (gevent-patched by locust)
from gevent import GreenletExit  # noqa: E402
from locust import User, between, events, task  # noqa: E402

from loadtest.prompts import build_prompts, load_prompts  # noqa: E402
from loadtest.stream import Record, StreamError, parse_sse, record_from_stream  # noqa: E402
from loadtest.config import parse_mix  # noqa: E402

_prompts_path = os.environ.get("LOADTEST_PROMPTS")
PROMPTS = load_prompts(_prompts_path) if _prompts_path else build_prompts(0)
MIX = parse_mix(os.environ.get("LOADTEST_MIX", "chat=1,agent=1,rag=1"))
MODEL = os.environ.get("LOADTEST_MODEL", "default")
MAX_TOKENS = int(os.environ.get("LOADTEST_MAX_TOKENS", "32"))
THINK = [float(x) for x in os.environ.get("LOADTEST_THINK_S", "0.2,1.0").split(",")]
CHAT_TURNS = int(os.environ.get("LOADTEST_CHAT_TURNS", "4"))
AGENT_STEPS = int(os.environ.get("LOADTEST_AGENT_STEPS", "5"))
RAG_QUESTIONS = int(os.environ.get("LOADTEST_RAG_QUESTIONS", "2"))
REQUEST_TIMEOUT_S = float(os.environ.get("LOADTEST_REQUEST_TIMEOUT_S", "300"))

_records_path = os.environ.get("LOADTEST_RECORDS")
_records = open(_records_path, "a", buffering=1) if _records_path else None
_user_ids = itertools.count()


@events.quitting.add_listener
def _close_records(environment, **kw):
    if _records:
        _records.flush()


def _fire(name: str, kind: str, value: float, length: int = 0, exc=None):
    events.request.fire(request_type=kind, name=name, response_time=value,
                        response_length=length, exception=exc, context={})


class _StreamingUser(User):
    """Base: one requests.Session per user, the streamed call and its metrics."""

    abstract = True
    cls = "base"
    wait_time = between(*THINK)

    def on_start(self):
        self.session = requests.Session()
        self.uid = next(_user_ids)
        self.rng = random.Random(f"{self.cls}-{self.uid}")  # each user's own fixed sequence

    def chat(self, messages: list) -> str | None:
        """Stream one completion; record it; return the answer text (None on failure)."""
        body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS,
                "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        name = f"{self.cls} /v1/chat/completions"
        t_wall, t0 = time.time(), time.perf_counter()
        try:
            with self.session.post(self.host.rstrip("/") + "/v1/chat/completions", json=body,
                                   stream=True, timeout=REQUEST_TIMEOUT_S) as resp:
                if resp.status_code != 200:
                    raise StreamError(f"HTTP {resp.status_code}: {resp.text[:300]}")
                res = parse_sse((time.perf_counter(), line) for line in resp.iter_lines())
        except (StreamError, requests.RequestException, ValueError) as e:
            err = f"{type(e).__name__}: {e}"
            rec = Record(cls=self.cls, t_start=t_wall, ok=False, error=err[:500],
                         latency_ms=(time.perf_counter() - t0) * 1000.0,
                         messages=len(messages))
            self._write(rec)
            _fire(name, "POST", rec.latency_ms, 0, e)
            return None
        except GreenletExit:  # the run ended (--stop-timeout) while this request was in flight
            self._write(Record(cls=self.cls, t_start=t_wall, ok=False, interrupted=True,
                               error="interrupted: the run ended",
                               latency_ms=(time.perf_counter() - t0) * 1000.0,
                               messages=len(messages)))
            raise
        rec = record_from_stream(self.cls, t_wall, t0, time.perf_counter(), res, len(messages))
        self._write(rec)
        _fire(name, "POST", rec.latency_ms, rec.completion_tokens)
        _fire(self.cls, "TTFT", rec.ttft_ms)
        if rec.itl_ms:
            _fire(self.cls, "ITL", sum(rec.itl_ms) / len(rec.itl_ms))
        if rec.decode_tokens_per_s is not None:
            _fire(self.cls, "TOKENS/S", rec.decode_tokens_per_s)
        return res.text

    def _write(self, rec: Record):
        if _records:
            _records.write(json.dumps(rec.to_json()) + "\n")


class ChatUser(_StreamingUser):
    """Multi-turn chat: the same system prompt for everyone, conversations of CHAT_TURNS turns.

    One turn per task run, so that stopping at the end of the run waits for one request only.
    """

    cls = "chat"
    weight = MIX.get("chat", 0)
    messages: list = []

    @task
    def turn(self):
        if len(self.messages) < 2 or len(self.messages) >= 1 + 2 * CHAT_TURNS:
            self.messages = [{"role": "system", "content": PROMPTS.chat_system}]
        self.messages.append({"role": "user", "content": self.rng.choice(PROMPTS.chat_questions)})
        answer = self.chat(self.messages)
        if answer is None:
            self.messages = []  # start over after a failure
        else:
            self.messages.append({"role": "assistant", "content": answer})


class AgentUser(_StreamingUser):
    """An agent loop: each step appends the model's step and a tool output to the context,
    for AGENT_STEPS steps; then a new task. One step per task run."""

    cls = "agent"
    weight = MIX.get("agent", 0)
    messages: list = []
    steps = 0

    @task
    def step(self):
        if not self.messages or self.steps >= AGENT_STEPS:
            self.messages = [{"role": "system", "content": PROMPTS.agent_system},
                             {"role": "user", "content": self.rng.choice(PROMPTS.agent_tasks)}]
            self.steps = 0
        answer = self.chat(self.messages)
        self.steps += 1
        if answer is None:
            self.messages = []
            return
        tool = self.rng.choice(PROMPTS.agent_tool_outputs)
        self.messages = self.messages + [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"Tool output:\n{tool}\nNext step?"}]


class RagUser(_StreamingUser):
    """Many users, different questions, the same long documents (a shared prompt prefix).

    A task asks RAG_QUESTIONS questions about one document, one after the other, so every
    RAG user sends at least one request whose document prefix is already in the radix cache.
    """

    cls = "rag"
    weight = MIX.get("rag", 0)

    @task
    def ask(self):
        i = self.rng.randrange(len(PROMPTS.rag_documents))
        system = {"role": "system", "content": PROMPTS.rag_system + PROMPTS.rag_documents[i]["text"]}
        for _ in range(RAG_QUESTIONS):
            question = {"role": "user", "content": self.rng.choice(PROMPTS.rag_questions[i])}
            if self.chat([system, question]) is None:
                return


# Classes with weight 0 in LOADTEST_MIX are not run.
for _name in [c.__name__ for c in (ChatUser, AgentUser, RagUser) if not c.weight]:
    del globals()[_name]
