"""Reporters: what a commit status says (pure), and GitHub's client against the stand-in that
validates every request against GitHub's official schemas."""

from __future__ import annotations

import asyncio

import pytest

from bot.models import BuildStatus
from bot.reporters.commit_status import commit_status
from bot.reporters.errors import ReportError as GitHubError
from bot.reporters.errors import classify
from bot.reporters.github import GitHubClient
from tests.support import app_key, github_app_standin, make_settings, private_pem

TOKEN = "ghp_reporter-test-token"
APP_ID = 424242
SHA = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
PLATFORMS = ["linux/amd64", "linux/arm64"]


# -- what a status says ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "message", "github", "gitlab", "text"),
    [
        (BuildStatus.queued, None, None, "pending", "pending", "Queued: linux/amd64, linux/arm64"),
        (BuildStatus.running, None, None, "pending", "running", "Building linux/amd64, linux/arm64"),
        (BuildStatus.succeeded, None, None, "success", "success", "Built linux/amd64, linux/arm64"),
        (BuildStatus.failed, "build", "linux/arm64: RUN failed", "failure", "failed",
         "Failed (build): linux/arm64: RUN failed"),
        (BuildStatus.failed, "network", "registry down", "error", "failed", "Failed (network): registry down"),
        (BuildStatus.superseded, None, "superseded by build 9", "error", "canceled", "Superseded by build 9"),
        (BuildStatus.cancelled, None, "branch deleted", "error", "canceled", "Cancelled: branch deleted"),
        (BuildStatus.skipped, None, "[skip ci] in the head commit message", "success", "success",
         "Skipped: [skip ci] in the head commit message"),
    ],
)
def test_every_build_state_has_a_final_or_pending_status(status, kind, message, github, gitlab, text):
    gh = commit_status("github", 7, status, PLATFORMS, kind, message, "https://ci.example/")
    assert (gh.state, gh.description, gh.target_url) == (github, text, "https://ci.example/builds/7")
    assert commit_status("gitlab", 7, status, PLATFORMS, kind, message, "https://ci.example").state == gitlab


def test_descriptions_fit_githubs_limit():
    long = commit_status("github", 1, BuildStatus.failed, PLATFORMS, "build", "x\n" * 400, "http://h")
    assert len(long.description) == 140 and long.description.endswith("…") and "\n" not in long.description


# -- classification of GitHub's answers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retry_after"),
    [
        (502, {}, "server", None),
        (503, {"Retry-After": "4"}, "server", 4.0),
        (403, {"retry-after": "60"}, "rate_limited", 60.0),  # secondary rate limit
        (429, {"retry-after": "3"}, "rate_limited", 3.0),
        (403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1030"}, "rate_limited", 30.0),
        (401, {}, "auth", None),
        (403, {}, "auth", None),
        (404, {}, "not_found", None),
        (422, {}, "invalid", None),
        (418, {}, "unknown", None),
        # GitLab's names for the same hints
        (429, {"RateLimit-Remaining": "0", "RateLimit-Reset": "1010"}, "rate_limited", 10.0),
        (429, {"Retry-After": "5", "RateLimit-Remaining": "0"}, "rate_limited", 5.0),
        (400, {}, "invalid", None),
    ],
)
def test_classify(status, headers, kind, retry_after):
    error = classify(status, headers, now=1000.0)
    assert (error.kind, error.retry_after) == (kind, retry_after)
    assert error.retryable is (kind in ("server", "rate_limited"))


# -- against the stand-in -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key():
    return app_key()


@pytest.fixture(scope="module")
def running(key):
    with github_app_standin(key, APP_ID, tokens={TOKEN}) as standin:
        yield standin


@pytest.fixture
def github(running):
    running.reset()
    yield running
    running.assert_no_violations()


def post(client: GitHubClient, state=BuildStatus.queued, installation_id=None):
    status = commit_status("github", 3, state, PLATFORMS, None, None, "https://ci.example")

    async def go():
        try:
            return await client.create_status("Codertocat/Hello-World", SHA, status, "imagebot", installation_id)
        finally:
            await client.aclose()
    return asyncio.run(go())


def token_client(github) -> GitHubClient:
    return GitHubClient(make_settings(github_api_url=github.url, github_token=TOKEN))


def test_token_mode_posts_a_valid_status(github):
    answer = post(token_client(github))
    assert answer["state"] == "pending" and answer["context"] == "imagebot"
    (stored,) = github.statuses[("Codertocat", "Hello-World", SHA)]
    assert stored["description"] == "Queued: linux/amd64, linux/arm64"
    assert stored["target_url"] == "https://ci.example/builds/3"


