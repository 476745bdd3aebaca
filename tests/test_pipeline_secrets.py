"""The operator's build secrets file (pure but for the files it names)."""

from __future__ import annotations

import json

import pytest

from bot.pipeline.secrets import SecretsFileError, for_repository, glob_matches, load, parse_entries, select
from bot.settings import SettingsError, load_settings


@pytest.mark.parametrize(("glob", "repo", "matches"), [
    ("acme/app", "acme/app", True),
    ("acme/app", "Acme/App", True),
    ("acme/app", "acme/app2", False),
    ("acme/*", "acme/app", True),
    ("acme/*", "acme/sub/app", False),  # * is one segment: a subgroup is not covered silently
    ("acme/**", "acme/sub/app", True),
    ("**", "any/thing/at/all", True),
    ("acme/app-*", "acme/app-web", True),
    ("acme/a.p", "acme/axp", False),  # a dot is a dot
])
def test_globs(glob, repo, matches):
    assert glob_matches(glob, "github", repo) is matches


def test_entries_apply_in_file_order_and_files_are_read(tmp_path):
    (tmp_path / "npm").write_text("npm-from-file\n")
    path = tmp_path / "secrets.yml"
    path.write_text("'**': {SENTRY: all-sentry, NPM: generic-npm}\n"
                    "acme/*: {NPM_FILE: npm}\n"
                    "other/app: {NPM: not-for-acme}\n")
    entries = load(path)
    assert for_repository(entries, "github", "acme/app") == {"SENTRY": "all-sentry", "NPM": "npm-from-file"}
    assert for_repository(entries, "github", "zeta/x") == {"SENTRY": "all-sentry", "NPM": "generic-npm"}


def test_json_works_too(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"acme/app": {"TOKEN": "json-secret"}}))
    assert for_repository(load(path), "github", "acme/app") == {"TOKEN": "json-secret"}


def test_a_build_gets_only_what_it_asks_for():
    assert select(["A"], {"A": "11111111", "B": "22222222"}, "acme/app") == {"A": "11111111"}
    with pytest.raises(ValueError, match=r"B is not among .* acme/app .*available: none"):
        select(["B"], {}, "acme/app")


@pytest.mark.parametrize(("text", "problem"), [
    ("- a\n", "expected a mapping of repository globs to {NAME: value}"),
    ("acme/app: [hunter2-value]\n", "'acme/app': expected a mapping of NAME to a value or NAME_FILE to a path"),
    ("acme/app: {TOKEN: 1234567}\n", "'acme/app': TOKEN must be a string (put it in quotes)"),
    ("acme/app: {TOKEN: ''}\n", "'acme/app': TOKEN is shorter than 8 characters"),
    ("acme/app: {TOKEN: hunter2}\n", "'acme/app': TOKEN is shorter than 8 characters"),
    ("acme/app: {'bad name': hunter2-value}\n",
     "'acme/app': 'bad name' is not a build arg name (letters, digits and _)"),
    ("acme/app: {TOKEN: hunter2-value, TOKEN_FILE: f}\n", "'acme/app': TOKEN is given twice (as TOKEN and TOKEN_FILE)"),
    ("acme/app: {TOKEN_FILE: missing}\n", "'acme/app': TOKEN_FILE: cannot read"),
    ("acme/app: {TOKEN: 'hunter2-value\n", "neither JSON nor YAML at line 2, column 1"),
])
def test_problems_name_the_place_never_the_value(tmp_path, text, problem):
    path = tmp_path / "secrets.yml"
    (tmp_path / "f").write_text("hunter2-value")
    path.write_text(text)
    with pytest.raises(SecretsFileError) as info:
        load(path)
    assert info.value.kind == "secrets"
    assert info.value.message.startswith(f"IMAGEBOT_BUILD_SECRETS_FILE {path}: {problem}")
    assert "hunter2" not in info.value.message


def test_oversized_or_missing_files_are_refused(tmp_path):
    with pytest.raises(SecretsFileError, match="cannot be read"):
        load(tmp_path / "nope.yml")
    big = tmp_path / "big.yml"
    big.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(SecretsFileError, match="over the limit"):
        load(big)
    with pytest.raises(SecretsFileError, match="not UTF-8"):
        parse_entries(big, b"\xff\xfe")


def test_a_broken_file_stops_start_up_without_showing_a_value(tmp_path):
    path = tmp_path / "secrets.yml"
    path.write_text("acme/app: {TOKEN: 77777777}\n")
    with pytest.raises(SettingsError) as info:
        load_settings(build_secrets_file=str(path))
    assert "IMAGEBOT_BUILD_SECRETS_FILE" in str(info.value) and "TOKEN must be a string" in str(info.value)
    assert "77777777" not in str(info.value)
    path.write_text("acme/app: {TOKEN: '77777777'}\n")
    assert "77777777" not in repr(load_settings(build_secrets_file=str(path)))


def test_a_forge_prefix_scopes_secrets_to_that_forges_repositories(tmp_path):
    """With both forges configured, GitLab's acme/app is another repository than GitHub's: it
    must not get the secrets the operator gave to GitHub's."""
    path = tmp_path / "secrets.yml"
    path.write_text("'github:acme/app': {NPM: for-github-only}\n'gitlab:acme/*': {PIP: for-gitlab-only}\n")
    entries = load(path)
    assert for_repository(entries, "github", "acme/app") == {"NPM": "for-github-only"}
    assert for_repository(entries, "gitlab", "acme/app") == {"PIP": "for-gitlab-only"}


def test_a_key_that_is_no_repository_glob_is_refused(tmp_path):
    path = tmp_path / "secrets.yml"
    path.write_text("'ftp:acme/app': {NPM: some-secret-value}\n")
    with pytest.raises(SecretsFileError, match="prefix must be one of"):
        load(path)
