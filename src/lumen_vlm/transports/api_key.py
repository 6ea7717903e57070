"""The optional API key, checked the same way on every transport."""

from __future__ import annotations

import hmac


def bearer_key_matches(authorization: str, key: str) -> bool:
    """Whether an `authorization` value (HTTP header or gRPC metadata) is `Bearer KEY`; the
    comparison takes the same time whatever the token, so it cannot be guessed byte by byte."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
