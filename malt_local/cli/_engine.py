"""The engine flags `malt run` and `malt eval` share: `--engine` (its choices come from the
registry) and the flags of `--engine openai`, with one spelling and one help text."""

from __future__ import annotations

import os
from collections.abc import Callable

import click

from malt_local.engines import ENGINES, EngineOptions, engine_kind, engine_names
from malt_local.errors import MaltError
from malt_local.hashing import is_sha256

ENDPOINTS_ENV = "MALT_ENDPOINTS"
FLAG_NAMES = {"endpoints": "--endpoint", "role_models": "--role-model", "server_n": "--server-n"}


def engine_option(default: str = "batched") -> Callable:
    return click.option(
        "--engine",
        "engine_kind",
        type=click.Choice(engine_names()),
        default=default,
        show_default=True,
        help="; ".join(f"{k.name}: {k.summary}" for k in ENGINES.values()) + ".",
    )


_SERVER_OPTIONS = [
    click.option(
        "--endpoint",
        "endpoints",
        multiple=True,
        metavar="URL",
        help="OpenAI-compatible server (--engine openai), e.g. http://127.0.0.1:8080; "
        f"repeat for more, or ${ENDPOINTS_ENV} (comma or space separated).",
    ),
    click.option(
        "--api-key-env",
        metavar="VAR",
        default="OPENAI_API_KEY",
        show_default=True,
        help="Environment variable holding the servers' API key (none needed if unset).",
    ),
    click.option(
        "--role-model",
        "role_models",
        multiple=True,
        metavar="ROLE=NAME",
        help="Served model name for one role (generator|verifier|refiner|judge), e.g. a LoRA "
        "served by vLLM's multi-LoRA; repeatable.",
    ),
    click.option(
        "--max-in-flight",
        type=int,
        help="Sequences in flight per endpoint [the server's slots from /props, else 8].",
    ),
    click.option(
        "--server-n/--no-server-n",
        "server_n",
        default=None,
        help="Send a node's children as one request with n (the server gives child i the "
        "seed + i) [detected: llama-server yes, others no].",
    ),
    click.option("--model-revision", help="Declared revision of the served weights (recorded)."),
    click.option("--model-sha256", help="Declared sha256 of the served GGUF (recorded, compared)."),
    click.option(
        "--request-timeout",
        type=float,
        help="Seconds to wait for one answer [60 + max_tokens / 4].",
    ),
]


def server_options(func: Callable) -> Callable:
    for option in reversed(_SERVER_OPTIONS):
        func = option(func)
    return func


def pop_server_settings(kind: str, flags: dict) -> object | None:
    """Take the `--engine openai` flags out of `flags`; their settings for that engine, None for
    a local engine (where giving them is an error, not silently ignored)."""
    from malt_local.engines.openai.settings import (
        OpenAISettings,
        parse_role_models,
        split_endpoints,
    )

    given = {
        "endpoints": flags.pop("endpoints"),
        "api_key_env": flags.pop("api_key_env"),
        "role_models": flags.pop("role_models"),
        "max_in_flight": flags.pop("max_in_flight"),
        "server_n": flags.pop("server_n"),
        "model_revision": flags.pop("model_revision"),
        "model_sha256": flags.pop("model_sha256"),
        "request_timeout": flags.pop("request_timeout"),
    }
    if engine_kind(kind).local:
        extra = [k for k, v in given.items() if v not in (None, (), "OPENAI_API_KEY")]
        if extra:
            flag = FLAG_NAMES.get(extra[0], "--" + extra[0].replace("_", "-"))
            raise MaltError(f"{flag} needs --engine openai")
        return None
    if given["max_in_flight"] is not None and given["max_in_flight"] < 1:
        raise MaltError(f"--max-in-flight must be at least 1 (got {given['max_in_flight']})")
    sha = given["model_sha256"]
    if sha is not None and not is_sha256(sha):
        raise MaltError("--model-sha256 must be 64 lower-case hex digits")
    if given["request_timeout"] is not None and given["request_timeout"] <= 0:
        raise MaltError("--request-timeout must be positive")
    return OpenAISettings(
        endpoints=split_endpoints(given["endpoints"], os.environ.get(ENDPOINTS_ENV)),
        api_key=os.environ.get(given["api_key_env"]) or None,
        role_models=parse_role_models(given["role_models"]),
        max_in_flight=given["max_in_flight"],
        server_n=given["server_n"],
        model_revision=given["model_revision"],
        model_sha256=sha,
        timeout=given["request_timeout"],
    )


def engine_options(
    *,
    max_tokens: int | None,
    ctx: int | None,
    threads: int | None,
    gpu_layers: int | None,
    parallel: int | None,
    remote: object | None,
) -> EngineOptions:
    if remote is not None:
        local_only = {"--ctx": ctx, "--threads": threads, "--gpu-layers": gpu_layers,
                      "--parallel": parallel}  # fmt: skip
        for flag, value in local_only.items():
            if value is not None:
                raise MaltError(f"{flag} is for the llama.cpp engines, not --engine openai")
    from malt_local.engines.llama.sizing import check_ctx

    check_ctx(ctx)  # before any model is loaded or row written
    return EngineOptions(
        max_tokens=max_tokens or 512,
        ctx=ctx,
        threads=threads,
        gpu_layers=gpu_layers,
        parallel=parallel,
        remote=remote,  # type: ignore[arg-type]
    )
