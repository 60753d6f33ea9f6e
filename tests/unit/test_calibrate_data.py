"""Calibration data: the retrieval windows (--data retrieval) on the calibration essays."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("transformers")

from sglang_kascade.corpus import (DataError, calibration_documents,  # noqa: E402
                                           heldout_documents, load_samples, read_documents)


@pytest.fixture(scope="module")
def tokenizer():
    try:
        calibration_documents()
    except DataError as e:
        pytest.skip(str(e))
    from transformers import AutoTokenizer

    from sglang_kascade.embedded_model import ensure_converted

    return AutoTokenizer.from_pretrained(ensure_converted())


def test_retrieval_windows_have_one_answerable_question(tokenizer):
    plain = load_samples("builtin", tokenizer, 1024, 3, seed=1)
    retr = load_samples("retrieval", tokenizer, 1024, 3, seed=1)
    assert retr.description["window_indices"] == plain.description["window_indices"]
    assert "retrieval" in retr.description["source"]
    calib = "\n\n".join(read_documents(calibration_documents()))
    heldout = "\n\n".join(read_documents(heldout_documents()))
    for ids in retr.windows:
        assert len(ids) == 1024
        text = tokenizer.decode(ids)
        facts = dict(re.findall(r"The access code for locker ([A-Z]-\d\d) is (\d{6})\.", text))
        q = re.search(r"What is the access code for locker ([A-Z]-\d\d)\?", text)
        assert q and q.group(1) in facts
        # the window ends with the answer, which is the fact stated in the text
        assert text.rstrip().endswith(f"locker {q.group(1)} is {facts[q.group(1)]}.")
        assert text.count(f"is {facts[q.group(1)]}.") == 2  # the fact and the answer
        # the filler is calibration text: a long run of it occurs in the calibration essays
        # and not in the held-out ones
        body = text.split("mentioned in them.", 1)[1].strip()
        chunk = body[200:280]
        assert chunk in calib and chunk not in heldout


def test_retrieval_windows_are_deterministic(tokenizer):
    a = load_samples("retrieval", tokenizer, 512, 2, seed=3).windows
    b = load_samples("retrieval", tokenizer, 512, 2, seed=3).windows
    assert a == b
