"""A forge's refusal, classified from its answer (pure), with the retry hint it gave.

GitHub and GitLab say "slow down" in the same ways with different header names: GitHub
``X-RateLimit-Remaining``/``X-RateLimit-Reset``, GitLab ``RateLimit-Remaining``/``RateLimit-Reset``
(both epoch seconds), and both ``Retry-After`` (seconds).
"""

from __future__ import annotations

import time
from collections.abc import Mapping


class ReportError(Exception):
    """``kind``: server, rate_limited, auth, invalid, not_found, network, unknown."""

    def __init__(self, kind: str, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in ("server", "rate_limited", "network")


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def classify(status: int, headers: Mapping[str, str], message: str = "", now: float | None = None) -> ReportError:
    """A forge's error response as a :class:`ReportError` (status and headers in)."""
    now = time.time() if now is None else now
    lower = {k.lower(): v for k, v in headers.items()}
    retry_after = _seconds(lower.get("retry-after"))
    remaining = lower.get("x-ratelimit-remaining", lower.get("ratelimit-remaining"))
    if remaining == "0" and status in (403, 429):
        reset = _seconds(lower.get("x-ratelimit-reset", lower.get("ratelimit-reset")))
        wait = max(0.0, reset - now) if reset is not None else None
        return ReportError("rate_limited", message or "rate limit exhausted", status=status,
                           retry_after=retry_after if retry_after is not None else wait)
    if status == 429 or (status == 403 and retry_after is not None):
        return ReportError("rate_limited", message or "secondary rate limit", status=status,
                           retry_after=retry_after)
    if status >= 500:
        return ReportError("server", message or f"the forge answered {status}", status=status,
                           retry_after=retry_after)
    kind = {400: "invalid", 401: "auth", 403: "auth", 404: "not_found", 422: "invalid"}.get(status, "unknown")
    return ReportError(kind, message or f"the forge answered {status}", status=status)
