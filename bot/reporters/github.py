"""GitHub's side of reporting: auth (a token, or a GitHub App's installation tokens) and the
REST calls, through gidgethub's httpx backend against ``GITHUB_API_URL`` (github.com or GitHub
Enterprise Server).

Failures become :class:`bot.reporters.errors.ReportError` with a ``kind`` and the server's
retry hint, so the sender can back off as GitHub asks: ``Retry-After`` for secondary rate
limits and 429s, ``X-RateLimit-Reset`` when the primary limit is used up.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from gidgethub import GitHubException
from gidgethub import apps as github_apps
from gidgethub.httpx import GitHubAPI

from bot.reporters import api_path
from bot.reporters.commit_status import CommitStatus
from bot.reporters.errors import ReportError, classify
from bot.settings import Settings

#: Kept for readers of GitHub's side; the same error type serves every forge.
GitHubError = ReportError

USER_AGENT = "imagebot"
#: An installation token is renewed this long before GitHub says it expires.
TOKEN_MARGIN_SECONDS = 300


def _repo_path(repo: str, *rest: str | int) -> str:
    """``/repos/{owner}/{repo}/...`` with every segment quoted (bot.reporters.api_path); the
    ``{`` and ``}`` of a quoted value cannot open a URI template either."""
    return api_path("repos", *repo.split("/"), *rest)


class _API(GitHubAPI):
    """gidgethub's client, keeping the last response's headers: its exceptions drop them, and
    the retry hints are in them."""

    last_headers: Mapping[str, str] = {}

    async def _request(self, method: str, url: str, headers: Mapping[str, str], body: bytes = b""):
        status, response_headers, data = await super()._request(method, url, headers, body)
        self.last_headers = response_headers
        return status, response_headers, data


@dataclass
class _Token:
    value: str
    expires_at: float


class GitHubClient:
    """One bot's GitHub access: ``token`` mode (commit statuses) or ``app`` mode (statuses and
    check runs, with an installation token per installation, cached until near expiry)."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.base_url = settings.github_api_url
        self.http = http or httpx.AsyncClient(timeout=30.0)
        self._tokens: dict[int, _Token] = {}
        self.token_requests = 0  # installation tokens fetched (tests and metrics read it)

    @property
    def mode(self) -> str | None:
        if self.settings.github_app_id is not None:
            return "app"
        return "token" if self.settings.github_token is not None else None

    def _private_key(self) -> str:
        s = self.settings
        if s.github_private_key is not None:
            return s.github_private_key.get_secret_value()
        assert s.github_private_key_path is not None
        return s.github_private_key_path.read_text()

    def _api(self) -> _API:
        return _API(self.http, USER_AGENT, base_url=self.base_url)

    async def token(self, installation_id: int | None) -> str:
        """The token for a call about a repository of ``installation_id``."""
        if self.mode == "token":
            return self.settings.github_token.get_secret_value()
        if self.mode != "app":
            raise GitHubError("auth", "no GitHub credentials are configured (IMAGEBOT_GITHUB_TOKEN or an App)")
        if installation_id is None:
            raise GitHubError("auth", "the build has no installation id; GitHub App mode needs one")
        cached = self._tokens.get(installation_id)
        if cached is not None and cached.expires_at - TOKEN_MARGIN_SECONDS > time.time():
            return cached.value
        api = self._api()
        try:
            answer = await github_apps.get_installation_access_token(
                api, installation_id=str(installation_id), app_id=str(self.settings.github_app_id),
                private_key=self._private_key(),
            )
        except GitHubException as exc:
            raise self._error(exc, api) from None
        except httpx.TransportError as exc:
            raise GitHubError("network", f"{type(exc).__name__}: {exc}") from None
        self.token_requests += 1
        expires = datetime.fromisoformat(answer["expires_at"].replace("Z", "+00:00")).timestamp()
        self._tokens[installation_id] = _Token(answer["token"], expires)
        return answer["token"]

    def forget_token(self, installation_id: int | None) -> None:
        """Drop a cached installation token (GitHub refused it: fetch a fresh one next time)."""
        if installation_id is not None:
            self._tokens.pop(installation_id, None)

    async def create_status(self, repo: str, sha: str, status: CommitStatus, context: str,
                            installation_id: int | None = None) -> dict[str, Any]:
        """POST /repos/{owner}/{repo}/statuses/{sha}."""
        body = {"state": status.state, "description": status.description,
                "target_url": status.target_url, "context": context}
        return await self._call("POST", _repo_path(repo, "statuses", sha), body, installation_id)

    async def create_check_run(self, repo: str, body: dict[str, Any],
                               installation_id: int | None) -> dict[str, Any]:
        """POST /repos/{owner}/{repo}/check-runs (App mode only)."""
        return await self._call("POST", _repo_path(repo, "check-runs"), body, installation_id)

    async def update_check_run(self, repo: str, check_run_id: int, body: dict[str, Any],
                               installation_id: int | None) -> dict[str, Any]:
        """PATCH /repos/{owner}/{repo}/check-runs/{check_run_id} (App mode only)."""
        return await self._call("PATCH", _repo_path(repo, "check-runs", check_run_id), body, installation_id)

    async def find_check_run(self, repo: str, sha: str, name: str, external_id: str,
                             installation_id: int | None) -> dict[str, Any] | None:
        """This App's check run ``name`` on ``sha`` with ``external_id``, if GitHub has one.

        GET /repos/{owner}/{repo}/commits/{sha}/check-runs, every page (gidgethub follows the
        ``Link`` header). A create whose answer was lost (a crash, a timeout, a 502 after the
        fact) may still have made the run; looking first keeps a retry from making a second.
        """
        url = _repo_path(repo, "commits", sha, "check-runs") + "{?check_name,filter,app_id,per_page}"
        query = {"check_name": name, "filter": "all", "app_id": str(self.settings.github_app_id),
                 "per_page": "100"}

        async def first(api: _API, token: str) -> dict[str, Any] | None:
            async for run in api.getiter(url, query, oauth_token=token, iterable_key="check_runs"):
                if run.get("external_id") == external_id:
                    return run
            return None

        return await self._with_token(installation_id, first)

    async def _call(self, method: str, url: str, body: dict[str, Any],
                    installation_id: int | None) -> dict[str, Any]:
        async def send(api: _API, token: str) -> dict[str, Any]:
            request = api.post if method == "POST" else api.patch
            return await request(url, data=body, oauth_token=token)

        return await self._with_token(installation_id, send)

    async def _with_token(self, installation_id: int | None, work):
        """``work(api, token)``, with GitHub's refusals and network faults as ReportErrors."""
        token = await self.token(installation_id)
        api = self._api()
        try:
            return await work(api, token)
        except GitHubException as exc:
            error = self._error(exc, api)
            if error.kind == "auth":
                self.forget_token(installation_id)
            raise error from None
        except httpx.TransportError as exc:
            raise GitHubError("network", f"{type(exc).__name__}: {exc}") from None

    @staticmethod
    def _error(exc: GitHubException, api: _API) -> GitHubError:
        status = getattr(getattr(exc, "status_code", None), "value", None) or getattr(exc, "status_code", 0)
        return classify(int(status or 0), api.last_headers, str(exc))

    async def aclose(self) -> None:
        await self.http.aclose()
