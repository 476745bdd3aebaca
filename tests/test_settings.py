"""Settings: environment names, defaults, secrets that never print, every problem at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.settings import Settings, SettingsError, load_settings


def test_defaults(monkeypatch):
    monkeypatch.chdir("/")  # no .env here
    settings = load_settings()
    assert settings.database_url.get_secret_value() == "sqlite:///./imagebot.db"
    assert settings.github_api_url == "https://api.github.com"
    assert settings.platforms == ["linux/amd64"]
    assert settings.concurrency == 2
    assert settings.max_payload_bytes == 25 * 1024 * 1024
    assert settings.github_webhook_secret is None and settings.registry is None


def test_environment_with_prefix(monkeypatch):
    monkeypatch.setenv("IMAGEBOT_PLATFORMS", "linux/amd64, linux/arm64,linux/arm/v7")
    monkeypatch.setenv("IMAGEBOT_REGISTRY", "127.0.0.1:5000/acme")
    monkeypatch.setenv("IMAGEBOT_CONCURRENCY", "4")
    monkeypatch.setenv("IMAGEBOT_GITHUB_API_URL", "https://ghe.example.test/api/v3/")
    settings = load_settings()
    assert settings.platforms == ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    assert settings.registry == "127.0.0.1:5000/acme"
    assert settings.concurrency == 4
    assert settings.github_api_url == "https://ghe.example.test/api/v3"


def test_dotenv_file(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("IMAGEBOT_GITHUB_WEBHOOK_SECRET=from-dotenv\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings().github_webhook_secret.get_secret_value() == "from-dotenv"


def test_secrets_never_print(monkeypatch):
    secrets = {
        "IMAGEBOT_GITHUB_WEBHOOK_SECRET": "wh-secret-1",
        "IMAGEBOT_GITLAB_WEBHOOK_TOKEN": "gl-token-2",
        "IMAGEBOT_GITHUB_TOKEN": "ghp-token-3",
        "IMAGEBOT_REGISTRY_USERNAME": "bot",
        "IMAGEBOT_REGISTRY_PASSWORD": "reg-pass-4",
        "IMAGEBOT_DATABASE_URL": "postgresql+psycopg://u:db-pass-5@db/imagebot",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    shown = repr(settings) + str(settings) + settings.model_dump_json() + settings.database_url_for_display
    for value in ("wh-secret-1", "gl-token-2", "ghp-token-3", "reg-pass-4", "db-pass-5"):
        assert value not in shown
    assert settings.registry_password.get_secret_value() == "reg-pass-4"


def test_every_field_problem_listed_at_once(monkeypatch):
    monkeypatch.setenv("IMAGEBOT_CONCURRENCY", "0")
    monkeypatch.setenv("IMAGEBOT_PLATFORMS", "linux/amd64,windows")
    monkeypatch.setenv("IMAGEBOT_REGISTRY", "https://ghcr.io")
    monkeypatch.setenv("IMAGEBOT_DATABASE_URL", "mysql://x/y")
    monkeypatch.setenv("IMAGEBOT_PUBLIC_URL", "localhost:8000")
    with pytest.raises(SettingsError) as exc:
        load_settings()
    problems = exc.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "IMAGEBOT_DATABASE_URL", "IMAGEBOT_REGISTRY", "IMAGEBOT_PLATFORMS",
        "IMAGEBOT_PUBLIC_URL", "IMAGEBOT_CONCURRENCY",
    ]
    assert "not os/arch[/variant]: windows" in problems[2]
    assert str(exc.value).startswith("invalid settings:\n  - ")


def test_every_combination_problem_listed_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGEBOT_GITHUB_APP_ID", "12")
    monkeypatch.setenv("IMAGEBOT_GITHUB_TOKEN", "t")
    monkeypatch.setenv("IMAGEBOT_REGISTRY_USERNAME", "bot")
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert exc.value.problems == [
        "IMAGEBOT_GITHUB_APP_ID needs IMAGEBOT_GITHUB_PRIVATE_KEY or IMAGEBOT_GITHUB_PRIVATE_KEY_PATH",
        "set either IMAGEBOT_GITHUB_TOKEN or IMAGEBOT_GITHUB_APP_ID, not both",
        "IMAGEBOT_REGISTRY_USERNAME needs IMAGEBOT_REGISTRY_PASSWORD or IMAGEBOT_REGISTRY_PASSWORD_FILE",
    ]


def test_private_key_path_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGEBOT_GITHUB_APP_ID", "12")
    monkeypatch.setenv("IMAGEBOT_GITHUB_PRIVATE_KEY_PATH", str(tmp_path / "missing.pem"))
    with pytest.raises(SettingsError, match="no file at"):
        load_settings()
    (tmp_path / "missing.pem").write_text("-----BEGIN RSA PRIVATE KEY-----\n")
    assert load_settings().github_app_id == 12


@pytest.mark.parametrize("value", ["ghcr.io", "ghcr.io/acme", "localhost:5000", "127.0.0.1:5001/a/b", "[::1]:5000"])
def test_registry_forms(monkeypatch, value):
    monkeypatch.setenv("IMAGEBOT_REGISTRY", value)
    assert load_settings().registry == value


@pytest.mark.parametrize("value", ["ghcr.io/Acme", "host:99999", "host//x", "a b"])
def test_registry_rejects(monkeypatch, value):
    monkeypatch.setenv("IMAGEBOT_REGISTRY", value)
    with pytest.raises(SettingsError, match="IMAGEBOT_REGISTRY"):
        load_settings()


def test_every_setting_is_documented():
    """An operator finds every IMAGEBOT_ setting in README.md's table (the Kubernetes runtime's
    in docs/kubernetes.md)."""
    root = Path(__file__).resolve().parents[1]
    documented = (root / "README.md").read_text() + (root / "docs" / "kubernetes.md").read_text()
    missing = [name for name in Settings.model_fields if not re.search(rf"\b{name.upper()}\b", documented)]
    assert missing == []
