"""A small HTTP/1.1 client on asyncio streams, for JSON requests to inference servers.

Why not a library: the core install stays the design card's stack, and `huggingface-hub`, the
only HTTP user there, does not promise httpx. One connection per request (`Connection: close`)
keeps the client simple and a dropped connection local to its request; against a server that
spends seconds per answer the handshake costs nothing measurable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import urllib.parse
from dataclasses import dataclass


class TransportError(Exception):
    """The exchange failed below HTTP: refused, reset, cut off mid-response, or timed out."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def _target(url: str) -> tuple[str, int, bool, str]:
    u = urllib.parse.urlsplit(url)
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    return u.hostname or "localhost", port, tls, path


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()


async def _exchange(
    url: str, method: str, body: bytes | None, headers: dict[str, str], connect_timeout: float
) -> Response:
    host, port, tls, path = _target(url)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl.create_default_context() if tls else None),
            connect_timeout,
        )
    except (OSError, asyncio.TimeoutError) as exc:
        raise TransportError(f"cannot connect to {host}:{port}: {exc or 'timed out'}") from exc
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b""))
        await writer.drain()
        status_line = await reader.readuntil(b"\r\n")
        parts = status_line.decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise TransportError(f"not an HTTP response from {host}:{port}")
        status = int(parts[1])
        got: dict[str, str] = {}
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            got[name.strip().lower()] = value.strip()
        return Response(status, got, await _read_body(reader, got))
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise TransportError(f"{host}:{port} cut the response short") from exc
    except OSError as exc:
        raise TransportError(f"{host}:{port}: {exc}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError, ssl.SSLError):
            await writer.wait_closed()


async def request(
    url: str,
    method: str = "GET",
    payload: object | None = None,
    headers: dict[str, str] | None = None,
    *,
    timeout: float,
    connect_timeout: float = 10.0,
) -> Response:
    """One exchange; `TransportError` for anything below HTTP, including the timeout."""
    all_headers = {"Accept": "application/json", **(headers or {})}
    body = None
    if payload is not None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        all_headers["Content-Type"] = "application/json"
    try:
        return await asyncio.wait_for(
            _exchange(url, method, body, all_headers, connect_timeout), timeout
        )
    except asyncio.TimeoutError as exc:
        raise TransportError(f"no complete response from {url} within {timeout:.0f} s") from exc


def get_sync(url: str, headers: dict[str, str], timeout: float) -> Response:
    """A blocking GET for start-up checks (before any event loop runs), `timeout` seconds for
    the whole exchange: connect, headers and body together.

    urllib's timeout is per socket operation, so a server that sends a byte every few seconds
    held the start-up for ever; this is the engine's own client under one `wait_for`."""
    return asyncio.run(request(url, "GET", None, headers, timeout=timeout, connect_timeout=timeout))
