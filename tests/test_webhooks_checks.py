"""The pure checks of ingress (bot.webhooks.checks, bot.repositories): what a delivery's fields
may be, the clone URL rule, the repository allowlist. No I/O, except the real
``git check-ref-format`` as the spec of the ref rules. The endpoint, the reporters and the real
processes are tested in test_webhooks_trust.py and tests/e2e/test_webhooks_trust.py.
"""

from __future__ import annotations

import subprocess

import pytest

from bot.queue import BuildRequest, CancelRef, Ignore
from bot.reporters import api_path
from bot.reporters.errors import ReportError
from bot.repositories import RepositoryPatterns
from bot.settings import web_url_for_api
from bot.webhooks import checks
from bot.webhooks.ingress import WebhookError
from tests.support import make_settings

TRAVERSAL_SHA = "../../../projects/5/members?user_id=42&access_level=50"
SHA = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"


REFS = [
    "refs/heads/main", "refs/heads/feature/x-1", "refs/tags/v1.2.3", "refs/pull/7/head",
    "refs/heads/ünïcode", "refs/heads/a.b", "refs/heads/-dash",
    "refs/heads/a..b", "refs/heads/.hidden", "refs/heads/x.lock", "refs/heads/end.", "refs/heads/",
    "refs//heads/x", "refs/heads/a b", "refs/heads/a~1", "refs/heads/a^", "refs/heads/a:b",
    "refs/heads/a?", "refs/heads/a*", "refs/heads/a[b", "refs/heads/a\\b", "refs/heads/a@{1}",
    "refs/heads/tab\there", "refs/heads/nl\nx", "refs/heads/del\x7f", "@", "main", "/refs/heads/x",
]


@pytest.mark.parametrize("ref", REFS)
def test_ref_rules_agree_with_git_check_ref_format(ref):
    """Our pure check and git's own verdict on the same name (git is the spec)."""
    git = subprocess.run(["git", "check-ref-format", ref], capture_output=True).returncode == 0
    assert (checks.ref_problem(ref) is None) is git, checks.ref_problem(ref)


def test_ref_length_is_bounded_in_bytes():
    assert checks.ref_problem("refs/heads/" + "a" * 244) is None  # 255 bytes
    assert "over the limit of 255" in checks.ref_problem("refs/heads/" + "a" * 245)
    assert "over the limit" in checks.ref_problem("refs/heads/" + "é" * 123)  # 257 bytes
    assert checks.ref_problem("refs/heads/\ud800") == "is not valid UTF-8"


@pytest.mark.parametrize("value", [SHA, "a" * 64])
def test_full_shas_pass(value):
    assert checks.sha(value, "after") == value


@pytest.mark.parametrize("value", [TRAVERSAL_SHA, SHA[:7], SHA.upper(), SHA + "0", f"{SHA}\n", "-" + SHA[1:]])
def test_anything_else_is_no_sha(value):
    with pytest.raises(WebhookError) as refused:
        checks.sha(value, "after")
    assert refused.value.status == 400 and "after is not a commit sha" in refused.value.reason


@pytest.mark.parametrize(("provider", "repo", "ok"), [
    ("github", "Codertocat/Hello-World", True), ("github", "acme/.github", True),
    ("github", "acme/app/sub", False), ("gitlab", "group/sub/app", True),
    ("gitlab", "group", False), ("gitlab", "group/../app", False), ("gitlab", "group/./app", False),
    ("github", "acme/app?x=1", False), ("github", "acme/app%2F..", False), ("github", "acme//app", False),
    ("gitlab", "/".join(["g"] * 22), False), ("github", "a/" + "b" * 101, False),
])
def test_repository_paths(provider, repo, ok):
    if ok:
        assert checks.repo_path(repo, provider, "repo") == repo
    else:
        with pytest.raises(WebhookError):
            checks.repo_path(repo, provider, "repo")


