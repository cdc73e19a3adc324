"""Per-role LoRA adapters in llama.cpp's GGUF format: parsing `--adapter`, checking the files.

MALT trains one LoRA adapter per role on a frozen base (paper §4.3). At test time the base
weights are loaded once and each role's generations run with that role's adapter set on the
context (`LocalModel.load_adapter`, `HighLevelEngine.use_adapters`). A role without an adapter
uses the base weights, which is the paper's untrained setting for that role.

An adapter file is checked here, in Python, before llama.cpp sees it, so a user who passes the
wrong file gets one line that says what is wrong instead of a NULL pointer and a log on stderr.
The checks mirror `llama_adapter_lora_init` (vendor/llama.cpp/src/llama-adapter.cpp):

* the file is GGUF with ``general.type = "adapter"`` and ``adapter.type = "lora"``;
* ``general.architecture`` is the model's;
* every tensor is a ``NAME.lora_a`` / ``NAME.lora_b`` pair (``*_norm.weight`` is tolerated and
  ignored, as llama.cpp does) whose NAME is a tensor of the model, with shapes that fit it:
  ``lora_a`` is [in, rank] and ``lora_b`` [rank, out] in GGUF's dimension order, where the model
  tensor is [in, out] (``token_embd`` is the exception: A and B swap, see llm_build_inp_embd).

llama.cpp stays the final word: if it still refuses the file, that is reported too.

The files' headers are read by `malt_local.gguf`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from malt_local.errors import MaltError
from malt_local.gguf import GGUFHeader, read_gguf_header
from malt_local.roles import ROLES

# --------------------------------------------------------------------------- --adapter


@dataclass(frozen=True)
class AdapterSpec:
    """One `--adapter ROLE=PATH[:SCALE]`."""

    role: str
    path: Path
    scale: float = 1.0


def parse_adapter(value: str) -> AdapterSpec:
    """`generator=lora.gguf`, `refiner=out/r.gguf:0.5` -> AdapterSpec.

    The scale is the text after the last ':' when it reads as a number, so a path that itself
    contains ':' still works when no scale is given.
    """
    role, sep, rest = value.partition("=")
    role = role.strip().lower()
    if not sep or not rest.strip():
        raise MaltError(f"--adapter {value!r}: expected ROLE=PATH[:SCALE], e.g. generator=g.gguf")
    if role not in ROLES:
        raise MaltError(f"--adapter {value!r}: unknown role '{role}' (roles: {', '.join(ROLES)})")
    path_text, scale = rest.strip(), 1.0
    head, colon, tail = path_text.rpartition(":")
    if colon and head:
        try:
            scale = float(tail)
        except ValueError:
            pass
        else:
            path_text = head
            if not math.isfinite(scale):
                raise MaltError(f"--adapter {value!r}: the scale must be a finite number")
    return AdapterSpec(role, Path(path_text).expanduser(), scale)


def parse_adapters(values: list[str] | tuple[str, ...]) -> dict[str, list[AdapterSpec]]:
    """Every `--adapter`, grouped by role in the order of ROLES, in the order given per role.

    A role may take several adapters: they are applied together (LoRA deltas add up), which is
    how an SFT adapter and the DPO adapter trained on top of it are used at test time.
    """
    by_role: dict[str, list[AdapterSpec]] = {}
    for value in values:
        spec = parse_adapter(value)
        by_role.setdefault(spec.role, []).append(spec)
    return {role: by_role[role] for role in ROLES if role in by_role}


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class AdapterInfo:
    """A checked adapter file: what it adapts, for the eval record and the summary."""

    role: str
    path: Path
    scale: float
    sha256: str
    alpha: float | None
    rank: int
    tensors: int
    targets: tuple[str, ...] = field(default=(), repr=False)

    def record(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "scale": self.scale,
            "alpha": self.alpha,
            "rank": self.rank,
            "tensors": self.tensors,
        }


def check_adapter(spec: AdapterSpec, model: GGUFHeader | None, model_name: str) -> AdapterInfo:
    """Check that `spec.path` is a LoRA GGUF that llama.cpp can apply to `model`.

    With `model` None (a server's model, whose file malt does not read) only the file itself is
    checked: a LoRA GGUF of complete A/B pairs; the server checks the fit when it loads it."""
    from malt_local.hashing import cached_sha256

    where = f"--adapter {spec.role}: {spec.path}"
    if not spec.path.exists():
        raise MaltError(f"{where}: file not found")
    try:
        header = read_gguf_header(spec.path)
    except MaltError as exc:
        raise MaltError(f"{where}: {exc.message.replace(str(spec.path), 'file')}") from exc
    gtype = header.string("general.type")
    if gtype != "adapter":
        what = "a model" if gtype in (None, "model") else f"general.type '{gtype}'"
        raise MaltError(
            f"{where} is {what}, not a LoRA adapter (convert a PEFT adapter with llama.cpp's "
            "convert_lora_to_gguf.py)"
        )
    atype = header.string("adapter.type")
    if atype != "lora":
        raise MaltError(f"{where} is a '{atype}' adapter, not a LoRA adapter")
    arch = header.string("general.architecture")
    model_arch = model.string("general.architecture") if model is not None else arch
    if arch != model_arch:
        raise MaltError(f"{where} is for architecture '{arch}', but {model_name} is '{model_arch}'")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in header.tensors.items():
        if name.endswith((".lora_a", ".lora_b")):
            pairs.setdefault(name[:-7], {})[name[-1]] = shape
        elif name.endswith("_norm.weight"):
            continue  # llama.cpp ignores norm vectors in adapters
        else:
            raise MaltError(f"{where}: tensor '{name}' is not a LoRA tensor (.lora_a/.lora_b)")
    if not pairs:
        raise MaltError(f"{where} has no LoRA tensors")
    ranks: set[int] = set()
    for base, ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            raise MaltError(f"{where}: tensor '{base}' has lora_a or lora_b but not both")
        a, b = ab["a"], ab["b"]
        if model is None:
            if len(a) != 2 or len(b) != 2:
                raise MaltError(f"{where}: tensor '{base}' has unexpected dimensions")
            ranks.add(a[0] if base.endswith("token_embd.weight") else a[1])
            continue
        target = model.tensors.get(base)
        if target is None:
            raise MaltError(
                f"{where}: tensor '{base}' does not exist in {model_name} (an adapter for "
                "another model?)"
            )
        if len(a) != 2 or len(b) != 2 or len(target) < 2:
            raise MaltError(f"{where}: tensor '{base}' has unexpected dimensions")
        if base.endswith("token_embd.weight"):
            fits = target[0] == b[1] and target[1] == a[1]
            rank = a[0]
        else:
            fits = target[0] == a[0] and target[1] == b[1] and a[1] == b[0]
            rank = a[1]
        if not fits:
            raise MaltError(
                f"{where}: tensor '{base}' has shapes A{list(a)} B{list(b)}, which do not fit "
                f"{model_name}'s {list(target)} (an adapter for another model?)"
            )
        ranks.add(rank)
    alpha = header.metadata.get("adapter.lora.alpha")
    return AdapterInfo(
        role=spec.role,
        path=spec.path,
        scale=spec.scale,
        sha256=cached_sha256(spec.path),
        alpha=float(alpha) if isinstance(alpha, (int, float)) else None,
        rank=max(ranks),
        tensors=2 * len(pairs),
        targets=tuple(sorted(pairs)),
    )


def check_adapters(
    specs: dict[str, list[AdapterSpec]], model_path: Path
) -> dict[str, list[AdapterInfo]]:
    """Check every adapter against the model's header (read once), before anything loads."""
    if not specs:
        return {}
    model = read_gguf_header(model_path)
    return {
        role: [check_adapter(spec, model, model_path.name) for spec in role_specs]
        for role, role_specs in specs.items()
    }


def check_adapter_files(specs: dict[str, list[AdapterSpec]]) -> dict[str, list[AdapterInfo]]:
    """Check every adapter file on its own, for a server's model (see `check_adapter`)."""
    return {
        role: [check_adapter(spec, None, "the served model") for spec in role_specs]
        for role, role_specs in specs.items()
    }
