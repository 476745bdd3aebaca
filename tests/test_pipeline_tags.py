"""Image names and tags: the metadata-action rules, templates, names, per-platform tags."""

from __future__ import annotations

import pytest

from bot.models import BuildKind
from bot.pipeline.tags import (
    RESERVED_TAG,
    TagError,
    buildkit_args,
    check_image_override,
    image_name,
    newer_version_published,
    normalize_platform,
    parse_semver,
    plan_tags,
    platform_parts,
    platform_tag,
    sanitize_tag,
    split_image,
    template_placeholders,
    user_tags,
)

SHA = "0123abcdef4567890123abcdef4567890123abcd"
S = "sha-0123abc"
LONG = "feature/" + "x" * 192  # a 200-character branch name


# -- user_tags: the default rules -------------------------------------------------------------

DEFAULT_CASES = [
    # branches
    ("default branch", "branch", "refs/heads/main", None, "main", ["main", S, "latest"]),
    ("default branch given as a ref", "branch", "refs/heads/main", None, "refs/heads/main",
     ["main", S, "latest"]),
    ("other branch", "branch", "refs/heads/develop", None, "main", ["develop", S]),
    ("default branch unknown", "branch", "refs/heads/main", None, None, ["main", S]),
    ("slashes", "branch", "refs/heads/feature/login", None, "main", ["feature-login", S]),
    ("runs of odd characters collapse", "branch", "refs/heads/feat//ä ö+x", None, "main",
     ["feat-x", S]),
    ("allowed characters kept", "branch", "refs/heads/Fix_1.2-b", None, "main", ["Fix_1.2-b", S]),
    ("leading separator stripped", "branch", "refs/heads/@home", None, "main", ["home", S]),
    ("nothing usable left", "branch", "refs/heads/日本", None, "main", [S]),
    # tags
    ("semver with v", "tag", "refs/tags/v1.2.3", None, "main", ["1.2.3", "1.2", "1", S, "latest"]),
    ("semver without v", "tag", "refs/tags/1.2.3", None, "main", ["1.2.3", "1.2", "1", S, "latest"]),
    ("semver build metadata dropped", "tag", "refs/tags/v1.2.3+build.5", None, "main",
     ["1.2.3", "1.2", "1", S, "latest"]),
    ("prerelease: version only, no latest", "tag", "refs/tags/v1.2.3-rc.1", None, "main",
     ["1.2.3-rc.1", S]),
    ("prerelease with build metadata", "tag", "refs/tags/v2.0.8-beta.67+exp", None, "main",
     ["2.0.8-beta.67", S]),
    ("0.x: no major tag", "tag", "refs/tags/v0.4.1", None, "main", ["0.4.1", "0.4", S, "latest"]),
    ("0.0.x", "tag", "refs/tags/v0.0.1", None, "main", ["0.0.1", "0.0", S, "latest"]),
    ("0.x prerelease", "tag", "refs/tags/v0.1.0-alpha", None, "main", ["0.1.0-alpha", S]),
    ("two-part version is not semver", "tag", "refs/tags/v1.2", None, "main", ["v1.2", S]),
    ("leading zero is not semver", "tag", "refs/tags/v01.2.3", None, "main", ["v01.2.3", S]),
    ("capital V is not semver", "tag", "refs/tags/V1.2.3", None, "main", ["V1.2.3", S]),
    ("non-semver tag", "tag", "refs/tags/nightly", None, "main", ["nightly", S]),
    ("non-semver tag with slash", "tag", "refs/tags/release/v1.2.3", None, "main",
     ["release-v1.2.3", S]),
    # pull requests
    ("GitHub PR head", "pull_request", "refs/pull/7/head", 7, "main", ["pr-7"]),
    ("GitHub PR merge", "pull_request", "refs/pull/7/merge", 7, "main", ["pr-7"]),
    ("GitHub PR number from ref", "pull_request", "refs/pull/12/head", None, "main", ["pr-12"]),
    ("GitLab MR", "pull_request", "refs/merge-requests/9/head", 9, "main", ["pr-9"]),
    ("GitLab MR number from ref", "pull_request", "refs/merge-requests/31/head", None, None,
     ["pr-31"]),
]


@pytest.mark.parametrize(
    "kind, ref, pr, default_branch, expected",
    [case[1:] for case in DEFAULT_CASES],
    ids=[case[0] for case in DEFAULT_CASES],
)
def test_default_tags(kind, ref, pr, default_branch, expected):
    assert user_tags(kind, ref, SHA, pr, default_branch) == expected


