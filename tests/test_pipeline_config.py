"""The repo config: .imagebot.yml parsing, every problem at once, and paths kept in the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bot.models import BuildKind
from bot.pipeline.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    RepoConfig,
    load_config,
    parse_config,
    resolve_paths,
)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout with a Dockerfile at its root, beside (not under) a directory outside it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "Dockerfile").write_text("FROM scratch\n")
    return repo


def write(checkout: Path, text: str, name: str = ".imagebot.yml") -> None:
    (checkout / name).write_text(text)


def problems_of(checkout: Path, text: str) -> list[str]:
    write(checkout, text)
    with pytest.raises(ConfigError) as info:
        load_config(checkout)
    assert info.value.kind == "config"
    for problem in info.value.problems:  # the one message carries every problem
        assert problem in str(info.value)
    return info.value.problems


# -- reading the file -------------------------------------------------------------------------


def test_no_file_gives_the_defaults(checkout):
    config = load_config(checkout)
    assert config == RepoConfig()
    assert (config.dockerfile, config.context, config.platforms) == ("Dockerfile", ".", None)
    assert config.build_args == {} and config.labels == {} and config.tags == []
    assert (config.target, config.image, config.allow_partial) == (None, None, False)
    assert config.secrets == [] and config.secret_build_args is None
    assert all(config.pushes(kind) for kind in BuildKind)
    assert config.source is None


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_an_empty_file_gives_the_defaults(checkout, text):
    write(checkout, text)
    config = load_config(checkout)
    assert config.model_dump() == RepoConfig().model_dump()
    assert config.source == ".imagebot.yml"


FULL = """\
dockerfile: docker/Dockerfile
context: app
platforms: [linux/amd64, linux/arm64, linux/arm/v7]
build_args:
  PYTHON_VERSION: "3.12"
  API_TOKEN: hunter2
target: runtime
image: team/app
tags:
  - "{branch}-{short_sha}"
  - stable
push:
  pull_request: false
labels:
  org.opencontainers.image.vendor: Acme
