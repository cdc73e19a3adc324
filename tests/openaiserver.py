"""A scripted OpenAI-compatible server on 127.0.0.1, for `--engine openai` fault tests.

It answers `GET /v1/models`, optionally `GET /props` (as llama-server does: `total_slots`, so
the client sends `n`), and `POST /v1/chat/completions` with a reply that depends only on the
request (messages, seed, choice index), so a test can tell which request made which node.

Faults are scripted per chat request, in arrival order (`script`, a list consumed one entry a
request; the rest answer normally): "429" (with `Retry-After: 1`), "503", "drop" (headers and a
few bytes of the body, then the connection closes), "hang" (no answer for `hang_seconds`), or
"kill" (the server stops: this request and every later one find nothing), or bytes: a 200
answer with exactly that body (an answer of the wrong shape). Every chat request is recorded
with its time, headers and body.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _QuietServer(ThreadingHTTPServer):
    """A client that gave up (malt stops at its first failed endpoint, with other requests in
    flight) closes sockets the server still writes to: not news, and not to be printed on the
    stderr a test reads."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class ChatRequest:
    at: float
    session: str | None
    authorization: str | None
    body: dict
    fault: str | bytes | None


def reply_text(body: dict, index: int) -> str:
    """What the fake model says: the seed it used and a number, so grading has something."""
    seed = int(body.get("seed", 0)) + index
    if "response_format" in body:
        return json.dumps({"explanation": f"seed {seed}", "key_matches": ["x"],
                           "reasoning_score": 0.5, "correctness_score": 1.0})  # fmt: skip
    return f"Working with seed {seed}. Final Answer: {seed % 7}"


class FakeOpenAI:
    """`with FakeOpenAI() as server:` - server.url is the endpoint."""

    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("fake-model",),
        api_key: str | None = None,
        slots: int | None = None,
        delay: float = 0.0,
        hang_seconds: float = 30.0,
        json_schema_format: bool = True,
        loras: tuple[str, ...] | None = None,
        reply: Callable[[dict, int], str] | None = None,
    ) -> None:
        self.models = models
        self.api_key = api_key
        self.slots = slots
        self.delay = delay
        self.hang_seconds = hang_seconds
        # False: refuse response_format "json_schema" as llama-cpp-python's server does (its
        # validation error, answered with 500).
        self.json_schema_format = json_schema_format
        # Paths listed at GET /lora-adapters, as llama-server lists its --lora files (None: 404).
        self.loras = loras
        # What the fake model says to a request (its body and choice index): `reply_text` unless
        # a test scripts its own (known-good and known-bad code for the code task).
        self.reply = reply or reply_text
        self.script: list[str | bytes | None] = []
        self.chats: list[ChatRequest] = []
        self.killed = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> FakeOpenAI:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server._get(self)

            def do_POST(self) -> None:
                server._post(self)

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def kill(self) -> None:
        """Stop at once: the port refuses connections from now on."""
        if self.killed.is_set():
            return
        self.killed.set()
        assert self._server is not None
        threading.Thread(target=self._server.shutdown, daemon=True).start()
        with contextlib.suppress(OSError):
            self._server.socket.close()

    # -- handlers -----------------------------------------------------------------------------

    def _authorized(self, h: BaseHTTPRequestHandler) -> bool:
        if self.api_key is None or h.headers.get("Authorization") == f"Bearer {self.api_key}":
            return True
        self._json(h, 401, {"error": {"message": "invalid api key"}})
        return False

    def _json(self, h: BaseHTTPRequestHandler, status: int, data: object, **headers) -> None:
        body = json.dumps(data).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            h.send_header(k.replace("_", "-"), v)
        h.end_headers()
        h.wfile.write(body)

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        if not self._authorized(h):
            return
        if h.path == "/v1/models":
            self._json(h, 200, {"object": "list", "data": [{"id": m} for m in self.models]})
        elif h.path == "/props" and self.slots is not None:
            self._json(h, 200, {"total_slots": self.slots})
        elif h.path == "/lora-adapters" and self.loras is not None:
            listing = [{"id": i, "path": p, "scale": 1.0} for i, p in enumerate(self.loras)]
            self._json(h, 200, listing)
        else:
            self._json(h, 404, {"error": {"message": "not found"}})

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))))
        if not self._authorized(h):
            return
        with self._lock:
            fault = self.script.pop(0) if self.script else None
            self.chats.append(
                ChatRequest(
                    time.monotonic(),
                    h.headers.get("X-Session-ID"),
                    h.headers.get("Authorization"),
                    body,
                    fault,
                )
            )
        fmt = (body.get("response_format") or {}).get("type")
        if fmt == "json_schema" and not self.json_schema_format:
            self._json(h, 500, {"detail": [{"msg": "Input should be 'text' or 'json_object'"}]})
            return
        if fault == "kill" or self.killed.is_set():
            self.kill()
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        if isinstance(fault, bytes):
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(fault)))
            h.end_headers()
            h.wfile.write(fault)
            return
        if fault == "429":
            self._json(h, 429, {"error": {"message": "slow down"}}, Retry_After="1")
            return
        if fault == "503":
            self._json(h, 503, {"error": {"message": "loading model"}})
            return
        if fault == "hang":
            time.sleep(self.hang_seconds)
            return
        if self.delay:
            time.sleep(self.delay)
        n = int(body.get("n", 1)) if self.slots is not None else 1
        texts = [self.reply(body, i) for i in range(n)]
        data = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "finish_reason": "stop",
                }  # fmt: skip
                for i, t in enumerate(texts)
            ],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": sum(len(t.split()) for t in texts),
                "total_tokens": 10 + sum(len(t.split()) for t in texts),
            },
        }
        if fault == "drop":
            raw = json.dumps(data).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(raw)))
            h.end_headers()
            h.wfile.write(raw[:12])
            h.wfile.flush()
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._json(h, 200, data)
