"""Tests for the GitHub stand-in, over real HTTP on its TCP socket.

Reporter tests will trust this stand-in in place of GitHub, so it is checked against the same
api-subset.json it serves: every response seen on the wire is validated here against the
documented schema, independently of the stand-in's own self-check.  No test sleeps to
synchronise; the stand-in is ready when ``start()`` returns and state is written before a
response leaves.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from gidgethub import BadRequest, GitHubBroken, InvalidField, RateLimitExceeded
from gidgethub.apps import get_installation_access_token
from gidgethub.httpx import GitHubAPI
from jsonschema import Draft4Validator

from tests.standins.github import DEFAULT_APP_PERMISSIONS, FORMATS, GitHubStandIn, openapi_to_draft4

SPEC: dict[str, Any] = json.loads((Path(__file__).parent / "data/github/api-subset.json").read_text())
TOKEN = "ghp_StandInStaticToken000000000000000000"
APP_ID = 424242
OWNER, REPO, SHA = "octo-org", "hello-image", "6dcb09b5b57875f334f61aebed695e2e4193db5e"
STATUS_PATH = f"/repos/{OWNER}/{REPO}/statuses/{SHA}"
CHECK_RUNS_PATH = f"/repos/{OWNER}/{REPO}/check-runs"
RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "x-ratelimit-used")

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------- schema checks


def documented_schema(method: str, path: str, status: int) -> dict[str, Any] | None:
    """The response schema api-subset.json documents for this request and status, if any."""
    for key, spec in SPEC.items():
        spec_method, template = key.split(" ", 1)
        pattern = "^" + re.sub(r"\{[^}/]+\}", "[^/]+", template) + "$"
        if spec_method == method and re.match(pattern, path):
            return spec["responses"].get(str(status))
    return None


def assert_documented(method: str, path: str, status: int, body: Any) -> bool:
    """Fail if ``body`` breaks the documented schema; True when there was a schema to check."""
    schema = documented_schema(method, path, status)
    if schema is None:
        return False
    validator = Draft4Validator(openapi_to_draft4(schema), format_checker=FORMATS)
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(body)]
    assert not errors, f"{method} {path} -> {status} breaks the documented schema: {errors}"
    return True


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def app_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def running_standin(app_key: rsa.RSAPrivateKey) -> Iterator[GitHubStandIn]:
    """One server for the module: starting uvicorn is cheap, stopping it costs ~0.2 s."""
    with GitHubStandIn(tokens={TOKEN}, app_id=APP_ID, public_key=public_pem(app_key)) as standin:
        yield standin


@pytest.fixture
def github(running_standin: GitHubStandIn) -> Iterator[GitHubStandIn]:
    """A clean stand-in; afterwards every recorded response is re-checked and no violation may remain."""
    running_standin.reset()
    yield running_standin
    for record in running_standin.requests:
        if record.status is not None and not isinstance(record.response, (str, bytes)):
            assert_documented(record.method, record.path, record.status, record.response)
    running_standin.assert_no_violations()


@pytest.fixture
def wire_checked() -> list[tuple[str, str, int]]:
    """Responses that had a documented schema and passed it, as (method, path, status)."""
    return []


def _checker(checked: list[tuple[str, str, int]]) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        response.read()
        request = response.request
        if documented_schema(request.method, request.url.path, response.status_code) is None:
            return
        assert_documented(request.method, request.url.path, response.status_code, response.json())
        checked.append((request.method, request.url.path, response.status_code))
    return check


@pytest.fixture
def client(github: GitHubStandIn, wire_checked: list[tuple[str, str, int]]) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=github.url, headers={"authorization": f"token {TOKEN}"}, timeout=5,
        event_hooks={"response": [_checker(wire_checked)]},
    ) as http:
        yield http


@pytest.fixture
async def http_async(
    github: GitHubStandIn, wire_checked: list[tuple[str, str, int]]
) -> AsyncIterator[httpx.AsyncClient]:
    check = _checker(wire_checked)

    async def hook(response: httpx.Response) -> None:
        await response.aread()
        check(response)

    async with httpx.AsyncClient(timeout=5, event_hooks={"response": [hook]}) as http:
        yield http


@pytest.fixture
def gh(github: GitHubStandIn, http_async: httpx.AsyncClient) -> GitHubAPI:
    """gidgethub exactly as the reporters will use it: httpx backend, base_url = the stand-in."""
    return GitHubAPI(http_async, "imagebot-tests", oauth_token=TOKEN, base_url=github.url)


# --------------------------------------------------------------------------- statuses


def test_valid_status_is_accepted_stored_and_documented(
    github: GitHubStandIn, client: httpx.Client, wire_checked: list[tuple[str, str, int]]
) -> None:
    sent = {"state": "pending", "context": "imagebot/build", "description": "Building",
            "target_url": "https://ci.example.com/builds/7"}
    first = client.post(STATUS_PATH, json=sent)
    second = client.post(STATUS_PATH, json={"state": "success", "target_url": None})

    assert (first.status_code, second.status_code) == (201, 201)
    assert first.headers["content-type"] == "application/json; charset=utf-8"
    assert all(name in first.headers for name in (*RATE_HEADERS, "x-github-request-id"))
    assert int(second.headers["x-ratelimit-used"]) == int(first.headers["x-ratelimit-used"]) + 1
    assert int(second.headers["x-ratelimit-remaining"]) == 5000 - int(second.headers["x-ratelimit-used"])
    assert first.headers["x-github-request-id"] != second.headers["x-github-request-id"]
    body = first.json()
    assert {k: body[k] for k in sent} == sent
    assert body["url"] == f"{github.url}{STATUS_PATH}" and body["creator"]["login"] == "octocat"
    later = second.json()
    assert later["id"] > body["id"]
    assert (later["context"], later["description"], later["target_url"]) == ("default", None, None)

    assert [s["state"] for s in github.statuses[(OWNER, REPO, SHA)]] == ["pending", "success"]
    assert github.statuses[(OWNER, REPO, SHA)][0] == body
    record = github.requests[0]
    assert (record.method, record.path, record.json, record.status) == ("POST", STATUS_PATH, sent, 201)
    assert record.headers["authorization"] == "token"  # scheme kept, secret dropped
    assert TOKEN not in repr(github.requests)
    assert [r.seq for r in github.requests] == [1, 2]
    assert wire_checked == [("POST", STATUS_PATH, 201)] * 2


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"state": "passed"}, "state", "invalid"),
        ({"description": "state forgotten"}, "state", "missing_field"),
        ({"state": "success", "target_url": 7}, "target_url", "invalid"),
        ({"state": "success", "description": "x" * 141}, "description", "custom"),
    ],
    ids=["unknown-state", "missing-state", "target_url-not-string", "description-over-140"],
)
def test_invalid_status_is_422_and_recorded(
    github: GitHubStandIn, client: httpx.Client, body: dict[str, Any], field: str, code: str
) -> None:
    response = client.post(STATUS_PATH, json=body)

    assert response.status_code == 422
    error = response.json()
    assert error["message"] == "Validation Failed"
    assert error["documentation_url"].startswith("https://docs.github.com/rest/commits/statuses")
    assert [(e["field"], e["code"]) for e in error["errors"]] == [(field, code)]
    assert github.statuses == {}
    [violation] = github.violations
    assert (violation.kind, violation.path) == ("invalid-body", STATUS_PATH)
    with pytest.raises(AssertionError, match=rf"1 violation.*\n.*{STATUS_PATH}.*\n.*{field}: {code}"):
        github.assert_no_violations()
    github.violations.clear()


# --------------------------------------------------------------------------- check runs


@pytest.mark.anyio
async def test_check_run_created_then_completed_with_gidgethub(
    github: GitHubStandIn, gh: GitHubAPI, wire_checked: list[tuple[str, str, int]]
) -> None:
    repo_vars = {"owner": OWNER, "repo": REPO}
    annotation = {"path": "Dockerfile", "start_line": 3, "end_line": 3,
                  "annotation_level": "warning", "message": "pin the base image"}
    run = await gh.post("/repos/{owner}/{repo}/check-runs", url_vars=repo_vars, data={
        "name": "imagebot/build", "head_sha": SHA, "status": "in_progress", "external_id": "build-7",
        "output": {"title": "Building", "summary": "linux/amd64, linux/arm64"},
    })
    done = await gh.patch("/repos/{owner}/{repo}/check-runs/{check_run_id}",
                          url_vars={**repo_vars, "check_run_id": run["id"]}, data={
        "conclusion": "success",
        "output": {"title": "Built", "summary": "2 platforms", "annotations": [annotation]},
    })

    assert (run["status"], run["conclusion"], run["completed_at"]) == ("in_progress", None, None)
    assert run["url"] == f"{github.url}{CHECK_RUNS_PATH}/{run['id']}"
    assert run["pull_requests"] == [] and run["app"]["id"] == APP_ID and run["external_id"] == "build-7"
    assert (done["status"], done["conclusion"]) == ("completed", "success")
    datetime.fromisoformat(done["completed_at"])
    assert done["output"] | {"annotations_url": None} == {
        "title": "Built", "summary": "2 platforms", "text": None, "annotations_count": 1, "annotations_url": None,
    }
    assert done["check_suite"] == run["check_suite"] and done["started_at"] == run["started_at"]
    assert github.check_runs[run["id"]] == done
    assert [h["status"] for h in github.check_run_history[run["id"]]] == ["in_progress", "completed"]
    assert github.annotations[run["id"]] == [annotation]
    assert [s for _, _, s in wire_checked] == [201, 200]


def test_check_run_limits_are_schema_encoded() -> None:
    """The stand-in relies on the schema for these limits; a re-cut without them must fail here."""
    for key in ("POST /repos/{owner}/{repo}/check-runs", "PATCH /repos/{owner}/{repo}/check-runs/{check_run_id}"):
        output = SPEC[key]["request"]["properties"]["output"]["properties"]
        assert output["summary"]["maxLength"] == output["text"]["maxLength"] == 65535
        assert output["annotations"]["maxItems"] == 50


def _annotations(count: int) -> list[dict[str, Any]]:
    return [{"path": "Dockerfile", "start_line": n, "end_line": n, "annotation_level": "notice",
             "message": f"note {n}"} for n in range(1, count + 1)]


@pytest.mark.parametrize(
    ("method", "body", "field"),
    [
        ("POST", {"output": {"title": "t", "summary": "s" * 65536}}, "output.summary"),
        ("PATCH", {"output": {"title": "t", "summary": "s", "text": "t" * 65536}}, "output.text"),
        ("PATCH", {"output": {"title": "t", "summary": "s", "annotations": _annotations(51)}}, "output.annotations"),
        ("POST", {"status": "completed"}, "conclusion"),
        ("PATCH", {"status": "completed"}, ""),  # the schema's anyOf: completed needs a conclusion
        ("PATCH", {"conclusion": "stale"}, "conclusion"),
        ("PATCH", {"output": {"summary": "title forgotten"}}, "output.title"),
        ("PATCH", {"status": "waiting"}, ""),  # in the enum, but only GitHub Actions may set it
        ("POST", {"started_at": "yesterday"}, "started_at"),
    ],
    ids=["summary-65536", "text-65536", "51-annotations", "create-completed-no-conclusion",
         "update-completed-no-conclusion", "conclusion-stale", "update-output-no-title",
         "status-waiting", "started_at-not-date-time"],
)
def test_check_run_breaking_documented_rules_is_422(
    github: GitHubStandIn, client: httpx.Client, method: str, body: dict[str, Any], field: str
) -> None:
    created = client.post(CHECK_RUNS_PATH, json={"name": "build", "head_sha": SHA}).json()
    url = CHECK_RUNS_PATH if method == "POST" else f"{CHECK_RUNS_PATH}/{created['id']}"
    base = {"name": "build", "head_sha": SHA} if method == "POST" else {}

    response = client.request(method, url, json=base | body)

    assert response.status_code == 422, response.text
    assert field in [e["field"] for e in response.json()["errors"]]
    assert list(github.check_runs) == [created["id"]] and len(github.check_run_history[created["id"]]) == 1
    assert [v.kind for v in github.violations] == ["invalid-body"]
    github.violations.clear()


def test_check_run_at_the_limits_is_accepted(github: GitHubStandIn, client: httpx.Client) -> None:
    body = {"name": "build", "head_sha": SHA,
            "output": {"title": "t", "summary": "s" * 65535, "text": "t" * 65535, "annotations": _annotations(50)}}
    created = client.post(CHECK_RUNS_PATH, json=body)
    more = client.patch(f"{CHECK_RUNS_PATH}/{created.json()['id']}",
                        json={"output": {"title": "t", "summary": "s", "annotations": _annotations(50)}})

    assert (created.status_code, more.status_code) == (201, 200)
    assert more.json()["output"]["annotations_count"] == 100  # updates append annotations


def test_check_runs_of_a_commit_are_listed_filtered_and_paged(
    github: GitHubStandIn, client: httpx.Client, wire_checked: list[tuple[str, str, int]]
) -> None:
    made = [client.post(CHECK_RUNS_PATH, json={"name": name, "head_sha": sha, "external_id": str(n)}).json()
            for n, (name, sha) in enumerate([("build", SHA), ("lint", SHA), ("build", SHA), ("build", SHA),
                                             ("build", "0" * 40)])]
    client.patch(f"{CHECK_RUNS_PATH}/{made[2]['id']}", json={"conclusion": "success"})
    path = f"/repos/{OWNER}/{REPO}/commits/{SHA}/check-runs"

    def ids(**query: Any) -> list[int]:
        response = client.get(path, params=query)
        assert response.status_code == 200 and response.json()["total_count"] >= len(response.json()["check_runs"])
        return [run["id"] for run in response.json()["check_runs"]]

    newest_first = [made[3]["id"], made[2]["id"], made[0]["id"]]
    assert ids() == [made[3]["id"], made[1]["id"]]  # filter=latest: the newest of each name
    assert ids(check_name="build", filter="all") == newest_first
    assert ids(check_name="build", filter="all", status="completed") == [made[2]["id"]]
    assert ids(filter="all", app_id=APP_ID + 1) == []
    first = client.get(path, params={"check_name": "build", "filter": "all", "per_page": 2})
    assert [r["id"] for r in first.json()["check_runs"]] == newest_first[:2] and first.json()["total_count"] == 3
    links = dict((rel, url) for url, rel in re.findall(r'<([^>]+)>; rel="(\w+)"', first.headers["link"]))
    assert set(links) == {"next", "last"} and links["next"] == links["last"]
    second = client.get(links["next"])
    assert [r["id"] for r in second.json()["check_runs"]] == newest_first[2:]
    assert ("GET", path, 200) in wire_checked


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ({"filter": "newest"}, "filter: 'newest' is not one of ['latest', 'all']"),
        ({"checkname": "build"}, "checkname: not a documented parameter of checks/list-for-ref"),
        ({"per_page": "many"}, "per_page: 'many' is not of type 'integer'"),
    ],
)
def test_undocumented_list_query_is_422_and_recorded(
    github: GitHubStandIn, client: httpx.Client, query: dict[str, str], problem: str
) -> None:
    response = client.get(f"/repos/{OWNER}/{REPO}/commits/{SHA}/check-runs", params=query)
    assert response.status_code == 422 and problem in response.json()["message"]
    (violation,) = github.violations
    assert violation.kind == "invalid-query" and violation.details == (problem,)
    github.violations.clear()


def test_listing_needs_read_permission_only(
    github: GitHubStandIn, client: httpx.Client, app_key: rsa.RSAPrivateKey
) -> None:
    reader = client.post("/app/installations/77/access_tokens", json={"permissions": {"checks": "read"}},
                         headers={"authorization": f"Bearer {app_jwt(app_key)}"}).json()["token"]
    as_reader = {"authorization": f"token {reader}"}
    listed = client.get(f"/repos/{OWNER}/{REPO}/commits/{SHA}/check-runs", headers=as_reader)
    created = client.post(CHECK_RUNS_PATH, json={"name": "build", "head_sha": SHA}, headers=as_reader)
    assert listed.status_code == 200 and listed.json() == {"total_count": 0, "check_runs": []}
    assert created.status_code == 403


def test_a_lost_answer_still_takes_effect(github: GitHubStandIn, client: httpx.Client) -> None:
    github.lost_answer(502, method="POST", path_regex="/check-runs$")
    response = client.post(CHECK_RUNS_PATH, json={"name": "build", "head_sha": SHA, "external_id": "9"})
    assert response.status_code == 502 and response.json() == {"message": "Server Error"}
    (run,) = github.check_runs.values()
    assert run["external_id"] == "9" and github.requests[-1].faulted


# --------------------------------------------------------------------------- undocumented calls


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("GET", STATUS_PATH, "unknown-route"),
        ("POST", f"/repos/{OWNER}/{REPO}/statuses", "unknown-route"),
        ("GET", f"/repos/{OWNER}/{REPO}/commits/{SHA}/status", "unknown-route"),
        ("PATCH", f"{CHECK_RUNS_PATH}/12345", "unknown-check-run"),
    ],
    ids=["GET-status", "POST-statuses-without-sha", "GET-combined-status", "PATCH-unknown-check-run"],
)
def test_undocumented_call_is_404_and_recorded(
    github: GitHubStandIn, client: httpx.Client, method: str, path: str, kind: str
) -> None:
    response = client.request(method, path, json={"state": "success"})

    assert response.status_code == 404 and response.json()["message"] == "Not Found"
    assert [(v.kind, v.method, v.path) for v in github.violations] == [(kind, method, path)]
    github.violations.clear()


def test_unparseable_body_is_400_and_recorded(github: GitHubStandIn, client: httpx.Client) -> None:
    response = client.post(STATUS_PATH, content=b"{state: success")

    assert response.status_code == 400 and response.json()["message"] == "Problems parsing JSON"
    assert [v.kind for v in github.violations] == ["invalid-json"]
    github.violations.clear()


# --------------------------------------------------------------------------- faults


@pytest.mark.anyio
async def test_injected_502_then_success(github: GitHubStandIn, gh: GitHubAPI) -> None:
    fault = github.server_error(502, path_regex=r"/statuses/")

    with pytest.raises(GitHubBroken):
        await gh.post(STATUS_PATH, data={"state": "success"})
    status = await gh.post(STATUS_PATH, data={"state": "success"})

    assert fault.remaining == 0
    assert [(r.status, r.faulted) for r in github.requests] == [(502, True), (201, False)]
    assert github.requests[0].json == {"state": "success"}
    assert github.statuses[(OWNER, REPO, SHA)] == [status]


def test_faults_match_method_and_count(github: GitHubStandIn, client: httpx.Client) -> None:
    github.inject("PATCH", r"/check-runs/\d+$", 500, count=2, body="<html>unicorn</html>")
    created = client.post(CHECK_RUNS_PATH, json={"name": "build", "head_sha": SHA})  # POST: not matched
    url = f"{CHECK_RUNS_PATH}/{created.json()['id']}"

    codes = [client.patch(url, json={"status": "in_progress"}).status_code for _ in range(3)]

    assert created.status_code == 201 and codes == [500, 500, 200]
    assert github.requests[1].response == "<html>unicorn</html>"


@pytest.mark.anyio
async def test_secondary_rate_limit(github: GitHubStandIn, gh: GitHubAPI, client: httpx.Client) -> None:
    github.secondary_rate_limit(retry_after=7, count=2)

    response = client.post(STATUS_PATH, json={"state": "success"})
    with pytest.raises(BadRequest) as raised:
        await gh.post(STATUS_PATH, data={"state": "success"})

    assert response.status_code == 403 and response.headers["retry-after"] == "7"
    assert int(response.headers["x-ratelimit-remaining"]) > 0  # quota left: it is the *secondary* limit
    assert response.json()["message"].startswith("You have exceeded a secondary rate limit")
    assert "secondary-rate-limits" in response.json()["documentation_url"]
    assert not isinstance(raised.value, RateLimitExceeded) and raised.value.headers["retry-after"] == "7"
    assert github.statuses == {}


@pytest.mark.anyio
@pytest.mark.parametrize("status", [403, 429])
async def test_primary_rate_limit(github: GitHubStandIn, gh: GitHubAPI, client: httpx.Client, status: int) -> None:
    github.rate_limited(reset_in=30, status=status, count=2)

    response = client.post(STATUS_PATH, json={"state": "success"})
    with pytest.raises(RateLimitExceeded if status == 403 else BadRequest) as raised:
        await gh.post(STATUS_PATH, data={"state": "success"})

    assert response.status_code == status
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert 0 < int(response.headers["x-ratelimit-reset"]) - time.time() <= 31
    if status == 403:  # gidgethub only decodes the 403 form as RateLimitExceeded
        assert raised.value.rate_limit.remaining == 0


def test_too_many_requests(github: GitHubStandIn, client: httpx.Client) -> None:
    github.too_many_requests(retry_after=3, method="POST", path_regex="/check-runs$")

    limited = client.post(CHECK_RUNS_PATH, json={"name": "build", "head_sha": SHA})
    retried = client.post(CHECK_RUNS_PATH, json={"name": "build", "head_sha": SHA})

    assert (limited.status_code, limited.headers["retry-after"], retried.status_code) == (429, "3", 201)
    assert len(github.check_runs) == 1


def test_delay_lets_the_client_time_out(github: GitHubStandIn, client: httpx.Client) -> None:
    github.delay = 30  # the held request is woken and dropped by the next reset() or stop()

    with pytest.raises(httpx.ReadTimeout):
        client.post(STATUS_PATH, json={"state": "success"}, timeout=0.1)

    assert [r.status for r in github.requests] == [None]  # arrived, never answered


def test_standalone_lifecycle_and_prompt_stop(app_key: rsa.RSAPrivateKey) -> None:
    """start() returns a ready server on a free port; stop() ends it even with a request held."""
    standin = GitHubStandIn(tokens={TOKEN}, delay=30)
    with standin:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", standin.url)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{standin.url}{STATUS_PATH}", json={"state": "success"},
                       headers={"authorization": f"token {TOKEN}"}, timeout=0.1)
        standin.delay = 0
        ok = httpx.post(f"{standin.url}{STATUS_PATH}", json={"state": "failure"},
                        headers={"authorization": f"token {TOKEN}"})
        assert ok.status_code == 201
        started = time.monotonic()
    assert time.monotonic() - started < 5  # not the 30 s the held request asked for
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{standin.url}{STATUS_PATH}", json={"state": "success"})
    assert [s["state"] for s in standin.statuses[(OWNER, REPO, SHA)]][-1] == "failure"
    standin.assert_no_violations()


def test_standin_bug_is_loud(github: GitHubStandIn, client: httpx.Client) -> None:
    """A reply that breaks its documented schema becomes a 500 and a violation, never a quiet pass."""
    github.inject("POST", "/access_tokens$", 422, body={"errors": "no message, no documentation_url"})

    response = httpx.post(f"{github.url}/app/installations/1/access_tokens")

    assert response.status_code == 500 and "documentation_url" in response.text
    assert [v.kind for v in github.violations] == ["standin-bug"]
    with pytest.raises(AssertionError, match="standin-bug"):
        github.assert_no_violations()
    github.violations.clear()


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        ("token ghp_wrong", "Bad credentials"),
        (f"Bearer {TOKEN}x", "Bad credentials"),
        (f"basic {TOKEN}", "Requires authentication"),
        (None, "Requires authentication"),
    ],
    ids=["wrong-token", "wrong-bearer", "unknown-scheme", "missing"],
)
def test_bad_credentials_are_401(
    github: GitHubStandIn, client: httpx.Client, authorization: str | None, message: str
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    client.headers.pop("authorization")

    response = client.post(STATUS_PATH, json={"state": "success"}, headers=headers)
    accepted = client.post(STATUS_PATH, json={"state": "success"}, headers={"authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 401 and response.json()["message"] == message
    assert accepted.status_code == 201 and len(github.statuses[(OWNER, REPO, SHA)]) == 1
    assert github.violations == []  # a refused token is the bot's problem to handle, not a contract breach


def app_jwt(key: rsa.RSAPrivateKey, *, iss: int | str = str(APP_ID), iat: float | None = None,
            lifetime: int = 540) -> str:
    """An App JWT; signed at the JWS layer because PyJWT's encode() refuses an integer ``iss``."""
    issued = int(time.time()) - 30 if iat is None else int(iat)
    claims = json.dumps({"iat": issued, "exp": issued + lifetime, "iss": iss}).encode()
    return jwt.PyJWS().encode(claims, key, algorithm="RS256", headers={"typ": "JWT"})


