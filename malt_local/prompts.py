"""Role prompts: Jinja templates rendered in a sandbox into chat messages.

Each role has one template, `prompts/<role>.j2`, with an optional task variant
`prompts/<role>.<task>.j2` (CSQA shows its options). A template defines a `user` block: the turn
that role adds to the conversation. The generator's template also defines `system`, the one
system prompt all three roles share.

The roles do not get separate conversations. The verifier's prompt is the generator's prompt,
the generator's answer as an assistant turn, and the verifier's turn; the refiner's extends that
by the critique and its own turn. Each level's prompt therefore extends its parent's, and an
engine that keeps the parent's KV cache prefills only the new turn.

Templates come from users (`--prompts DIR`), so they render in Jinja's immutable sandbox with
undefined variables as errors: a typo in a template fails the run before any node is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from malt_local.errors import MaltError
from malt_local.paths import data_path
from malt_local.questions import Question

ROLES = ("generator", "verifier", "refiner")
Message = dict[str, str]


@dataclass(frozen=True)
class TreeContext:
    """What a role's template can see: the question and the turns above it."""

    question: Question
    generation: str | None = None
    critique: str | None = None

    def variables(self) -> dict:
        q = self.question
        return {
            "question": q.text,
            "task": q.task,
            "options": [{"letter": letter, "text": text} for letter, text in q.options],
            "generation": self.generation,
            "critique": self.critique,
        }


class PromptSet:
    """The templates of one prompts folder, compiled once."""

    def __init__(self, folder: Path | str | None = None) -> None:
        self.folder = Path(folder) if folder is not None else data_path("prompts")
        if not self.folder.is_dir():
            raise MaltError(f"prompts folder not found: {self.folder}")
        self.env = ImmutableSandboxedEnvironment(
            loader=jinja2.FileSystemLoader(str(self.folder)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        for role in ROLES:
            if not (self.folder / f"{role}.j2").is_file():
                raise MaltError(f"prompts folder {self.folder} has no {role}.j2")
        self._cache: dict[str, jinja2.Template] = {}

    def hashes(self) -> dict[str, str]:
        """sha256 of every template file, recorded with a run so a changed prompt is noticed."""
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.folder.glob("*.j2"))
        }

    def template(self, role: str, task: str) -> jinja2.Template:
        name = f"{role}.{task}.j2"
        if not (self.folder / name).is_file():
            name = f"{role}.j2"
        if name not in self._cache:
            try:
                self._cache[name] = self.env.get_template(name)
            except jinja2.TemplateError as exc:
                raise MaltError(f"prompt template {name}: {exc}") from exc
        return self._cache[name]

    def _block(self, role: str, task: str, block: str, ctx: TreeContext) -> str | None:
        tpl = self.template(role, task)
        if block not in tpl.blocks:
            return None
        try:
            jctx = tpl.new_context(ctx.variables())
            return "".join(tpl.blocks[block](jctx)).strip()
        except jinja2.TemplateError as exc:
            raise MaltError(f"prompt template {tpl.name}, block {block}: {exc}") from exc

    def messages(self, role: str, ctx: TreeContext) -> list[Message]:
        """The exact chat messages a node of `role` is generated from."""
        task = ctx.question.task
        if role == "generator":
            out: list[Message] = []
            system = self._block("generator", task, "system", ctx)
            if system:
                out.append({"role": "system", "content": system})
        elif role == "verifier":
            if ctx.generation is None:
                raise ValueError("a verifier prompt needs the generator's output")
            out = self.messages("generator", ctx)
            out.append({"role": "assistant", "content": ctx.generation})
        elif role == "refiner":
            if ctx.critique is None:
                raise ValueError("a refiner prompt needs the verifier's output")
            out = self.messages("verifier", ctx)
            out.append({"role": "assistant", "content": ctx.critique})
        else:
            raise ValueError(f"unknown role {role!r}")
        user = self._block(role, task, "user", ctx)
        if not user:
            raise MaltError(f"prompt template for {role} ({task}) has no 'user' block")
        out.append({"role": "user", "content": user})
        return out

    def check(self, questions: list[Question]) -> None:
        """Render every template once per task in use, so errors surface before generation."""
        seen: set[str] = set()
        for q in questions:
            if q.task in seen:
                continue
            seen.add(q.task)
            ctx = TreeContext(q, generation="(answer)", critique="(critique)")
            self.messages("refiner", ctx)
