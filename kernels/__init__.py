"""Kascade compute kernels, installed as ``sglang_kascade.kernels``.

``*_torch.py`` files are the PyTorch implementations: they serve on the CPU (and, slowly, on a
GPU) and are the references that future GPU kernels are tested against. The independent oracle
for the method itself (full score matrices and masks) lives in ``tests/helpers/reference.py``.

The other ``*_torch.py`` functions work on one request at a time with keys in position order; the
backend gathers them from SGLang's paged pool (``req_to_token`` -> slots) before calling.

``decode_*_triton.py`` and ``topk_triton.py`` are the batched GPU decode kernels (Triton, imported
only where a GPU path runs): they read the token-major pool through ``req_to_token`` themselves;
``decode_torch.py`` is their reference and ``decode_plan.py`` their static buffers.
"""