@pytest.mark.anyio
async def test_app_jwt_flow_issues_a_working_token(
    github: GitHubStandIn, http_async: httpx.AsyncClient, app_key: rsa.RSAPrivateKey,
    wire_checked: list[tuple[str, str, int]],
) -> None:
    app = GitHubAPI(http_async, "imagebot-tests", base_url=github.url)
    issued = await get_installation_access_token(
        app, installation_id="77", app_id=str(APP_ID), private_key=private_pem(app_key)
    )
    installation = GitHubAPI(http_async, "imagebot-tests", oauth_token=issued["token"], base_url=github.url)
    status = await installation.post(STATUS_PATH, data={"state": "success"})

    assert re.fullmatch(r"ghs_[A-Za-z0-9]{36}", issued["token"])
    expires = datetime.fromisoformat(issued["expires_at"]).timestamp()
    assert 3590 < expires - time.time() <= 3600
    assert issued["permissions"] == DEFAULT_APP_PERMISSIONS and issued["repository_selection"] == "all"
    assert github.installation_tokens[issued["token"]].installation_id == 77
    assert github.requests[0].headers["authorization"] == "bearer"
    assert status["creator"]["login"] == "imagebot[bot]" and status["creator"]["type"] == "Bot"
    assert ("POST", "/app/installations/77/access_tokens", 201) in wire_checked


