"""Local fakes of the Slack Web API (plus a Socket Mode WebSocket server) and the Telegram Bot API.

They record every call (path and payload) so tests assert on what the platform received, and can
answer a call with a rate limit (429 + Retry-After) to test retries. Telegram's getUpdates serves
updates a test pushes, so the real `supportbot telegram` process long-polls this fake. Bound to
port 0 on loopback; nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

SLACK_TOKEN = "xoxb-000000000000-000000000000-" + "a" * 24
SLACK_APP_TOKEN = "xapp-1-A000000000-000000000000-" + "b" * 64
SLACK_SECRET = "0" * 32
TELEGRAM_TOKEN = "123456789:" + "A" * 35
BOT_USER = "U0BOT00000"
TELEGRAM_BOT_ID = 123456789
TELEGRAM_BOT_NAME = "supportbot"


class FakePlatforms:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.call_times: list[float] = []  # time.monotonic() of each call, for benchmarks
        # Two pages of members: the adapter must follow the cursor.
        self.member_pages = [
            [{"id": "U0PRIYA000", "profile": {"real_name": "Priya Raman", "display_name": "priya"}}],
            [{"id": "U0OKONKWO0", "profile": {"real_name": "Chidi Okonkwo", "display_name": "chidi"}}],
        ]
        self.rate_limits: dict[str, int] = {}  # method -> how many next calls get 429
        self.rate_limit_where: dict[str, Any] = {}  # method -> which calls count (a predicate on the payload)
        self.updates: list[dict[str, Any]] = []
        self.uploads: dict[str, bytes] = {}  # Slack file id or Telegram form field -> uploaded bytes
        self.socket_url: str | None = None
        self._ts = itertools.count(1)
        self._message_ids = itertools.count(5000)
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                kind = self.headers.get("Content-Type", "")
                if self.path.startswith("/upload/") or "multipart/form-data" in kind:
                    # Binary bodies: Slack's file upload URL, Telegram's sendPhoto (admin reports).
                    payload = owner.take_binary(self.path, kind, body)
                    if self.path.startswith("/upload/"):
                        self.send_response(200)
                        self.send_header("Content-Type", "text/plain")
                        self.send_header("Content-Length", "2")
                        self.end_headers()
                        self.wfile.write(b"OK")
                        return
                elif "json" in kind and body:
                    payload = json.loads(body.decode())
                else:
                    raw = body.decode()
                    payload = {k: v[0] for k, v in parse_qs(raw).items()}
                    if "?" in self.path:
                        payload.update({k: v[0] for k, v in parse_qs(self.path.split("?", 1)[1]).items()})
                path = self.path.split("?", 1)[0]
                method = path.rsplit("/", 1)[-1]
                with owner._lock:
                    where = owner.rate_limit_where.get(method)
                    limited = owner.rate_limits.get(method, 0) > 0 and (where is None or where(payload))
                    if limited:
                        owner.rate_limits[method] -= 1
                    elif method == "sendMessage":  # ids in call order, so tests can find a message's id
                        payload["_message_id"] = next(owner._message_ids)
                    elif method == "chat.postMessage":
                        payload["_ts"] = owner.next_ts()
                    owner.calls.append((path, {**payload, "_rate_limited": limited} if limited else payload))
                    owner.call_times.append(time.monotonic())
                if limited:
                    if path.startswith("/api/"):
                        self._reply({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": "1"})
                    else:
                        self._reply({"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 1",
                                     "parameters": {"retry_after": 1}}, status=429)
                    return
                self._reply(owner.answer(path, payload))

            do_GET = do_POST

            def _reply(self, body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def slack_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    @property
    def telegram_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    def next_ts(self) -> str:
        return f"1800000000.{next(self._ts):06d}"

    def answer(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        method = path.rsplit("/", 1)[-1]
        if path.startswith("/api/"):
            if method == "auth.test":
                return {"ok": True, "user_id": BOT_USER, "bot_id": "B0BOT", "team_id": "T0TEAM", "user": "supportbot"}
            if method == "users.list":
                page = int(payload.get("cursor") or 0)
                following = str(page + 1) if page + 1 < len(self.member_pages) else ""
                return {"ok": True, "members": self.member_pages[page], "response_metadata": {"next_cursor": following}}
            if method == "chat.postMessage":
                return {"ok": True, "channel": payload.get("channel"), "ts": payload.get("_ts") or self.next_ts()}
            if method == "conversations.open":  # a DM with the user (admin reports)
                return {"ok": True, "channel": {"id": "D" + str(payload.get("users", "")).split(",")[0]}}
            if method == "files.getUploadURLExternal":
                file_id = f"F{next(self._ts):08d}"
                return {"ok": True, "file_id": file_id, "upload_url": f"http://127.0.0.1:{self.port}/upload/{file_id}"}
            if method == "files.completeUploadExternal":
                files = payload.get("files")
                files = json.loads(files) if isinstance(files, str) else files or []
                return {"ok": True, "files": [{"id": f["id"], "title": f.get("title")} for f in files]}
            if method == "chat.update":
                return {"ok": True, "channel": payload.get("channel"), "ts": payload.get("ts")}
            if method == "chat.getPermalink":  # the desk card links back to the employee's thread
                return {"ok": True, "channel": payload.get("channel"),
                        "permalink": f"https://fake.slack.test/archives/{payload.get('channel')}/"
                                     f"p{str(payload.get('message_ts', '')).replace('.', '')}"}
            if method == "apps.connections.open":
                return {"ok": True, "url": self.socket_url} if self.socket_url else {"ok": False, "error": "no_socket"}
            return {"ok": True}
        if method == "getMe":
            return {"ok": True, "result": {"id": TELEGRAM_BOT_ID, "is_bot": True, "first_name": "supportbot",
                                           "username": TELEGRAM_BOT_NAME}}
        if method == "getUpdates":
            offset = int(payload.get("offset") or 0)
            deadline = time.monotonic() + min(float(payload.get("timeout") or 0), 0.5)
            while True:
                with self._lock:
                    pending = [u for u in self.updates if u["update_id"] >= offset]
                if pending or time.monotonic() >= deadline:
                    return {"ok": True, "result": pending}
                time.sleep(0.05)
        if method in ("sendMessage", "editMessageText", "sendPhoto"):
            chat_id = int(payload["chat_id"])
            return {"ok": True, "result": {
                "message_id": int(payload.get("message_id") or payload.get("_message_id") or next(self._message_ids)), "date": int(time.time()),
                "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
                "from": {"id": TELEGRAM_BOT_ID, "is_bot": True, "first_name": "supportbot", "username": TELEGRAM_BOT_NAME},
                "text": payload.get("text", "")}}
        return {"ok": True, "result": True}

    def take_binary(self, path: str, content_type: str, body: bytes) -> dict[str, Any]:
        """A Slack upload (raw bytes, kept in ``uploads`` by file id) or a Telegram multipart form (its
        text fields as the payload, each file's bytes in ``uploads`` by field name)."""
        if path.startswith("/upload/"):
            with self._lock:
                self.uploads[path.rsplit("/", 1)[-1]] = body
            return {"_bytes": len(body)}
        from email.parser import BytesParser
        from email.policy import HTTP

        form = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        payload: dict[str, Any] = {}
        for part in form.iter_parts():
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True) or b""
            if part.get_filename():
                payload[f"_file_{name}"] = len(data)
                with self._lock:
                    self.uploads[str(name)] = data
            else:
                payload[str(name)] = data.decode()
        return payload

    def push_update(self, update: dict[str, Any]) -> None:
        with self._lock:
            self.updates.append(update)

    def posted(self, method: str) -> list[dict[str, Any]]:
        with self._lock:
            return [payload for path, payload in self.calls if path.endswith("/" + method)]

    def wait_for(self, method: str, count: int = 1, timeout: float = 180.0, where=None) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [p for p in self.posted(method) if where is None or where(p)]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{method} was called {len(self.posted(method))} times, expected {count}: {self.calls[-20:]}")

    def close(self) -> None:
        self.server.shutdown()


