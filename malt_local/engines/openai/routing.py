"""Which endpoint a question's requests go to, and which endpoints are still in the run.

Rendezvous (highest random weight) hashing on the question id: every request of one tree goes
to the same endpoint, so the children find their parent's prompt in that server's prefix cache,
and when an endpoint is taken out only its questions move (to the endpoint that scores next
highest for each), the others stay where their caches are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass
class Endpoint:
    """One server: its limit on requests in flight and its health in this run."""

    url: str
    slots: int  # most sequences in flight at once
    server_n: bool  # sends a node's children as one request with `n`
    in_flight: int = 0
    failures: int = 0  # failures in a row; a success resets
    down: bool = False
    last_error: str = ""
    # How the server takes a JSON schema: the OpenAI "json_schema" response format, or
    # "json_object" with a "schema" (llama-cpp-python's server, which refuses the former).
    schema_style: str = "json_schema"
    reported: bool = False  # its removal was announced
    # llama-server's `GET /lora-adapters` as (id, path); None where the server has no such list.
    loras: list[tuple[int, str]] | None = None


def score(url: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{url}\0{key}".encode()).digest()[:8], "big")


def pick(endpoints: list[Endpoint], key: str) -> Endpoint | None:
    """The healthy endpoint with the highest score for `key`; None when none is left."""
    healthy = [e for e in endpoints if not e.down]
    if not healthy:
        return None
    return max(healthy, key=lambda e: score(e.url, key))
