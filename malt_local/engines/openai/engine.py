"""The OpenAI-compatible engine: each node a chat-completions request, many servers at once.

Every request carries the full messages and every sampling value explicitly (servers' defaults
differ: llama-server samples with top_k 40 and min_p 0.05 unless told otherwise), the node's own
seed, and `X-Session-ID: <question id>` so a router with consistent hashing keeps a tree on one
replica. A node's n children go as one request with `n` only where the server is known to give
child i the seed + i (llama-server, detected from `/props`, or `--server-n`); each completion
then records the seed that made it.

The tree scheduler is synchronous; the requests are not. An asyncio loop on a thread of its own
runs the requests, and `generate` hands them out from per-endpoint queues (deepest nodes first,
so trees finish and free the servers' caches) while each endpoint has fewer sequences in flight
than its slots. Failures are retried with jittered exponential backoff (honouring
`Retry-After`); an endpoint that keeps failing is taken out and its questions move to the
others. A completion is yielded once per key, so a node is never stored twice, and whatever
was stored stays: a killed run resumes from the database as with the local engines.

LoRA adapters go with each request to a llama-server that serves the files (`lora.py`): the
engine is an `AdapterEngine` (a stack for every request from now on, as eval switches sets) and
`PerRequestAdapters` (each request its role's stack, so a run needs no waves).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import heapq
import itertools
import json
import queue as queue_mod
import random
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from malt_local.engines.base import Completion, GenRequest, ModelIdentity, RequestQueue
from malt_local.engines.openai import http
from malt_local.engines.openai.lora import ServedLora, lora_field, match, parse_listing
from malt_local.engines.openai.routing import Endpoint, pick
from malt_local.engines.openai.settings import OpenAISettings
from malt_local.engines.registry import EngineOptions
from malt_local.errors import MaltError, redact

# Sequences in flight per endpoint when the server does not say (`--max-in-flight`).
DEFAULT_IN_FLIGHT = 8
# 408/429 answers retried before the run gives up on a server that stays busy.
BUSY_RETRIES = 30
PROBE_TIMEOUT = 10.0
# How long start-up waits for a server that answers 503 while it loads its model.
LOADING_WAIT = 120.0


# -- start-up: what each server serves ---------------------------------------------------------


@dataclass
class ServerInfo:
    url: str
    models: list[str]
    slots: int | None  # llama-server's total_slots
    llama_server: bool
    loras: list[tuple[int, str]] | None = None  # llama-server's /lora-adapters


def _auth(settings: OpenAISettings, url: str) -> dict[str, str]:
    """The endpoint's own credentials (its URL's ``user:password@``, as Basic auth), else the
    API key: both are the `Authorization` header, and the URL's are the more specific."""
    if url in settings.endpoint_auth:
        return {"Authorization": settings.endpoint_auth[url]}
    return {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}


def probe(url: str, settings: OpenAISettings) -> ServerInfo:
    """Ask one endpoint what it serves; one clear error for each thing a user can get wrong."""
    deadline = time.monotonic() + LOADING_WAIT
    # --request-timeout bounds each probe as a whole (connect, headers, body): a server that
    # trickles a byte every few seconds must not hold the start-up forever.
    timeout = settings.timeout or PROBE_TIMEOUT
    while True:
        try:
            r = http.get_sync(url + "/v1/models", _auth(settings, url), timeout)
        except http.TransportError as exc:
            raise MaltError(f"endpoint {url} is not reachable: {exc}") from exc
        # 503: a server still loading its model (llama-server, vLLM); wait for it a while.
        if r.status != 503 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if r.status in (401, 403):
        raise MaltError(
            f"endpoint {url} refused the API key (HTTP {r.status}): set $OPENAI_API_KEY "
            "or name the variable that holds it with --api-key-env"
        )
    if r.status != 200:
        raise MaltError(f"endpoint {url} answered HTTP {r.status} to GET /v1/models")
    try:
        data = r.json()
        models = [str(m["id"]) for m in data["data"]]  # type: ignore[index]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise MaltError(f"endpoint {url}: /v1/models is not an OpenAI model list") from exc
    slots, llama_server = None, False
    try:
        props = http.get_sync(url + "/props", _auth(settings, url), timeout)
        info = props.json() if props.status == 200 else None
        if isinstance(info, dict) and isinstance(info.get("total_slots"), int):
            slots, llama_server = int(info["total_slots"]), True
    except (http.TransportError, ValueError, RecursionError):
        pass
    loras = None
    if llama_server:
        try:
            listing = http.get_sync(url + "/lora-adapters", _auth(settings, url), timeout)
            if listing.status == 200:
                loras = parse_listing(url, listing.json())
        except (http.TransportError, ValueError, RecursionError):
            pass
    return ServerInfo(url, models, slots, llama_server, loras)


