"""A local HTTP server that speaks the parts of the Slack Web API and the Telegram Bot API we use.

It records every call (path and payload) so tests assert on what the platform received. Bound to
port 0 on loopback; nothing leaves the machine.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

SLACK_TOKEN = "xoxb-000000000000-000000000000-" + "a" * 24
SLACK_SECRET = "0" * 32
TELEGRAM_TOKEN = "123456789:" + "A" * 35
BOT_USER = "U0BOT00000"


class FakePlatforms:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.members = [{"id": "U0PRIYA000", "profile": {"real_name": "Priya Raman", "display_name": "priya"}}]
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode() if length else ""
                kind = self.headers.get("Content-Type", "")
                if "json" in kind and raw:
                    payload = json.loads(raw)
                else:
                    payload = {k: v[0] for k, v in parse_qs(raw).items()}
                owner.calls.append((self.path, payload))
                self._reply(owner.answer(self.path, payload))

            do_GET = do_POST

            def _reply(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def slack_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    @property
    def telegram_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    def answer(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        method = path.rsplit("/", 1)[-1]
        if path.startswith("/api/"):
            if method == "auth.test":
                return {"ok": True, "user_id": BOT_USER, "bot_id": "B0BOT", "team_id": "T0TEAM", "user": "supportbot"}
            if method == "users.list":
                return {"ok": True, "members": self.members, "response_metadata": {"next_cursor": ""}}
            if method == "chat.postMessage":
                return {"ok": True, "channel": payload.get("channel"), "ts": f"{time.time():.6f}"}
            return {"ok": True}
        if method == "getMe":
            return {"ok": True, "result": {"id": 123456789, "is_bot": True, "first_name": "supportbot", "username": "supportbot"}}
        if method == "sendMessage":
            return {"ok": True, "result": {"message_id": int(time.time()) % 100000, "date": int(time.time()),
                                           "chat": {"id": int(payload["chat_id"]), "type": "private"},
                                           "text": payload.get("text", "")}}
        return {"ok": True, "result": True}

    def posted(self, method: str) -> list[dict[str, Any]]:
        return [payload for path, payload in self.calls if path.endswith("/" + method)]

    def wait_for(self, method: str, count: int = 1, timeout: float = 180.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.posted(method)
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"{method} was called {len(self.posted(method))} times, expected {count}: {self.calls}")

    def close(self) -> None:
        self.server.shutdown()