@pytest.mark.parametrize(("url", "problem"), [
    ("https://github.com/acme/app.git", None),
    ("https://github.com/Acme/App", None),
    ("--upload-pack=touch /tmp/x", "is not on https://github.com"),
    ("file:///srv/acme/app.git", "is not on https://github.com"),
    ("http://github.com/acme/app.git", "is not on https://github.com"),
    ("https://github.com:8443/acme/app.git", "is not on https://github.com"),
    ("https://github.com.attacker.example/acme/app.git", "is not on https://github.com"),
    ("https://github.com@attacker.example/acme/app.git", "is not on https://github.com"),
    ("https://github.com/other/app.git", "is not the one of acme/app"),
    ("https://github.com/acme/app.git?x=1", "is not the one of acme/app"),
    ("https://github.com/acme/app.git/../../other/app.git", "is not the one of acme/app"),
    ("https://github.com/acme/app\t.git", "is not the one of acme/app"),
    ("https://github.com/acme/app\u212a.git", "is not on https://github.com"),  # Kelvin sign: "k" lower-cased
    ("https://github.com/acme/\u212a", "is not on https://github.com"),
])
def test_clone_url_must_be_the_repositorys_own_on_the_forge(url, problem):
    found = checks.clone_url_problem(url, "https://github.com", "acme/app")
    assert (found is None) if problem is None else (problem in found), found


def test_a_forge_under_a_path_prefix():
    assert checks.clone_url_problem("https://host/gitlab/g/app.git", "https://host/gitlab", "g/app") is None
    assert checks.clone_url_problem("https://host/g/app.git", "https://host/gitlab", "g/app")


@pytest.mark.parametrize(("api", "web"), [
    ("https://api.github.com", "https://github.com"),
    ("https://ghe.acme.example/api/v3", "https://ghe.acme.example"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
])
def test_github_web_url_from_the_api_url(api, web):
    assert web_url_for_api(api) == web
    assert make_settings(github_api_url=api).github_web_url == web
    assert make_settings(github_api_url=api, github_url="https://web.example/").github_web_url == "https://web.example"


@pytest.mark.parametrize(("patterns", "forge", "repo", "served"), [
    (("**",), "gitlab", "a/b/c", True),
    (("group/*",), "gitlab", "group/app", True),
    (("group/*",), "gitlab", "group/sub/app", False),  # * is one segment: no subgroups
    (("group/**",), "gitlab", "group/sub/app", True),
    (("acme/*",), "github", "Acme/App", True),  # forges ignore case
    (("acme/*",), "github", "acme/.github", True),
    (("acme/app",), "github", "acme/app-evil", False),
    (("gitlab:acme/*",), "github", "acme/app", False),
    (("gitlab:acme/*", "github:acme/app"), "github", "acme/app", True),
])
def test_repository_allowlist(patterns, forge, repo, served):
    assert RepositoryPatterns(patterns).matches(forge, repo) is served


@pytest.mark.parametrize("bad", ["acme app", "bitbucket:acme/*", "acme/app#x", ""])
def test_bad_patterns_stop_start_up(bad):
    from bot.settings import SettingsError, load_settings

    with pytest.raises(SettingsError) as refused:
        load_settings(_env_file=None, repositories=bad)
    assert "IMAGEBOT_REPOSITORIES" in str(refused.value)


def test_admit_ignores_unserved_repositories_and_refuses_foreign_clone_urls():
    rules = checks.Rules("gitlab", "https://git.example", "IMAGEBOT_GITLAB_URL", RepositoryPatterns(("group/*",)))
    cancel = CancelRef("gitlab", "group/sub/app", "refs/heads/main", "branch deleted")
    assert checks.admit(cancel, rules) == Ignore(
        "repository group/sub/app is not one this bot serves (IMAGEBOT_REPOSITORIES)")
    request = BuildRequest(provider="gitlab", repo="group/app", clone_url="https://evil.example/group/app.git",
                           ref="refs/heads/main", sha=SHA, kind="branch", trigger="Push Hook")
    with pytest.raises(WebhookError) as refused:
        checks.admit(request, rules)
    assert refused.value.reason.endswith("the forge's URL (IMAGEBOT_GITLAB_URL)")
    good = BuildRequest(**{**request.__dict__, "clone_url": "https://git.example/group/app.git"})
    assert checks.admit(good, rules) is good


def test_api_path_refuses_dot_segments():
    assert api_path("repos", "a", "b c") == "/repos/a/b%20c"
    for bad in ("..", ".", ""):
        with pytest.raises(ReportError) as refused:
            api_path("repos", bad, "x")
        assert refused.value.kind == "invalid"

