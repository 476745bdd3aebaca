"""What a build may do, decided up front (pure)."""

from __future__ import annotations

import pytest

from bot.models import Build, BuildKind, BuildStatus, utcnow
from bot.pipeline.config import ConfigError, parse_config
from bot.pipeline.run import make_plan
from tests.support import make_settings

SHA = "0123456789abcdef0123456789abcdef01234567"


def build(**kw) -> Build:
    values = dict(id=1, provider="github", repo="Acme/App", clone_url="https://github.com/Acme/App.git",
                  ref="refs/heads/main", sha=SHA, kind=BuildKind.branch, trigger="push", status=BuildStatus.running,
                  platforms=["linux/amd64", "linux/arm64"], created_at=utcnow(), default_branch="main")
    values.update(kw)
    return Build(**values)


def settings(**kw):
    return make_settings(registry="ghcr.io/acme-org", **kw)


def test_a_default_branch_build():
    plan = make_plan(build(), parse_config(""), settings())
    assert plan.image == "ghcr.io/acme-org/acme/app"
    assert plan.user_tags == ["main", "sha-0123456", "latest"]
    assert plan.platforms == ["linux/amd64", "linux/arm64"]
    assert plan.push and plan.trusted and plan.skip_reason is None
    assert plan.labels["org.opencontainers.image.source"] == "https://github.com/Acme/App"
    assert plan.labels["org.opencontainers.image.revision"] == SHA
    assert plan.labels["org.opencontainers.image.created"].endswith("Z")


def test_a_fork_pull_request_is_untrusted_and_never_pushes():
    plan = make_plan(build(kind=BuildKind.pull_request, ref="refs/pull/7/head", pr_number=7, fork=True),
                     parse_config(""), settings())
    assert not plan.push and not plan.trusted
    assert plan.user_tags == ["pr-7", "sha-0123456"]
    assert "fork" in plan.skip_reason


@pytest.mark.parametrize(
    ("config", "kind", "ref", "pushes"),
    [
        ("push: false\n", BuildKind.branch, "refs/heads/main", False),
        ("push: {pull_request: false}\n", BuildKind.pull_request, "refs/pull/3/head", False),
        ("push: {pull_request: false}\n", BuildKind.branch, "refs/heads/main", True),
    ],
)
def test_push_policy_from_the_repo(config, kind, ref, pushes):
    plan = make_plan(build(kind=kind, ref=ref, pr_number=3 if kind is BuildKind.pull_request else None),
                     parse_config(config), settings())
    assert plan.push is pushes and plan.trusted
    if not pushes:
        assert "push is off" in plan.skip_reason


def test_no_registry_means_build_only():
    plan = make_plan(build(), parse_config(""), make_settings())
    assert not plan.push and plan.image is None and "IMAGEBOT_REGISTRY" in plan.skip_reason


def test_no_push_flag():
    plan = make_plan(build(), parse_config(""), settings(), no_push=True)
    assert not plan.push and plan.trusted and plan.skip_reason == "--no-push was given"


def test_repo_config_overrides_platforms_image_tags_and_labels():
    config = parse_config(
        "platforms: [linux/arm/v7]\nimage: ghcr.io/other/name\ntags: ['build-{short_sha}']\n"
        "labels: {org.opencontainers.image.revision: forged, team: core}\n"
        "build_args: {MODE: prod}\nsecrets: [TOKEN]\n"
    )
    plan = make_plan(build(), config, settings(), given={"TOKEN": "s3cret", "OTHER": "x"})
    assert plan.platforms == ["linux/arm/v7"] and plan.image == "ghcr.io/other/name"
    assert plan.user_tags[-1] == "build-0123456"
    assert plan.labels["team"] == "core"
    assert plan.labels["org.opencontainers.image.revision"] == SHA  # the truth wins over the repo's
    assert plan.secrets == {"TOKEN": "s3cret"} and "s3cret" not in repr(plan)


def test_a_fork_pull_request_gets_no_build_secrets():
    fork = build(kind=BuildKind.pull_request, ref="refs/pull/7/head", pr_number=7, fork=True)
    plan = make_plan(fork, parse_config("secrets: [TOKEN]\n"), settings(), given={"TOKEN": "s3cret"})
    assert plan.secrets == {}
    # a fork asking for a secret the operator never gave is no error either: it gets none anyway
    assert make_plan(fork, parse_config("secrets: [NOPE]\n"), settings()).secrets == {}


def test_a_secret_the_operator_did_not_give_is_a_config_error_naming_what_is():
    with pytest.raises(ConfigError) as info:
        make_plan(build(), parse_config("secrets: [TOKEN, NPM]\n"), settings(), given={"NPM": "s3cret-npm"})
    assert info.value.kind == "config"
    assert str(info.value) == (".imagebot.yml: secrets: TOKEN is not among the build secrets the operator "
                               "gives to Acme/App (IMAGEBOT_BUILD_SECRETS_FILE; available: NPM)")
    assert "s3cret" not in str(info.value)