def test_kind_may_be_the_enum_and_sha_any_case():
    assert user_tags(BuildKind.branch, "refs/heads/main", SHA.upper(), None, "main") == [
        "main", S, "latest",
    ]


def test_long_branch_names_are_cut_to_128_without_colliding():
    tags = user_tags("branch", f"refs/heads/{LONG}", SHA, None, "main")
    other = user_tags("branch", f"refs/heads/{LONG}y", SHA, None, "main")
    assert len(tags[0]) == 128 and tags[0].startswith("feature-xxxx")
    assert tags[1:] == [S]
    assert tags[0] != other[0] and tags[0][:120] == other[0][:120]
    assert user_tags("branch", f"refs/heads/{LONG}", SHA, None, "main") == tags  # deterministic


@pytest.mark.parametrize(
    "kind, ref, sha, pr",
    [
        ("branch", "refs/tags/v1.0.0", SHA, None),
        ("tag", "refs/heads/main", SHA, None),
        ("pull_request", "refs/heads/main", SHA, None),
        ("pull_request", "refs/pull/7/head", SHA, 8),
        ("branch", "refs/heads/main", "not-a-sha", None),
        ("branch", "refs/heads/main", "abc", None),
        ("nonsense", "refs/heads/main", SHA, None),
    ],
)
def test_inconsistent_arguments_from_the_bot_are_value_errors(kind, ref, sha, pr):
    with pytest.raises(ValueError):
        user_tags(kind, ref, sha, pr, "main")


def test_pr_number_alone_is_enough_for_an_unusual_ref():
    assert user_tags("pull_request", "refs/heads/feature", SHA, 5, "main") == ["pr-5"]


# -- user_tags: templates ---------------------------------------------------------------------

TEMPLATE_CASES = [
    ("branch + short sha", "branch", "refs/heads/feature/x", ["{branch}-{short_sha}"],
     ["feature-x", S, "feature-x-0123abc"]),
    ("full sha", "branch", "refs/heads/main", ["{sha}"], ["main", S, "latest", SHA]),
    ("kind", "pull_request", "refs/pull/3/head", ["build-{kind}"], ["pr-3"]),
    ("static", "branch", "refs/heads/main", ["stable"], ["main", S, "latest", "stable"]),
    ("duplicates of defaults dropped", "branch", "refs/heads/main", ["sha-{short_sha}", "latest"],
     ["main", S, "latest"]),
    ("pr on a branch build is dropped", "branch", "refs/heads/dev", ["pr-{pr}-x", "dev-{short_sha}"],
     ["dev", S, "dev-0123abc"]),
    ("branch on a tag build is dropped", "tag", "refs/tags/v1.2.3", ["{branch}"],
     ["1.2.3", "1.2", "1", S, "latest"]),
    ("tag on a branch build is dropped", "branch", "refs/heads/dev", ["{tag}"], ["dev", S]),
    ("semver parts", "tag", "refs/tags/v1.2.3",
     ["v{version}", "v{major}.{minor}", "{major}-{minor}-{patch}", "{tag}-slim"],
     ["1.2.3", "1.2", "1", S, "latest", "v1.2.3", "v1.2", "1-2-3", "v1.2.3-slim"]),
    ("version on a non-semver tag is dropped", "tag", "refs/tags/nightly", ["{version}", "{tag}-x"],
     ["nightly", S, "nightly-x"]),
    ("prerelease: version applies, major does not", "tag", "refs/tags/v1.2.3-rc.1",
     ["v{version}", "v{major}"], ["1.2.3-rc.1", S, "v1.2.3-rc.1"]),
    ("0.x: major applies in a template", "tag", "refs/tags/v0.4.1", ["v{major}"],
     ["0.4.1", "0.4", S, "latest", "v0"]),
    ("results are sanitised", "branch", "refs/heads/a/b", ["x/{branch}!"], ["a-b", S, "x-a-b-"]),
    ("literal braces", "branch", "refs/heads/dev", ["{{x}}"], ["dev", S, "x-"]),
    ("template that leaves nothing is dropped", "branch", "refs/heads/日本", ["{branch}"], [S]),
    ("pr template", "pull_request", "refs/merge-requests/4/head", ["mr-{pr}-{short_sha}"],
     ["pr-4"]),
]


@pytest.mark.parametrize(
    "kind, ref, templates, expected",
    [case[1:] for case in TEMPLATE_CASES],
    ids=[case[0] for case in TEMPLATE_CASES],
)
def test_templates(kind, ref, templates, expected):
    assert user_tags(kind, ref, SHA, None, "main", templates) == expected