def _settings(options: EngineOptions) -> OpenAISettings:
    if not isinstance(options.remote, OpenAISettings):
        raise MaltError("--engine openai needs --endpoint URL (or $MALT_ENDPOINTS)")
    return options.remote


def _check_model(name: str, servers: list[ServerInfo], what: str) -> None:
    for s in servers:
        if name not in s.models:
            raise MaltError(
                f"endpoint {s.url} does not serve {what} '{name}' "
                f"(it serves: {', '.join(s.models) or 'nothing'})"
            )


def identify(model_spec: str | None, options: EngineOptions) -> ModelIdentity:
    """The served model every endpoint lists, checked, as the run records it."""
    settings = _settings(options)
    servers = [probe(url, settings) for url in settings.endpoints]
    name = model_spec or settings.model
    if not name:
        served = sorted({m for s in servers for m in s.models})
        if len(served) != 1:
            raise MaltError(
                "pass --model NAME: the endpoints serve "
                + (", ".join(served) if served else "no model")
            )
        name = served[0]
    _check_model(name, servers, "model")
    for role, role_name in sorted(settings.role_models.items()):
        _check_model(role_name, servers, f"the {role}'s model")
    revision = settings.model_revision
    sha = settings.model_sha256 or ("served:" + name + (f"@{revision}" if revision else ""))
    return ModelIdentity(model=name, sha256=sha, served_model=name, revision=revision)


def make_openai(options: EngineOptions) -> OpenAIEngine:
    settings = _settings(options)
    endpoints = []
    for url in settings.endpoints:
        info = probe(url, settings)
        slots = settings.max_in_flight or info.slots or DEFAULT_IN_FLIGHT
        server_n = info.llama_server if settings.server_n is None else settings.server_n
        endpoints.append(Endpoint(url, max(1, slots), server_n, loras=info.loras))
    return OpenAIEngine(settings, endpoints)


# -- the engine --------------------------------------------------------------------------------


@dataclass
class _Unit:
    """Keys of one request sent together: one, or a node's children with `n`."""

    request: GenRequest
    keys: list[str]
    seeds: list[int]
    with_n: bool
    priority: tuple = ()
    tries: int = 0
    adapters: list[tuple[object, float]] = field(default_factory=list)  # (ServedLora, scale)

    @property
    def size(self) -> int:
        return len(self.keys)


@dataclass(order=True)
class _Waiting:
    priority: tuple
    order: int
    request: GenRequest = field(compare=False)
    start: int = field(default=0, compare=False)  # keys before this one are handed out


class _Fatal(Exception):
    """A failure no retry can fix (a refused key, a bad request); ends the run."""


