"""The node-by-node engine on llama-cpp-python's high-level API (`--engine simple`).

One completion at a time through `Llama.create_completion`, which reuses the KV cache of the
previous call's prompt prefix. It is the reference the batched engine is measured and tested
against, and the engine that holds output to a JSON schema (the judge) through a llama.cpp
grammar.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from malt_local.engines.base import Completion, GenRequest, RequestQueue, SamplingParams
from malt_local.engines.llama.model import LocalModel, set_context_adapters


class HighLevelEngine:
    """One completion at a time through `Llama.create_completion` (the simple path)."""

    name = "simple"

    def __init__(self, model: LocalModel) -> None:
        self.model = model
        self.model_path = model.path
        self._grammars: dict[str, object] = {}

    def _grammar(self, schema: dict | None) -> object | None:
        """The llama.cpp grammar for a JSON schema, built once per schema."""
        if schema is None:
            return None
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            from llama_cpp import LlamaGrammar

            self._grammars[key] = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        return self._grammars[key]

    def complete(
        self, tokens: list[int], seed: int, params: SamplingParams, grammar: object = None
    ) -> Completion:
        llm = self.model.llm
        room = self.model.n_ctx - len(tokens)
        if room <= 0:
            # The prompt alone fills the context: record an empty, truncated node rather
            # than fail the whole run; it grades as wrong.
            return Completion("", "", "length", len(tokens), 0)
        max_tokens = min(params.max_tokens, room)
        bias = {t: -1e30 for t in self.model.eog_ids} if params.ignore_eos else None
        t0 = time.perf_counter()
        out = llm.create_completion(
            tokens,
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=0.0,
            repeat_penalty=1.0,
            seed=seed,
            logit_bias=bias,
            grammar=grammar,
        )
        choice = out["choices"][0]
        usage = out["usage"]
        return Completion(
            "",
            choice["text"],
            "length" if choice["finish_reason"] == "length" else "stop",
            usage["prompt_tokens"],
            usage["completion_tokens"],
            time.perf_counter() - t0,
        )

    def load_adapter(self, path: str | Path) -> object:
        return self.model.load_adapter(path)

    def use_adapters(self, adapters: list[tuple[object, float]]) -> None:
        """Generate with these (LoRA handle, scale) pairs from now on; [] is the base model.

        Adapters act per context, so callers switch them between batches of one role's work.
        The cached prompt prefix is dropped: KV computed under other adapters is wrong for these.
        """
        set_context_adapters(self.model.llm._ctx.ctx, adapters)
        self.model.llm.reset()

    def generate(self, queue: RequestQueue) -> Iterator[Completion]:
        while (request := queue.pop()) is not None:
            yield from self._run(request)

    def _run(self, request: GenRequest) -> Iterator[Completion]:
        tokens = self.model.prompt_tokens(request.messages)
        grammar = self._grammar(request.json_schema)
        for key, seed in zip(request.keys, request.seeds, strict=True):
            done = self.complete(tokens, seed, request.params, grammar)
            done.key = key
            yield done

    def prompt_length(self, messages: list[dict[str, str]]) -> int:
        return len(self.model.prompt_tokens(messages))

    def node_context(self) -> int:
        return self.model.n_ctx

    def close(self) -> None:
        self.model.close()
