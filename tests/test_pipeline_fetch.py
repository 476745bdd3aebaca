"""Fetching exactly one commit over real smart HTTP, with the token kept out of sight."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import SecretStr

from bot.pipeline.fetch import FetchError, classify, fetch, git_env, masker
from tests.standins.git_http import GitHTTPServer, make_repo

TOKEN = "ghs_fetch-test-token-123"


@pytest.fixture
def forge(tmp_path: Path):
    repo = make_repo(tmp_path / "srv", "acme/app", {"README.md": "v1\n"})
    old = repo.head()
    new = repo.commit({"README.md": "v2\n"}, "second")
    with GitHTTPServer(tmp_path / "srv", username="x-access-token", password=TOKEN) as server:
        yield server, repo, old, new


def run_fetch(server, sha, dest, token=TOKEN, ref="refs/heads/main", **kw):
    logged: list[str] = []

    async def log(lines):
        logged.extend(lines)

    checkout = asyncio.run(fetch(server.repo_url("acme/app"), sha, ref, dest,
                                 token=SecretStr(token) if token else None, log=log, **kw))
    return checkout, logged


def test_fetches_exactly_the_sha_not_the_tip(forge, tmp_path):
    server, repo, old, new = forge
    checkout, _ = run_fetch(server, old, tmp_path / "w")
    assert (checkout.path / "README.md").read_text() == "v1\n"
    assert checkout.method == "sha" and checkout.sha == old
    fetches = [r for r in server.requests_for("acme/app") if r.service == "git-upload-pack" and r.method == "POST"]
    assert any(r.wants == (old,) for r in fetches)
    assert all(r.auth_present and r.username == "x-access-token" for r in server.requests_for("acme/app"))


def test_token_is_nowhere_on_disk_or_in_the_log(forge, tmp_path):
    server, _, old, _ = forge
    checkout, logged = run_fetch(server, old, tmp_path / "w")
    for path in (checkout.path / ".git").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in "\n".join(logged)


def test_server_refusing_unadvertised_sha_falls_back_to_the_ref(tmp_path):
    repo = make_repo(tmp_path / "srv", "acme/app", {"README.md": "v1\n"})
    old = repo.head()
    repo.commit({"README.md": "v2\n"}, "second")
    with GitHTTPServer(tmp_path / "srv", allow_sha_in_want=False) as server:
        checkout, _ = run_fetch(server, old, tmp_path / "w", token=None)
    assert checkout.method == "ref" and (checkout.path / "README.md").read_text() == "v1\n"


def test_a_sha_that_is_not_there(forge, tmp_path):
    server, *_ = forge
    with pytest.raises(FetchError) as exc:
        run_fetch(server, "0" * 40, tmp_path / "w")
    assert exc.value.kind == "sha_not_found"
    assert f"commit {'0' * 40} is not in refs/heads/main" in exc.value.message


def test_missing_repository(forge, tmp_path):
    server, *_ = forge
    server.set_missing("acme/app")
    with pytest.raises(FetchError) as exc:
        run_fetch(server, "1" * 40, tmp_path / "w")
    assert exc.value.kind == "not_found" and "was not found" in exc.value.message


@pytest.mark.parametrize("token", ["wrong-token", None])
def test_bad_or_no_credentials(forge, tmp_path, token):
    server, _, old, _ = forge
    with pytest.raises(FetchError) as exc:
        run_fetch(server, old, tmp_path / "w", token=token)
    assert exc.value.kind == "auth"
    assert "wrong-token" not in exc.value.message and TOKEN not in exc.value.message


def test_a_hanging_server_times_out(forge, tmp_path):
    server, _, old, _ = forge
    server.inject_hang(60, repo="acme/app", count=None)
    with pytest.raises(FetchError) as exc:
        run_fetch(server, old, tmp_path / "w", timeout=2)
    assert exc.value.kind == "timeout" and "took longer than 2s" in exc.value.message


def test_server_error(forge, tmp_path):
    server, _, old, _ = forge
    server.inject_error(500, repo="acme/app", count=None)
    with pytest.raises(FetchError) as exc:
        run_fetch(server, old, tmp_path / "w")
    assert exc.value.kind in ("failed", "network")
    assert "500" in exc.value.message


def test_not_a_sha():
    with pytest.raises(FetchError, match="not a full commit sha"):
        asyncio.run(fetch("http://x/y.git", "main", "refs/heads/main", Path("/nonexistent/w")))


def test_environment_isolates_git_and_scopes_the_header():
    env = git_env("https://github.com/acme/app.git", SecretStr("t0k"), "x-access-token", Path("/tmp"))
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["GIT_CONFIG_NOSYSTEM"] == "1"
    keys = [env[f"GIT_CONFIG_KEY_{n}"] for n in range(int(env["GIT_CONFIG_COUNT"]))]
    assert "http.https://github.com/.extraHeader" in keys
    assert "t0k" not in " ".join(env.values())  # only its Basic encoding travels


@pytest.mark.parametrize(
    ("stderr", "kind"),
    [
        ("fatal: Authentication failed for 'https://x/'", "auth"),
        ("fatal: could not read Username for 'http://x': terminal prompts disabled", "auth"),
        ("fatal: repository 'https://x/' not found", "not_found"),
        ("fatal: remote error: upload-pack: not our ref 0123", "sha_not_found"),
        ("fatal: Server does not allow request for unadvertised object 0123", "sha_not_found"),
        ("fatal: couldn't find remote ref refs/heads/gone", "sha_not_found"),
        ("error: RPC failed; curl 28 Operation too slow", "timeout"),
        ("fatal: unable to access 'https://x/': Failed to connect to x port 443: Connection refused", "network"),
        ("fatal: the remote end hung up unexpectedly\nfatal: early EOF", "network"),
        ("something else entirely", "failed"),
        ("fatal: unable to access 'http://x/': The requested URL returned error: 403", "auth"),
        ("fatal: unable to access 'http://x/': The requested URL returned error: 404", "not_found"),
        # a port is no HTTP status (this once made a missing repository look like an auth failure)
        ("remote: Repository not found.\nfatal: repository 'http://127.0.0.1:33401/a.git/' not found", "not_found"),
        ("fatal: unable to access 'http://127.0.0.1:40403/a.git/': Failed to connect: Connection refused", "network"),
    ],
)
def test_classify(stderr, kind):
    assert classify(stderr) == kind


def test_masker_blanks_raw_and_encoded_token():
    import base64

    mask = masker(SecretStr("s3cr3t"), "oauth2").mask
    encoded = base64.b64encode(b"oauth2:s3cr3t").decode()
    assert mask(f"token s3cr3t and {encoded}") == "token *** and ***"


# -- clone URLs are data, never options or other transports (issue 12) ---------------------------


def test_a_clone_url_that_is_a_git_option_runs_nothing(forge, tmp_path):
    """``git fetch --upload-pack=<cmd> <sha>`` runs <cmd>: the URL must never read as an option."""
    _, _, old, _ = forge
    marker = tmp_path / "pwned"
    with pytest.raises(FetchError) as failed:
        asyncio.run(fetch(f"--upload-pack=touch {marker}", old, "refs/heads/main", tmp_path / "w"))
    assert "is not allowed" in failed.value.message
    assert not marker.exists()


@pytest.mark.parametrize("form", ["file://{path}", "{path}", "ext::sh -c touch% {marker}"])
def test_local_and_ext_transports_are_refused(forge, tmp_path, form):
    """A bare path or ``file://`` reads the host's repositories; ``ext::`` runs a command."""
    _, repo, old, _ = forge
    marker = tmp_path / "pwned"
    url = form.format(path=tmp_path / "srv" / "acme" / "app.git", marker=marker)
    with pytest.raises(FetchError) as failed:
        asyncio.run(fetch(url, old, "refs/heads/main", tmp_path / "w"))
    assert "git may use https, http (IMAGEBOT_GIT_PROTOCOLS)" in failed.value.message
    assert not (tmp_path / "w" / "README.md").exists() and not marker.exists()


def test_git_itself_allows_only_the_configured_transports(forge, tmp_path):
    """The second wall, for callers that skip the check (the Kubernetes pod gets this env too):
    git refuses a transport outside GIT_ALLOW_PROTOCOL, even for a URL it is handed."""
    import subprocess

    bare = tmp_path / "srv" / "acme" / "app.git"
    env = git_env(f"file://{bare}", None, "x-access-token", tmp_path)
    listed = subprocess.run(["git", "ls-remote", "--", f"file://{bare}"], env=env, capture_output=True, text=True)
    assert listed.returncode != 0 and "transport 'file' not allowed" in listed.stderr
    allowed = git_env(f"file://{bare}", None, "x-access-token", tmp_path, protocols=("file",))
    assert subprocess.run(["git", "ls-remote", "--", f"file://{bare}"], env=allowed,
                          capture_output=True).returncode == 0