class FakeSocketMode:
    """A Slack Socket Mode endpoint: apps.connections.open hands out its ws:// URL; each connection gets
    "hello", then the envelopes a test pushes; the app's acknowledgements are recorded by envelope id."""

    def __init__(self, platforms: FakePlatforms) -> None:
        from aiohttp import web

        self.acks: dict[str, dict[str, Any]] = {}
        self.connections: list[Any] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def link(request):  # type: ignore[no-untyped-def]
            socket = web.WebSocketResponse(heartbeat=None)
            await socket.prepare(request)
            self.connections.append(socket)
            await socket.send_json({"type": "hello", "num_connections": 1, "debug_info": {"host": "fake"},
                                    "connection_info": {"app_id": "A0APP"}})
            async for frame in socket:
                if frame.type.name == "TEXT":
                    data = json.loads(frame.data)
                    if "envelope_id" in data:
                        self.acks[data["envelope_id"]] = data
            return socket

        async def start() -> None:
            app = web.Application()
            app.router.add_get("/link", link)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop)
        ready.wait(10)
        platforms.socket_url = f"ws://127.0.0.1:{self.port}/link"

    def push(self, envelope: dict[str, Any]) -> None:
        async def send() -> None:
            for socket in list(self.connections):
                if not socket.closed:
                    await socket.send_json(envelope)
                    return
            raise RuntimeError("no Socket Mode connection")

        asyncio.run_coroutine_threadsafe(send(), self.loop).result(10)

    def wait_connected(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(not s.closed for s in self.connections):
                return
            time.sleep(0.05)
        raise AssertionError("the app did not open a Socket Mode connection")

    def wait_ack(self, envelope_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if envelope_id in self.acks:
                return self.acks[envelope_id]
            time.sleep(0.02)
        raise AssertionError(f"envelope {envelope_id} was not acknowledged")

    def close(self) -> None:
        async def stop() -> None:
            for socket in self.connections:
                await socket.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


class AdapterProcess:
    """A real `supportbot slack` / `supportbot telegram` process on the test's settings."""

    def __init__(self, command: list[str], *, settings, env: dict[str, str], name: str) -> None:  # type: ignore[no-untyped-def]
        import subprocess
        import sys

        from tests.conftest import ROOT, settings_env

        self.log = settings.data_dir / f"adapter-{name}.log"
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", *command], stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
            env={**settings_env(settings), **env}, cwd=ROOT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_http(self, port: int, path: str = "/health", timeout: float = 600.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"adapter exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"adapter not serving: {self.log.read_text()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
