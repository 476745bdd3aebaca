"""What a build may do, decided up front (pure)."""

from __future__ import annotations

import pytest

from bot.models import Build, BuildKind, BuildStatus, utcnow
from bot.pipeline.config import ConfigError, parse_config
from bot.pipeline.run import make_plan
from bot.pipeline.tags import TagError
from tests.support import make_settings

SHA = "0123456789abcdef0123456789abcdef01234567"


def build(**kw) -> Build:
    values = dict(id=1, provider="github", repo="Acme/App", clone_url="https://github.com/Acme/App.git",
                  ref="refs/heads/main", sha=SHA, kind=BuildKind.branch, trigger="push", status=BuildStatus.running,
                  platforms=["linux/amd64", "linux/arm64"], created_at=utcnow(), default_branch="main")
    values.update(kw)
    return Build(**values)


def settings(**kw):
    return make_settings(**{"registry": "ghcr.io/acme-org", **kw})


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
    assert plan.user_tags == ["pr-7"]
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
        "platforms: [linux/arm/v7]\nimage: ghcr.io/acme-org/acme/app/name\ntags: ['build-{short_sha}']\n"
        "labels: {org.opencontainers.image.revision: forged, team: core}\n"
        "build_args: {MODE: prod}\nsecrets: [TOKEN]\n"
    )
    plan = make_plan(build(), config, settings(), given={"TOKEN": "s3cret", "OTHER": "x"})
    assert plan.platforms == ["linux/arm/v7"] and plan.image == "ghcr.io/acme-org/acme/app/name"
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


# -- where images may go: the operator's decision ------------------------------------------------


def refused(config: str, **kw) -> str:
    with pytest.raises(TagError) as info:
        make_plan(build(**kw.pop("build", {})), parse_config(config), settings(**kw))
    assert info.value.kind == "config"
    return str(info.value)


@pytest.mark.parametrize("image", ["evil.example.com/x/y", "ghcr.io/other/name", "ghcr.io/acme-org/acme/ap",
                                   "ghcr.io/acme-org/acme/app2", "otherteam/app", "acme/appx/y"])
def test_an_image_outside_the_policy_is_a_config_error_naming_what_is_allowed(image):
    message = refused(f"image: {image}\n")
    assert "ghcr.io/acme-org/acme/app or a name below it" in message and "IMAGEBOT_IMAGE_POLICY" in message


@pytest.mark.parametrize(("image", "expected"), [
    ("acme/app", "ghcr.io/acme-org/acme/app"),
    ("acme/app/api", "ghcr.io/acme-org/acme/app/api"),
    ("ghcr.io/acme-org/acme/app/tools/cli", "ghcr.io/acme-org/acme/app/tools/cli"),
])
def test_the_default_image_and_names_below_it_are_allowed(image, expected):
    assert make_plan(build(), parse_config(f"image: {image}\n"), settings()).image == expected


def test_the_operator_policy_widens_by_repository_glob_at_a_slash_boundary():
    policy = {"acme/*": ["ghcr.io/shared/acme"], "gitlab:acme/*": ["ghcr.io/gl-only"]}
    plan = make_plan(build(), parse_config("image: ghcr.io/shared/acme/web\n"), settings(image_policy=policy))
    assert plan.image == "ghcr.io/shared/acme/web"
    assert "ghcr.io/shared/acme or a name below it" in refused("image: ghcr.io/shared/acmex\n", image_policy=policy)
    refused("image: ghcr.io/gl-only/x\n", image_policy=policy)  # that entry is GitLab's
    refused("image: ghcr.io/shared/acme/web\n", image_policy={"acme/*/x": ["ghcr.io/shared/acme"]})


def test_a_gitlab_sub_image_is_refused_by_default_it_could_be_another_projects_image():
    gitlab = {"provider": "gitlab", "repo": "g/app"}
    message = refused("image: g/app/api\n", build=gitlab, registry="reg.example/ci")
    assert "reg.example/ci/gitlab/g/app" in message and "below it" not in message.split("allowed is")[1]
    plan = make_plan(build(**gitlab), parse_config(""), settings(registry="reg.example/ci"))
    assert plan.image == "reg.example/ci/gitlab/g/app"  # both forges configured: GitLab's own namespace
    widened = settings(registry="reg.example/ci", image_policy={"gitlab:g/app": ["reg.example/ci/gitlab/g/app"]})
    assert make_plan(build(**gitlab), parse_config("image: g/app/api\n"), widened).image == \
        "reg.example/ci/gitlab/g/app/api"


def test_a_github_repository_cannot_reach_into_gitlabs_namespace():
    message = refused("", build={"repo": "gitlab/app"})
    assert "another forge's namespace" in message
    refused("image: ghcr.io/acme-org/gitlab/g/app\n", image_policy={"acme/*": ["ghcr.io/acme-org"]})


def test_forges_sharing_one_namespace_refuse_to_start():
    from bot.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="IMAGEBOT_IMAGE_NAMESPACES"):
        load_settings(_env_file=None, registry="ghcr.io/x", github_webhook_secret="a", gitlab_webhook_token="b",
                      image_namespaces={"github": "ci", "gitlab": "ci"})
    one_forge = load_settings(_env_file=None, registry="ghcr.io/x", gitlab_webhook_token="b")
    assert make_plan(build(provider="gitlab", repo="g/app"), parse_config(""), one_forge).image == "ghcr.io/x/g/app"


def test_a_pull_request_publishes_only_pr_n_whatever_its_config_says():
    plan = make_plan(build(kind=BuildKind.pull_request, ref="refs/pull/7/head", pr_number=7),
                     parse_config("tags: [latest, '1.2.3', 'x-{short_sha}']\n"), settings())
    assert plan.push and plan.user_tags == ["pr-7"] and plan.tag_plan.moving == {"pr-7"}


def test_a_repository_name_docker_refuses_can_still_name_an_allowed_image():
    policy = {"acme/*": ["ghcr.io/acme-org/dotgithub"]}
    plan = make_plan(build(repo="acme/.github"), parse_config("image: dotgithub\n"), settings(image_policy=policy))
    assert plan.image == "ghcr.io/acme-org/dotgithub"
    assert "'.github'" in refused("", build={"repo": "acme/.github"})
