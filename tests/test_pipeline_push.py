"""Registry failure classification and the shared retry policy, without I/O."""

from __future__ import annotations

import pytest

from bot.pipeline.push import (
    Exhausted,
    RegistryError,
    Retry,
    RetryPolicy,
    classify,
    pull_failure_kind,
    sanitize,
    with_retries,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("detail", "status", "kind"),
    [
        # texts seen from the Docker engine and distribution 2.8 on this machine
        ("unauthorized: authentication required", None, "auth"),
        ("no basic auth credentials", None, "auth"),
        ("denied: requested access to the resource is denied", None, "denied"),
        ("Get \"http://127.0.0.1:5001/v2/\": dial tcp 127.0.0.1:5001: connect: connection refused", None, "network"),
        ("Patch http://127.0.0.1:5001/v2/x/blobs/uploads/abc: EOF", None, "network"),
        ("read tcp 127.0.0.1:40000->127.0.0.1:5001: read: connection reset by peer", None, "network"),
        ("net/http: TLS handshake timeout", None, "network"),
        ("toomanyrequests: You have reached your pull rate limit", None, "registry"),
        ("received unexpected HTTP status: 503 Service Unavailable", None, "registry"),
        ("received unexpected HTTP status: 502 Bad Gateway", None, "registry"),
        ("name unknown: repository name not known to registry", None, "not_found"),
        ("An image does not exist locally with the tag: r/x", None, "not_found"),
        ("manifest unknown", None, "not_found"),
        ("something nobody has seen", None, "unknown"),
        # HTTP status decides where there is one
        ("whatever", 401, "auth"),
        ("whatever", 403, "denied"),
        ("whatever", 404, "not_found"),
        ("whatever", 429, "registry"),
        ("whatever", 500, "registry"),
        ("whatever", 418, "unknown"),
    ],
)
def test_classify(detail, status, kind):
    assert classify(detail, status) == kind


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("auth", "auth"), ("denied", "auth"), ("network", "network"), ("registry", "registry"),
     ("not_found", "not_found"), ("unknown", "build")],
)
def test_what_a_build_that_could_not_pull_its_base_image_fails_with(kind, expected):
    # a denied base image is reported as auth; the unclassified is the Dockerfile's own failure
    assert pull_failure_kind(kind) == expected


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        (None, "None"),
        (b"bytes \xff detail", "bytes \ufffd detail"),
        ({"errors": [{"code": "DENIED"}]}, "{'errors': [{'code': 'DENIED'}]}"),
        ("line one\nline two\t\x00end", "line one line two end"),
        ("", "(no detail)"),
        ("x" * 600, "x" * 500 + "…"),
        ("token hunter2 leaked", "token *** leaked"),
    ],
)
def test_sanitize_is_tolerant_and_capped(detail, expected):
    assert sanitize(detail, secrets=("hunter2",)) == expected


def test_sanitize_survives_a_hostile_repr():
    class Hostile:
        def __repr__(self):
            raise RuntimeError("no")

    assert sanitize(Hostile()) == "<unprintable Hostile>"


class Script:
    """An attempt function failing with the given kinds, then succeeding."""

    def __init__(self, *kinds: str, retry_after: float | None = None) -> None:
        self.kinds = list(kinds)
        self.calls = 0
        self.retry_after = retry_after

    async def __call__(self) -> str:
        self.calls += 1
        if self.kinds:
            kind = self.kinds.pop(0)
            raise RegistryError(kind, f"{kind} failure", retry_after=self.retry_after)
        return "sha256:done"


FAST = RetryPolicy(retries=3, initial=0.0, maximum=0.0)


async def run(script, policy=FAST, refresh_result=True):
    retries: list[Retry] = []
    refreshes = []

    async def refresh():
        refreshes.append(1)
        return refresh_result

    async def on_retry(retry):
        retries.append(retry)

    result = await with_retries(script, policy, refresh=refresh, on_retry=on_retry)
    return result, retries, refreshes


async def test_success_first_time():
    result, retries, _ = await run(Script())
    assert (result.value, result.attempts, result.retries, retries) == ("sha256:done", 1, 0, [])


async def test_network_and_registry_failures_are_retried():
    result, retries, refreshes = await run(Script("network", "registry"))
    assert result.attempts == 3 and refreshes == []
    assert [(r.attempt, r.kind, r.refreshed) for r in retries] == [(1, "network", False), (2, "registry", False)]


@pytest.mark.parametrize("kind", ["denied", "not_found", "unknown"])
async def test_final_kinds_fail_at_once(kind):
    with pytest.raises(Exhausted) as exc:
        await run(Script(kind))
    assert exc.value.attempts == 1 and exc.value.error.kind == kind


async def test_auth_refreshes_once_then_retries_at_once():
    result, retries, refreshes = await run(Script("auth"), RetryPolicy(3, initial=5.0, maximum=5.0))
    assert result.attempts == 2 and refreshes == [1]
    assert retries == [Retry(1, 0.0, "auth", True, "auth failure")]  # no backoff after a refresh


async def test_credentials_that_never_work_fail_with_auth_after_one_refresh():
    with pytest.raises(Exhausted) as exc:
        await run(Script("auth", "auth", "auth"))
    assert exc.value.error.kind == "auth" and exc.value.attempts == 2


async def test_auth_without_fresh_credentials_is_final():
    with pytest.raises(Exhausted) as exc:
        await run(Script("auth"), refresh_result=False)
    assert exc.value.attempts == 1


async def test_retries_are_bounded():
    with pytest.raises(Exhausted) as exc:
        await run(Script(*["network"] * 10))
    assert exc.value.attempts == 4 and exc.value.error.kind == "network"


async def test_zero_retries_means_one_attempt():
    for kinds in (("network",), ("auth",)):
        with pytest.raises(Exhausted) as exc:
            await run(Script(*kinds), RetryPolicy(0, 0.0, 0.0))
        assert exc.value.attempts == 1


async def test_backoff_grows_and_honours_retry_hints():
    _, retries, _ = await run(Script("network", "network", "network"), RetryPolicy(3, initial=0.001, maximum=0.004))
    delays = [r.delay_s for r in retries]
    assert all(0 <= d <= 0.004 for d in delays)
    _, retries, _ = await run(Script("registry", retry_after=0.05), RetryPolicy(3, initial=0.001, maximum=0.002))
    assert retries[0].delay_s == 0.05  # the registry's hint wins over a shorter backoff
