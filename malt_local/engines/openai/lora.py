"""LoRA adapters through llama-server: which of its adapters is which file, and what to send.

llama-server loads LoRA GGUF files at start (`--lora FILE`, repeatable), lists them at
`GET /lora-adapters` as ``{"id", "path", "scale"}`` and applies them per request from the
request's ``lora`` field, a list of ``{"id", "scale"}``. Two facts of its code
(tools/server/server-context.cpp) shape what malt sends:

* a request without ``lora`` gets the server's global scales, which are 1.0 for every file
  given with `--lora` unless the server was started with `--lora-init-without-apply`; so a
  request meant for the base model must list every adapter at scale 0, or it is silently
  adapted. Once a server lists any adapter, every request malt sends carries the whole list.
* adapters a request does not list are at scale 0, and ids are positions in the server's list,
  which differ between servers started with the files in another order; so each endpoint maps
  a file to its own id.

A file is matched by name: the server lists the path it was given, which may be relative to its
own working directory or on another machine. Where that path can be read here, its sha256 must
be the local file's too (two rounds of `malt train` write files of the same names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from malt_local.errors import MaltError


@dataclass(frozen=True)
class ServedLora:
    """One adapter file as the endpoints serve it: its id on each endpoint, by URL."""

    path: Path
    ids: dict[str, int] = field(default_factory=dict)


def parse_listing(url: str, data: object) -> list[tuple[int, str]]:
    """`GET /lora-adapters` as (id, path) pairs; one line for a listing of another shape."""
    if not isinstance(data, list):
        raise MaltError(f"endpoint {url}: /lora-adapters is not a list of adapters")
    out = []
    for entry in data:
        if (
            not isinstance(entry, dict)
            or type(entry.get("id")) is not int
            or not isinstance(entry.get("path"), str)
        ):
            raise MaltError(f"endpoint {url}: /lora-adapters is not a list of adapters")
        out.append((entry["id"], entry["path"]))
    return out


def _same_file(local: Path, served: str) -> bool | None:
    """Whether the server's path holds the local file's bytes; None where it cannot be read."""
    from malt_local.hashing import cached_sha256

    path = Path(served)
    if not path.is_absolute() or not path.is_file():
        return None
    try:
        return cached_sha256(path) == cached_sha256(local)
    except OSError:
        return None


def match(url: str, local: Path, listing: list[tuple[int, str]] | None) -> int:
    """The id under which `url` serves the file `local`; one line when it serves none or
    several that could be it, or cannot take adapters per request at all."""
    if listing is None:
        raise MaltError(
            f"endpoint {url} cannot apply LoRA adapters per request (it is not a llama-server "
            "with /lora-adapters): serve each role's adapter under its own model name (vLLM "
            "--lora-modules) and pass --role-model ROLE=NAME"
        )
    named = [(i, p) for i, p in listing if Path(p).name == local.name]
    checked = [(i, p, _same_file(local, p)) for i, p in named]
    fits = [(i, p) for i, p, same in checked if same is not False]
    if len(fits) == 1:
        return fits[0][0]
    if len(fits) > 1:
        exact = [(i, p) for i, p, same in checked if same]
        if len(exact) == 1:
            return exact[0][0]
        raise MaltError(
            f"endpoint {url} serves several LoRA files named {local.name} "
            f"({', '.join(p for _, p in fits)}): start it with one of them"
        )
    served = ", ".join(Path(p).name for _, p in listing) or "none"
    other = " (a file of that name with other contents)" if named else ""
    raise MaltError(
        f"endpoint {url} does not serve the LoRA {local.name}{other}; it serves: {served}. "
        f"Start llama-server with --lora {local} (and --lora-init-without-apply)"
    )


def lora_field(
    url: str, listing: list[tuple[int, str]] | None, stack: list[tuple[object, float]]
) -> list[dict] | None:
    """The request's ``lora`` value for `url`: every adapter it serves, at the stack's scale
    or 0; None for a server that serves none (the field is then left out)."""
    if not listing:
        return None
    scales = {i: 0.0 for i, _ in listing}
    for handle, scale in stack:
        assert isinstance(handle, ServedLora)
        scales[handle.ids[url]] += scale
    return [{"id": i, "scale": s} for i, s in sorted(scales.items())]
