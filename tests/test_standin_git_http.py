"""Tests for the git smart-HTTP stand-in: real ``git`` clients against real ``git http-backend``.

The pipeline will fetch exactly the build's sha with the forge token kept off every command
line; these tests pin down the client invocations that do that (and what the server sees), so
the pipeline's tests can rely on the stand-in.  Nothing sleeps to synchronise: the server is
ready when ``start()`` returns and a request's record is complete before its response ends.
"""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.standins.git_http import (
    GitHTTPServer,
    Repo,
    git_client_env,
    git_config_env,
    make_repo,
    multiarch_fixture_files,
    token_auth_env,
)

TOKEN = "ghs_StandInInstallationToken0000000000"
APP = "acme/app"

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- helpers


def git(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client git (bounded); the caller checks the outcome."""
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stderr}"
    return result


def fetch_sha(
    url: str, sha: str, work: Path, env: dict[str, str], *config: str,
) -> subprocess.CompletedProcess[str]:
    """What a CI does to build exactly one commit: init, shallow fetch by sha (not checked)."""
    ok(git("init", "--quiet", str(work), env=env))
    return git(*config, "fetch", "--quiet", "--depth", "1", url, sha, env=env, cwd=work)


def statuses(server: GitHTTPServer, repo: str = APP) -> list[tuple[str, str, int | None]]:
    return [(r.method, r.service, r.status) for r in server.requests_for(repo)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "srv"


@pytest.fixture
def app(root: Path) -> Repo:
    return make_repo(root, APP, {"README.md": "v1\n", "src/app.txt": "one\n"})


@pytest.fixture
def server(root: Path) -> Iterator[GitHTTPServer]:
    with GitHTTPServer(root) as running:
        yield running


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return git_client_env(tmp_path / "home")


# --------------------------------------------------------------------------- fetching


def test_clone_over_http(server: GitHTTPServer, app: Repo, env: dict[str, str], tmp_path: Path) -> None:
    ok(git("clone", "--quiet", server.repo_url(APP), str(tmp_path / "clone"), env=env))

    assert (tmp_path / "clone" / "README.md").read_text() == "v1\n"
    assert ok(git("rev-parse", "HEAD", env=env, cwd=tmp_path / "clone")).stdout.strip() == app.head()
    assert statuses(server)[0] == ("GET", "info/refs", 200)
    assert all(status == 200 for _, _, status in statuses(server))
    assert not any(r.auth_present for r in server.requests)


@pytest.mark.parametrize("protocol", ["2", "0"])
def test_shallow_fetch_gets_exactly_the_sha_not_the_moved_branch(
    server: GitHTTPServer, app: Repo, env: dict[str, str], tmp_path: Path, protocol: str,
) -> None:
    built = app.head()
    tip = app.commit({"README.md": "v2\n", "src/app.txt": None}, "branch moves on")
    work = tmp_path / "work"

    ok(fetch_sha(server.repo_url(APP), built, work, env, "-c", f"protocol.version={protocol}"))
    ok(git("checkout", "--quiet", "FETCH_HEAD", env=env, cwd=work))

    assert ok(git("rev-parse", "HEAD", env=env, cwd=work)).stdout.strip() == built != tip
    assert (work / "README.md").read_text() == "v1\n"
    assert (work / "src" / "app.txt").read_text() == "one\n"
    assert ok(git("rev-list", "--count", "HEAD", env=env, cwd=work)).stdout.strip() == "1"
    assert ok(git("rev-parse", "--is-shallow-repository", env=env, cwd=work)).stdout.strip() == "true"
    negotiation = [r for r in server.requests_for(APP) if r.wants]
    assert negotiation and all(r.wants == (built,) and r.deepen == 1 for r in negotiation)
    assert all(r.git_protocol == ("version=2" if protocol == "2" else None) for r in server.requests)


def test_refusing_server_rejects_an_old_sha_but_serves_the_ref(
    root: Path, app: Repo, env: dict[str, str], tmp_path: Path,
) -> None:
    """The pipeline's fallback: a forge that won't send an unadvertised sha still sends the ref."""
    built = app.head()
    tip = app.commit({"README.md": "v2\n"}, "branch moves on")
    with GitHTTPServer(root, allow_sha_in_want=False) as server:
        url = server.repo_url(APP)
        refused = fetch_sha(url, built, tmp_path / "by-sha", env)
        assert refused.returncode == 128
        assert f"Server does not allow request for unadvertised object {built}" in refused.stderr

        ok(fetch_sha(url, "refs/heads/main", tmp_path / "by-ref", env))
        fetched = ok(git("rev-parse", "FETCH_HEAD", env=env, cwd=tmp_path / "by-ref")).stdout.strip()
        assert fetched == tip
        ok(fetch_sha(url, tip, tmp_path / "tip-sha", env))  # an advertised tip sha is fine

        assert [r.wants for r in server.requests_for(APP) if r.wants][-1] == (tip,)


def test_large_negotiation_is_gzipped_and_still_served(
    server: GitHTTPServer, app: Repo, env: dict[str, str], tmp_path: Path,
) -> None:
    """git gzips upload-pack requests over 1 KiB; http-backend must get HTTP_CONTENT_ENCODING."""
    tips = {app.commit({f"f{i}.txt": f"{i}\n"}, f"c{i}", branch=f"b{i}", parent=app.head()) for i in range(30)}

    ok(git("clone", "--quiet", "--mirror", server.repo_url(APP), str(tmp_path / "mirror"), env=env))

    gzipped = [r for r in server.requests_for(APP) if r.content_encoding == "gzip"]
    assert gzipped and all(r.status == 200 for r in gzipped)
    assert tips <= set(gzipped[-1].wants)
    refs = ok(git("for-each-ref", "--format=%(objectname)", "refs/heads", env=env, cwd=tmp_path / "mirror"))
    assert tips <= set(refs.stdout.split())


def test_chunked_request_body_reaches_the_backend(server: GitHTTPServer, app: Repo) -> None:
    """git sends bodies over http.postBuffer chunked; the bridge de-chunks them for the CGI."""
    body = [b"0014command=ls-refs\n", b"0001", b"0009peel\n", b"0000"]
    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
    conn.request(
        "POST", f"/{APP}.git/git-upload-pack", body=iter(body), encode_chunked=True,
        headers={"Content-Type": "application/x-git-upload-pack-request", "Git-Protocol": "version=2"},
    )
    response = conn.getresponse()
    payload = response.read()
    conn.close()

    assert response.status == 200
    assert f"{app.head()} refs/heads/main".encode() in payload
    assert server.requests_for(APP)[-1].chunked


# --------------------------------------------------------------------------- auth


@pytest.fixture
def private(root: Path, app: Repo) -> Iterator[GitHTTPServer]:
    with GitHTTPServer(root, username="x-access-token", password=TOKEN) as running:
        yield running


def _askpass(tmp_path: Path) -> dict[str, str]:
    script = tmp_path / "askpass.sh"
    script.write_text(
        '#!/bin/sh\ncase "$1" in\n  Username*) echo x-access-token ;;\n  *) echo "$IMAGEBOT_GIT_TOKEN" ;;\nesac\n'
    )
    script.chmod(0o700)
    return {"GIT_ASKPASS": str(script), "IMAGEBOT_GIT_TOKEN": TOKEN}


def _helper(token: str) -> dict[str, str]:
    helper = (
        '!f() { test "$1" = get || exit 0; '
        'echo username=x-access-token; echo "password=$IMAGEBOT_GIT_TOKEN"; }; f'
    )
    # The empty value first drops every helper configured elsewhere (none could store the token).
    return {**git_config_env([("credential.helper", ""), ("credential.helper", helper)]),
            "IMAGEBOT_GIT_TOKEN": token}


def test_private_repo_without_credentials_fails_with_401(
    private: GitHTTPServer, app: Repo, env: dict[str, str], tmp_path: Path,
) -> None:
    result = fetch_sha(private.repo_url(APP), app.head(), tmp_path / "work", env)

    assert result.returncode == 128
    assert "terminal prompts disabled" in result.stderr  # git wanted credentials and had none
    assert [(r.status, r.auth_present) for r in private.requests] == [(401, False)]
    conn = http.client.HTTPConnection("127.0.0.1", int(private.url.rsplit(":", 1)[1]), timeout=10)
    conn.request("GET", f"/{APP}.git/info/refs?service=git-upload-pack")
    response = conn.getresponse()
    assert response.status == 401
    assert response.getheader("WWW-Authenticate") == 'Basic realm="GitHub"'
    conn.close()


@pytest.mark.parametrize("mechanism", ["extraheader", "credential-helper", "askpass"])
def test_token_from_the_environment_fetches_with_no_token_in_argv_or_url(
    private: GitHTTPServer, app: Repo, env: dict[str, str], tmp_path: Path, mechanism: str,
) -> None:
    """Three ways to hand git the token with nothing on a command line; extraheader is the one
    the pipeline should use (no 401 round trip, no script, no shell, scoped to the forge)."""
    secret_env = {
        "extraheader": lambda: token_auth_env(TOKEN, url=private.url),
        "credential-helper": lambda: _helper(TOKEN),
        "askpass": lambda: _askpass(tmp_path),
    }[mechanism]()
    url, work, sha = private.repo_url(APP), tmp_path / "work", app.head()
    init_argv = ["git", "init", "--quiet", str(work)]
    fetch_argv = ["git", "fetch", "--quiet", "--depth", "1", url, sha]

    ok(subprocess.run(init_argv, env=env, capture_output=True, text=True, timeout=30))
    fetched = subprocess.run(
        fetch_argv, cwd=work, env={**env, **secret_env}, capture_output=True, text=True, timeout=30,
    )
    ok(fetched)
    ok(git("checkout", "--quiet", "FETCH_HEAD", env=env, cwd=work))

    assert (work / "README.md").read_text() == "v1\n"
    base64_token = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    for argv in (init_argv, fetch_argv):  # what ps would show for the processes we start
        assert not any(TOKEN in arg or base64_token in arg for arg in argv)
    assert "@" not in url.split("//", 1)[1]  # no userinfo in the URL
    assert TOKEN not in (work / ".git" / "config").read_text()  # nothing persisted in the clone
    unauthorized = [r for r in private.requests if r.status == 401]
    assert len(unauthorized) == (0 if mechanism == "extraheader" else 1)  # header goes out up front
    assert {r.username for r in private.requests if r.status == 200} == {"x-access-token"}
    assert TOKEN not in repr(private.requests)  # the record never holds the password


def test_wrong_token_fails(private: GitHTTPServer, app: Repo, env: dict[str, str], tmp_path: Path) -> None:
    url, sha = private.repo_url(APP), app.head()

    via_header = fetch_sha(url, sha, tmp_path / "a", {**env, **token_auth_env("wrong", url=private.url)})
    header_requests = [(r.status, r.auth_present) for r in private.requests]
    private.reset()
    via_helper = fetch_sha(url, sha, tmp_path / "b", {**env, **_helper("wrong")})
    helper_requests = [(r.status, r.auth_present) for r in private.requests]

    # A rejected header makes git ask for credentials, which are disabled: exit 128 either way,
    # but only the helper path says "Authentication failed" (classify on exit code + both texts).
    assert via_header.returncode == 128 and "terminal prompts disabled" in via_header.stderr
    assert via_helper.returncode == 128 and "Authentication failed" in via_helper.stderr
    assert header_requests == [(401, True)]
    assert helper_requests == [(401, False), (401, True)]  # anonymous first, then the helper's answer


def test_gitlab_style_username_and_header_scoping(
    root: Path, app: Repo, env: dict[str, str], tmp_path: Path,
) -> None:
    """GitLab takes ``oauth2:<token>``; a header scoped to another URL is not sent here."""
    with GitHTTPServer(root, username="oauth2", password=TOKEN, realm="GitLab") as gitlab:
        url, sha = gitlab.repo_url(APP), app.head()
        right = token_auth_env(TOKEN, url=gitlab.url, username="oauth2")
        elsewhere = token_auth_env(TOKEN, url="http://forge.invalid", username="oauth2")

        ok(fetch_sha(url, sha, tmp_path / "right", {**env, **right}))
        assert fetch_sha(url, sha, tmp_path / "elsewhere", {**env, **elsewhere}).returncode == 128

        assert [(r.username, r.status) for r in gitlab.requests if r.auth_present][0] == ("oauth2", 200)
        assert gitlab.requests[-1].status == 401 and not gitlab.requests[-1].auth_present


# --------------------------------------------------------------------------- failures


def test_missing_repo_is_a_404(server: GitHTTPServer, app: Repo, env: dict[str, str], tmp_path: Path) -> None:
    server.set_missing(APP)
    hidden = git("clone", server.repo_url(APP), str(tmp_path / "a"), env=env)
    never = git("clone", server.repo_url("acme/nope"), str(tmp_path / "b"), env=env)

    for result in (hidden, never):
        assert result.returncode == 128
        assert "not found" in result.stderr
    assert statuses(server) == [("GET", "info/refs", 404)]
    assert statuses(server, "acme/nope") == [("GET", "info/refs", 404)]  # http-backend's own 404

    server.set_missing(APP, missing=False)
    ok(git("clone", "--quiet", server.repo_url(APP), str(tmp_path / "c"), env=env))


def test_injected_500_fails_once(server: GitHTTPServer, app: Repo, env: dict[str, str], tmp_path: Path) -> None:
    server.inject_error(500, repo=APP)

    failed = git("clone", server.repo_url(APP), str(tmp_path / "a"), env=env)
    assert failed.returncode == 128
    assert "500" in failed.stderr
    assert [(r.status, r.faulted) for r in server.requests] == [(500, True)]
    ok(git("clone", "--quiet", server.repo_url(APP), str(tmp_path / "b"), env=env))  # count=1: served again


def test_hang_is_cut_short_by_the_low_speed_limit(
    server: GitHTTPServer, app: Repo, env: dict[str, str], tmp_path: Path,
) -> None:
    server.inject_hang(60)
    slow_env = {**env, "GIT_HTTP_LOW_SPEED_LIMIT": "1", "GIT_HTTP_LOW_SPEED_TIME": "2"}

    started = time.monotonic()
    result = fetch_sha(server.repo_url(APP), app.head(), tmp_path / "work", slow_env)
    elapsed = time.monotonic() - started

    assert result.returncode == 128
    assert "Operation too slow" in result.stderr
    assert 1.5 < elapsed < 10, elapsed
    assert server.requests[0].faulted and server.requests[0].status is None  # never answered


# --------------------------------------------------------------------------- fixture repos


def test_repo_helper_refs_are_visible_over_http(
    server: GitHTTPServer, app: Repo, env: dict[str, str],
) -> None:
    first = app.head()
    second = app.commit({"README.md": "v2\n"}, "second")
    assert app.branch("release", first) == first
    assert app.tag("v1.0.0", first, message="release 1.0.0") == first
    assert app.tag("latest") == second
    feature = app.commit({"feature.txt": "x\n"}, "feature", branch="feature", parent=first)
    assert app.read(feature, "README.md") == b"v1\n"  # branched from first

    def remote_refs() -> dict[str, str]:
        listing = ok(git("ls-remote", server.repo_url(APP), env=env)).stdout.split("\n")
        return {ref: sha for sha, ref in (line.split("\t") for line in listing if line)}

    refs = remote_refs()
    assert refs["HEAD"] == refs["refs/heads/main"] == second
    assert refs["refs/heads/release"] == first and refs["refs/heads/feature"] == feature
    assert refs["refs/tags/v1.0.0^{}"] == first != refs["refs/tags/v1.0.0"]  # annotated: a tag object
    assert refs["refs/tags/latest"] == second

    assert app.delete_branch("feature") == feature
    assert app.delete_tag("v1.0.0") == first
    app.set_default_branch("release")
    refs = remote_refs()
    assert "refs/heads/feature" not in refs and "refs/tags/v1.0.0" not in refs
    assert refs["HEAD"] == first


def test_same_input_same_shas(tmp_path: Path) -> None:
    """Fixed commit dates: a failing test names the same shas on every run."""
    one = make_repo(tmp_path / "one", APP, {"a": "1\n"})
    two = make_repo(tmp_path / "two", APP, {"a": "1\n"})
    assert one.head() == two.head()
    assert one.commit({"b": b"\x00\x01"}) == two.commit({"b": b"\x00\x01"})


def test_multiarch_fixture_repo_is_fetchable(
    server: GitHTTPServer, root: Path, env: dict[str, str], tmp_path: Path,
) -> None:
    base = "127.0.0.1:5001/base/busybox:latest"
    repo = make_repo(root, "acme/multiarch", multiarch_fixture_files(base), "multi-arch fixture")
    work = tmp_path / "work"

    ok(fetch_sha(server.repo_url("acme/multiarch"), repo.head(), work, env))
    ok(git("checkout", "--quiet", "FETCH_HEAD", env=env, cwd=work))

    assert sorted(p.name for p in work.iterdir() if p.name != ".git") == ["Dockerfile", "hello.txt"]
    instructions = [line.split(" ", 1) for line in (work / "Dockerfile").read_text().splitlines() if line]
    keywords = [keyword for keyword, _ in instructions]
    assert instructions[0] == ["FROM", base]
    assert ["ARG", "TARGETARCH"] in instructions  # no default: BuildKit's automatic value must reach it
    assert keywords.index("ARG") < keywords.index("RUN")
    assert ["COPY", "hello.txt /hello.txt"] in instructions
    run = dict(instructions)["RUN"]
    assert "uname -m > /arch" in run and '"${TARGETARCH:-unknown}" > /targetarch' in run
    assert json.loads(dict(instructions)["CMD"]) == ["cat", "/arch"]
    assert (work / "hello.txt").read_text().strip()
