"""Tests for the GitLab stand-in, over real HTTP on its TCP socket.

Reporter tests will trust this stand-in in place of GitLab, so it is checked against the same
api-subset.json it serves: every 201 seen on the wire is validated here against the documented
``API_Entities_CommitStatus``, independently of the stand-in's own self-check, and every error
body must have one of GitLab's two shapes (``{"message": ...}`` / ``{"error": ...}``).  No test
sleeps to synchronise; the stand-in is ready when ``start()`` returns and state is written
before a response leaves.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft4Validator

from tests.standins.gitlab import (
    FIRST_JOB_ID,
    FORMATS,
    INVALID_JSON_TEXT,
    GitLabStandIn,
    Project,
    grape_param_errors,
    response_schema_in_practice,
    transition_error,
)

SPEC: dict[str, Any] = json.loads((Path(__file__).parent / "data/gitlab/api-subset.json").read_text())
OPERATION = SPEC["POST /api/v4/projects/{id}/statuses/{sha}"]
TOKEN = "glpat-StandInToken000000000"
REPORTER_TOKEN = "glpat-ReporterOnly000000000"
PROJECT_ID, PROJECT_PATH = 4711, "octo-group/images/hello-image"
ENCODED = PROJECT_PATH.replace("/", "%2F")
SHA = "6dcb09b5b57875f334f61aebed695e2e4193db5e"
OTHER_SHA = "0ec9e58fdfca6cdd6652c083c9edb53abc0bad52"
BY_ID = f"/api/v4/projects/{PROJECT_ID}/statuses/{SHA}"
BY_PATH = f"/api/v4/projects/{ENCODED}/statuses/{SHA}"
STATUS_ROUTE = re.compile(r"^/api/v4/projects/[^/]+/statuses/[^/]+$")

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------- wire checks


RESPONSE_VALIDATOR = Draft4Validator(response_schema_in_practice(OPERATION["responses"]["200"]), format_checker=FORMATS)


def assert_gitlab_shaped(method: str, path: str, status: int, body: Any) -> None:
    """A 201 from the statuses route must match the documented entity; any JSON error must be
    ``{"message": ...}`` or ``{"error": ...}``."""
    if method == "POST" and STATUS_ROUTE.match(path) and status == 201:
        errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in RESPONSE_VALIDATOR.iter_errors(body)]
        assert not errors, f"{method} {path} -> 201 breaks the documented schema: {errors}"
    elif status >= 400 and isinstance(body, dict):
        assert len(body) == 1 and set(body) <= {"message", "error"}, body


@pytest.fixture(scope="module")
def running_standin() -> Iterator[GitLabStandIn]:
    """One server for the module: starting uvicorn is cheap, stopping it costs ~0.2 s."""
    projects = [Project(PROJECT_ID, PROJECT_PATH), Project(7, "solo/known-commits", commits=frozenset({SHA}))]
    with GitLabStandIn(tokens={TOKEN: "developer", REPORTER_TOKEN: "reporter"}, projects=projects) as standin:
        yield standin


@pytest.fixture
def gitlab(running_standin: GitLabStandIn) -> Iterator[GitLabStandIn]:
    """A clean stand-in; afterwards every recorded response is re-checked and no violation may remain."""
    running_standin.reset()
    yield running_standin
    for record in running_standin.requests:
        if record.status is not None and not isinstance(record.response, (str, bytes)):
            assert_gitlab_shaped(record.method, record.path, record.status, record.response)
    running_standin.assert_no_violations()


@pytest.fixture
def wire_checked() -> list[tuple[str, str, int]]:
    """Responses that were checked on the wire, as (method, raw path, status)."""
    return []


def _checker(checked: list[tuple[str, str, int]]) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        response.read()
        request = response.request
        path = request.url.raw_path.decode().split("?", 1)[0]
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
        assert_gitlab_shaped(request.method, path, response.status_code, body)
        checked.append((request.method, path, response.status_code))
    return check


@pytest.fixture
def client(gitlab: GitLabStandIn, wire_checked: list[tuple[str, str, int]]) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=gitlab.url, headers={"PRIVATE-TOKEN": TOKEN}, timeout=5,
        event_hooks={"response": [_checker(wire_checked)]},
    ) as http:
        yield http


# --------------------------------------------------------------------------- the happy path


def test_pending_running_success_updates_one_status(
    gitlab: GitLabStandIn, client: httpx.Client, wire_checked: list[tuple[str, str, int]]
) -> None:
    sent = {"state": "pending", "name": "imagebot/build", "ref": "main", "description": "Queued",
            "target_url": "https://ci.example.com/builds/7"}
    pending = client.post(BY_ID, json=sent)
    running = client.post(BY_ID, json={"state": "running", "name": "imagebot/build", "ref": "main",
                                       "description": "Building"})
    success = client.post(BY_ID, json={"state": "success", "name": "imagebot/build", "ref": "main",
                                       "coverage": 81.5})

    assert [r.status_code for r in (pending, running, success)] == [201, 201, 201]
    assert pending.headers["content-type"] == "application/json"
    assert re.fullmatch(r"01[0-9A-Z]{24}", pending.headers["x-request-id"])
    first, second, done = pending.json(), running.json(), success.json()
    assert list(first) == ["id", "sha", "ref", "status", "name", "target_url", "description", "created_at",
                           "started_at", "finished_at", "allow_failure", "coverage", "pipeline_id", "author"]
    assert (first["sha"], first["ref"], first["name"], first["allow_failure"]) == (SHA, "main", "imagebot/build", False)
    assert (first["started_at"], first["finished_at"], first["coverage"]) == (None, None, None)
    assert first["id"] >= FIRST_JOB_ID  # past 2**31, like GitLab.com job ids
    # GitLab updates the pending/running status in place: same id, same pipeline, same created_at ...
    assert first["id"] == second["id"] == done["id"]
    assert first["pipeline_id"] == second["pipeline_id"] == done["pipeline_id"]
    assert first["created_at"] == second["created_at"] == done["created_at"]
    # ... stamping started_at on running and finished_at on success, keeping earlier attributes.
    assert second["started_at"] is not None and second["finished_at"] is None
    assert done["started_at"] == second["started_at"] and done["finished_at"] is not None
    assert datetime.fromisoformat(done["finished_at"]) >= datetime.fromisoformat(done["started_at"])
    assert (done["description"], done["target_url"], done["coverage"]) == (
        "Building", "https://ci.example.com/builds/7", 81.5)
    assert done["author"]["username"] == "imagebot" and done["author"]["web_url"] == f"{gitlab.url}/imagebot"

    assert gitlab.history(PROJECT_ID, SHA, "imagebot/build") == ["pending", "running", "success"]
    assert gitlab.statuses[(PROJECT_ID, SHA, "imagebot/build")][-1] == done
    assert gitlab.jobs[done["id"]]["status"] == "success"
    record = gitlab.requests[0]
    assert (record.method, record.path, record.json, record.status, record.project_id) == (
        "POST", BY_ID, sent, 201, PROJECT_ID)
    assert record.headers["private-token"] == "[FILTERED]" and TOKEN not in repr(gitlab.requests)
    assert [r.seq for r in gitlab.requests] == [1, 2, 3]
    assert wire_checked == [("POST", BY_ID, 201)] * 3


@pytest.mark.parametrize(
    "project",
    [str(PROJECT_ID), ENCODED, ENCODED.lower().replace("%2f", "%2f"), ENCODED.upper().replace("%2F", "%2f")],
    ids=["numeric-id", "url-encoded-path", "lowercase-escape", "path-in-other-case"],
)
def test_numeric_id_and_encoded_path_reach_the_same_project(
    gitlab: GitLabStandIn, client: httpx.Client, project: str
) -> None:
    response = client.post(f"/api/v4/projects/{project}/statuses/{SHA}", json={"state": "running"})

    assert response.status_code == 201, response.text
    assert response.json()["name"] == "default"  # neither name nor context: "default"
    assert gitlab.history(PROJECT_ID, SHA) == ["running"] == gitlab.history(PROJECT_PATH, SHA)
    assert gitlab.requests[0].path == f"/api/v4/projects/{project}/statuses/{SHA}"  # kept raw


def test_both_addressings_update_the_same_status(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    by_id = client.post(BY_ID, json={"state": "pending", "context": "imagebot"}).json()
    by_path = client.post(BY_PATH, json={"state": "success", "name": "imagebot"}).json()  # name == context

    assert by_id["id"] == by_path["id"] and by_path["status"] == "success"
    assert gitlab.history(PROJECT_ID, SHA, "imagebot") == ["pending", "success"]


def test_query_string_and_form_parameters_work_too(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    """The docs' own example sends ``?state=success``; forms are as good as JSON to Grape."""
    by_query = client.post(f"{BY_ID}?state=pending&name=q&coverage=12.5")
    by_form = client.post(BY_ID, data={"state": "running", "name": "q", "pipeline_id": str(by_query.json()["pipeline_id"])})

    assert (by_query.status_code, by_form.status_code) == (201, 201), by_form.text
    assert by_query.json()["coverage"] == 12.5 and by_form.json()["status"] == "running"
    assert gitlab.history(PROJECT_ID, SHA, "q") == ["pending", "running"]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, ""),
        ({"PRIVATE-TOKEN": "glpat-wrong"}, ""),
        ({"Authorization": f"Bearer {TOKEN}x"}, ""),
        ({"Authorization": f"token {TOKEN}"}, ""),  # GitHub's scheme means nothing to GitLab
        ({}, "?private_token=glpat-wrong"),
    ],
    ids=["missing", "wrong-private-token", "wrong-bearer", "github-scheme", "wrong-query-token"],
)
def test_missing_or_wrong_token_is_401(
    gitlab: GitLabStandIn, client: httpx.Client, headers: dict[str, str], query: str
) -> None:
    client.headers.pop("PRIVATE-TOKEN")

    refused = client.post(BY_ID + query, json={"state": "success"}, headers=headers)
    bearer = client.post(BY_ID, json={"state": "pending"}, headers={"Authorization": f"Bearer {TOKEN}"})
    by_query = client.post(f"{BY_ID}?private_token={TOKEN}", json={"state": "running"})

    assert refused.status_code == 401 and refused.json() == {"message": "401 Unauthorized"}
    assert (bearer.status_code, by_query.status_code) == (201, 201)
    assert gitlab.history(PROJECT_ID, SHA) == ["pending", "running"]
    assert "glpat" not in json.dumps(gitlab.requests[-1].query)
    assert gitlab.violations == []  # a refused token is the bot's problem to handle, not a contract breach


