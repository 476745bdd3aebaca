"""GitLab's side of reporting: commit statuses through ``POST /projects/:id/statuses/:sha`` on
``GITLAB_URL`` with the ``PRIVATE-TOKEN`` header (plain httpx: there is one call, and the
maintained client, python-gitlab, is synchronous)."""

from __future__ import annotations

from typing import Any
import httpx

from bot.reporters import api_path
from bot.reporters.commit_status import CommitStatus
from bot.reporters.errors import ReportError, classify
from bot.settings import Settings


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)[:200]
    return str(body)[:200]


class GitLabClient:
    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.http = http or httpx.AsyncClient(timeout=30.0)

    async def create_status(self, project: str, sha: str, status: CommitStatus, name: str,
                            ref: str | None = None) -> dict[str, Any]:
        """Set the status ``name`` of ``sha`` in ``project`` (``group/sub/project`` or an id)."""
        token = self.settings.gitlab_api_token
        if token is None:
            raise ReportError("auth", "no GitLab API token is configured (IMAGEBOT_GITLAB_API_TOKEN)")
        url = self.settings.gitlab_url + api_path("api", "v4", "projects", project, "statuses", sha)
        body: dict[str, Any] = {"state": status.state, "name": name, "target_url": status.target_url,
                                "description": status.description}
        if ref:
            body["ref"] = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
        try:
            response = await self.http.post(url, json=body, headers={"PRIVATE-TOKEN": token.get_secret_value()})
        except httpx.TransportError as exc:
            raise ReportError("network", f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise classify(response.status_code, response.headers, _message(response))
        return response.json()

    async def aclose(self) -> None:
        await self.http.aclose()
