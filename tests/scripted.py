"""A real HTTP server that answers the way odd providers and gateways do, from a script.

    with ScriptedServer([Reply(200, body), Reply(429, {...}, {"retry-after": "2"})]) as server:
        ...  # OpenAI(base_url=server.base_url) gets these answers in order; the last one repeats

Bodies are dicts (sent as JSON) or raw bytes (sent as they are, e.g. JSON with a lone surrogate
escape). Every request's path and JSON body is kept in `server.requests`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def completion(content: str | None = "A hero who flies.", finish_reason: str | None = "stop", **message: Any) -> dict:
    """A chat.completion body as OpenAI sends it."""
    return {
        "id": "chatcmpl-scripted", "object": "chat.completion", "created": 1, "model": "scripted-model",
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": content, **message}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27},
    }


class ScriptedServer:
    def __init__(self, replies: list[Reply]):
        self.replies = list(replies)
        self.requests: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                with server._lock:
                    server.requests.append((self.path, json.loads(raw) if raw else None))
                    reply = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