def test_401_comes_before_parameter_errors(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    response = client.post(BY_ID, json={"state": "passed"}, headers={"PRIVATE-TOKEN": "nope"})

    assert response.status_code == 401 and gitlab.violations == []


def test_reporter_may_not_set_statuses(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    response = client.post(BY_ID, json={"state": "success"}, headers={"PRIVATE-TOKEN": REPORTER_TOKEN})

    assert response.status_code == 403 and response.json() == {"message": "403 Forbidden"}
    assert gitlab.statuses == {}


@pytest.mark.parametrize(
    ("project", "sha", "message"),
    [
        ("999999", SHA, "404 Project Not Found"),
        ("nobody%2Fnothing", SHA, "404 Project Not Found"),
        ("hello-image", SHA, "404 Project Not Found"),  # a path must contain a slash
        (ENCODED.replace("%2F", "%252F"), SHA, "404 Project Not Found"),  # double-encoded
        ("7", OTHER_SHA, "404 Commit Not Found"),
    ],
    ids=["unknown-id", "unknown-path", "path-without-namespace", "double-encoded", "unknown-commit"],
)
def test_unknown_project_or_commit_is_404(
    gitlab: GitLabStandIn, client: httpx.Client, project: str, sha: str, message: str
) -> None:
    path = f"/api/v4/projects/{project}/statuses/{sha}"

    response = client.post(path, json={"state": "success"})

    assert response.status_code == 404 and response.json() == {"message": message}
    assert [(r.path, r.status) for r in gitlab.requests] == [(path, 404)]
    assert gitlab.statuses == {}
    assert gitlab.violations == []  # GitLab says the same for a private project it hides: an outcome


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"state": "passed"}, "state does not have a valid value"),
        ({"state": "failure"}, "state does not have a valid value"),  # GitHub's word; GitLab says failed
        ({"state": "error"}, "state does not have a valid value"),
        ({"state": ""}, "state does not have a valid value"),
        ({"state": None}, "state does not have a valid value"),
        ({"name": "imagebot"}, "state is missing, state does not have a valid value"),
        ({"state": "success", "coverage": "most"}, "coverage is invalid"),
        ({"state": "success", "pipeline_id": "12.5"}, "pipeline_id is invalid"),
        ({"state": ["success"], "ref": {"branch": "main"}}, "state is invalid, ref is invalid"),
    ],
    ids=["passed", "failure", "error", "empty", "null", "missing", "coverage-not-float",
         "pipeline_id-not-integer", "array-and-hash"],
)
def test_invalid_parameters_are_400_with_grapes_body(
    gitlab: GitLabStandIn, client: httpx.Client, body: dict[str, Any], error: str
) -> None:
    response = client.post(BY_PATH, json=body)

    assert response.status_code == 400
    assert response.json() == {"error": error}  # no "message": GitLab's own spec checks that it is nil
    assert gitlab.statuses == {}
    [violation] = gitlab.violations
    assert (violation.kind, violation.path) == ("invalid-params", BY_PATH)
    with pytest.raises(AssertionError, match=rf"1 violation.*\n.*{re.escape(BY_PATH)}.*invalid-params"):
        gitlab.assert_no_violations()
    gitlab.violations.clear()