allow_partial: true
secrets: [NPM_TOKEN]
"""


def test_every_key(checkout):
    write(checkout, FULL)
    config = load_config(checkout)
    assert config.dockerfile == "docker/Dockerfile" and config.context == "app"
    assert config.platforms == ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    assert config.build_args == {"PYTHON_VERSION": "3.12", "API_TOKEN": "hunter2"}
    assert config.target == "runtime" and config.image == "team/app"
    assert config.tags == ["{branch}-{short_sha}", "stable"]
    assert config.labels == {"org.opencontainers.image.vendor": "Acme"}
    assert config.allow_partial is True
    assert config.secrets == ["NPM_TOKEN"]
    assert config.pushes("branch") and config.pushes(BuildKind.tag)
    assert not config.pushes("pull_request")


def test_the_yaml_extension_works_too(checkout):
    write(checkout, "target: app\n", ".imagebot.yaml")
    config = load_config(checkout)
    assert config.target == "app" and config.source == ".imagebot.yaml"


def test_both_names_is_an_error(checkout):
    write(checkout, "target: a\n")
    write(checkout, "target: b\n", ".imagebot.yaml")
    with pytest.raises(ConfigError, match=r"both \.imagebot\.yml and \.imagebot\.yaml exist"):
        load_config(checkout)


def test_yaml_syntax_error_names_the_line(checkout):
    problems = problems_of(checkout, "target: app\nplatforms:\n  - linux/amd64\n bad: [\n")
    assert len(problems) == 1
    assert problems[0].startswith(".imagebot.yml line 4: could not parse: ")


def test_yaml_syntax_error_mapping_values(checkout):
    (problem,) = problems_of(checkout, "target: app\ncontext: a\n  image: b\n")
    assert problem == (
        ".imagebot.yml line 3: could not parse: mapping values are not allowed here (column 8)"
    )


def test_python_tags_are_refused_by_safe_load(checkout, tmp_path):
    marker = tmp_path / "pwned"
    (problem,) = problems_of(
        checkout, f'target: !!python/object/apply:os.system ["touch {marker}"]\n'
    )
    assert problem.startswith(".imagebot.yml line 1: could not parse:")
    assert not marker.exists()


def test_several_documents_are_refused(checkout):
    (problem,) = problems_of(checkout, "target: a\n---\ntarget: b\n")
    assert "line 2: could not parse" in problem


@pytest.mark.parametrize(
    "text, what", [("- a\n- b\n", "a list"), ("just text\n", "the string 'just text'"), ("3\n", "the number 3")]
)
def test_the_document_must_be_a_mapping(checkout, text, what):
    (problem,) = problems_of(checkout, text)
    assert problem == f".imagebot.yml: expected a mapping of settings (key: value), got {what}"


def test_unknown_keys_suggest_the_known_one(checkout):
    (problem,) = problems_of(checkout, "imgae: acme/app\n")
    assert problem.startswith(".imagebot.yml: imgae: unknown key; did you mean image? known keys are ")
    assert "secret_build_args" in problem


def test_non_string_top_level_key(checkout):
    (problem,) = problems_of(checkout, "1: x\n")
    assert problem == ".imagebot.yml: the number 1 is not a setting name"


def test_duplicate_keys_are_reported_with_lines(checkout):
    problems = problems_of(checkout, "target: a\nbuild_args:\n  A: '1'\n  A: '2'\ntarget: b\n")
    assert problems == [
        ".imagebot.yml line 4: key 'A' appears twice (first on line 3)",
        ".imagebot.yml line 5: key 'target' appears twice (first on line 1)",
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("dockerfile: 3\n", "dockerfile: expected a string, got the number 3 (put it in quotes)"),
        ("dockerfile:\n", "dockerfile: expected a string, got nothing"),
        ("dockerfile: ''\n", "dockerfile: give a path relative to the repository root"),
        ("context: [a]\n", "context: expected a string, got a list"),
        ("platforms: linux/amd64\n", "platforms: expected a list, got the string 'linux/amd64'"),
        ("platforms: []\n", "platforms: give at least one platform, e.g. [linux/amd64], or leave it out"),
        ("tags: [1.0]\n", "tags[0]: expected a string, got the number 1.0 (put it in quotes)"),
        ("allow_partial: 'false'\n",
         "allow_partial: expected true or false, got the string 'false' (without quotes)"),
        ("allow_partial: 1\n", "allow_partial: expected true or false, got the number 1"),
        ("labels: [a]\n", "labels: expected a mapping, got a list"),
        ("build_args: x\n", "build_args: expected a mapping, got the string 'x'"),
        ("push: 'yes'\n",
         "push: expected true, false, or a mapping of branch/tag/pull_request to true/false"),
        ("push: {branches: false}\n",
         "push.branches: unknown key; did you mean branch? known keys are branch, pull_request, tag"),
        ("push: {tag: 'no'}\n", "push.tag: expected true or false, got the string 'no' (without quotes)"),
        ("target: 'my stage'\n", "target: 'my stage' is not a Dockerfile stage name (FROM ... AS <name>)"),
        ("target: 7\n", "target: expected a string, got the number 7 (put it in quotes)"),
        ("secrets: TOKEN\n", "secrets: expected a list, got the string 'TOKEN'"),
    ],
)
def test_wrong_types_and_values(checkout, text, expected):
    assert problems_of(checkout, text) == [f".imagebot.yml: {expected}"]


def test_every_problem_is_listed_in_one_message(checkout):
    text = "platforms: [linux/amd64, arm64]\ndockerfile: 3\nimgae: x\ntags: ['{nope}']\n"
    problems = problems_of(checkout, text)
    assert problems == [
        '.imagebot.yml: dockerfile: expected a string, got the number 3 (put it in quotes)',
        '.imagebot.yml: platforms[1]: not os/arch[/variant]: "arm64"',
        ".imagebot.yml: tags[0]: tag template '{nope}' has an unknown placeholder {nope}; use one of "
        "{branch}, {tag}, {pr}, {sha}, {short_sha}, {version}, {major}, {minor}, {patch}, {kind}",
        ".imagebot.yml: imgae: unknown key; did you mean image? known keys are allow_partial, "
        "build_args, context, dockerfile, image, labels, platforms, push, secret_build_args, secrets, "
        "tags, target",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(checkout)
    assert str(info.value).startswith("4 problems:\n  - .imagebot.yml: dockerfile:")


def test_platforms_are_normalised_and_deduplicated(checkout):
    write(checkout, "platforms: [linux/arm, linux/arm64/v8, linux/arm/v7, linux/arm64]\n")
    assert load_config(checkout).platforms == ["linux/arm/v7", "linux/arm64"]


def test_tag_templates_are_checked(checkout):
    problems = problems_of(checkout, "tags: ['{branch}', '{branch', '{sha!r}']\n")
    assert [p.split(":", 2)[1] for p in problems] == [" tags[1]", " tags[2]"]
    assert "malformed" in problems[0] and "malformed placeholder {sha!r}" in problems[1]


@pytest.mark.parametrize(
    "image, ok",
    [("team/app", True), ("ghcr.io/acme/app", True), ("app:1.0", False), ("Bad Name", False)],
)
def test_image_is_checked(checkout, image, ok):
    write(checkout, f"image: '{image}'\n")
    if ok:
        assert load_config(checkout).image == image
    else:
        (problem,) = problems_of(checkout, f"image: '{image}'\n")
        assert problem.startswith(".imagebot.yml: image: image ")


# -- push policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, branch, tag, pull_request",
    [
        ("", True, True, True),
        ("push: true\n", True, True, True),
        ("push: false\n", False, False, False),
        ("push: no\n", False, False, False),  # a YAML boolean
        ("push: {pull_request: false}\n", True, True, False),
        ("push: {branch: false, tag: true}\n", False, True, True),
        ("push: {}\n", True, True, True),
    ],
)
def test_push_policy_per_kind(checkout, text, branch, tag, pull_request):
    write(checkout, text or "target: app\n")
    config = load_config(checkout)
    assert config.pushes("branch") is branch
    assert config.pushes(BuildKind.tag) is tag
    assert config.pushes(BuildKind.pull_request) is pull_request


# -- build_args, labels, secrets --------------------------------------------------------------


def test_build_args_are_taken_as_written(checkout):
    write(
        checkout,
        "build_args:\n"
        "  PYTHON: 3.10\n"  # YAML would read the float 3.1
        "  WORKERS: 4\n"
        "  OCTAL: 017\n"  # YAML 1.1 would read 15
        "  DEBUG: true\n"
        "  LEGACY: on\n"  # YAML 1.1 would read true
        "  DATE: 2024-01-01\n"
        "  ON: x\n"  # a key YAML 1.1 reads as true
        "  QUOTED: \"a\\tb\"\n"
        "  EMPTY: ''\n"
        "  BIG: 1_000\n",
    )
    assert load_config(checkout).build_args == {
        "PYTHON": "3.10", "WORKERS": "4", "OCTAL": "017", "DEBUG": "true", "LEGACY": "on",
        "DATE": "2024-01-01", "ON": "x", "QUOTED": "a\tb", "EMPTY": "", "BIG": "1_000",
    }


def test_labels_are_taken_as_written(checkout):
    write(checkout, "labels:\n  org.example.version: 1.10\n  org.example.stable: yes\n")
    assert load_config(checkout).labels == {"org.example.version": "1.10", "org.example.stable": "yes"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("build_args: {A: }\n", "build_args.A: expected a string, got nothing"),
        ("build_args: {A: [1]}\n", "build_args.A: expected a string, got a list"),
        ("build_args: {A: {b: c}}\n", "build_args.A: expected a string, got a mapping"),
        ("build_args: {my-arg: x}\n",
         "build_args: 'my-arg' is not a build arg name (letters, digits and _, not starting with a digit)"),
        ("build_args: {1X: x}\n",
         "build_args: '1X' is not a build arg name (letters, digits and _, not starting with a digit)"),
        ("build_args: {TARGETPLATFORM: linux/amd64}\n",
         "build_args: TARGETPLATFORM is set by BuildKit for each platform; it cannot be a build arg"),
        ("labels: {'a b': x}\n", "labels: 'a b' is not a label name (no spaces or '=', e.g. org.example.team)"),
        ("labels: {'a=b': x}\n", "labels: 'a=b' is not a label name (no spaces or '=', e.g. org.example.team)"),
    ],
)
def test_bad_build_args_and_labels(checkout, text, expected):
    assert problems_of(checkout, text) == [f".imagebot.yml: {expected}"]


@pytest.mark.parametrize("value", ["[TOKEN]", "[]"])
def test_secret_build_args_are_refused_pointing_at_the_operator_file(checkout, value):
    (problem,) = problems_of(checkout, f"build_args: {{TOKEN: s3cret}}\nsecret_build_args: {value}\n")
    assert problem.startswith(".imagebot.yml: secret_build_args: is no longer supported: a value committed")
    assert "IMAGEBOT_BUILD_SECRETS_FILE" in problem and "secrets: [TOKEN]" in problem


def test_secrets_are_names_and_never_build_args_too(checkout):
    problems = problems_of(checkout, "build_args: {TOKEN: x}\nsecrets: [TOKEN, 'not a name']\n")
    assert problems == [".imagebot.yml: secrets[1]: 'not a name' is not a build arg name "
                        "(letters, digits and _, not starting with a digit)"]
    assert problems_of(checkout, "build_args: {TOKEN: x}\nsecrets: [OTHER, TOKEN]\n") == [
        ".imagebot.yml: secrets[1]: TOKEN is also a key of build_args; a secret's value comes from "
        "the operator only"]


def test_secrets_deduplicated(checkout):
    write(checkout, "secrets: [TOKEN, TOKEN, NPM]\n")
    assert load_config(checkout).secrets == ["TOKEN", "NPM"]


def test_secret_values_never_appear_in_problems(checkout):
    text = "build_args: {TOKEN: hunter2-secret}\nsecret_build_args: [TOKEN, NOPE]\nimgae: x\n"
    write(checkout, text)
    with pytest.raises(ConfigError) as info:
        load_config(checkout)
    assert "hunter2" not in str(info.value)


# -- what may be read -------------------------------------------------------------------------


def test_oversized_file_is_refused(checkout):
    (problem,) = problems_of(checkout, "# " + "x" * MAX_CONFIG_BYTES + "\n")
    assert problem.startswith(".imagebot.yml is ") and f"over the limit of {MAX_CONFIG_BYTES}" in problem


def test_a_file_at_the_limit_is_read(checkout):
    body = "target: app\n"
    write(checkout, body + "#" * (MAX_CONFIG_BYTES - len(body) - 1) + "\n")
    assert load_config(checkout).target == "app"


def test_a_directory_is_refused(checkout):
    (checkout / ".imagebot.yml").mkdir()
    with pytest.raises(ConfigError, match=r"^\.imagebot\.yml is a directory"):
        load_config(checkout)


@pytest.mark.parametrize("target", ["inside.yml", "../outside.yml", "missing.yml"])
def test_a_symlink_is_refused(checkout, target):
    (checkout / "inside.yml").write_text("target: app\n")
    (checkout.parent / "outside.yml").write_text("target: app\n")
    (checkout / ".imagebot.yml").symlink_to(target)
    with pytest.raises(ConfigError, match=r"^\.imagebot\.yml is a symlink"):
        load_config(checkout)


def test_a_fifo_is_refused_without_blocking(checkout):
    os.mkfifo(checkout / ".imagebot.yaml")
    with pytest.raises(ConfigError, match=r"^\.imagebot\.yaml is not a regular file"):
        load_config(checkout)


def test_non_utf8_is_refused(checkout):
    (checkout / ".imagebot.yml").write_bytes(b"target: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text"):
        load_config(checkout)


def test_a_utf8_bom_is_fine(checkout):
    (checkout / ".imagebot.yml").write_bytes("\ufefftarget: app\n".encode())
    assert load_config(checkout).target == "app"


def merge_key_bomb(size: int = 1024) -> str:
    """The issue's bomb: each mapping merges the one before it twice (2**n keys to flatten)."""
    lines = ["a0: &a0 {x: 1}"]
    while len("\n".join(lines)) < size - 40:
        i = len(lines)
        lines.append(f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}]}}")
    return "\n".join(lines) + "\n"


