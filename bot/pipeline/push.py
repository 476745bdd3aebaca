"""Registry failures, classified, and the retry policy every registry call shares.

Whatever fails in a push (an error item in the Docker push stream, an exception before the
stream starts, an HTTP error from the registry API) becomes one :class:`RegistryError` with a
``kind``:

- ``auth``: unauthorized or expired credentials; refresh the credentials once, then retry;
- ``denied``: the credentials work but may not do this; never retried;
- ``not_found``: no such repository, image or tag; never retried;
- ``network``: refused, reset, timed out, EOF; retried with backoff;
- ``registry``: the registry's own trouble (5xx, TOOMANYREQUESTS); retried, honouring hints;
- ``unknown``: anything else; not retried (retrying the unknown hides bugs).

A build whose base image could not be pulled fails with the same kinds (the runtime's
``PullError``), and is retried, refreshed or given up by the same policy; what the build step
then reports is :func:`pull_failure_kind`.

Classification is a plain function of the text (and HTTP status, where there is one), tested
without I/O. Retries use tenacity: exponential backoff with jitter, bounded by settings, and
zero retries means one attempt.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt, wait_exponential_jitter

from bot.masking import mask

T = TypeVar("T")

RETRYABLE = frozenset({"network", "registry"})
DETAIL_LIMIT = 500

# Checked in this order: the first rule whose words appear decides.
_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("denied", ("denied", "insufficient_scope", "forbidden", "not allowed")),
    ("auth", ("unauthorized", "authentication required", "no basic auth credentials",
              "invalid_token", "token has expired", "token expired", "incorrect username or password",
              "invalid username/password", "authentication failed")),
    ("registry", ("toomanyrequests", "too many requests", "rate limit", "internal server error",
                  "bad gateway", "service unavailable", "gateway timeout", "unexpected http status: 5",
                  "status code 5", "received unexpected http status: 5")),
    ("network", ("connection refused", "connection reset", "no route to host", "network is unreachable",
                 "i/o timeout", "timed out", "timeout", "broken pipe", "eof", "dial tcp",
                 "tls handshake", "server misbehaving", "no such host", "connection aborted",
                 "remote end closed", "connecterror", "readerror", "connection closed")),
    ("not_found", ("name unknown", "repository name not known", "manifest unknown", "not found",
                   "no such image", "does not exist", "blob unknown")),
]
_STATUS_KINDS = {401: "auth", 403: "denied", 404: "not_found", 429: "registry"}


def sanitize(detail: Any, secrets: tuple[str, ...] = ()) -> str:
    """Registry detail as one short printable line, whatever shape it came in, with every
    form of ``secrets`` masked (bot.masking)."""
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    elif not isinstance(detail, str):
        try:
            detail = repr(detail)
        except Exception:  # noqa: BLE001 - a detail object whose repr fails is still a detail
            detail = f"<unprintable {type(detail).__name__}>"
    text = mask(re.sub(r"[\x00-\x1f\x7f]+", " ", detail).strip(), secrets)
    return text[:DETAIL_LIMIT] + ("…" if len(text) > DETAIL_LIMIT else "") if text else "(no detail)"


def classify(detail: str, status: int | None = None) -> str:
    """The kind of a registry failure from its text and, where known, its HTTP status."""
    if status is not None:
        if status in _STATUS_KINDS:
            return _STATUS_KINDS[status]
        if status >= 500:
            return "registry"
    text = detail.lower()
    for kind, words in _RULES:
        if any(word in text for word in words):
            return kind
    return "unknown"


#: What a build step that could not pull its base image fails with, per registry failure kind.
_PULL_FAILURE_KINDS = {"auth": "auth", "denied": "auth", "network": "network", "registry": "registry",
                       "not_found": "not_found"}


def pull_failure_kind(kind: str) -> str:
    """The kind a build fails with when pulling its base image failed with ``kind``.

    A denial is ``auth`` too: for a base image the registry refuses these credentials, and
    nothing the repository changes mends it (the commit status says error, not failure). An
    unclassified failure is the build's own (``build``), as it was before pulls were told apart.
    """
    return _PULL_FAILURE_KINDS.get(kind, "build")


class RegistryError(Exception):
    """A classified registry failure; ``retry_after`` is the registry's hint in seconds."""

    def __init__(self, kind: str, detail: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retry_after = retry_after

    @classmethod
    def of(cls, detail: Any, status: int | None = None, *, retry_after: float | None = None,
           secrets: tuple[str, ...] = ()) -> RegistryError:
        text = sanitize(detail, secrets)
        return cls(classify(text, status), text, status=status, retry_after=retry_after)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int
    initial: float
    maximum: float


@dataclass(frozen=True)
class Retry:
    """What the pipeline reports before sleeping for the next attempt."""

    attempt: int  # the attempt that failed
    delay_s: float
    kind: str
    refreshed: bool
    detail: str


@dataclass(frozen=True)
class Attempts:
    value: Any
    attempts: int

    @property
    def retries(self) -> int:
        return self.attempts - 1


class Exhausted(Exception):
    """The last failure, with how many attempts were made."""

    def __init__(self, error: RegistryError, attempts: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    refresh: Callable[[], Awaitable[bool]],
    on_retry: Callable[[Retry], Awaitable[None]],
) -> Attempts:
    """Run ``attempt`` until it succeeds or the policy says stop.

    ``refresh`` is awaited once, on the first ``auth`` failure that still has an attempt left;
    it returns whether fresh credentials were obtained (if not, the auth failure is final).
    """
    max_attempts = policy.retries + 1
    refreshed = False
    refreshed_now = False
    backoff = wait_exponential_jitter(multiplier=policy.initial, max=policy.maximum, jitter=policy.initial)

    async def should_retry(state: RetryCallState) -> bool:
        nonlocal refreshed, refreshed_now
        refreshed_now = False
        error = state.outcome.exception() if state.outcome else None
        if not isinstance(error, RegistryError) or state.attempt_number >= max_attempts:
            return False
        if error.kind == "auth":
            if refreshed:
                return False
            refreshed = refreshed_now = await refresh()
            return refreshed
        return error.kind in RETRYABLE

    def wait(state: RetryCallState) -> float:
        if refreshed_now:
            return 0.0
        error = state.outcome.exception() if state.outcome else None
        hint = getattr(error, "retry_after", None) or 0.0
        return min(max(backoff(state), hint), max(policy.maximum, hint))

    async def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception()
        assert isinstance(error, RegistryError)
        await on_retry(Retry(state.attempt_number, round(state.upcoming_sleep, 3), error.kind,
                             refreshed_now, error.detail))

    retrying = AsyncRetrying(
        stop=stop_after_attempt(max_attempts),
        retry=should_retry,
        wait=wait,
        before_sleep=before_sleep,
        reraise=True,
    )
    number = 0
    try:
        async for trial in retrying:
            number = trial.retry_state.attempt_number
            with trial:
                value = await attempt()
    except RegistryError as error:
        raise Exhausted(error, number) from error
    return Attempts(value, number)