def test_parameter_errors_come_before_project_lookup(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    response = client.post(f"/api/v4/projects/999999/statuses/{SHA}", json={"state": "done"})

    assert response.status_code == 400 and response.json() == {"error": "state does not have a valid value"}
    assert [v.kind for v in gitlab.violations] == ["invalid-params"]
    gitlab.violations.clear()


@pytest.mark.parametrize(
    ("extra", "errors"),
    [
        ({"description": "x" * 256}, {"description": ["is too long (maximum is 255 characters)"]}),
        ({"ref": "r" * 256}, {"ref": ["is too long (maximum is 255 characters)"]}),
        ({"target_url": "git://example.com/build/7"}, {"target_url": ["is blocked: Only allowed schemes are http, https"]}),
        ({"target_url": "invalid url"}, {"target_url": ["is blocked: Only allowed schemes are http, https"]}),
        ({"name": "  "}, {"name": ["can't be blank"]}),
    ],
    ids=["description-256", "ref-256", "git-scheme", "not-a-url", "blank-name"],
)
def test_model_validations_are_400_with_a_message_hash(
    gitlab: GitLabStandIn, client: httpx.Client, extra: dict[str, Any], errors: dict[str, list[str]]
) -> None:
    response = client.post(BY_ID, json={"state": "pending", **extra})

    assert response.status_code == 400 and response.json() == {"message": errors}
    assert [v.kind for v in gitlab.violations] == ["invalid-attributes"] and gitlab.statuses == {}
    gitlab.violations.clear()


def test_at_the_limits_is_accepted(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    url = "https://ci.example.com/" + "u" * (255 - len("https://ci.example.com/"))
    response = client.post(BY_ID, json={"state": "success", "description": "d" * 255, "ref": "r" * 255,
                                        "target_url": url, "coverage": 0})

    assert response.status_code == 201, response.text
    assert response.json()["coverage"] == 0.0 and len(response.json()["target_url"]) == 255


def test_empty_optional_values_are_ignored_not_cleared(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    """attributes_for_keys only takes present values: null or "" cannot clear a description."""
    client.post(BY_ID, json={"state": "pending", "description": "Queued", "target_url": "https://ci.example.com/1"})
    later = client.post(BY_ID, json={"state": "running", "description": "", "target_url": None, "coverage": ""})

    assert later.status_code == 201
    assert (later.json()["description"], later.json()["target_url"]) == ("Queued", "https://ci.example.com/1")


# --------------------------------------------------------------------------- the state machine


@pytest.mark.parametrize(
    ("first", "then", "event", "current"),
    [
        ("pending", "pending", "enqueue", "pending"),
        ("running", "running", "run", "running"),
        ("running", "pending", "enqueue", "running"),
        ("running", "skipped", "skip", "running"),
    ],
    ids=["pending-again", "running-again", "running-to-pending", "running-to-skipped"],
)
def test_transitions_gitlab_refuses_are_400(
    gitlab: GitLabStandIn, client: httpx.Client, first: str, then: str, event: str, current: str
) -> None:
    created = client.post(BY_ID, json={"state": first, "name": "build", "description": "before"}).json()

    refused = client.post(BY_ID, json={"state": then, "name": "build", "description": "after"})

    assert refused.status_code == 400
    assert refused.json() == {"message": transition_error(event, current)}
    assert refused.json()["message"].startswith(f"Cannot transition status via :{event} from :{current} (Reason(s): ")
    assert gitlab.history(PROJECT_ID, SHA, "build") == [first]
    assert gitlab.jobs[created["id"]]["description"] == "before"  # nothing saved on a refusal
    assert gitlab.violations == []  # GitLab behaviour the bot must cope with, not a contract breach


def test_exact_refusal_text_from_gitlabs_specs() -> None:
    assert transition_error("run", "running") == (
        'Cannot transition status via :run from :running (Reason(s): Status cannot transition via "run")')
    assert transition_error("enqueue", "pending") == (
        'Cannot transition status via :enqueue from :pending (Reason(s): Status cannot transition via "enqueue")')


@pytest.mark.parametrize("then", ["running", "pending", "success", "failed"])
def test_a_finished_status_is_replaced_not_transitioned(
    gitlab: GitLabStandIn, client: httpx.Client, then: str
) -> None:
    """Only pending/running statuses are looked up again, so success -> running is *accepted*:
    GitLab creates a new status (new id, same pipeline) and marks the old one retried."""
    done = client.post(BY_ID, json={"state": "success", "name": "build"}).json()

    again = client.post(BY_ID, json={"state": then, "name": "build"})

    assert again.status_code == 201, again.text
    assert again.json()["id"] > done["id"] and again.json()["pipeline_id"] == done["pipeline_id"]
    assert again.json()["status"] == then
    assert gitlab.jobs[done["id"]]["retried"] is True and gitlab.jobs[again.json()["id"]]["retried"] is False
    assert gitlab.history(PROJECT_ID, SHA, "build") == ["success", then]


@pytest.mark.parametrize("then", ["running", "success", "failed", "canceled", "skipped"])
def test_pending_moves_anywhere_but_pending(gitlab: GitLabStandIn, client: httpx.Client, then: str) -> None:
    first = client.post(BY_ID, json={"state": "pending"}).json()
    moved = client.post(BY_ID, json={"state": then})

    assert moved.status_code == 201 and moved.json()["id"] == first["id"] and moved.json()["status"] == then


def test_names_and_refs_keep_separate_statuses(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    build = client.post(BY_ID, json={"state": "running", "name": "build"}).json()
    push = client.post(BY_ID, json={"state": "running", "name": "push"}).json()
    other_ref = client.post(BY_ID, json={"state": "running", "name": "build", "ref": "release"}).json()

    assert len({build["id"], push["id"], other_ref["id"]}) == 3
    assert build["pipeline_id"] == push["pipeline_id"] != other_ref["pipeline_id"]  # one pipeline per sha+ref
    assert gitlab.history(PROJECT_ID, SHA, "build") == ["running", "running"]


def test_statuses_join_an_existing_pipeline_and_take_its_ref(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    older = gitlab.create_pipeline(PROJECT_ID, SHA, "feature")
    newest = gitlab.create_pipeline(PROJECT_PATH, SHA, "feature")

    joined = client.post(BY_ID, json={"state": "pending"}).json()  # no ref: newest pipeline's
    chosen = client.post(BY_ID, json={"state": "pending", "name": "old", "pipeline_id": older}).json()
    wrong = client.post(BY_ID, json={"state": "pending", "pipeline_id": older, "ref": "main"})

    assert (joined["pipeline_id"], joined["ref"]) == (newest, "feature")
    assert (chosen["pipeline_id"], chosen["ref"]) == (older, "feature")
    assert wrong.status_code == 404
    assert wrong.json() == {"message": "404 Pipeline for pipeline_id, sha and ref Not Found"}


# --------------------------------------------------------------------------- undocumented calls


@pytest.mark.parametrize(
    ("method", "path", "status", "body"),
    [
        ("GET", BY_ID, 405, {"error": "405 Not Allowed"}),
        ("PUT", BY_PATH, 405, {"error": "405 Not Allowed"}),
        ("POST", f"/api/v4/projects/{PROJECT_ID}/statuses", 404, {"error": "404 Not Found"}),
        ("POST", f"/api/v4/projects/{PROJECT_PATH}/statuses/{SHA}", 404, {"error": "404 Not Found"}),  # unencoded
        ("GET", f"/api/v4/projects/{PROJECT_ID}/repository/commits/{SHA}/statuses", 404, {"error": "404 Not Found"}),
        ("POST", f"/projects/{PROJECT_ID}/statuses/{SHA}", 404, {"error": "404 Not Found"}),  # forgot /api/v4
    ],
    ids=["GET-status", "PUT-status", "no-sha", "unencoded-path", "list-statuses", "no-api-prefix"],
)
def test_undocumented_call_is_refused_and_recorded(
    gitlab: GitLabStandIn, client: httpx.Client, method: str, path: str, status: int, body: dict[str, str]
) -> None:
    response = client.request(method, path, json={"state": "success"})

    assert response.status_code == status and response.json() == body
    if status == 405:
        assert response.headers["allow"] == "OPTIONS, POST"
    assert [(v.kind, v.method, v.path) for v in gitlab.violations] == [("unknown-route", method, path)]
    assert gitlab.statuses == {}
    gitlab.violations.clear()


def test_undeclared_parameter_is_ignored_but_recorded(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    response = client.post(BY_ID, json={"state": "success", "target-url": "https://ci.example.com/7"})

    assert response.status_code == 201 and response.json()["target_url"] is None  # silently lost on GitLab
    [violation] = gitlab.violations
    assert (violation.kind, violation.details) == ("undocumented-param", ("target-url",))
    gitlab.violations.clear()


@pytest.mark.parametrize(
    ("content", "content_type", "status", "kind", "error"),
    [
        (b"{state: success", "application/json", 400, "invalid-json", INVALID_JSON_TEXT),
        (b"state=success", "text/plain", 415, "unsupported-media-type",
         "The provided content-type 'text/plain' is not supported."),
    ],
    ids=["broken-json", "text-plain"],
)
def test_unparseable_body_is_refused_before_authentication(
    gitlab: GitLabStandIn, client: httpx.Client, content: bytes, content_type: str, status: int, kind: str,
    error: str,
) -> None:
    response = client.post(BY_ID, content=content, headers={"content-type": content_type, "PRIVATE-TOKEN": "x"})

    assert response.status_code == status and response.json() == {"error": error}
    assert [v.kind for v in gitlab.violations] == [kind]
    gitlab.violations.clear()


# --------------------------------------------------------------------------- faults


def test_injected_502_then_success(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    fault = gitlab.server_error(502, path_regex=r"/statuses/")

    broken = client.post(BY_ID, json={"state": "success"})
    retried = client.post(BY_ID, json={"state": "success"})

    assert broken.status_code == 502 and broken.headers["content-type"].startswith("text/html")
    assert "GitLab is not responding" in broken.text  # not JSON: the bot must not assume it
    assert retried.status_code == 201 and fault.remaining == 0
    assert [(r.status, r.faulted) for r in gitlab.requests] == [(502, True), (201, False)]
    assert gitlab.requests[0].json == {"state": "success"}
    assert gitlab.statuses[(PROJECT_ID, SHA, "default")] == [retried.json()]


def test_500_is_json_and_faults_match_method_path_and_count(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    gitlab.server_error(500, method="POST", path_regex=f"^/api/v4/projects/{ENCODED}/", count=2)

    codes = [client.post(BY_PATH, json={"state": "running"}).status_code for _ in range(3)]
    by_id = client.post(BY_ID, json={"state": "success"})  # other path: not matched

    assert codes == [500, 500, 201] and by_id.status_code == 201
    assert gitlab.requests[0].response == {"message": "500 Internal Server Error"}


def test_429_with_retry_after_and_ratelimit_headers(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    gitlab.too_many_requests(retry_after=7, limit=600)

    limited = client.post(BY_ID, json={"state": "pending"})
    retried = client.post(BY_ID, json={"state": "pending"})

    assert limited.status_code == 429 and limited.text == "Retry later\n"
    assert limited.headers["content-type"].startswith("text/plain")
    assert limited.headers["retry-after"] == "7"
    assert limited.headers["ratelimit-remaining"] == "0"
    assert (limited.headers["ratelimit-limit"], limited.headers["ratelimit-observed"]) == ("600", "601")
    assert limited.headers["ratelimit-name"] == "throttle_authenticated_api"
    reset = int(limited.headers["ratelimit-reset"])  # an epoch, not a delay
    assert 0 < reset - time.time() <= 8
    assert int(parsedate_to_datetime(limited.headers["ratelimit-resettime"]).timestamp()) == reset
    assert retried.status_code == 201 and gitlab.history(PROJECT_ID, SHA) == ["pending"]


def test_409_lock_conflict(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    gitlab.conflict()

    response = client.post(BY_ID, json={"state": "pending"})

    assert response.status_code == 409
    assert response.json() == {"message": "Another update to this commit status is in progress"}


def test_ratelimit_headers_on_every_response_like_gitlab_com() -> None:
    with GitLabStandIn(tokens={TOKEN}, projects={1: "a/b"}, rate_limit=3,
                       ratelimit_headers_on_every_response=True) as standin:
        responses = [httpx.post(f"{standin.api_url}/projects/1/statuses/{SHA}", json={"state": "pending", "name": str(n)},
                                headers={"PRIVATE-TOKEN": TOKEN}) for n in range(2)]
    assert [r.headers["ratelimit-remaining"] for r in responses] == ["2", "1"]
    assert [r.headers["ratelimit-observed"] for r in responses] == ["1", "2"]
    assert int(responses[0].headers["ratelimit-reset"]) > time.time()


def test_delay_lets_the_client_time_out(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    gitlab.delay = 30  # the held request is woken and dropped by the next reset() or stop()

    with pytest.raises(httpx.ReadTimeout):
        client.post(BY_ID, json={"state": "success"}, timeout=0.1)

    assert [r.status for r in gitlab.requests] == [None]  # arrived, never answered


def test_standalone_lifecycle_and_prompt_stop() -> None:
    """start() returns a ready server on a free port; stop() ends it even with a request held."""
    standin = GitLabStandIn(tokens={TOKEN}, projects={1: "a/b"}, delay=30)
    with standin:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", standin.url)
        assert standin.api_url == standin.url + "/api/v4"
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{standin.api_url}/projects/1/statuses/{SHA}", json={"state": "pending"},
                       headers={"PRIVATE-TOKEN": TOKEN}, timeout=0.1)
        standin.delay = 0
        ok = httpx.post(f"{standin.api_url}/projects/a%2Fb/statuses/{SHA}", json={"state": "failed"},
                        headers={"PRIVATE-TOKEN": TOKEN})
        assert ok.status_code == 201
        started = time.monotonic()
    assert time.monotonic() - started < 5  # not the 30 s the held request asked for
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{standin.api_url}/projects/1/statuses/{SHA}", json={"state": "success"})
    assert standin.history(1, SHA) == ["failed"]
    standin.assert_no_violations()


def test_standin_bug_is_loud(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    """A 201 that breaks the documented entity becomes a 500 and a violation, never a quiet pass."""
    gitlab.inject("POST", "/statuses/", 201, body={"id": "not-an-integer", "status": "success"})

    response = client.post(BY_ID, json={"state": "success"})

    assert response.status_code == 500 and "id" in response.text
    assert [v.kind for v in gitlab.violations] == ["standin-bug"]
    with pytest.raises(AssertionError, match="standin-bug"):
        gitlab.assert_no_violations()
    gitlab.violations.clear()


def test_reset_restores_projects_and_settings(gitlab: GitLabStandIn, client: httpx.Client) -> None:
    gitlab.add_project(99, "extra/project")
    gitlab.tokens["glpat-temporary"] = "maintainer"
    assert client.post("/api/v4/projects/99/statuses/" + SHA, json={"state": "pending"}).status_code == 201

    gitlab.reset()

    assert 99 not in gitlab.projects and "glpat-temporary" not in gitlab.tokens
    assert gitlab.requests == gitlab.violations == [] and gitlab.statuses == gitlab.jobs == {}


# --------------------------------------------------------------------------- the description itself


def test_the_cut_is_the_official_operation() -> None:
    """A re-cut must keep what the stand-in relies on."""
    request = OPERATION["request"]
    assert OPERATION["operationId"] == "postApiV4ProjectsIdStatusesSha"
    assert request["required"] == ["state"]
    assert request["properties"]["state"]["enum"] == ["pending", "running", "success", "failed", "canceled", "skipped"]
    assert list(request["properties"]) == ["state", "ref", "target_url", "description", "name", "context",
                                           "coverage", "pipeline_id"]
    assert [p["name"] for p in OPERATION["parameters"]] == ["id", "sha"]
    assert OPERATION["security"]["access_token_header"]["name"] == "PRIVATE-TOKEN"
    assert set(OPERATION["responses"]) == {"200", "400", "401", "403", "404", "409"}  # documents 200; GitLab sends 201
    assert "$ref" not in json.dumps(OPERATION)


def test_grape_errors_follow_declaration_order() -> None:
    schema = OPERATION["request"]
    coerced, errors = grape_param_errors(schema, {"pipeline_id": "x", "coverage": "1.5", "state": 5, "extra": 1})

    assert errors == ["state does not have a valid value", "pipeline_id is invalid"]
    assert coerced == {"state": "5", "coverage": 1.5, "pipeline_id": "x"}
    assert grape_param_errors(schema, {"state": "success", "coverage": True})[1] == ["coverage is invalid"]
