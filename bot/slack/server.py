"""Running the Slack app: Socket Mode (no inbound port; the default with an app-level token) or the
HTTP Events API under uvicorn, behind a guard that bounds what one request may cost.

The guard reads the whole body first, with a size limit (413) and a per-read timeout (408), and
answers a body that is neither JSON nor a Slack form with 400; only then Bolt's ASGI adapter sees the
request. uvicorn serves many connections at once, so a slow client holds only its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from bot.intake import Intake
from core.settings import Settings

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
# An oversized body is read and thrown away up to this much so that its client gets the 413; beyond it the
# connection is simply closed (a client sending more is not one to be polite to).
DRAIN_BYTES = 16 * 1024 * 1024
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def well_formed(body: bytes, content_type: str) -> bool:
    """Whether a body is something Slack sends: a JSON object (events) or a form (interactivity, commands)."""
    try:
        text = body.decode("utf-8")
        if "application/json" in content_type:
            return isinstance(json.loads(text), dict)
        form = parse_qs(text, strict_parsing=True)
        if "payload" in form:
            return isinstance(json.loads(form["payload"][0]), dict)
        return "command" in form
    except (UnicodeDecodeError, ValueError):
        return False


class GuardedEndpoint:
    """ASGI app: /slack/events through the guard to Bolt's handler, /health for probes."""

    def __init__(self, handler, *, max_body: int, read_timeout_s: float,  # type: ignore[no-untyped-def]
                 on_startup: Callable[[], Awaitable[None]] | None = None) -> None:
        self.handler = handler
        self.max_body = max_body
        self.read_timeout_s = read_timeout_s
        self.on_startup = on_startup
        self._tasks: list[asyncio.Task[None]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await _respond(send, 200, b"ok")
            return
        if scope["path"] != EVENTS_PATH or scope["method"] != "POST":
            await _respond(send, 404, b"not found")
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await self._refuse_large(receive, send)
            return
        body = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                await _respond(send, 408, b"request body not received in time")
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await self._refuse_large(receive, send, more=bool(message.get("more_body")))
                return
            if not message.get("more_body"):
                break
        if not well_formed(bytes(body), headers.get("content-type", "")):
            await _respond(send, 400, b"malformed request body")
            return
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.handler(scope, replay, send)

    async def _refuse_large(self, receive: Receive, send: Send, more: bool = True) -> None:
        """413, after reading what the client is still sending (discarded, up to ``DRAIN_BYTES``): a server
        that answers and closes mid-upload makes the client fail with a broken pipe before it reads the
        answer (uvicorn ends a cycle's reads once its response is sent, so the reading comes first)."""
        drained = 0
        while more and drained <= DRAIN_BYTES:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                break
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            more = bool(message.get("more_body"))
        await _respond(send, 413, b"request body too large")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.on_startup is not None:
                    self._tasks.append(asyncio.create_task(self.on_startup()))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for task in self._tasks:
                    task.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def http_app(*, settings: Settings, intake: Intake, app=None) -> GuardedEndpoint:  # type: ignore[no-untyped-def]
    from slack_bolt.adapter.asgi.async_handler import AsyncSlackRequestHandler

    from bot.slack.app import build_app, refresh_members_forever

    app = app or build_app(settings=settings, intake=intake)
    return GuardedEndpoint(
        AsyncSlackRequestHandler(app, path=EVENTS_PATH),
        max_body=settings.http_max_body_bytes,
        read_timeout_s=settings.http_read_timeout_s,
        on_startup=lambda: refresh_members_forever(app.client, intake, settings.slack_members_refresh_s),
    )


def serve_http(*, settings: Settings, intake: Intake, host: str, port: int) -> None:
    import uvicorn

    config = uvicorn.Config(
        http_app(settings=settings, intake=intake),
        host=host,
        port=port,
        lifespan="on",
        limit_concurrency=settings.http_max_concurrency,
        timeout_keep_alive=5,
        log_level="warning",
        access_log=False,
    )
    uvicorn.Server(config).run()


async def run_socket_mode(*, settings: Settings, intake: Intake) -> None:
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    from bot.slack.app import build_app, refresh_members_forever

    assert settings.slack_app_token is not None
    app = build_app(settings=settings, intake=intake, socket_mode=True)
    refresher = asyncio.create_task(refresh_members_forever(app.client, intake, settings.slack_members_refresh_s))
    handler = AsyncSocketModeHandler(app, app_token=settings.slack_app_token.get_secret_value(), web_client=app.client)
    try:
        await handler.start_async()  # runs until cancelled
    finally:
        refresher.cancel()
        await handler.close_async()


def serve(*, settings: Settings, intake: Intake, port: int, host: str = "0.0.0.0", http: bool = False) -> None:
    """`supportbot slack`: Socket Mode when an app-level token is set (unless ``http``), else HTTP."""
    if settings.slack_app_token and not http:
        log.info("Slack: Socket Mode")
        asyncio.run(run_socket_mode(settings=settings, intake=intake))
    else:
        log.info("Slack: HTTP Events API on %s:%d%s", host, port, EVENTS_PATH)
        serve_http(settings=settings, intake=intake, host=host, port=port)
