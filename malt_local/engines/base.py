"""The engine interface: prompts in, completions out, with n seeds and an optional JSON schema.

The tree scheduler never calls llama.cpp directly. It fills a `RequestQueue` with `GenRequest`s
(one per tree node that needs children: one prompt, n seeds) and reads `Completion`s as the
engine produces them. Because `Engine.generate` is a generator, the scheduler can push a finished
node's children into the queue before the engine takes its next step, so a batched engine starts
them at once (continuous batching) while a node-by-node engine simply works depth first.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from malt_local.errors import MaltError


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by every node of a run."""

    temperature: float = 0.3
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 512
    # Fixed-length generation (benchmarks): keep sampling past end-of-sequence.
    ignore_eos: bool = False


# The widest values the engines and the database take: llama.cpp's sampler takes a 32-bit top-k
# and token count, SQLite a 64-bit integer for the run seed.
INT32_MAX = 2**31 - 1
INT64 = (-(2**63), 2**63 - 1)


def check_sampling(
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
) -> None:
    """Refuse, in one line, sampling flags an engine or the database cannot take (None: not
    given). Checked before anything is written: `--temperature nan` would otherwise be stored and
    then sent as `NaN` (not JSON), and `--seed 10**22` fail as an overflow in SQLite after the
    run row was begun."""
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise MaltError(f"--temperature must be a finite number >= 0 (got {temperature})")
    if top_p is not None and not 0 < top_p <= 1:  # NaN and inf fail it too
        raise MaltError(f"--top-p must be in (0, 1] (got {top_p})")
    if top_k is not None and not 0 <= top_k <= INT32_MAX:
        raise MaltError(f"--top-k must be in [0, {INT32_MAX}] (got {top_k})")
    if max_tokens is not None and not 1 <= max_tokens <= INT32_MAX:
        raise MaltError(f"--max-tokens must be in [1, {INT32_MAX}] (got {max_tokens})")
    if seed is not None and not INT64[0] <= seed <= INT64[1]:
        raise MaltError(f"--seed must be a 64-bit integer (got {seed})")


@dataclass
class GenRequest:
    """One prompt to be sampled once per seed: the n children of one tree node.

    `parent_key` names the completion whose prompt and output this prompt extends, so an engine
    that kept that completion's KV cache can reuse it. `expects_children` tells the engine whether
    the completions it produces will themselves get a request (worth keeping cached).
    """

    messages: list[dict[str, str]]
    keys: list[str]
    seeds: list[int]
    params: SamplingParams
    parent_key: str | None = None
    expects_children: bool = False
    # Hold the output to this JSON schema (the judge). Every engine honours it.
    json_schema: dict | None = None
    # The tree the request belongs to (the question id): a remote engine keeps one question's
    # requests on one server, so its children find their prefix in that server's cache.
    group: str | None = None
    # The role the output plays (generator, verifier, refiner), for engines that serve one
    # model name per role.
    role: str | None = None

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.seeds):
            raise ValueError("one seed per key")

    def only(self, keys: Sequence[str], *, parent_key: str | None = None) -> GenRequest:
        """The same request for some of its children (a split, a retry elsewhere, a restart),
        each keeping its own seed. `parent_key` is dropped unless given: the engine that
        splits a request has already used (or lost) the parent's cache."""
        seed = dict(zip(self.keys, self.seeds, strict=True))
        return dataclasses.replace(
            self, keys=list(keys), seeds=[seed[k] for k in keys], parent_key=parent_key
        )


@dataclass
class Completion:
    key: str
    text: str
    finish_reason: str  # "stop" (end of turn) or "length" (max tokens or context)
    prompt_tokens: int
    completion_tokens: int
    seconds: float = 0.0
    # The seed that produced the text when the engine could not use the requested one (a
    # server that samples a request's n children with seed + i); None: the requested seed.
    seed: int | None = None


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights a run's nodes come from, as recorded and compared on resume."""

    model: str  # the GGUF path, or the served model's id from /v1/models
    sha256: str  # the file's digest, a declared one, or "served:<id>[@revision]"
    served_model: str | None = None  # the name the user gave a server
    revision: str | None = None  # a declared revision of served weights


@dataclass(order=True)
class _Entry:
    priority: tuple
    order: int
    request: GenRequest = field(compare=False)


class RequestQueue:
    """Pending requests, highest priority first (the scheduler puts deeper nodes first)."""

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._count = itertools.count()

    def push(self, request: GenRequest, priority: tuple = ()) -> None:
        heapq.heappush(self._heap, _Entry(priority, next(self._count), request))

    def pop(self) -> GenRequest | None:
        return heapq.heappop(self._heap).request if self._heap else None

    def pop_with_priority(self) -> tuple[tuple, GenRequest] | None:
        """The next request and the priority it was pushed with (for engines that keep their
        own queues, e.g. one per server)."""
        if not self._heap:
            return None
        entry = heapq.heappop(self._heap)
        return entry.priority, entry.request

    def __len__(self) -> int:
        return len(self._heap)


@runtime_checkable
class Engine(Protocol):
    """What the tree, the judge and eval need from a model backend."""

    name: str  # the registry name the engine was made under

    def generate(self, queue: RequestQueue) -> Iterator[Completion]:
        """Yield completions until the queue is empty and nothing is in flight."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class AdapterEngine(Protocol):
    """An engine that applies LoRA adapters on its own loaded weights (llama.cpp engines)."""

    def load_adapter(self, path: str | Path) -> object:
        """Load an adapter GGUF and return its handle."""
        ...

    def use_adapters(self, adapters: list[tuple[object, float]]) -> None:
        """Generate with these (handle, scale) pairs from now on; [] is the base model."""
        ...


@runtime_checkable
class PerRequestAdapters(Protocol):
    """An adapter engine whose server applies a stack per request (llama-server's `lora`
    field): a run gives each role its stack once, and the roles' requests then interleave as
    without adapters instead of being built role by role in waves."""

    def adapters_by_role(self, stacks: dict[str, list[tuple[object, float]]]) -> None:
        """Each request from now on carries its role's (handle, scale) stack; none: the base."""
        ...


@runtime_checkable
class HasLayout(Protocol):
    """An engine whose texts follow a memory layout of its own choosing (the batched engine's
    KV cache): a run records it when it starts and is continued only under the same one."""

    def layout(self) -> dict:
        """The figures that shape the texts, JSON-ready."""
        ...


@runtime_checkable
class MeasuresPrompts(Protocol):
    """An engine that tokenizes prompts itself and knows the context one node may use (the
    llama.cpp engines), so a question too long for it is found before anything is generated.
    A server enforces its own context instead."""

    def prompt_length(self, messages: list[dict[str, str]]) -> int:
        """Tokens of this prompt as the engine would feed it."""
        ...

    def node_context(self) -> int:
        """Most positions one node may use, prompt and output together."""
        ...
