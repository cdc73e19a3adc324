"""A scripted engine for unit tests of the tree, credit and storage logic (no model)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from malt_local.engines.base import Completion, GenRequest, RequestQueue


class FakeEngine:
    """Answers every request from `script(request, key, seed) -> text`, deterministically.

    It has no adapter ability (`AdapterEngine`); subclasses add one.

    `fail_after` raises KeyboardInterrupt after that many completions, to simulate Ctrl-C.
    """

    def __init__(
        self,
        script: Callable[[GenRequest, str, int], str],
        fail_after: int | None = None,
    ) -> None:
        self.script = script
        self.fail_after = fail_after
        self.name = "fake"
        self.requests: list[GenRequest] = []
        self.completed: list[str] = []

    def generate(self, queue: RequestQueue) -> Iterator[Completion]:
        while (request := queue.pop()) is not None:
            self.requests.append(request)
            for key, seed in zip(request.keys, request.seeds, strict=True):
                if self.fail_after is not None and len(self.completed) >= self.fail_after:
                    raise KeyboardInterrupt
                text = self.script(request, key, seed)
                self.completed.append(key)
                yield Completion(key, text, "stop", 10, len(text.split()))

    def close(self) -> None:
        pass
