"""What GitHub and GitLab ingress share: bounded body reading, JSON parsing, payload field
access with clear errors, and recording a decision with the answer it earns.

Every body that passed the forge's check is still untrusted text: it is parsed with a bounded
nesting depth, and what it asks to store must fit the columns (no NUL, no lone surrogate, no
string longer than its column, no integer outside it), so hostile bodies get a 400 that says
why, never a 500 from deep inside the parser or the database.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import orjson
from gidgethub import sansio
from gidgethub.routing import Router
from sqlalchemy import BigInteger, Column, Integer, String, Table
from sqlalchemy.exc import IntegrityError
from starlette.requests import Request
from starlette.responses import JSONResponse

from bot.db import Database
from bot.models import builds, deliveries, utcnow
from bot.reporters import outbox
from bot.queue import (BuildRequest, CancelRef, Decision, DeliveryInfo, Ignore, Incoming, Recorded,
                       record_deliveries)

log = logging.getLogger(__name__)

#: The markers that turn a push into a skipped build, as GitHub Actions and GitLab CI read them.
SKIP_MARKERS = ("[skip ci]", "[ci skip]", "[no ci]")

#: HTTP status per outcome of a first delivery.
_STATUS = {"queued": 201, "skipped": 201, "cancelled": 200, "ping": 200, "ignored": 202}


class WebhookError(Exception):
    """A delivery refused with ``status`` and a reason the sender can act on."""

    def __init__(self, status: int, reason: str, kind: str = "bad_request") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.kind = kind


def router_for(deciders: dict[str, Callable[[dict[str, Any]], Decision]]) -> Router:
    """A gidgethub ``Router`` that sends each event name to its pure decision function."""
    router = Router()
    for event_name, decide_payload in deciders.items():

        async def handler(event: sansio.Event, out: list[Decision], _decide=decide_payload) -> None:
            out.append(_decide(event.data))

        router.add(handler, event_name)
    return router


async def decide(router: Router, event: sansio.Event) -> Decision:
    """What an event asks of imagebot; events nobody handles are ignored, with a reason."""
    decisions: list[Decision] = []
    await router.dispatch(event, decisions)
    return decisions[0] if decisions else Ignore(f"event {event.event!r} does not build")


def skip_reason(message: str | None) -> str | None:
    """The skip marker in a commit message, as the reason a build is skipped, or None."""
    lowered = (message or "").lower()
    for marker in SKIP_MARKERS:
        if marker in lowered:
            return f"{marker} in the head commit message"
    return None


def field(
    payload: Any,
    path: str,
    *,
    of: type | tuple[type, ...] = str,
    optional: bool = False,
    at: str | None = None,
) -> Any:
    """``payload["a"]["b"]`` for ``path`` "a.b", of type ``of``, or a 400 naming the field.

    Payloads are checked where they are read, so that a malformed delivery is refused with a
    reason instead of failing deeper down. ``at`` names where ``payload`` sits in the delivery.
    """
    name = f"{at}.{path}" if at else path
    value = payload
    for part in path.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            if optional:
                return None
            raise WebhookError(400, f"payload has no {name}", kind="payload")
        value = value[part]
    if not isinstance(value, of) or (of is int and isinstance(value, bool)):
        raise WebhookError(400, f"payload field {name} has the wrong type", kind="payload")
    if isinstance(value, str) and not value.strip():
        raise WebhookError(400, f"payload field {name} is empty", kind="payload")
    return value


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) anything over ``limit`` without reading all of it.

    Its SHA-256 is kept on ``request.state`` for :func:`accept`, which uses it (once the forge's
    check has passed) to recognise a replayed body under a new delivery id."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise WebhookError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise WebhookError(
                413, f"payload of {declared} bytes is over the limit of {limit}", kind="too_large"
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise WebhookError(413, f"payload is over the limit of {limit} bytes", kind="too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    request.state.body_sha256 = hashlib.sha256(body).hexdigest()
    return body


def parse_payload(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The JSON object of a delivery; GitHub's form encoding (``payload=...``) is accepted too."""
    if (content_type or "").startswith("application/x-www-form-urlencoded"):
        form = parse_qs(body.decode("utf-8", "replace"))
        if "payload" not in form:
            raise WebhookError(400, "form-encoded delivery has no payload field")
        text = form["payload"][0]
    else:
        text = body
    try:
        # orjson bounds nesting (1024 levels) and refuses lone surrogates, NaN and infinities
        payload = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise WebhookError(400, f"payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise WebhookError(400, "payload is not a JSON object")
    return payload


def required_header(request: Request, name: str) -> str:
    value = request.headers.get(name, "").strip()
    if not value:
        raise WebhookError(400, f"missing {name} header")
    if len(value) > 128:
        raise WebhookError(400, f"{name} header is longer than 128 characters")
    return value


async def accept(
    request: Request,
    router: Router,
    payload: dict[str, Any],
    delivery: DeliveryInfo,
    admit: Callable[[Decision], Decision] | None = None,
) -> JSONResponse:
    """Decide what a verified delivery asks for, hold it to the operator's rules (``admit``,
    e.g. bot.webhooks.checks.admit), record it, and answer the forge."""
    event = sansio.Event(payload, event=delivery.event, delivery_id=delivery.delivery_id or "")
    if delivery.body_sha256 is None:
        delivery = dataclasses.replace(delivery, body_sha256=getattr(request.state, "body_sha256", None))
    decision = await decide(router, event)
    return await record(request, delivery, admit(decision) if admit else decision)


def text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


#: Where each value a delivery stores or looks up goes (names match columns).
_TABLES: dict[type, Table] = {DeliveryInfo: deliveries, BuildRequest: builds, CancelRef: builds}
#: Free text that is cut to fit when stored: only its characters are checked.
_CUT_TO_FIT = frozenset({"reason", "skip_reason"})


def unstorable(value: str | int, column: Column | None) -> str | None:
    """Why ``value`` cannot be stored in ``column`` (None: no column, characters only), or None."""
    if isinstance(value, str):
        if "\x00" in value:
            return "contains a NUL character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode text (a lone surrogate)"
        length = column.type.length if column is not None and isinstance(column.type, String) else None
        if length and len(value) > length:
            return f"is longer than {length} characters"
    elif column is not None and isinstance(column.type, Integer) and not isinstance(value, bool):
        bound = 2**63 if isinstance(column.type, BigInteger) else 2**31
        if not -bound <= value < bound:
            return "is out of range"
    return None


def check_storable(delivery: DeliveryInfo, decision: Decision) -> None:
    """Refuse (400, naming the field) a delivery whose values the database cannot hold.

    PostgreSQL refuses NUL characters and over-long strings, SQLite lone surrogates; either
    would surface as a 500 deep in the writer. Checked here against the columns themselves,
    so every value that reaches a statement is covered, whatever field it came from."""
    for item in (delivery, decision):
        table = _TABLES.get(type(item))
        for name, value in vars(item).items():
            if isinstance(value, str | int):
                column = table.c.get(name) if table is not None and name not in _CUT_TO_FIT else None
                if problem := unstorable(value, column):
                    raise WebhookError(400, f"{name} {problem}", kind="payload")


async def record(request: Request, delivery: DeliveryInfo, decision: Decision) -> JSONResponse:
    """Store the delivery and its effect in one transaction, then answer the forge."""
    db: Database = request.app.state.db
    platforms = request.app.state.settings.platforms

    check_storable(delivery, decision)
    reported = delivery.provider in outbox.report_to(request.app.state.settings)
    incoming = Incoming(delivery, decision, platforms, utcnow(), reported)
    try:
        recorded = await db.write_item(record_deliveries, incoming)
    except IntegrityError:
        # Another process stored the same delivery id between our lookup and insert.
        recorded = await db.write_item(record_deliveries, incoming)
    if not recorded.duplicate:
        if recorded.superseded or recorded.cancelled:
            request.app.state.notify_ended(recorded.superseded + recorded.cancelled)
        if recorded.outcome == "queued":
            request.app.state.notify_queued()
    log.info(
        "%s delivery %s (%s%s) for %s: %s%s",
        delivery.provider, delivery.delivery_id, delivery.event,
        f"/{delivery.action}" if delivery.action else "", delivery.repo, recorded.outcome,
        (f" (replay of delivery {recorded.duplicate_of})" if recorded.duplicate_of
         else " (duplicate)" if recorded.duplicate else ""),
    )
    return JSONResponse(_answer(delivery, recorded), 200 if recorded.duplicate else _STATUS[recorded.outcome])


def _answer(delivery: DeliveryInfo, recorded: Recorded) -> dict[str, Any]:
    body: dict[str, Any] = {
        "delivery": delivery.delivery_id,
        "duplicate": recorded.duplicate,
        "outcome": recorded.outcome,
    }
    if recorded.reason:
        body["reason"] = recorded.reason
    if recorded.duplicate_of is not None:
        body["duplicate_of"] = recorded.duplicate_of
    if recorded.build_id is not None:
        body["build_id"] = recorded.build_id
    if recorded.superseded:
        body["superseded"] = recorded.superseded
    if recorded.cancelled or recorded.outcome == "cancelled":
        body["cancelled"] = recorded.cancelled
    return body
