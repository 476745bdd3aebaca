"""The status page in a real browser (Debian's Chromium, headless, driven by Playwright): a
signed webhook to a served ``imagebot`` makes a build appear in the open list without a
reload; the real pipeline builds it for two platforms (fetch over HTTP, Docker with QEMU, push,
manifest list); its page shows a timeline lane per platform, and follows the build's stream
(log tail, timeline). A screenshot of that page is kept in ``$IMAGEBOT_TEST_ARTIFACTS``
(default /tmp/imagebot-artifacts); the test prints its path."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from bot import telemetry
from bot.db import Database
from bot.models import utcnow
from tests.standins.git_http import GitHTTPServer, make_repo, multiarch_fixture_files
from tests.support import github_headers, github_payload, infra
from tests.test_api_stream import serving

pytestmark = pytest.mark.e2e

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
#: Read at import: the autouse fixture that keeps IMAGEBOT_* out of the tests' settings runs first.
ARTIFACTS = Path(os.environ.get("IMAGEBOT_TEST_ARTIFACTS", "/tmp/imagebot-artifacts"))
#: A two-platform build takes seconds with a warm engine; the first one on a machine, longer.
BUILD_TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def services() -> dict[str, str]:
    return infra("docker", "registry", "binfmt", "base-image", "chromium")


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def browser(services, tmp_path) -> Iterator[BrowserContext]:
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=services["IMAGEBOT_TEST_CHROMIUM"], headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def push_webhook(url: str, clone_url: str, sha: str) -> int:
    """A signed GitHub push of ``sha`` to main of acme/app, served from ``clone_url``."""
    payload = github_payload("push.payload.4")
    payload["repository"].update(clone_url=clone_url, full_name="acme/app", default_branch="main")
    payload.update(after=sha, ref="refs/heads/main")
    body = json.dumps(payload).encode()
    answer = httpx.post(f"{url}/webhooks/github", content=body, headers=github_headers("push", body, uuid.uuid4().hex))
    assert answer.status_code == 201, answer.text
    return answer.json()["build_id"]


def open_list(page: Page, url: str) -> None:
    page.goto(f"{url}/")
    expect(page.locator("h1")).to_have_text("Builds")
    expect(page.locator("#live")).to_be_visible()  # the event stream is connected
    page.evaluate("window.notReloaded = true")


def test_a_webhook_build_appears_live_and_its_page_has_a_lane_per_platform(services, browser, artifacts, tmp_path):
    repo = make_repo(tmp_path / "srv", "acme/app", multiarch_fixture_files(services["IMAGEBOT_TEST_BASE_IMAGE"]))
    env = {
        "IMAGEBOT_PLACEHOLDER_BUILD_SECONDS": "0",
        "IMAGEBOT_REGISTRY": f"{services['IMAGEBOT_TEST_REGISTRY']}/ui{uuid.uuid4().hex[:8]}",
        "IMAGEBOT_REGISTRY_USERNAME": services["IMAGEBOT_TEST_REGISTRY_USERNAME"],
        "IMAGEBOT_REGISTRY_PASSWORD": services["IMAGEBOT_TEST_REGISTRY_PASSWORD"],
    }
    page = browser.new_page()
    database = f"sqlite:///{tmp_path / 'bot.db'}"
    with GitHTTPServer(tmp_path / "srv") as git, \
            serving(database, tmp_path / "bot.log", env={**env, "IMAGEBOT_GITHUB_URL": git.url}) as url:
        open_list(page, url)
        build_id = push_webhook(url, git.repo_url("acme/app"), repo.head())

        row = page.locator(f"#build-{build_id}")
        expect(row).to_be_visible()  # arrived over SSE: no reload
        expect(row).to_have_attribute("data-status", "succeeded", timeout=BUILD_TIMEOUT_MS)
        assert page.evaluate("window.notReloaded") is True

        row.locator(f'a[href="/builds/{build_id}"]').click()
        expect(page.locator(".build-head .status")).to_have_text("succeeded")
        page.evaluate("window.notReloaded = true")
        for platform in ("linux/amd64", "linux/arm64"):
            lane = page.locator(f'.lane[data-lane="{platform}"]')
            for kind in ("build", "tag", "push"):
                expect(lane.locator(f'.span[data-kind="{kind}"]')).to_have_count(1)
            result = page.locator(f'tr.platform[data-platform="{platform}"]')
            expect(result.locator(".status")).to_have_text("pushed")
            expect(result.locator("code.digest")).to_have_text(re.compile(r"^sha256:[0-9a-f]{64}$"))
        expect(page.locator('.lane[data-lane="build"] .span[data-kind="manifest"]')).to_have_count(1)
        expect(page.locator("#log")).to_contain_text("[linux/arm64]")
        shot = artifacts / f"dashboard-build-{uuid.uuid4().hex[:8]}.png"
        page.screenshot(path=str(shot), full_page=True)

        # the open page follows its build's stream: a log line and an event written now (as a
        # worker process would) show up without a reload
        db = Database(database)
        try:
            db.write_sync(lambda c: telemetry._store_log_lines(c, [(build_id, None, utcnow(), ["written later"])]))
            db.write_sync(lambda c: telemetry.record(c, build_id, "build_platform_started", utcnow(),
                                                     "linux/riscv64", image="late"))
        finally:
            db.close()
        expect(page.locator("#log")).to_contain_text("[build] written later")
        expect(page.locator('.lane[data-lane="linux/riscv64"] .span[data-kind="build"]')).to_have_count(1)
        assert page.evaluate("window.notReloaded") is True
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
