"""The long-context tasks: deterministic samples of an exact token length.

Every sample is drawn from its own ``random.Random`` seeded by (seed, task, length, index), so a
sample does not depend on how many others are drawn or in which order. Keys and values are
generated (random digits, invented words, random capitals); filler is the classic pass-key text
or the held-out essays (``calibrate.heldout_documents()``) -- never the calibration essays.
A draw whose needle strings or answers would not occur exactly once in the context (e.g. a
value that happens to be in an essay) is redrawn.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .text import EssayCorpus, Tokens, insert_needles, make_frame, repeated_filler

# Names of the tasks in the order they are run and reported.
TASKS = ("passkey", "single_needle", "multi_key", "multi_value", "variable_tracking", "two_hop")
QUICK_TASKS = ("passkey", "single_needle")

ADJECTIVES = ("amber ancient brave bright calm clever crimson distant dusty eager elegant "
              "faint fierce gentle golden hollow humble icy jolly lively lonely lucky misty "
              "noble pale proud quiet rapid rustic scarlet shiny silent sleepy sturdy swift "
              "tender tidy vivid wandering wild witty").split()
NOUNS = ("anchor badger beacon bramble candle cathedral cobalt comet dragonfly emerald "
         "falcon fern glacier harbor hazel iris jaguar kettle lantern lighthouse maple "
         "meadow nebula orchid otter pebble pilgrim quartz raven saddle sparrow spruce "
         "thimble tulip violin walrus willow zephyr").split()
FIRST_NAMES = ("Alma Boris Celia Dario Edith Felix Greta Hugo Ines Jonas Karin Lucas Mira "
               "Nadia Oskar Petra Quentin Rosa Stefan Tilda Ulrich Vera Walter Yara").split()
SYLLABLES = ("bar bel cor dan del fen gal hol kar lin mar mor nel ost pel quin ras ril sol "
             "tam tor ulm var ven wil zan").split()


@dataclass
class Sample:
    task: str
    length: int  # requested context length (tokens) == len(input_ids)
    index: int
    seed: int
    input_ids: list
    body: tuple  # (start, end): the context (haystack) inside input_ids
    answers: list  # every one must be in the prediction
    forbidden: list  # none may be in the prediction (other keys' values, distractors)
    needles: list  # inserted sentences, each exactly once in the context
    unique: list  # strings that occur exactly once in the context
    documents: list  # essay file names the filler came from ([] for generated filler)
    depths: list  # where the needles went, as fractions of the body
    max_new_tokens: int
    question: str


@dataclass
class Draw:
    """What a task's ``draw`` returns before assembly."""

    instruction: str
    question: str
    answer_prefix: str
    answers: list
    needles: list  # sentences (text, no leading space)
    depths: list
    unique: list
    forbidden: list = field(default_factory=list)
    docs_of: list | None = None  # two-hop: which document each needle goes into


class TaskError(RuntimeError):
    pass


def digits(rng, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10 ** n - 1))


def distinct(rng, make, k: int) -> list:
    out = []
    while len(out) < k:
        v = make(rng)
        if v not in out:
            out.append(v)
    return out


def magic_key(rng) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def var_name(rng) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def invented_word(rng, syllables=(2, 3)) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice(syllables))).capitalize()


def depth(rng) -> float:
    return rng.uniform(0.05, 0.95)


NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure "
                    "to memorize them. I will quiz you about the numbers afterwards.")