@pytest.mark.parametrize(
    ("make_jwt", "message"),
    [
        (lambda key: app_jwt(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "could not be decoded"),
        (lambda key: app_jwt(key, iss=str(APP_ID + 1)), "Issuer"),
        (lambda key: app_jwt(key, lifetime=700), "too far in the future"),
        (lambda key: app_jwt(key, iat=time.time() - 1200), "Expiration time"),
        (lambda key: app_jwt(key, iat=time.time() + 300), "Issued at"),
        (lambda key: jwt.encode({"iat": int(time.time()), "exp": int(time.time()) + 60, "iss": str(APP_ID)},
                                "an-hmac-secret-that-is-32-bytes-long", algorithm="HS256"), "could not be decoded"),
    ],
    ids=["wrong-key", "wrong-app", "lifetime-over-600s", "expired", "issued-in-future", "hs256"],
)
def test_bad_app_jwt_is_401(
    github: GitHubStandIn, client: httpx.Client, app_key: rsa.RSAPrivateKey,
    make_jwt: Any, message: str, wire_checked: list[tuple[str, str, int]],
) -> None:
    response = client.post("/app/installations/77/access_tokens",
                           headers={"authorization": f"Bearer {make_jwt(app_key)}"})

    assert response.status_code == 401 and message in response.json()["message"]
    assert github.installation_tokens == {}
    assert wire_checked == [("POST", "/app/installations/77/access_tokens", 401)]


@pytest.mark.parametrize("iss", [APP_ID, "client-id"], ids=["integer-app-id", "client-id"])
def test_other_iss_forms_and_requested_permissions(
    github: GitHubStandIn, client: httpx.Client, app_key: rsa.RSAPrivateKey, iss: int | str
) -> None:
    iss = github.client_id if iss == "client-id" else iss
    app_auth = {"authorization": f"Bearer {app_jwt(app_key, iss=iss)}"}
    narrow = client.post("/app/installations/77/access_tokens", headers=app_auth,
                         json={"repositories": [REPO], "permissions": {"statuses": "write"}})
    too_wide = client.post("/app/installations/77/access_tokens", headers=app_auth,
                           json={"permissions": {"administration": "write"}})
    check_run = client.post(CHECK_RUNS_PATH, json={"name": "build", "head_sha": SHA},
                            headers={"authorization": f"token {narrow.json()['token']}"})

    assert narrow.status_code == 201 and narrow.json()["repository_selection"] == "selected"
    assert too_wide.status_code == 422
    assert check_run.status_code == 403 and check_run.json()["message"] == "Resource not accessible by integration"
    assert [v.kind for v in github.violations] == ["invalid-body"]  # asking for more than the App has
    github.violations.clear()


@pytest.mark.parametrize("how", ["ttl-zero", "expire_tokens"])
def test_expired_installation_token_is_401(
    github: GitHubStandIn, client: httpx.Client, app_key: rsa.RSAPrivateKey, how: str
) -> None:
    if how == "ttl-zero":
        github.token_ttl_seconds = 0
    issued = client.post("/app/installations/77/access_tokens",
                         headers={"authorization": f"Bearer {app_jwt(app_key)}"}).json()
    if how == "expire_tokens":
        github.expire_tokens()

    response = client.post(STATUS_PATH, json={"state": "success"},
                           headers={"authorization": f"token {issued['token']}"})

    assert response.status_code == 401 and response.json()["message"] == "Bad credentials"
    assert github.statuses == {}


# --------------------------------------------------------------------------- schema translation


def test_nullable_becomes_json_schema_null() -> None:
    """OpenAPI's ``nullable`` means nothing to draft 4; the translation must make null valid there only."""
    schema = openapi_to_draft4({
        "type": "object",
        "properties": {
            "conclusion": {"type": "string", "nullable": True, "enum": ["success", "failure"]},
            "name": {"type": "string"},
        },
    })
    validator = Draft4Validator(schema)

    assert validator.is_valid({"conclusion": None, "name": "x"})
    assert not validator.is_valid({"conclusion": "stale"})
    assert not validator.is_valid({"name": None})
    raw = SPEC["POST /repos/{owner}/{repo}/statuses/{sha}"]["request"]
    assert not Draft4Validator(raw).is_valid({"state": "success", "target_url": None})  # why the translation exists
