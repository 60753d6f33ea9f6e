"""Token-exact haystacks: filler sources, needle insertion at sentence boundaries, prompt frames.

Everything is assembled from token ids, so a prompt has exactly the requested number of tokens:
``head + body + tail`` where the head and tail are the prompt frame (chat template, instruction,
question, answer prefix) and the body is filler text with needles spliced in. Needles go in only
at sentence boundaries of the filler (after a token that ends a sentence), each tokenized on its
own with a leading space, so the text reads naturally and decodes back to the needle sentence.

Filler sources:

* ``repeated_filler``: the classic pass-key filler ("The grass is green. ..."), repeated;
* ``EssayCorpus``: the held-out Paul Graham essays (``calibrate.heldout_documents()``), never the
  calibration half.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ..corpus import DOC_SEPARATOR, heldout_documents, read_documents

PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again.")
SENTENCE_END = ".!?"
CLOSERS = "\"')]”’"


@dataclass
class Segment:
    """A run of token ids with its sentence boundaries.

    ``ends``: sorted insertion points b (0 < b <= len(ids)) such that ids[:b] ends a sentence.
    ``documents``: names of the source documents the ids were cut from.
    """

    ids: list
    ends: list = field(default_factory=list)
    documents: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> "Segment":
        return Segment(self.ids[:n], [b for b in self.ends if b <= n], list(self.documents))


class Tokens:
    """A tokenizer with the few operations the suite needs (no special tokens added)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict = {}

    def encode(self, text: str) -> list:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def segment(self, text: str, document: str | None = None) -> Segment:
        """Tokenize ``text`` and find its sentence boundaries (from character offsets)."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = enc.get("offset_mapping")
        ends = []
        if offsets is not None:
            for i, (_s, e) in enumerate(offsets):
                if _ends_sentence(text, e):
                    ends.append(i + 1)
        else:  # slow tokenizer: decode prefixes token by token
            pos = 0
            for i in range(len(ids)):
                pos = len(self.decode(ids[: i + 1]))
                if _ends_sentence(text, pos):
                    ends.append(i + 1)
        ends = sorted(set(ends))
        return Segment(ids, ends, [document] if document else [])

    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def _ends_sentence(text: str, e: int) -> bool:
    """True if character position ``e`` is just after a sentence end followed by whitespace."""
    if e <= 0 or e > len(text):
        return False
    j = e - 1
    while j >= 0 and text[j] in CLOSERS:
        j -= 1
    if j < 0 or text[j] not in SENTENCE_END:
        return False
    if j > 0 and text[j] == "." and text[j - 1].isdigit() and e < len(text) and text[e].isdigit():
        return False  # a decimal point
    return e == len(text) or text[e].isspace()


def repeated_filler(tokens: Tokens, n: int) -> Segment:
    """``n`` tokens of the classic pass-key filler (a unit repeated; boundaries every sentence)."""
    unit = tokens.cached("passkey-unit", lambda: tokens.segment(" " + PASSKEY_FILLER))
    ids, ends = [], []
    while len(ids) < n:
        base = len(ids)
        ids.extend(unit.ids)
        ends.extend(base + b for b in unit.ends)
    return Segment(ids, ends).head(n)


class EssayCorpus:
    """The held-out essays, tokenized once, as one circular stream and as single documents."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens
        self.paths = heldout_documents()
        self.names = [p.name for p in self.paths]
        texts = read_documents(self.paths)
        self.docs = [tokens.segment(t.strip(), name) for t, name in zip(texts, self.names)]
        self.separator = tokens.encode(DOC_SEPARATOR)

    @classmethod
    def of(cls, tokens: Tokens) -> "EssayCorpus":
        return tokens.cached("essays", lambda: cls(tokens))

    def excerpt(self, rng, n: int) -> Segment:
        """``n`` tokens of the essays in file-name order (circular), starting at a sentence
        boundary of a random essay chosen by ``rng``."""
        d = rng.randrange(len(self.docs))
        doc = self.docs[d]
        starts = [0] + [b for b in doc.ends if b < len(doc)]
        start = rng.choice(starts[: max(1, len(starts) * 3 // 4)])
        ids, ends, names = [], [], []
        pos = start
        while len(ids) < n:
            doc = self.docs[d]
            base = len(ids) - pos
            ids.extend(doc.ids[pos:])
            ends.extend(base + b for b in doc.ends if b > pos)
            names.append(doc.documents[0])
            if len(ids) < n:
                ids.extend(self.separator)
                ends.append(len(ids))  # a document break is a boundary too
            d, pos = (d + 1) % len(self.docs), 0
        return Segment(ids, ends, names).head(n)

    def document_excerpt(self, index: int, rng, n: int) -> Segment:
        """``n`` tokens of essay ``index`` from a random sentence start (it must be long enough)."""
        doc = self.docs[index]
        if len(doc) < n:
            raise ValueError(f"{doc.documents[0]} has {len(doc)} tokens < {n}")
        starts = [0] + [b for b in doc.ends if b <= len(doc) - n]
        start = rng.choice(starts)
        return Segment(doc.ids[start:start + n],
                       [b - start for b in doc.ends if start < b <= start + n],
                       list(doc.documents))


def insert_needles(filler: Segment, needles, depths) -> tuple[list, list]:
    """Splice needle id lists into ``filler`` at the sentence boundaries nearest to ``depths``
    (fractions of the filler). Needles keep the order of their depths; two needles never share a
    boundary while free boundaries remain. Returns (ids, start index of each needle)."""
    n = len(filler)
    bounds = sorted(set([0] + [b for b in filler.ends if b <= n] + [n]))
    order = sorted(range(len(needles)), key=lambda i: depths[i])
    used, at = set(), {}
    last = 0
    for i in order:
        target = depths[i] * n
        j = bisect.bisect_left(bounds, target)
        cands = sorted((c for c in (j - 1, j) if 0 <= c < len(bounds)),
                       key=lambda c: abs(bounds[c] - target))
        pick = None
        for c in cands:
            if bounds[c] >= last and bounds[c] not in used:
                pick = bounds[c]
                break
        if pick is None:  # walk right to the next free boundary keeping the order
            free = [b for b in bounds if b >= last and b not in used]
            pick = free[0] if free else max(last, bounds[-1])
        used.add(pick)
        at[i] = pick
        last = pick
    ids, starts = [], [0] * len(needles)
    prev = 0
    for i in order:
        ids.extend(filler.ids[prev:at[i]])
        starts[i] = len(ids)
        ids.extend(needles[i])
        prev = at[i]
    ids.extend(filler.ids[prev:])
    return ids, starts


@dataclass
class Frame:
    """The prompt around the context: ``head + body + tail``."""

    head: list
    tail: list


CONTEXT_MARK = "\u241fCONTEXT\u241f"


def make_frame(tokens: Tokens, instruction: str, question: str, answer_prefix: str,
               chat: bool) -> Frame:
    """Chat format: one user turn (instruction, context, question) and the assistant turn opened
    with ``answer_prefix``. Plain format: BOS (if any), the same text, ``Answer: prefix``."""
    user = f"{instruction}\n\n{CONTEXT_MARK}\n\n{question}"
    tok = tokens.tokenizer
    if chat:
        rendered = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                           add_generation_prompt=True)
        pre, post = rendered.split(CONTEXT_MARK)
        return Frame(tokens.encode(pre), tokens.encode(post + answer_prefix))
    pre, post = user.split(CONTEXT_MARK)
    bos = getattr(tok, "bos_token_id", None)
    return Frame(([bos] if bos is not None else []) + tokens.encode(pre),
                 tokens.encode(post + "\nAnswer: " + answer_prefix))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