@pytest.mark.parametrize(
    "template, needle",
    [
        ("{foo}", "unknown placeholder {foo}"),
        ("v{Version}", "unknown placeholder {Version}"),
        ("{branch", "malformed"),
        ("x}", "malformed"),
        ("{}", "malformed placeholder {}"),
        ("{0}", "malformed placeholder {0}"),
        ("{sha.real}", "malformed placeholder {sha.real}"),
        ("{sha[0]}", "malformed placeholder {sha[0]}"),
        ("{sha!r}", "malformed placeholder {sha!r}"),
        ("{sha:>10}", "malformed placeholder {sha:>10}"),
        ("", "empty"),
        ("   ", "empty"),
        ("...", "gives no usable tag"),
    ],
)
def test_bad_templates(template, needle):
    with pytest.raises(TagError) as info:
        template_placeholders(template)
    assert needle in str(info.value) and info.value.kind == "config"
    with pytest.raises(TagError):  # even when the build would not use it
        user_tags("pull_request", "refs/pull/1/head", SHA, 1, "main", [template])


def test_template_placeholders():
    assert template_placeholders("{branch}-{short_sha}") == {"branch", "short_sha"}
    assert template_placeholders("stable") == set()


# -- sanitize_tag and semver ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, tag",
    [
        ("main", "main"),
        ("my/branch", "my-branch"),
        ("a//b", "a-b"),
        ("a b\tc", "a-b-c"),
        ("UPPER_case.1-2", "UPPER_case.1-2"),
        (".hidden", "hidden"),
        ("-dash", "dash"),
        ("..--.x", "x"),
        ("/x", "x"),
        ("ü", ""),
        ("x" * 128, "x" * 128),
    ],
)
def test_sanitize_tag(text, tag):
    assert sanitize_tag(text) == tag


def test_sanitize_tag_caps_at_128():
    tag = sanitize_tag("y" * 300)
    assert len(tag) == 128 and tag.startswith("y" * 120 + "-")
    assert sanitize_tag("y" * 129) != sanitize_tag("y" * 130)


def test_parse_semver():
    assert parse_semver("v1.2.3").version == "1.2.3"
    assert parse_semver("1.2.3-rc.1+b").prerelease == "rc.1"
    assert parse_semver("1.2.3-01") is None  # numeric prerelease ids have no leading zeros
    assert parse_semver("9007199254740992.0.0") is None
    assert parse_semver("１.2.3") is None  # ASCII digits only


# -- image names ------------------------------------------------------------------------------

NAME_CASES = [
    ("registry with namespace", "127.0.0.1:5001/acme", "Owner/Repo", None,
     "127.0.0.1:5001/acme/owner/repo"),
    ("plain host", "ghcr.io", "acme/app", None, "ghcr.io/acme/app"),
    ("trailing slash on registry", "ghcr.io/", "acme/app", None, "ghcr.io/acme/app"),
    ("localhost registry", "localhost:5000", "acme/app", None, "localhost:5000/acme/app"),
    ("nested GitLab group", "registry.example.com/ci", "Group/Sub/Project", None,
     "registry.example.com/ci/group/sub/project"),
    ("separators allowed", "ghcr.io", "acme/my_app.v2--x", None, "ghcr.io/acme/my_app.v2--x"),
    ("relative override", "127.0.0.1:5001/acme", "o/r", "team/App", "127.0.0.1:5001/acme/team/app"),
    ("single-component override", "ghcr.io/acme", "o/r", "tool", "ghcr.io/acme/tool"),
    ("full override", "127.0.0.1:5001/acme", "o/r", "GHCR.io/Acme/App", "ghcr.io/acme/app"),
    ("full override with port", None, "o/r", "registry.local:5000/x/y", "registry.local:5000/x/y"),
    ("localhost override", None, "o/r", "localhost/app", "localhost/app"),
    ("IPv6 override", None, "o/r", "[::1]:5000/app", "[::1]:5000/app"),
]


@pytest.mark.parametrize(
    "registry, repo, override, expected",
    [case[1:] for case in NAME_CASES],
    ids=[case[0] for case in NAME_CASES],
)
def test_image_name(registry, repo, override, expected):
    assert image_name(registry, repo, override) == expected


