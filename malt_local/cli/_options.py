"""The options several commands share, with one spelling and one help text each, and
`setting`, which reads an option's default from the settings dataclass that owns it.

Defaults live in the library's settings types (`RunSettings`, `EvalSettings`, `ExportOptions`,
`TrainSettings`), never as a literal here: `setting` puts the dataclass's default into click's
default and into the help, so `--help`, the docs and the behaviour cannot disagree.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from malt_local.engines import ENGINES, EngineOptions, engine_kind, engine_names
from malt_local.errors import MaltError, clean_secret

ENDPOINTS_ENV = "MALT_ENDPOINTS"
FLAG_NAMES = {"endpoints": "--endpoint", "role_models": "--role-model", "server_n": "--server-n"}


def setting(settings: type, name: str, *decls: str, help: str, **kwargs: Any) -> Callable:
    """A click option for the field `name` of the dataclass `settings`, its default read there.

    A settings type with a `DEFAULTS` mapping (`RunSettings`) holds None for "not given", so a
    resumed run keeps its stored value: the option's default stays None and the help shows the
    default a new run takes. Elsewhere the field's own default is click's default.
    """
    field = {f.name: f for f in dataclasses.fields(settings)}[name]
    given_defaults = getattr(settings, "DEFAULTS", None)
    if given_defaults is not None:
        if name in given_defaults:
            help = f"{help} [{given_defaults[name]}]"
        kwargs.setdefault("default", None)
    elif field.default is not dataclasses.MISSING:
        kwargs.setdefault("default", field.default)
        kwargs.setdefault("show_default", True)
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), help=help, **kwargs)


db_option = click.option(
    "--db",
    "db_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    envvar="MALT_DB",
    help="SQLite file (default ./malt.db, or $MALT_DB).",
)
json_option = click.option("--json", "json_", is_flag=True, help="Print JSON on stdout.")
model_option = click.option(
    "--model",
    "-m",
    envvar="MALT_MODEL",
    help="GGUF path or pulled alias ($MALT_MODEL); with --engine openai the served model name.",
)
prompts_option = click.option(
    "--prompts",
    "prompts_dir",
    type=click.Path(path_type=Path),
    metavar="DIR|NAME",
    help="Folder of role templates, or a shipped set: default (one shared conversation) or "
    "paper (each role its own, as in the MALT paper). An existing folder wins over a name. "
    "[default]",
)

_adapter_options = [
    click.option(
        "--adapter",
        "adapters",
        multiple=True,
        metavar="ROLE=PATH[:SCALE]",
        help="LoRA adapter GGUF for generator|verifier|refiner, scale 1.0 unless "
        ":SCALE. Repeatable; several for one role are applied together. With --engine "
        "openai: a file the llama-server serves (--lora).",
    ),
    click.option(
        "--adapters",
        "adapters_dir",
        type=click.Path(path_type=Path),
        help="A malt train folder: every role its adapters from manifest.json (SFT, then "
        "DPO). They must have been trained on --model and these prompts.",
    ),
    click.option(
        "--allow-mismatch",
        is_flag=True,
        help="Use --adapters trained on another model or other prompts anyway.",
    ),
]


def adapter_flags(func: Callable) -> Callable:
    """--adapter, --adapters and --allow-mismatch, the same for run and eval."""
    return _apply(_adapter_options, func)


def engine_option(default: str = "batched") -> Callable:
    return click.option(
        "--engine",
        "engine_kind",
        type=click.Choice(engine_names()),
        default=default,
        show_default=True,
        help="; ".join(f"{k.name}: {k.summary}" for k in ENGINES.values()) + ".",
    )


_LOCAL_ENGINE_OPTIONS = [
    click.option(
        "--ctx",
        type=int,
        help="KV cache in tokens: one cache all sequences share (batched engine), or one node's "
        "(simple) [sized from --max-tokens and --parallel; on a CPU a stream per sequence].",
    ),
    click.option("--threads", type=int, help="CPU threads [all cores]."),
    click.option(
        "--gpu-layers", type=int, help="Layers on the GPU [all, when built with GPU support]."
    ),
    click.option(
        "--parallel",
        type=int,
        help="Most sequences decoded at once by the batched engine [32 on a CPU, 256 on a GPU].",
    ),
]

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


def _apply(options: list[Callable], func: Callable) -> Callable:
    for option in reversed(options):
        func = option(func)
    return func


def engine_flags(func: Callable) -> Callable:
    """`--engine`, the llama.cpp engines' flags and `--engine openai`'s, for run and eval."""
    return _apply([engine_option(), *_LOCAL_ENGINE_OPTIONS, *_SERVER_OPTIONS], func)


def pop_engine_options(flags: dict, max_tokens: int | None) -> tuple[str, EngineOptions]:
    """Take the engine flags out of `flags`: the engine's name and its options, every value
    checked (by `EngineOptions` and the engine's own settings) before anything is loaded."""
    kind = flags.pop("engine_kind")
    local = {name: flags.pop(name) for name in ("ctx", "threads", "gpu_layers", "parallel")}
    remote = _pop_server_settings(kind, flags)
    return kind, EngineOptions(max_tokens=max_tokens or 512, remote=remote, **local)  # type: ignore[arg-type]


def _pop_server_settings(kind: str, flags: dict) -> object | None:
    """The `--engine openai` flags as that engine's settings; None for a local engine, where
    giving them is an error, not silently ignored."""
    from malt_local.engines.openai.settings import (
        OpenAISettings,
        parse_role_models,
        split_endpoints,
    )

    names = ("endpoints", "api_key_env", "role_models", "max_in_flight", "server_n",
             "model_revision", "model_sha256", "request_timeout")  # fmt: skip
    given = {name: flags.pop(name) for name in names}
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", given["api_key_env"] or ""):
        # os.environ.get would raise on a NUL, and no shell can set such a name anyway.
        raise MaltError(
            f"--api-key-env {given['api_key_env']!r} is not an environment variable name"
        )
    if engine_kind(kind).local:
        extra = [k for k, v in given.items() if v not in (None, (), "OPENAI_API_KEY")]
        if extra:
            flag = FLAG_NAMES.get(extra[0], "--" + extra[0].replace("_", "-"))
            raise MaltError(f"{flag} needs --engine openai")
        return None
    return OpenAISettings(
        endpoints=split_endpoints(given["endpoints"], os.environ.get(ENDPOINTS_ENV)),
        api_key=clean_secret(os.environ.get(given["api_key_env"]), "$" + given["api_key_env"]),
        role_models=parse_role_models(given["role_models"]),
        max_in_flight=given["max_in_flight"],
        server_n=given["server_n"],
        model_revision=given["model_revision"],
        model_sha256=given["model_sha256"],
        timeout=given["request_timeout"],
    )


_FIELD_FLAGS = (
    ("question", "--question-field", "Column holding the question text."),
    ("answer", "--answer-field", "Column holding the ground truth."),
    ("options", "--options-field", "Column holding the multiple-choice options."),
    ("test", "--tests-field", "Column holding a code question's tests (a string or a list)."),
    ("entry_point", "--entry-point-field", "Column holding a code question's function name."),
)


def field_flags(func: Callable) -> Callable:
    """--question-field and the other column mappings (`malt_local.datasets.fields`)."""
    options = [
        click.option(flag, f"{name}_field", metavar="COLUMN", help=help)
        for name, flag, help in _FIELD_FLAGS
    ]
    return _apply(options, func)


def pop_fields(flags: dict) -> Any:
    """The column mapping the flags give (a `FieldMap`, empty when none was given)."""
    from malt_local.datasets.fields import FieldMap

    return FieldMap(**{name: flags.pop(f"{name}_field", None) for name, _, _ in _FIELD_FLAGS})
