"""Exact-match scoring of a generated answer.

Both the prediction and the expected strings are normalised: lower case, thousands separators
between digits removed ("7,123,456" -> "7123456"), every other punctuation character and every
run of whitespace turned into one space. An expected string *matches* when it occurs in the
normalised prediction as whole words (not inside a longer word or number). A sample scores 1
when every answer matches and no forbidden string does (the other keys' values in multi_key,
the distractor chain's variables in variable_tracking, the distractor towns in two_hop), else 0;
``partial`` is the fraction of answers that match (for multi-value and variable tracking).
Generation stops at the model's end-of-turn token or at ``max_new_tokens``.
"""

from __future__ import annotations

import re
import unicodedata

_THOUSANDS = re.compile(r"(?<=\d)[,_](?=\d{3}(?!\d))")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = _THOUSANDS.sub("", text)
    text = "".join(" " if unicodedata.category(c).startswith(("P", "S")) else c for c in text)
    return " ".join(text.split())


def matches(prediction: str, expected: str) -> bool:
    """``expected`` appears in ``prediction`` as whole words, after normalising both."""
    exp = normalize(expected)
    if not exp:
        return False
    return f" {exp} " in f" {normalize(prediction)} "


def score(prediction: str, answers, forbidden=()) -> tuple[float, float]:
    """(exact, partial): exact is 1.0 iff all answers and no forbidden strings match."""
    found = [matches(prediction, a) for a in answers]
    partial = sum(found) / len(found) if found else 0.0
    exact = float(all(found) and bool(found)
                  and not any(matches(prediction, f) for f in forbidden))
    return exact, partial