BAD_NAME_CASES = [
    ("repo starting with a dot", "ghcr.io", "acme/.github", None, "'.github'"),
    ("triple underscore", "ghcr.io", "acme/foo___bar", None, "'foo___bar'"),
    ("mixed separators", "ghcr.io", "acme/foo._bar", None, "'foo._bar'"),
    ("no registry", None, "acme/app", None, "IMAGEBOT_REGISTRY"),
    ("no registry for relative override", "", "acme/app", "team/app", "IMAGEBOT_REGISTRY"),
    ("registry that is no host", "registry/acme", "acme/app", None, "does not start with a host"),
    ("override with a tag", "ghcr.io", "o/r", "ghcr.io/acme/app:1.0", "without a tag"),
    ("relative override with a tag", "ghcr.io", "o/r", "app:latest", "without a tag"),
    ("override with a digest", "ghcr.io", "o/r", "app@sha256:" + "0" * 64, "without a digest"),
    ("override with a space", "ghcr.io", "o/r", "my app", "'my app'"),
    ("empty component", "ghcr.io", "o/r", "acme//app", "empty path component"),
    ("empty override", "ghcr.io", "o/r", "  ", "not an empty one"),
    ("bad host", "ghcr.io", "o/r", "-bad.io/app", "not a registry host"),
    ("too long", "ghcr.io", "o/" + "a" * 250, None, "over docker's limit of 255"),
]


@pytest.mark.parametrize(
    "registry, repo, override, needle",
    [case[1:] for case in BAD_NAME_CASES],
    ids=[case[0] for case in BAD_NAME_CASES],
)
def test_bad_image_names(registry, repo, override, needle):
    with pytest.raises(TagError) as info:
        image_name(registry, repo, override)
    assert needle in str(info.value)
    assert info.value.kind == "config"


def test_default_name_error_says_how_to_fix_it():
    with pytest.raises(TagError, match=r"set `image:` in \.imagebot\.yml"):
        image_name("ghcr.io", "acme/.github")


@pytest.mark.parametrize("override", ["team/app", "ghcr.io/acme/app", "localhost:5000/x", "app"])
def test_check_image_override_accepts(override):
    check_image_override(override)


@pytest.mark.parametrize(
    "override", ["app:1", "ghcr.io/a/b@sha256:00", "Bad Name", "a//b", "_x/app", "ghcr.io/" + "a" * 260]
)
def test_check_image_override_refuses(override):
    with pytest.raises(TagError):
        check_image_override(override)


@pytest.mark.parametrize(
    "name, parts",
    [
        ("127.0.0.1:5001/acme/owner/repo", ("127.0.0.1:5001", "acme/owner/repo")),
        ("ghcr.io/acme/app", ("ghcr.io", "acme/app")),
        ("localhost/app", ("localhost", "app")),
        ("[::1]:5000/app", ("[::1]:5000", "app")),
        ("acme/app", ("docker.io", "acme/app")),
        ("ubuntu", ("docker.io", "library/ubuntu")),
    ],
)
def test_split_image(name, parts):
    assert split_image(name) == parts


# -- platforms --------------------------------------------------------------------------------

PLATFORM_CASES = [
    ("linux/amd64", ("linux", "amd64", None), "sha-0123abc-linux-amd64",
     {"TARGETPLATFORM": "linux/amd64", "TARGETOS": "linux", "TARGETARCH": "amd64",
      "TARGETVARIANT": ""}),
    ("linux/arm64", ("linux", "arm64", None), "sha-0123abc-linux-arm64",
     {"TARGETPLATFORM": "linux/arm64", "TARGETOS": "linux", "TARGETARCH": "arm64",
      "TARGETVARIANT": ""}),
    ("linux/arm/v7", ("linux", "arm", "v7"), "sha-0123abc-linux-arm-v7",
     {"TARGETPLATFORM": "linux/arm/v7", "TARGETOS": "linux", "TARGETARCH": "arm",
      "TARGETVARIANT": "v7"}),
]


@pytest.mark.parametrize("platform, parts, tag, target", PLATFORM_CASES)
def test_platforms(platform, parts, tag, target):
    assert platform_parts(platform) == parts
    assert platform_tag(SHA, platform) == tag
    args = buildkit_args(platform, "linux/amd64")
    assert args == {
        **target,
        "BUILDPLATFORM": "linux/amd64", "BUILDOS": "linux", "BUILDARCH": "amd64", "BUILDVARIANT": "",
    }


def test_build_platform_args():
    args = buildkit_args("linux/amd64", "linux/arm/v7")
    assert (args["BUILDPLATFORM"], args["BUILDOS"], args["BUILDARCH"], args["BUILDVARIANT"]) == (
        "linux/arm/v7", "linux", "arm", "v7",
    )


