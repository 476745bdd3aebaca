"""GitLab commit statuses against the GitLab stand-in (every request checked against GitLab's
own API description, state transitions as GitLab enforces them)."""

from __future__ import annotations

import asyncio

import pytest

from bot.models import BuildStatus
from bot.reporters.commit_status import commit_status
from bot.reporters.errors import ReportError
from bot.reporters.gitlab import GitLabClient
from tests.standins.gitlab import GitLabStandIn
from tests.support import make_settings

TOKEN = "glpat-reporter-test"
SHA = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
PLATFORMS = ["linux/amd64", "linux/arm64"]


@pytest.fixture(scope="module")
def running():
    with GitLabStandIn(tokens={TOKEN}, projects={15: "mike/diaspora"}) as standin:
        yield standin


@pytest.fixture
def gitlab(running):
    running.reset()
    yield running
    running.assert_no_violations()


def send(gitlab, *states, token=TOKEN, project="mike/diaspora"):
    settings = make_settings(gitlab_url=gitlab.url, gitlab_api_token=token)

    async def go():
        client = GitLabClient(settings)
        try:
            return [await client.create_status(
                project, SHA, commit_status("gitlab", 5, state, PLATFORMS, "build", "RUN failed", "https://ci.example"),
                "imagebot", "refs/heads/master") for state in states]
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_pending_running_success(gitlab):
    answers = send(gitlab, BuildStatus.queued, BuildStatus.running, BuildStatus.succeeded)
    assert [a["status"] for a in answers] == ["pending", "running", "success"]
    assert gitlab.history("mike/diaspora", SHA, "imagebot") == ["pending", "running", "success"]
    assert answers[-1]["target_url"] == "https://ci.example/builds/5" and answers[-1]["ref"] == "master"


def test_every_end_is_a_final_state(gitlab):
    for state, expected in ((BuildStatus.failed, "failed"), (BuildStatus.superseded, "canceled")):
        gitlab.reset()
        assert send(gitlab, BuildStatus.queued, state)[-1]["status"] == expected


def test_a_numeric_project_id_works_too(gitlab):
    assert send(gitlab, BuildStatus.queued, project="15")[0]["status"] == "pending"


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [({"token": "wrong"}, "auth"), ({"project": "nobody/nothing"}, "not_found")],
)
def test_refusals(gitlab, kwargs, kind):
    with pytest.raises(ReportError) as exc:
        send(gitlab, BuildStatus.queued, **kwargs)
    assert exc.value.kind == kind and not exc.value.retryable


def test_faults_carry_their_hints(gitlab):
    gitlab.server_error(502)
    with pytest.raises(ReportError) as exc:
        send(gitlab, BuildStatus.queued)
    assert exc.value.kind == "server" and exc.value.retryable
    gitlab.too_many_requests(retry_after=4)
    with pytest.raises(ReportError) as exc:
        send(gitlab, BuildStatus.queued)
    assert (exc.value.kind, exc.value.retry_after) == ("rate_limited", 4.0)
    assert send(gitlab, BuildStatus.queued)[0]["status"] == "pending"