def magic_sentence(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


# --- the tasks ----------------------------------------------------------------------------


def draw_passkey(rng, n_docs=None) -> Draw:
    key = digits(rng, 5)
    return Draw(
        instruction=("There is an important piece of information hidden inside a lot of "
                     "irrelevant text. Find it and memorize it. I will quiz you about it."),
        question="What is the pass key?",
        answer_prefix="The pass key is",
        answers=[key],
        needles=[f"The pass key is {key}. Remember it."],
        depths=[depth(rng)],
        unique=[key],
    )


def draw_single_needle(rng, n_docs=None) -> Draw:
    key, value = magic_key(rng), digits(rng, 7)
    return Draw(
        instruction=NIAH_INSTRUCTION,
        question=f"What is the special magic number for {key} mentioned in the provided text?",
        answer_prefix=f"The special magic number for {key} mentioned in the provided text is",
        answers=[value],
        needles=[magic_sentence(key, value)],
        depths=[depth(rng)],
        unique=[value, key],
    )


def draw_multi_key(rng, n_docs=None, n_keys: int = 4) -> Draw:
    keys = distinct(rng, magic_key, n_keys)
    values = distinct(rng, lambda r: digits(r, 7), n_keys)
    ask = rng.randrange(n_keys)
    return Draw(
        instruction=NIAH_INSTRUCTION,
        question=(f"What is the special magic number for {keys[ask]} mentioned in the provided "
                  "text?"),
        answer_prefix=(f"The special magic number for {keys[ask]} mentioned in the provided "
                       "text is"),
        answers=[values[ask]],
        forbidden=[v for i, v in enumerate(values) if i != ask],
        needles=[magic_sentence(k, v) for k, v in zip(keys, values)],
        depths=[depth(rng) for _ in keys],
        unique=keys + values,
    )


def draw_multi_value(rng, n_docs=None, n_values: int = 4) -> Draw:
    key = magic_key(rng)
    values = distinct(rng, lambda r: digits(r, 7), n_values)
    return Draw(
        instruction=NIAH_INSTRUCTION,
        question=(f"What are all the special magic numbers for {key} mentioned in the provided "
                  "text?"),
        answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are",
        answers=values,
        needles=[magic_sentence(key, v) for v in values],
        depths=[depth(rng) for _ in values],
        unique=values,
    )


def draw_variable_tracking(rng, n_docs=None, hops: int = 4) -> Draw:
    names = distinct(rng, var_name, 2 * (hops + 1))
    chain, other = names[: hops + 1], names[hops + 1:]
    value, other_value = distinct(rng, lambda r: digits(r, 5), 2)

    def statements(vs, val):
        return [f"VAR {vs[0]} = {val}."] + [f"VAR {b} = VAR {a}." for a, b in zip(vs, vs[1:])]

    needles = statements(chain, value) + statements(other, other_value)
    # each chain in order of depth; the two chains interleave
    d1 = sorted(depth(rng) for _ in chain)
    d2 = sorted(depth(rng) for _ in other)
    return Draw(
        instruction=("Memorize and track the chain(s) of variable assignment hidden in the "
                     "following text."),
        question=f"Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=(f"According to the chain(s) of variable assignment in the text above, "
                       f"{len(chain)} variables are assigned the value {value}, they are:"),
        answers=chain,
        forbidden=other,
        needles=needles,
        depths=d1 + d2,
        unique=[value, other_value, chain[-1], other[-1]],
    )


def draw_two_hop(rng, n_docs: int = 3, n_distractors: int = 2) -> Draw:
    n_triples = 1 + n_distractors
    codes = distinct(rng, lambda r: invented_word(r, (2, 3)), n_triples)
    people = distinct(rng, lambda r: f"{r.choice(FIRST_NAMES)} {invented_word(r, (2,))}",
                      n_triples)
    towns = distinct(rng, lambda r: invented_word(r, (3,)), n_triples)
    if len(set(codes) | set(towns) | {p.split()[1] for p in people}) < 3 * n_triples:
        raise TaskError("name collision")  # redrawn by the caller
    needles, docs_of = [], []
    for c, p, t in zip(codes, people, towns):
        a, b = rng.sample(range(n_docs), 2)  # the two facts of a triple: different documents
        needles += [f"Project {c} is led by {p}.", f"{p} lives in the town of {t}."]
        docs_of += [a, b]
    return Draw(
        instruction=("Below are several documents. A few sentences in them state facts about "
                     "projects, people and towns. Read all the documents, then answer the "
                     "question."),
        question=f"In which town does the leader of Project {codes[0]} live?",
        answer_prefix=f"The leader of Project {codes[0]} lives in the town of",
        answers=[towns[0]],
        forbidden=towns[1:],
        needles=needles,
        depths=[depth(rng) for _ in needles],
        unique=codes + towns,  # a leader's name is in both facts of a triple
        docs_of=docs_of,
    )


DRAWS = {
    "passkey": draw_passkey,
    "single_needle": draw_single_needle,
    "multi_key": draw_multi_key,
    "multi_value": draw_multi_value,
    "variable_tracking": draw_variable_tracking,
    "two_hop": draw_two_hop,
}
MAX_NEW_TOKENS = {
    "passkey": 12,
    "single_needle": 16,
    "multi_key": 16,
    "multi_value": 64,
    "variable_tracking": 48,
    "two_hop": 16,
}
DESCRIPTIONS = {
    "passkey": "a 5-digit pass key in the repeated classic filler ('The grass is green. ...')",
    "single_needle": "one 'special magic number' (7 digits) for an adjective-noun key, in "
                     "essay text",
    "multi_key": "4 key-value needles in essay text; the question asks for one key's value",
    "multi_value": "one key with 4 values in 4 needles; all values must be reported",
    "variable_tracking": "a chain VAR A = 12345, VAR B = VAR A, ... (5 variables) and a "
                         "distractor chain; name every variable of the asked value",
    "two_hop": "several essay documents; 'Project P is led by X' and 'X lives in the town of T' "
               "in different documents, plus 2 distractor triples; ask P's leader's town",
}


