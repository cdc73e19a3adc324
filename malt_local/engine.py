"""The engine interface: prompts in, completions out.

The tree scheduler never calls llama.cpp directly. It fills a `RequestQueue` with `GenRequest`s
(one per tree node that needs children: one prompt, n seeds) and reads `Completion`s as the
engine produces them. Because `Engine.generate` is a generator, the scheduler can push a finished
node's children into the queue before the engine takes its next step, so a batched engine starts
them at once (continuous batching) while a node-by-node engine simply works depth first.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by every node of a run."""

    temperature: float = 0.3
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 512
    # Fixed-length generation (benchmarks): keep sampling past end-of-sequence.
    ignore_eos: bool = False


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
    json_schema: dict | None = None

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.seeds):
            raise ValueError("one seed per key")


@dataclass
class Completion:
    key: str
    text: str
    finish_reason: str  # "stop" (end of turn) or "length" (max tokens or context)
    prompt_tokens: int
    completion_tokens: int
    seconds: float = 0.0


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

    def __len__(self) -> int:
        return len(self._heap)


class Engine(Protocol):
    """What the tree needs from a model backend."""

    model_path: Path

    def generate(self, queue: RequestQueue) -> Iterator[Completion]:
        """Yield completions until the queue is empty and nothing is in flight."""
        ...

    def close(self) -> None: ...
