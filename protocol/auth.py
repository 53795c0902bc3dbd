"""API keys as `Authorization: Bearer KEY`, shared by the balancer and the replica (torch-free).

A key is checked against every configured key with `hmac.compare_digest` over SHA-256 digests,
so the time taken depends neither on how much of a key matches nor on which key matched (the
digests also make the compared lengths equal). A missing or wrong key gets a 401 with an
OpenAI-style error body and `WWW-Authenticate: Bearer`, as OpenAI's API and vLLM's
`--api-key` answer.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from aiohttp import web

from protocol.openai_api import error_body


class KeySet:
    """A fixed set of accepted keys. Empty: nothing is accepted (callers skip the check instead)."""

    __slots__ = ("_digests",)

    def __init__(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for k in keys:
            if not isinstance(k, str) or not k or k != k.strip() or len(k) > 1024:
                raise ValueError("an API key must be a non-empty string without surrounding spaces, at most 1024 chars")
        self._digests = tuple(_digest(k) for k in keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, token: str | None) -> bool:
        if token is None:
            return False
        d = _digest(token)
        ok = False
        for ref in self._digests:  # no early exit: every key is compared
            ok |= hmac.compare_digest(d, ref)
        return ok


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


UNAUTHORIZED = "Incorrect or missing API key: send `Authorization: Bearer YOUR_KEY`"


def bearer_token(request: web.Request) -> str | None:
    """The key from the request's `Authorization: Bearer KEY` (scheme case-insensitive), else None."""
    return parse_bearer(request.headers.get("Authorization"))


def parse_bearer(value: str | None) -> str | None:
    """The key from an Authorization header's value `Bearer KEY`, else None."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def unauthorized(message: str = UNAUTHORIZED) -> web.Response:
    return web.json_response(error_body(401, message), status=401, headers={"WWW-Authenticate": "Bearer"})