def test_app_mode_caches_the_installation_token(github, key):
    settings = make_settings(github_api_url=github.url, github_app_id=APP_ID, github_private_key=private_pem(key))

    async def go():
        client = GitHubClient(settings)
        try:
            for state in (BuildStatus.queued, BuildStatus.running, BuildStatus.succeeded):
                status = commit_status("github", 3, state, PLATFORMS, None, None, "https://ci.example")
                await client.create_status("Codertocat/Hello-World", SHA, status, "imagebot", 42)
            return client.token_requests
        finally:
            await client.aclose()

    assert asyncio.run(go()) == 1
    assert [s["state"] for s in github.statuses[("Codertocat", "Hello-World", SHA)]] == ["pending", "pending", "success"]


def test_app_mode_refetches_a_refused_token(github, key):
    settings = make_settings(github_api_url=github.url, github_app_id=APP_ID, github_private_key=private_pem(key))

    async def go():
        client = GitHubClient(settings)
        status = commit_status("github", 3, BuildStatus.queued, PLATFORMS, None, None, "https://ci.example")
        try:
            await client.create_status("Codertocat/Hello-World", SHA, status, "imagebot", 42)
            github.expire_tokens()
            with pytest.raises(GitHubError) as refused:
                await client.create_status("Codertocat/Hello-World", SHA, status, "imagebot", 42)
            await client.create_status("Codertocat/Hello-World", SHA, status, "imagebot", 42)
            return refused.value, client.token_requests
        finally:
            await client.aclose()

    refused, fetched = asyncio.run(go())
    assert refused.kind == "auth" and fetched == 2


@pytest.mark.parametrize(
    ("inject", "kind", "retry_after"),
    [
        (lambda g: g.server_error(502), "server", None),
        (lambda g: g.secondary_rate_limit(retry_after=7), "rate_limited", 7.0),
        (lambda g: g.too_many_requests(retry_after=3), "rate_limited", 3.0),
        (lambda g: g.rate_limited(reset_in=30), "rate_limited", pytest.approx(30, abs=2)),
    ],
)
def test_faults_are_classified_with_their_hints(github, inject, kind, retry_after):
    inject(github)
    with pytest.raises(GitHubError) as exc:
        post(token_client(github))
    assert (exc.value.kind, exc.value.retry_after) == (kind, retry_after) and exc.value.retryable
    assert post(token_client(github))["state"] == "pending"  # the next one goes through


def test_no_credentials_is_a_clear_error(github):
    with pytest.raises(GitHubError, match="no GitHub credentials"):
        post(GitHubClient(make_settings(github_api_url=github.url)))


def test_find_check_run_reads_every_page_and_matches_name_app_and_external_id(github, key):
    """A create whose answer was lost is found again: across GitHub's pages (100 a page), only
    this App's run of this name and build, never another commit's or another name's."""
    settings = make_settings(github_api_url=github.url, github_app_id=APP_ID, github_private_key=private_pem(key))
    other_sha = "f" * 40

    async def go():
        client = GitHubClient(settings)
        try:
            async def create(name: str, external_id: str, sha: str = SHA) -> dict:
                body = {"name": name, "head_sha": sha, "external_id": external_id, "status": "queued"}
                return await client.create_check_run("Codertocat/Hello-World", body, 42)

            wanted = await create("imagebot", "7")
            await create("imagebot (pull_request)", "8")  # another context of the same commit
            await create("imagebot", "8", other_sha)  # this name on another commit
            await asyncio.gather(*(create("imagebot", str(1000 + n)) for n in range(120)))  # later builds
            found = await client.find_check_run("Codertocat/Hello-World", SHA, "imagebot", "7", 42)
            missing = await client.find_check_run("Codertocat/Hello-World", SHA, "imagebot", "8", 42)
            return wanted, found, missing
        finally:
            await client.aclose()

    wanted, found, missing = asyncio.run(go())
    assert found is not None and found["id"] == wanted["id"] and missing is None
    lists = [r for r in github.requests if r.operation_id == "checks/list-for-ref"]
    # newest first: build 7's run is on the second page of the first search; the second search reads both
    assert [r.status for r in lists] == [200, 200, 200, 200]
    assert f"app_id={APP_ID}" in lists[0].query and "check_name=imagebot" in lists[0].query
    assert "filter=all" in lists[0].query and "page=2" in lists[1].query


def test_find_check_run_faults_are_classified(github, key):
    settings = make_settings(github_api_url=github.url, github_app_id=APP_ID, github_private_key=private_pem(key))
    github.server_error(502, path_regex="/check-runs")

    async def go():
        client = GitHubClient(settings)
        try:
            return await client.find_check_run("Codertocat/Hello-World", SHA, "imagebot", "7", 42)
        finally:
            await client.aclose()

    with pytest.raises(GitHubError) as exc:
        asyncio.run(go())
    assert exc.value.kind == "server" and exc.value.retryable
