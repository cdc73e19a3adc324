"""The engines by name: what `--engine` offers, and how each one is made.

An entry names its factory as ``module:function`` and is imported only when that engine is
made, so listing the engines (for `--help`) loads no backend. A new backend is one entry here
and one module that builds an `Engine` from `EngineOptions`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from malt_local.engines.base import INT32_MAX, Engine, ModelIdentity
from malt_local.errors import MaltError

# More CPU threads than any machine malt runs on has cores; -1 gpu layers is llama.cpp's "all".
MAX_THREADS = 512


@runtime_checkable
class ServedSettings(Protocol):
    """A remote engine's settings: which served model (and per-role names) it asks for."""

    role_models: dict[str, str]

    def with_model(self, name: str) -> ServedSettings:
        """The same settings, asking for the served model `name`."""
        ...


@dataclass(frozen=True)
class EngineOptions:
    """Every engine setting a command can pass; each engine reads the ones it knows.

    `judge` says the requests will carry a JSON schema and come one leaf at a time; a llama.cpp
    engine then uses the node-by-node path, which constrains output with a grammar.
    """

    max_tokens: int
    model_path: Path | None = None  # local engines: the GGUF
    ctx: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    parallel: int | None = None
    judge: bool = False
    flash_attn: bool | None = None
    kv_unified: bool | None = None
    # A resumed run's recorded KV layout (`sizing.layout_of`): the batched engine is made with
    # it when no layout flag is given, so the run's texts keep following one layout.
    layout: dict | None = field(default=None, compare=False)
    # Remote engines: a settings object of the engine's own (e.g. `OpenAISettings`).
    remote: ServedSettings | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.remote is not None:
            local_only = {"--ctx": self.ctx, "--threads": self.threads,
                          "--gpu-layers": self.gpu_layers, "--parallel": self.parallel}  # fmt: skip
            for flag, value in local_only.items():
                if value is not None:
                    raise MaltError(f"{flag} is for the llama.cpp engines, not --engine openai")
        # Ranges llama.cpp's C ints take (a 10**22 would be an OverflowError deep in ctypes),
        # checked before any model is loaded or row written.
        limits = {"--threads": (self.threads, 1, MAX_THREADS),
                  "--gpu-layers": (self.gpu_layers, -1, INT32_MAX),
                  "--parallel": (self.parallel, 1, INT32_MAX)}  # fmt: skip
        for flag, (value, least, most) in limits.items():
            if value is not None and not least <= value <= most:
                raise MaltError(f"{flag} must be in [{least}, {most}] (got {value!r})")
        if self.ctx is not None:
            from malt_local.engines.llama.sizing import check_ctx

            check_ctx(self.ctx)

    def for_model(self, local: bool, target: str) -> EngineOptions:
        """These options pointed at a model: a GGUF path (local) or a served model name."""
        if local:
            return dataclasses.replace(self, model_path=Path(target))
        if self.remote is None:
            return self
        return dataclasses.replace(self, remote=self.remote.with_model(target))


@dataclass(frozen=True)
class EngineKind:
    name: str
    summary: str  # one line for --help
    factory: str  # "module:function" taking EngineOptions, returning an Engine
    local: bool  # runs a GGUF in this process (needs --model PATH or alias)
    # "module:function" taking (model spec, EngineOptions), returning the ModelIdentity; it
    # checks everything a user can get wrong about the model before anything is written.
    identify: str = "malt_local.engines.llama.factory:identify"


ENGINES: dict[str, EngineKind] = {
    k.name: k
    for k in (
        EngineKind(
            "batched",
            "every live node of every tree decoded together [default]",
            "malt_local.engines.llama.factory:make_batched",
            local=True,
        ),
        EngineKind(
            "simple",
            "node by node on llama.cpp",
            "malt_local.engines.llama.factory:make_simple",
            local=True,
        ),
        EngineKind(
            "openai",
            "any OpenAI-compatible server (vLLM, SGLang, llama-server): --endpoint URL",
            "malt_local.engines.openai.engine:make_openai",
            local=False,
            identify="malt_local.engines.openai.engine:identify",
        ),
    )
}

DEFAULT_ENGINE = "batched"


def engine_names() -> list[str]:
    """The names `--engine` accepts, in registry order."""
    return list(ENGINES)


def engine_kind(name: str) -> EngineKind:
    try:
        return ENGINES[name]
    except KeyError:
        raise MaltError(
            f"unknown engine '{name}': choose one of {', '.join(engine_names())}"
        ) from None


def _load(target: str):
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def identify_model(name: str, model_spec: str | None, options: EngineOptions) -> ModelIdentity:
    """The weights engine `name` would generate with, checked (a file's header and digest, or
    a server's answer) before anything is written."""
    return _load(engine_kind(name).identify)(model_spec, options)


def make_engine(name: str, options: EngineOptions) -> Engine:
    """Build the engine registered under `name`."""
    return _load(engine_kind(name).factory)(options)