def alias_list_bomb() -> str:
    """Billion laughs: a list of lists of aliases, handed to a key that is validated deeply."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 30)]
    return "\n".join(lines) + "\ntags: *a29\n"


@pytest.mark.timeout(30)  # before the budget, the 1 KB merge-key bomb never finished
@pytest.mark.parametrize("bomb", [merge_key_bomb(), alias_list_bomb()], ids=["merge-keys", "alias-lists"])
def test_an_alias_bomb_is_refused_quickly(checkout, bomb):
    import time

    assert len(bomb) <= 1200
    started = time.monotonic()
    (problem,) = problems_of(checkout, bomb)
    assert time.monotonic() - started < 1.0
    assert problem.startswith(".imagebot.yml line ") and "aliases expand to more than" in problem


def test_an_alias_that_contains_itself_is_refused(checkout):
    (problem,) = problems_of(checkout, "tags: &a [*a]\n")
    assert "an alias refers to the value it is part of" in problem


def test_deep_nesting_and_too_many_values_are_refused(checkout):
    (deep,) = problems_of(checkout, "labels: " + "[" * 5000 + "]" * 5000 + "\n")
    assert deep.startswith(".imagebot.yml line 1: nested more than")
    (many,) = problems_of(checkout, "tags: [" + ", ".join(["x"] * 20_000) + "]\n")
    assert "more than 10000 values" in many


def test_a_few_aliases_and_merge_keys_still_work(checkout):
    write(checkout, "x-common: &common {A: '1'}\nbuild_args: {<<: *common, B: '2'}\n"
                    "labels: &labels {team: a}\n")
    with pytest.raises(ConfigError, match=r"\['x-common'\]: unknown key"):
        load_config(checkout)
    write(checkout, "build_args: &args {<<: {A: '1'}, B: '2'}\nlabels: *args\n")
    config = load_config(checkout)
    assert config.build_args == {"A": "1", "B": "2"} and config.labels == {"A": "1", "B": "2"}


def test_parse_config_names_its_file():
    with pytest.raises(ConfigError, match=r"^custom\.yml: target: "):
        parse_config("target: 'a b'\n", "custom.yml")


# -- paths in the checkout --------------------------------------------------------------------


def test_default_paths(checkout):
    dockerfile, context = resolve_paths(checkout, RepoConfig())
    assert dockerfile == (checkout / "Dockerfile").resolve()
    assert context == checkout.resolve()


def test_dockerfile_outside_the_context_but_inside_the_checkout(checkout):
    (checkout / "docker").mkdir()
    (checkout / "docker" / "Dockerfile.prod").write_text("FROM scratch\n")
    (checkout / "app").mkdir()
    config = RepoConfig(dockerfile="docker/Dockerfile.prod", context="app")
    assert resolve_paths(checkout, config) == (
        (checkout / "docker" / "Dockerfile.prod").resolve(), (checkout / "app").resolve(),
    )


def test_dot_dot_that_stays_inside_is_fine(checkout):
    (checkout / "sub").mkdir()
    config = RepoConfig(dockerfile="sub/../Dockerfile", context="sub/..")
    assert resolve_paths(checkout, config) == ((checkout / "Dockerfile").resolve(), checkout.resolve())


def test_symlinks_that_stay_inside_are_fine(checkout):
    (checkout / "real").mkdir()
    (checkout / "real" / "Dockerfile").write_text("FROM scratch\n")
    (checkout / "linked").symlink_to("real")
    (checkout / "Dockerfile.link").symlink_to("real/Dockerfile")
    (checkout / "absolute.link").symlink_to(checkout / "real" / "Dockerfile")
    for dockerfile in ("Dockerfile.link", "linked/Dockerfile", "absolute.link"):
        found, context = resolve_paths(checkout, RepoConfig(dockerfile=dockerfile, context="linked"))
        assert found == (checkout / "real" / "Dockerfile").resolve()
        assert context == (checkout / "real").resolve()


@pytest.mark.parametrize(
    "dockerfile, context, needle",
    [
        ("/etc/passwd", ".", "dockerfile `/etc/passwd` is an absolute path; give it relative to the repository root"),
        (".", "/tmp", "context `/tmp` is an absolute path"),
        ("../outside/Dockerfile", ".", "dockerfile `../outside/Dockerfile` leaves the repository"),
        ("Dockerfile", "..", "context `..` leaves the repository"),
        ("a/../../x", ".", "dockerfile `a/../../x` leaves the repository"),
        ("missing/Dockerfile", ".", "dockerfile `missing/Dockerfile` does not exist in the repository"),
        ("Dockerfile", "missing", "context `missing` does not exist in the repository"),
        ("Dockerfile", "Dockerfile", "context `Dockerfile` is not a directory"),
        (".", ".", "dockerfile `.` is not a file"),
    ],
)
def test_bad_paths(checkout, dockerfile, context, needle):
    with pytest.raises(ConfigError) as info:
        resolve_paths(checkout, RepoConfig(dockerfile=dockerfile, context=context))
    assert needle in str(info.value) and info.value.kind == "config"


def test_symlinked_dockerfile_outside_is_refused(checkout):
    (checkout / "Dockerfile.out").symlink_to(checkout.parent / "outside" / "Dockerfile")
    with pytest.raises(ConfigError, match="dockerfile `Dockerfile.out` leaves the repository through a symlink"):
        resolve_paths(checkout, RepoConfig(dockerfile="Dockerfile.out"))


def test_symlinked_directory_outside_is_refused(checkout):
    (checkout / "vendor").symlink_to(checkout.parent / "outside")
    with pytest.raises(ConfigError) as info:
        resolve_paths(checkout, RepoConfig(dockerfile="vendor/Dockerfile", context="vendor"))
    assert info.value.problems == [
        "dockerfile `vendor/Dockerfile` leaves the repository through a symlink",
        "context `vendor` leaves the repository through a symlink",
    ]


def test_symlink_up_and_back_in_is_checked_by_where_it_lands(checkout):
    (checkout / "up").symlink_to("..")
    ok = RepoConfig(dockerfile=f"up/{checkout.name}/Dockerfile")
    assert resolve_paths(checkout, ok)[0] == (checkout / "Dockerfile").resolve()
    with pytest.raises(ConfigError, match="through a symlink"):
        resolve_paths(checkout, RepoConfig(dockerfile="up/outside/Dockerfile"))


def test_symlink_loop_is_refused(checkout):
    (checkout / "loop").symlink_to("loop")
    with pytest.raises(ConfigError, match="dockerfile `loop`"):
        resolve_paths(checkout, RepoConfig(dockerfile="loop"))


def test_path_messages_name_the_config_file_and_the_fix(checkout):
    (checkout / "Dockerfile").unlink()
    with pytest.raises(ConfigError) as info:
        resolve_paths(checkout, load_config(checkout))
    assert str(info.value) == (
        "dockerfile `Dockerfile` does not exist in the repository; add one, or set "
        "`dockerfile:` in .imagebot.yml"
    )
    write(checkout, "dockerfile: ../outside/Dockerfile\ncontext: nowhere\n")
    with pytest.raises(ConfigError) as info:
        resolve_paths(checkout, load_config(checkout))
    assert info.value.problems == [
        ".imagebot.yml: dockerfile `../outside/Dockerfile` leaves the repository",
        ".imagebot.yml: context `nowhere` does not exist in the repository",
    ]


# -- the files the engine's client reads whole ------------------------------------------------


@pytest.mark.parametrize("target", ["/dev/zero", "../outside.txt", "missing", "sub"])
def test_a_dockerignore_that_is_no_regular_file_of_the_checkout_is_refused(checkout, target):
    (checkout.parent / "outside.txt").write_text("*\n")
    (checkout / "sub").mkdir()
    (checkout / ".dockerignore").symlink_to(target)
    with pytest.raises(ConfigError) as info:
        resolve_paths(checkout, RepoConfig())
    (problem,) = info.value.problems
    assert problem.startswith(".dockerignore ") and info.value.kind == "config", problem


def test_a_dockerignore_inside_and_small_is_fine(checkout):
    (checkout / "ignore.txt").write_text("*.log\n")
    (checkout / ".dockerignore").symlink_to("ignore.txt")
    assert resolve_paths(checkout, RepoConfig())[1] == checkout.resolve()


def test_oversized_build_files_are_refused(checkout):
    from bot.pipeline.config import MAX_DOCKERFILE_BYTES, MAX_IGNORE_BYTES

    (checkout / ".dockerignore").write_text("#" * (MAX_IGNORE_BYTES + 1))
    (checkout / "Dockerfile").write_text("#" * (MAX_DOCKERFILE_BYTES + 1))
    with pytest.raises(ConfigError) as info:
        resolve_paths(checkout, RepoConfig())
    assert [p.split(" is ")[0] for p in info.value.problems] == ["the Dockerfile", ".dockerignore"]
