"""The yardstick: a bare Starlette endpoint that reads the body and answers JSON."""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def webhook(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"ok": True}, 201)


app = Starlette(routes=[Route("/webhooks/github", webhook, methods=["POST"])])
