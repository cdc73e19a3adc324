"""Per-role LoRA adapters for a command that generates (`malt run`, `malt eval`): which files,
checked against the model before anything is written, and loaded onto the engine once.

Both commands take the same flags, `--adapter ROLE=PATH[:SCALE]` (repeatable) and `--adapters
DIR` (a `malt train` folder, every role its SFT then DPO adapter), and refuse the same things in
one line: a server engine (llama.cpp applies adapters per context; a server serves them under
model names of its own), a file that does not fit the model (`engines.llama.adapters`), and a
train folder made for another model or under other prompts unless `allow_mismatch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from malt_local.engines.base import AdapterEngine, Engine, ModelIdentity
from malt_local.engines.llama.adapters import AdapterInfo, check_adapters, parse_adapters
from malt_local.errors import MaltError

# Per role, the loaded (llama.cpp handle, scale) pairs to set on the context for its turns.
RoleHandles = dict[str, list[tuple[object, float]]]


def check_engine(
    values: Sequence[str], adapters_dir: Path | None, *, local: bool, engine_name: str
) -> None:
    """Refuse adapters on a server engine before the server is even asked what it serves, and
    a malformed `--adapter` value before the model is looked for (a typo is the cheaper news)."""
    if (values or adapters_dir is not None) and not local:
        raise MaltError(
            f"--adapter needs a llama.cpp engine; with --engine {engine_name} serve each role's "
            "adapter under its own model name and pass --role-model ROLE=NAME"
        )
    parse_adapters(list(values))


def resolve_adapters(
    values: Sequence[str],
    adapters_dir: Path | None,
    *,
    local: bool,
    engine_name: str,
    model: ModelIdentity,
    prompts_sha256: str,
    allow_mismatch: bool = False,
) -> dict[str, list[AdapterInfo]]:
    """Every role's checked adapter files ({} when none was asked for).

    `adapters_dir` comes first, then `values`, so a `--adapter` adds to a trained folder's stack.
    """
    from malt_local.training.manifest import adapter_values as folder_values
    from malt_local.training.manifest import identity_problem, read_manifest

    if adapters_dir is not None:
        values = [*folder_values(adapters_dir), *values]
    specs = parse_adapters(list(values))
    if not specs:
        return {}
    check_engine(values, adapters_dir, local=local, engine_name=engine_name)
    if adapters_dir is not None and not allow_mismatch:
        manifest = read_manifest(adapters_dir) or {}
        problem = identity_problem(adapters_dir, manifest, model.sha256, prompts_sha256)
        if problem:
            raise MaltError(problem)
    return check_adapters(specs, Path(model.model))


def load_adapters(engine: Engine, infos: dict[str, list[AdapterInfo]]) -> RoleHandles:
    """Load each checked file onto the engine's weights once; a role's handles in apply order."""
    if not infos:
        return {}
    if not isinstance(engine, AdapterEngine):
        raise MaltError(f"the {engine.name} engine cannot apply LoRA adapters")
    return {
        role: [(engine.load_adapter(i.path), i.scale) for i in role_infos]
        for role, role_infos in infos.items()
    }


def identity_of(infos: dict[str, list[AdapterInfo]]) -> dict[str, list[list]]:
    """What a run's identity holds of its adapters: per role, [sha256, scale] in apply order.
    Paths are not identity (the same file moved is the same adapter)."""
    return {role: [[i.sha256, i.scale] for i in role_infos] for role, role_infos in infos.items()}