# --- assembly ------------------------------------------------------------------------------


def count_word(text: str, s: str) -> int:
    """Occurrences of ``s`` in ``text`` not inside a longer word or number."""
    return len(re.findall(r"(?<![0-9A-Za-z])" + re.escape(s) + r"(?![0-9A-Za-z])", text))


def n_documents(length: int) -> int:
    return max(3, min(8, length // 1024 + 2))


def make_sample(tokens: Tokens, task: str, length: int, index: int, seed: int = 0,
                chat: bool = True) -> Sample:
    if task not in DRAWS:
        raise TaskError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    rng = random.Random(f"kascade-eval:{seed}:{task}:{length}:{index}")
    for _attempt in range(50):
        n_docs = n_documents(length) if task == "two_hop" else None
        try:
            draw = DRAWS[task](rng, n_docs)
        except TaskError:
            continue
        frame = make_frame(tokens, draw.instruction, draw.question, draw.answer_prefix, chat)
        body_len = length - len(frame.head) - len(frame.tail)
        needle_ids = [tokens.encode(" " + s) for s in draw.needles]
        filler_len = body_len - sum(len(x) for x in needle_ids)
        if filler_len < 16:
            raise TaskError(f"{task}: {length} tokens is too short for the prompt and needles")
        if task == "two_hop":
            body, documents, depths = _multi_document_body(tokens, rng, draw, needle_ids,
                                                           body_len, n_docs)
        else:
            if task == "passkey":
                filler = repeated_filler(tokens, filler_len)
            else:
                filler = EssayCorpus.of(tokens).excerpt(rng, filler_len)
            body, starts = insert_needles(filler, needle_ids, draw.depths)
            documents = filler.documents
            depths = [round(s / max(1, len(body)), 4) for s in starts]
        ids = frame.head + body + frame.tail
        assert len(ids) == length, (task, len(ids), length)
        text = tokens.decode(body)
        if not all(text.count(s) == 1 for s in draw.needles):
            continue
        if not all(count_word(text, s) == 1 for s in draw.unique):
            continue
        if not all(count_word(text, s) >= 1 for s in draw.answers):
            continue
        if any(count_word(draw.answer_prefix, s) for s in draw.answers):
            continue
        return Sample(task=task, length=length, index=index, seed=seed, input_ids=ids,
                      body=(len(frame.head), len(frame.head) + len(body)),
                      answers=draw.answers, forbidden=draw.forbidden, needles=draw.needles,
                      unique=draw.unique, documents=documents, depths=depths,
                      max_new_tokens=MAX_NEW_TOKENS[task], question=draw.question)
    raise TaskError(f"{task}@{length} sample {index}: no valid draw in 50 attempts")


def _multi_document_body(tokens, rng, draw: Draw, needle_ids, body_len, n_docs):
    corpus = EssayCorpus.of(tokens)
    headers = [tokens.encode(("" if j == 0 else "\n\n") + f"Document {j + 1}:\n")
               for j in range(n_docs)]
    text_len = body_len - sum(len(h) for h in headers) - sum(len(x) for x in needle_ids)
    shares = [text_len // n_docs + (1 if j < text_len % n_docs else 0) for j in range(n_docs)]
    long_enough = [i for i, d in enumerate(corpus.docs) if len(d) >= max(shares)]
    if len(long_enough) < n_docs:
        raise TaskError(f"only {len(long_enough)} held-out essays have {max(shares)} tokens")
    picks = rng.sample(long_enough, n_docs)
    body, documents, depths = [], [], [0.0] * len(needle_ids)
    for j, (doc_index, share) in enumerate(zip(picks, shares)):
        excerpt = corpus.document_excerpt(doc_index, rng, share)
        mine = [i for i, d in enumerate(draw.docs_of) if d == j]
        ids, starts = insert_needles(excerpt, [needle_ids[i] for i in mine],
                                     [draw.depths[i] for i in mine])
        body += headers[j]
        for i, s in zip(mine, starts):
            depths[i] = len(body) + s
        body += ids
        documents += excerpt.documents
    depths = [round(d / max(1, len(body)), 4) for d in depths]
    return body, documents, depths


def make_samples(tokens: Tokens, task: str, length: int, n: int, seed: int = 0,
                 chat: bool = True) -> list:
    return [make_sample(tokens, task, length, i, seed, chat) for i in range(n)]


__all__ = ["TASKS", "QUICK_TASKS", "Sample", "make_sample", "make_samples", "MAX_NEW_TOKENS",
           "DESCRIPTIONS", "TaskError", "count_word"]
