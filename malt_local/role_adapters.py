"""Per-role LoRA adapters for a command that generates (`malt run`, `malt eval`): which files,
checked against the model before anything is written, and loaded onto the engine once.

Both commands take the same flags, `--adapter ROLE=PATH[:SCALE]` (repeatable) and `--adapters
DIR` (a `malt train` folder, every role its SFT then DPO adapter), and refuse the same things in
one line: a file that does not fit the model (`engines.llama.adapters`; for a server's model only
the file itself is checked, and the server must list it), and a train folder made for another
model or under other prompts unless `allow_mismatch`.

The llama.cpp engines apply a role's stack on their own context; `--engine openai` sends it with
each request to a llama-server started with the same files (`engines.openai.lora`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from malt_local.engines.base import AdapterEngine, Engine, ModelIdentity
from malt_local.engines.llama.adapters import (
    AdapterInfo,
    check_adapter_files,
    check_adapters,
    parse_adapters,
)
from malt_local.errors import MaltError
from malt_local.hashing import is_sha256

# Per role, the loaded (llama.cpp handle, scale) pairs to set on the context for its turns.
RoleHandles = dict[str, list[tuple[object, float]]]


def check_values(values: Sequence[str]) -> None:
    """Refuse a malformed `--adapter` value before the model is looked for (a typo is the
    cheaper news, and a server need not be asked)."""
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
    from malt_local.training.manifest import identity_problem, read_manifest, trained_for

    if adapters_dir is not None:
        values = [*folder_values(adapters_dir), *values]
    specs = parse_adapters(list(values))
    if not specs:
        return {}
    if adapters_dir is not None and not allow_mismatch:
        manifest = read_manifest(adapters_dir) or {}
        if not is_sha256(model.sha256) and trained_for(manifest)[0] is not None:
            raise MaltError(
                f"--adapters {adapters_dir}: the digest of the model --engine {engine_name} "
                "serves is not known, so the adapters cannot be checked against it: pass "
                "--model-sha256 (of the GGUF the server runs), or --allow-mismatch"
            )
        problem = identity_problem(adapters_dir, manifest, model.sha256, prompts_sha256)
        if problem:
            raise MaltError(problem)
    if not local:
        return check_adapter_files(specs)
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
