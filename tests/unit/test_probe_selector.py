"""The probe's --selector option (calibrate/probe.py): parsing and refusal."""

import pytest

from sglang_kascade.calibrate.probe import _quest_pages


def test_topk_and_quest_pages():
    assert _quest_pages("topk") is None
    assert _quest_pages("quest:16") == 16
    assert _quest_pages("quest:1") == 1


@pytest.mark.parametrize("bad", ["quest", "quest:0", "quest:x", "oracle:4", ""])
def test_bad_selector_is_refused(bad):
    with pytest.raises(SystemExit, match="expected topk or quest:P"):
        _quest_pages(bad)
