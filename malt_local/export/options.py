"""What an export is asked for: roles, formats, θ, runs, the split, the pair cap and whether
length-stopped nodes are kept.

`ExportOptions.validate` is where every choice a user can get wrong is refused, with the CLI's
wording, before anything is read or written; `parse_choice` reads the CLI's `all`-or-one flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from malt_local.errors import MaltError
from malt_local.roles import ROLES

FORMATS = ("sft", "dpo", "json")


@dataclass(frozen=True)
class ExportOptions:
    roles: tuple[str, ...] = ROLES
    formats: tuple[str, ...] = FORMATS
    theta: float | None = None
    run_ids: tuple[str, ...] = ()
    valid_fraction: float | None = None
    max_pairs_per_group: int | None = None
    # Nodes cut off at max_tokens are left out of SFT and the DPO chosen side unless kept.
    keep_length_stopped: bool = False

    def validate(self) -> None:
        for role in self.roles:
            if role not in ROLES:
                raise MaltError(f"unknown role {role!r}: choose {', '.join(ROLES)} or all")
        for fmt in self.formats:
            if fmt not in FORMATS:
                raise MaltError(f"unknown format {fmt!r}: choose {', '.join(FORMATS)} or all")
        if not self.roles or not self.formats:
            raise MaltError("nothing to export: no role or no format chosen")
        if self.theta is not None and not 0 <= self.theta <= 1:
            raise MaltError(f"--theta must be in [0, 1] (got {self.theta})")
        if self.valid_fraction is not None:
            if not 0 < self.valid_fraction < 1:
                raise MaltError(f"--valid-fraction must be in (0, 1) (got {self.valid_fraction})")
            if "sft" not in self.formats:
                raise MaltError("--valid-fraction splits the SFT data: use it with --format sft")
        if self.max_pairs_per_group is not None and self.max_pairs_per_group < 1:
            raise MaltError(
                f"--max-pairs-per-group must be at least 1 (got {self.max_pairs_per_group})"
            )


def parse_choice(value: str, choices: tuple[str, ...], what: str) -> tuple[str, ...]:
    """`all` or one of `choices` (case-insensitive) as a tuple."""
    v = value.strip().lower()
    if v == "all":
        return choices
    if v not in choices:
        raise MaltError(f"unknown {what} {value!r}: choose {', '.join(choices)} or all")
    return (v,)
