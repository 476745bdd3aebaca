"""Who may read what on the status page.

A build records its repository's visibility (``builds.visibility``). Anyone may read public
repositories' builds, unless the operator made the whole page private (IMAGEBOT_STATUS_PRIVATE);
private ones need a reader: a request with ``Authorization: Bearer <IMAGEBOT_READ_TOKEN>`` (the
admin token counts as one), or the dashboard's login cookie. To anyone else a private build does
not exist (404, never 403), so its id, repository and log stay unknown.

The login cookie is signed (itsdangerous) with a key derived from the tokens themselves, so no
session store is needed and changing a token ends every session made with the old one. It is
HttpOnly (scripts cannot read it), SameSite=Lax (other sites' forms and fetches do not carry it)
and Secure when IMAGEBOT_PUBLIC_URL is https.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import parse_qs

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import ColumnElement
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from bot.models import PUBLIC, builds

COOKIE = "imagebot_session"
#: A login form's body at most (a token and where to go next).
MAX_FORM_BYTES = 4096
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="imagebot"'}


def _tokens(settings: Any) -> list[bytes]:
    """The configured tokens that make a reader (empty ones do not count)."""
    return [t.get_secret_value().encode() for t in (settings.read_token, settings.admin_token)
            if t is not None and t.get_secret_value()]


def _serializer(settings: Any) -> URLSafeTimedSerializer | None:
    tokens = _tokens(settings)
    if not tokens:
        return None
    key = hashlib.sha256(b"imagebot-session\0" + b"\0".join(tokens)).hexdigest()
    return URLSafeTimedSerializer(key, salt="imagebot-read-session")


def token_ok(settings: Any, token: str) -> bool:
    """Whether ``token`` is the read or the admin token (constant-time, both compared)."""
    given = token.strip().encode()
    matches = [hmac.compare_digest(given, t) for t in _tokens(settings)]
    return bool(given) and any(matches)


def _session_ok(request: Request) -> bool:
    raw = request.cookies.get(COOKIE)
    serializer = _serializer(request.app.state.settings)
    if not raw or serializer is None:
        return False
    try:
        serializer.loads(raw, max_age=int(request.app.state.settings.session_hours * 3600))
    except BadSignature:  # SignatureExpired is one
        return False
    return True


def is_reader(request: Request) -> bool:
    """Whether this request may read private repositories (bearer token or login cookie)."""
    if "imagebot_reader" not in request.scope:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        bearer = scheme.lower() == "bearer" and token_ok(request.app.state.settings, token)
        request.scope["imagebot_reader"] = bearer or _session_ok(request)
    return request.scope["imagebot_reader"]


def require_reader(request: Request) -> None:
    """401 unless the request is a reader."""
    if not is_reader(request):
        raise HTTPException(401, "a read token is needed (Authorization: Bearer <IMAGEBOT_READ_TOKEN>, "
                                 "or log in at /login)", headers=_CHALLENGE)


def public_only(request: Request) -> bool:
    """Whether this request sees public repositories only; 401 when the page is private to it."""
    if is_reader(request):
        return False
    if request.app.state.settings.status_private:
        require_reader(request)
    return True


def visible(request: Request) -> ColumnElement[bool] | None:
    """The condition on ``builds`` this request may see (None: every build)."""
    return builds.c.visibility == PUBLIC if public_only(request) else None


def require_metrics_reader(request: Request) -> None:
    settings = request.app.state.settings
    if settings.metrics_private or settings.status_private:
        require_reader(request)


# -- the dashboard's login (bot.api.dashboard serves the form) ---------------------------------


def next_path(raw: str | None) -> str:
    """Where to go after logging in: a path on this site only (no ``//host``, ``\\`` or control
    characters), so the form cannot send a reader elsewhere or split the redirect's headers."""
    if (not raw or not raw.startswith("/") or raw.startswith("//") or "\\" in raw or len(raw) > 1000
            or not (raw.isascii() and raw.isprintable())):  # a header value: no CR/LF, no Unicode
        return "/"
    return raw


def logins_on(settings: Any) -> bool:
    return _serializer(settings) is not None


async def login_form(request: Request) -> tuple[str, str]:
    """The token and the ``next`` path of a posted login form (at most MAX_FORM_BYTES)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            raise HTTPException(413, f"a login form is at most {MAX_FORM_BYTES} bytes")
        chunks.append(chunk)
    form = parse_qs(b"".join(chunks).decode("utf-8", "replace"))  # MAX_FORM_BYTES bounds its fields
    return (form.get("token") or [""])[0], next_path((form.get("next") or ["/"])[0])


def start_session(response: Response, settings: Any) -> None:
    """Set the signed login cookie on ``response``."""
    response.set_cookie(
        COOKIE, _serializer(settings).dumps({"reader": True}), max_age=int(settings.session_hours * 3600),
        httponly=True, samesite="lax", secure=settings.public_url.startswith("https://"), path="/",
    )


def end_session(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax")
