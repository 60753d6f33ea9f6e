"""The admin sidecar: a FastAPI app in its own process that hot-swaps anchor profiles.

Start it with ``python -m sglang_kascade.server --server-url http://127.0.0.1:30000`` (see
docs/operations.md), or let the plugin start it with ``--kascade-admin-port``.
"""
