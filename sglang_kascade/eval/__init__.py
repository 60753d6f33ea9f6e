"""Long-context accuracy suite run through a live SGLang server (docs/evaluation.md).

    python -m sglang_kascade.eval          # the suite against a running server
    python -m sglang_kascade.eval.report   # results JSON -> markdown page and plot
    python -m sglang_kascade.eval.sweep    # start a server per configuration, run, stop

Tasks are generated here with fixed seeds (``tasks.py``); their filler text is the classic
pass-key filler or the held-out essays (``calibrate.heldout_documents()``), never the essays
calibration reads.
"""

from .tasks import QUICK_TASKS, TASKS  # noqa: F401