class OpenAIEngine:
    """Chat-completions requests to one or more endpoints; see the module docstring."""

    name = "openai"

    def __init__(self, settings: OpenAISettings, endpoints: list[Endpoint]) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self._by_url = {e.url: e for e in endpoints}
        self._waiting: dict[str, list[_Waiting]] = {e.url: [] for e in endpoints}
        self._order = itertools.count()
        self._results: queue_mod.Queue = queue_mod.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._yielded: set[str] = set()
        self._in_flight = 0
        # What each endpoint was sent, by question: the tests check that a tree stays on one.
        self.sent: dict[str, set[str]] = {e.url: set() for e in endpoints}
        # LoRA stacks: the one set by `use_adapters`, or one per role (`adapters_by_role`).
        self._stack: list[tuple[object, float]] = []
        self._role_stacks: dict[str, list[tuple[object, float]]] | None = None

    # -- adapters: llama-server applies them per request (engines.openai.lora) -------------------

    def load_adapter(self, path: str | Path) -> ServedLora:
        """The file's id on every endpoint; one line where an endpoint does not serve it."""
        local = Path(path)
        return ServedLora(local, {e.url: match(e.url, local, e.loras) for e in self.endpoints})

    def use_adapters(self, adapters: list[tuple[object, float]]) -> None:
        """Requests handed out from now on carry this stack ([]: the base model)."""
        self._stack = list(adapters)

    def adapters_by_role(self, stacks: dict[str, list[tuple[object, float]]]) -> None:
        """Each request carries its own role's stack, so a run's roles need no waves."""
        self._role_stacks = {role: list(stack) for role, stack in stacks.items()}

    def _stack_for(self, role: str | None) -> list[tuple[object, float]]:
        if self._role_stacks is not None:
            return self._role_stacks.get(role or "", [])
        return self._stack

    # -- the synchronous side: routing and hand-out ----------------------------------------------

    def generate(self, queue: RequestQueue) -> Iterator[Completion]:
        self._start()
        while True:
            self._take(queue)
            self._hand_out()
            if self._in_flight == 0:
                if queue or any(self._waiting.values()):
                    continue
                return
            kind, ep, unit, payload = self._results.get()
            self._in_flight -= 1
            ep.in_flight -= unit.size
            if kind == "fatal":
                raise payload
            if kind == "moved":
                self._note_down(ep)
                self._route(unit.request, unit.priority, start_keys=unit.keys)
                continue
            for c in payload:
                if c.key not in self._yielded:
                    self._yielded.add(c.key)
                    yield c

    def _take(self, queue: RequestQueue) -> None:
        """Take requests while fewer than twice the servers' slots wait here: a queue that
        claims work as it is popped (several processes on one database) then claims only what
        this process can start soon, and the rest stays free for the others."""
        room = max(1, 2 * sum(e.slots for e in self.endpoints if not e.down))
        while sum(map(len, self._waiting.values())) < room:
            if (item := queue.pop_with_priority()) is None:
                return
            self._route(item[1], item[0])

    def _route(self, request: GenRequest, priority: tuple, start_keys: list[str] | None = None):
        if start_keys is not None:
            # A unit coming back from an endpoint that was taken out: only its own keys.
            request = request.only(start_keys, parent_key=request.parent_key)
        ep = pick(self.endpoints, request.group or request.keys[0])
        if ep is None:
            raise MaltError(self._all_down())
        heapq.heappush(self._waiting[ep.url], _Waiting(priority, next(self._order), request))

    def _hand_out(self) -> None:
        for ep in self.endpoints:
            heap = self._waiting[ep.url]
            if ep.down and heap:
                moved, self._waiting[ep.url] = heap, []
                for w in moved:
                    rest = w.request.keys[w.start :]
                    self._route(w.request, w.priority, start_keys=rest)
                continue
            while heap and ep.in_flight < ep.slots:
                w = heap[0]
                room = ep.slots - ep.in_flight
                # With n a unit is a node's children (as many as fit), else one key.
                take = min(room, len(w.request.keys) - w.start) if ep.server_n else 1
                keys = w.request.keys[w.start : w.start + take]
                seeds = w.request.seeds[w.start : w.start + take]
                w.start += take
                if w.start >= len(w.request.keys):
                    heapq.heappop(heap)
                unit = _Unit(w.request, keys, seeds, ep.server_n and take > 1, w.priority)
                unit.adapters = self._stack_for(w.request.role)
                self._submit(ep, unit)

    def _submit(self, ep: Endpoint, unit: _Unit) -> None:
        ep.in_flight += unit.size
        self._in_flight += 1
        self.sent[ep.url].add(unit.request.group or "")
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._run(ep, unit), self._loop)

    def _note_down(self, ep: Endpoint) -> None:
        if not ep.reported:
            ep.reported = True
            others = sum(1 for e in self.endpoints if not e.down)
            where = f"its questions move to the {others} other(s)" if others else "none is left"
            sys.stderr.write(
                redact(
                    f"malt: endpoint {ep.url} taken out after {ep.failures} failures "
                    f"({ep.last_error}); {where}\n"
                )
            )

    def _all_down(self) -> str:
        last = "; ".join(f"{e.url}: {e.last_error}" for e in self.endpoints)
        return f"every endpoint failed ({last}); what was stored is kept: re-run to continue"

    # -- the asynchronous side: one unit's requests ----------------------------------------------

    def _start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="malt-openai", daemon=True
        )
        self._thread.start()

    def payload(self, unit: _Unit, schema_style: str = "json_schema") -> dict:
        """The chat-completions body: every sampling value explicit."""
        r, p = unit.request, unit.request.params
        body: dict = {
            "model": self.settings.model_for(r.role),
            "messages": r.messages,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,
            "min_p": 0.0,
            "repeat_penalty": 1.0,
            "max_tokens": p.max_tokens,
            "seed": unit.seeds[0],
            "stream": False,
        }
        if unit.with_n:
            body["n"] = unit.size
            # The usage of an n request is not per choice (llama-server reports the first
            # choice's, vLLM the sum): each choice's own token list gives its count.
            body["logprobs"] = True
        if p.ignore_eos:
            body["ignore_eos"] = True
        if r.json_schema is not None and schema_style == "json_object":
            body["response_format"] = {"type": "json_object", "schema": r.json_schema}
        elif r.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "malt", "schema": r.json_schema, "strict": True},
            }
        return body

    async def _run(self, ep: Endpoint, unit: _Unit) -> None:
        try:
            done = await self._attempts(ep, unit)
            self._results.put(
                ("done", ep, unit, done) if done is not None else ("moved", ep, unit, None)
            )
        except _Fatal as exc:
            self._results.put(("fatal", ep, unit, MaltError(str(exc))))
        except Exception as exc:  # a bug: hand it to the caller's thread with its traceback
            self._results.put(("fatal", ep, unit, exc))

    async def _attempts(self, ep: Endpoint, unit: _Unit) -> list[Completion] | None:
        """The unit's completions, or None when `ep` was taken out (the unit moves)."""
        headers = {**_auth(self.settings, ep.url)}
        if unit.request.group:
            headers["X-Session-ID"] = unit.request.group
        timeout = self.settings.read_timeout(unit.request.params.max_tokens, unit.size)
        busy = 0
        while True:
            if ep.down:
                return None
            t0 = time.perf_counter()
            retry_after: float | None = None
            style = ep.schema_style
            body = self.payload(unit, style)
            # Every adapter the server serves, at this unit's scale or 0: a request without
            # the field would get the server's own scales (see engines.openai.lora).
            lora = lora_field(ep.url, ep.loras, unit.adapters)
            if lora is not None:
                body["lora"] = lora
            try:
                r = await http.request(
                    ep.url + "/v1/chat/completions",
                    "POST",
                    body,
                    headers,
                    timeout=timeout,
                    connect_timeout=self.settings.connect_timeout,
                )
            except http.TransportError as exc:
                error = str(exc)
            else:
                if r.status == 200:
                    try:
                        out = self._completions(ep, unit, r, time.perf_counter() - t0)
                    except MalformedAnswer as exc:
                        # A 200 of the wrong shape is a server fault like a 5xx: retried, and
                        # the endpoint taken out when it keeps answering so.
                        error = f"unreadable answer ({exc})"
                    else:
                        ep.failures = 0
                        return out
                elif r.status in (401, 403):
                    raise _Fatal(f"endpoint {ep.url} refused the API key (HTTP {r.status})")
                elif r.status in (408, 429):
                    busy += 1
                    if busy > BUSY_RETRIES:
                        raise _Fatal(f"endpoint {ep.url} stayed busy (HTTP {r.status})")
                    await asyncio.sleep(self._delay(busy, _retry_after(r.headers)))
                    continue
                elif (
                    unit.request.json_schema is not None
                    and style == "json_schema"
                    and (
                        r.status in (400, 422)
                        # llama-cpp-python's server answers its validation errors with 500.
                        or (r.status == 500 and b"json_object" in r.body)
                    )
                ):
                    # A server that does not know the json_schema format: the older form.
                    ep.schema_style = "json_object"
                    continue
                elif r.status >= 500:
                    error = f"HTTP {r.status}"
                    retry_after = _retry_after(r.headers)
                else:
                    raise _Fatal(
                        f"endpoint {ep.url} answered HTTP {r.status}: "
                        + r.body[:300].decode("utf-8", "replace")
                    )
            ep.failures += 1
            ep.last_error = error
            unit.tries += 1
            others = any(not e.down for e in self.endpoints if e is not ep)
            # The last endpoint standing is kept while the request has tries left: a run with
            # one server rides out a restart instead of stopping at its first three errors.
            if unit.tries >= self.settings.retries or (
                others and ep.failures >= self.settings.fail_limit
            ):
                ep.down = True
                return None
            await asyncio.sleep(self._delay(unit.tries, retry_after))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, 120.0)
        base = min(self.settings.backoff_max, self.settings.backoff * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)

    def _completions(
        self, ep: Endpoint, unit: _Unit, r: http.Response, seconds: float
    ) -> list[Completion]:
        choices, prompt_tokens, total = parse_answer(r.body)
        if len(choices) != unit.size:
            raise _Fatal(
                f"endpoint {ep.url} answered {len(choices)} choice(s) to n = {unit.size}: it "
                "does not honour n; pass --no-server-n"
            )
        # With n the usage is the request's: each child counts its own logprobs entries (one a
        # token), or, from a server that sends none, gets an even share.
        shares = [total // unit.size + (i < total % unit.size) for i in range(unit.size)]
        if unit.size > 1:
            shares = [_token_count(c, s) for c, s in zip(choices, shares, strict=True)]
        out = []
        for i, (key, choice) in enumerate(zip(unit.keys, choices, strict=True)):
            text = _clean_text(choice["message"]["content"])
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            out.append(
                Completion(
                    key,
                    text,
                    finish,
                    prompt_tokens,
                    shares[i],
                    seconds,
                    seed=unit.seeds[0] + i if unit.with_n else None,
                )
            )
        return out

    def close(self) -> None:
        """Cancel what is still in flight (its nodes were not stored) and stop the loop."""
        if self._loop is None:
            return
        loop, self._loop = self._loop, None

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not loop.is_running():
            loop.close()


def _retry_after(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _token_count(choice: dict, fallback: int) -> int:
    """One choice's completion tokens from its logprobs (one entry a token), else `fallback`.

    llama-server lists the end-of-turn token that stopped the choice too, as an empty string;
    the local engines do not count it, so neither does this. Logprobs of another shape are
    ignored (the count is only bookkeeping), never a traceback."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or len(content) >= _MAX_COUNT:
        return fallback
    last = content[-1] if content else None
    ends_on_eog = (
        choice.get("finish_reason") == "stop" and isinstance(last, dict) and last.get("token") == ""
    )
    return len(content) - int(bool(ends_on_eog))


# -- answers of the wrong shape -----------------------------------------------------------------

# Token counts are stored as SQLite integers and summed in reports: only exact, finite ints a
# JSON reader anywhere agrees on (below 2**53) are believed.
_MAX_COUNT = 2**53
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class MalformedAnswer(ValueError):
    """A 200 answer that is not a chat completion: not JSON, or JSON of another shape.

    A proxy's HTML error page, a truncated or rewritten body, a server bug: what the server
    meant is unknown, so nothing of it is stored and the request is retried like a 5xx."""


def _no_constant(name: str) -> object:
    raise MalformedAnswer(f"{name} in the JSON")


def _count(usage: dict, name: str) -> int:
    value = usage.get(name)
    if value is None:
        return 0
    # bool is an int to Python, and a float (1e300, 3.0) is not a count.
    if type(value) is not int or not 0 <= value < _MAX_COUNT:
        raise MalformedAnswer(f"usage.{name} is {value!r:.40}, not a token count")
    return value


def _clean_text(text: str) -> str:
    """The text with every lone surrogate (JSON's `\\ud800` without its pair) as U+FFFD: such
    a str cannot be encoded as UTF-8, so SQLite and every file malt writes would refuse it."""
    return _SURROGATE_RE.sub("\ufffd", text)


def parse_answer(body: bytes) -> tuple[list[dict], int, int]:
    """A chat-completions body as (choices in index order, prompt tokens, completion tokens),
    every field malt reads checked; `MalformedAnswer` for anything else."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError as exc:
        raise MalformedAnswer("JSON nested too deep") from exc
    except MalformedAnswer:
        raise
    except ValueError as exc:  # not JSON, not UTF-8, an integer of thousands of digits
        raise MalformedAnswer(f"not JSON: {str(exc)[:80]}") from exc
    if not isinstance(data, dict):
        raise MalformedAnswer(f"a JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedAnswer("no list of choices")
    for c in choices:
        if not isinstance(c, dict):
            raise MalformedAnswer(f"a choice is a JSON {type(c).__name__}, not an object")
        index = c.get("index", 0)
        if type(index) is not int:
            raise MalformedAnswer("a choice's index is not an integer")
        message = c.get("message")
        if not isinstance(message, dict):
            raise MalformedAnswer("a choice has no message object")
        if not isinstance(message.get("content"), str):
            raise MalformedAnswer("a choice's message has no text content")
    usage = data.get("usage")
    if usage is None:
        usage = {}
    if not isinstance(usage, dict):
        raise MalformedAnswer("usage is not an object")
    ordered = sorted(choices, key=lambda c: c.get("index", 0))
    return ordered, _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
