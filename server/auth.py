"""Bearer-token check of the admin sidecar. The token comes from a file or an environment variable."""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path
from typing import Optional

from fastapi import HTTPException, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sglang_kascade.config import ADMIN_TOKEN_ENV as TOKEN_ENV
MIN_TOKEN_CHARS = 16

bearer = HTTPBearer(auto_error=False, description="Admin token (--token-file or "
                                                  f"{TOKEN_ENV})")


class TokenError(ValueError):
    pass


def load_token(token_file: Optional[str], environ=os.environ) -> tuple[str, list]:
    """(token, warnings). The file wins over the environment; refuses a missing or short token."""
    warnings = []
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise TokenError(f"--token-file {token_file}: cannot read: {e}") from e
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(f"--token-file {token_file} is readable by group/others; chmod 600")
    else:
        token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise TokenError(f"no admin token: pass --token-file FILE or set {TOKEN_ENV}")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"the admin token must have at least {MIN_TOKEN_CHARS} characters")
    return token, warnings


def require_token(expected: str):
    """A FastAPI dependency that answers 401 unless ``Authorization: Bearer <expected>``."""

    async def check(creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)):
        given = creds.credentials if creds is not None else ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(status_code=401, detail="missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return check
