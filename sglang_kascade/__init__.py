"""Kascade sparse attention as an SGLang attention backend (``--attention-backend kascade``)."""

__version__ = "0.1.0"