@pytest.mark.parametrize(
    "given, normal",
    [
        ("linux/arm", "linux/arm/v7"),
        ("linux/arm/7", "linux/arm/v7"),
        ("linux/arm/6", "linux/arm/v6"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/aarch64", "linux/arm64"),
        ("linux/x86_64", "linux/amd64"),
        ("linux/amd64/v1", "linux/amd64"),
        ("linux/amd64/v3", "linux/amd64/v3"),
        ("linux/armhf", "linux/arm/v7"),
        ("linux/armel", "linux/arm/v6"),
        ("linux/i386", "linux/386"),
        ("Linux/AMD64", "linux/amd64"),
        ("linux/riscv64", "linux/riscv64"),
    ],
)
def test_platforms_are_normalised_like_buildx(given, normal):
    assert normalize_platform(given) == normal
    assert buildkit_args(given, given)["TARGETPLATFORM"] == normal
    assert platform_tag(SHA, given) == "sha-0123abc-" + normal.replace("/", "-")


@pytest.mark.parametrize("bad", ["arm64", "linux", "linux/", "linux/amd64/", "linux/arm/v7/x", "linux/am d64", ""])
def test_bad_platforms(bad):
    with pytest.raises(TagError, match="not os/arch"):
        platform_parts(bad)


# -- moving tags: who may write them ----------------------------------------------------------

@pytest.mark.parametrize("branch", ["latest", "1.2.3", "v1", "1.2", "2", "1.2.3-rc.1", "sha-abcdef1",
                                    "sha-0123abc-linux-amd64", "pr-7", "src-anything"])
def test_a_branch_with_a_reserved_tag_safe_name_publishes_no_branch_tag_and_says_why(branch):
    plan = plan_tags("branch", f"refs/heads/{branch}", SHA, None, "main", ["{branch}-x", "{branch}"])
    assert branch not in plan.tags and plan.tags[0] == S
    assert any("reserved" in note for note in plan.notes)


@pytest.mark.parametrize("branch", ["latest-fix", "v1x", "sha-xyz", "pr-x", "release/1.2"])
def test_names_near_the_reserved_ones_still_get_their_tag(branch):
    assert not RESERVED_TAG.fullmatch(sanitize_tag(branch))
    assert plan_tags("branch", f"refs/heads/{branch}", SHA, None, "main").tags[0] == sanitize_tag(branch)


def test_which_tags_move():
    branch = plan_tags("branch", "refs/heads/main", SHA, None, "main", ["b-{short_sha}", "{branch}-slim", "edge"])
    assert branch.moving == {"main", "latest", "main-slim", "edge"}
    assert branch.immutable == [S, "b-0123abc"]
    release = plan_tags("tag", "refs/tags/v1.2.3", SHA, None, "main", ["{version}-slim", "{major}-slim"])
    assert release.immutable == ["1.2.3", S, "1.2.3-slim"]
    assert release.aliases == release.moving == {"1.2", "1", "latest", "1-slim"}
    assert plan_tags("tag", "refs/tags/nightly", SHA).moving == frozenset()


@pytest.mark.parametrize(("version", "published", "held"), [
    ("1.2.3", [], set()),
    ("1.2.3", ["1.2.3", "1.2.2", "0.9.0", "latest", "1.2"], set()),
    ("1.2.3", ["1.2.4"], {"latest", "1", "1.2"}),
    ("1.2.3", ["1.3.0"], {"latest", "1"}),
    ("1.2.3", ["2.0.0"], {"latest"}),
    ("1.2.3", ["2.0.0-rc.1", "v9.9.9", "sha-1234567", "9"], set()),  # not versions the bot wrote
])
def test_a_higher_published_version_keeps_latest_and_aliases(version, published, held):
    assert newer_version_published(parse_semver(version), published) == held


@pytest.mark.parametrize("literal", ["latest", "1.2.3", "v2", "sha-0000000", "pr-1", "src-abc"])
def test_a_branch_cannot_name_a_reserved_tag_literally(literal):
    """A feature branch is its own head, so the head check would let a literal ``latest`` (or a
    release, another commit's ``sha-…``, ``pr-1``) move: reserved shapes need this build's own
    sha or version in the template."""
    plan = plan_tags("branch", "refs/heads/feature", SHA, None, "main", [literal, "{branch}-ok"])
    assert literal not in plan.tags and "feature-ok" in plan.tags
    assert any(literal in note and "reserved" in note for note in plan.notes)


def test_reserved_shapes_made_of_the_builds_own_identity_stay():
    release = plan_tags("tag", "refs/tags/v1.2.3", SHA, None, "main", ["v{version}", "v{major}", "sha-{short_sha}-slim"])
    assert {"v1.2.3", "v1", f"{S}-slim"} <= set(release.tags)
