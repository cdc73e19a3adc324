"""Role prompts: Jinja templates rendered in a sandbox into chat messages.

Each role has one template, `prompts/<role>.j2`, with an optional task variant
`prompts/<role>.<task>.j2` (CSQA shows its options). A template defines a `user` block: the turn
that role adds to the conversation, and may define a `system` block.

A role's framing follows from its templates. A role whose template defines its own `system`
block gets a fresh conversation, `[system, user]`: the question and the earlier roles' outputs
reach it only through the template's variables (`generation`, `critique`). This is the MALT
paper's framing and the shipped `paper` set's (`prompts/paper/`). A role whose template defines
no `system` block continues the conversation above it, as every role of the shipped `default`
set does: the verifier's prompt is the generator's prompt, the generator's answer as an
assistant turn, and the verifier's turn; the refiner's extends that by the critique and its own
turn. Each level's prompt then extends its parent's, and an engine that keeps the parent's KV
cache prefills only the new turn. The generator's conversation always starts fresh, with its
`system` block as the system turn when it has one.

"Its own" means: defined by the role's template or by a template it extends, following the
`{% extends %}` chain up to (not into) another role's template. `verifier.csqa.j2` extending
`verifier.j2` has the system block of `verifier.j2`; a `verifier.j2` that extends
`generator.j2` does not inherit the generator's system block as its own, and still continues
the generator's conversation (a verifier that wants a fresh conversation with the generator's
system prompt says so: `{% block system %}{{ super() }}{% endblock %}`).

`--prompts` takes a folder or the name of a shipped set (`resolve_prompts_dir`): `default` is
`prompts/`, `paper` is `prompts/paper/`; an existing folder of that name wins over the name.

Templates come from users (`--prompts DIR`), so they render in Jinja's immutable sandbox with
undefined variables as errors: a typo in a template fails the run before any node is written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from malt_local.errors import MaltError
from malt_local.paths import data_path
from malt_local.questions.loading import Question
from malt_local.roles import ROLES
from malt_local.tasks import get_task

Message = dict[str, str]

# The prompt sets shipped with malt, by the name `--prompts` accepts, as paths under the shipped
# `prompts` folder (`data_path`). A subfolder does not change the default set's digest:
# `PromptSet.hashes` reads only the templates directly in its folder.
SHIPPED_SETS: dict[str, str] = {"default": ".", "paper": "paper"}


def resolve_prompts_dir(value: Path | str | None) -> Path:
    """The prompts folder `--prompts VALUE` names: an existing folder is that folder (a path
    wins over a name), else a shipped set's name (`SHIPPED_SETS`); None is the default set.
    Anything else is a `MaltError` that lists the shipped sets."""
    shipped = data_path("prompts")
    if value is None:
        return shipped
    path = Path(value)
    if path.is_dir():
        return path
    name = str(value)
    if name in SHIPPED_SETS:
        return shipped if SHIPPED_SETS[name] == "." else shipped / SHIPPED_SETS[name]
    names = ", ".join(SHIPPED_SETS)
    raise MaltError(f"prompts folder not found: {value} (shipped sets: {names})")


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


def render_block(
    tpl: jinja2.Template, block: str, variables: dict, label: str | None = None
) -> str | None:
    """One block of a template, found through its `{% extends %}` chain, stripped.

    A template's own `blocks` hold only the blocks it defines; Jinja adds the parents' blocks to
    a context only while rendering the whole document. Without the chain a variant such as
    `generator.csqa.j2`, which overrides `user`, would silently lose the `system` block it
    inherits. The chain is set up as Jinja does it, so `{{ super() }}` works too.
    """
    try:
        ctx = tpl.new_context(variables)
        for parent in _parents(tpl):
            for name, render in parent.blocks.items():
                ctx.blocks.setdefault(name, []).append(render)
        if block not in ctx.blocks:
            return None
        return "".join(ctx.blocks[block][0](ctx)).strip()
    except jinja2.TemplateError as exc:
        where = label or f"prompt template {tpl.name}"
        raise MaltError(f"{where}, block {block}: {exc}") from exc


def _parents(tpl: jinja2.Template) -> Iterator[jinja2.Template]:
    """The templates `tpl` extends, nearest first (a name computed at render time is not
    followed: the shipped and documented templates extend a literal name)."""
    env, seen = tpl.environment, {tpl.name}
    while True:
        assert env.loader is not None and tpl.name is not None
        source, _, _ = env.loader.get_source(env, tpl.name)
        extends = next(iter(env.parse(source).find_all(jinja2.nodes.Extends)), None)
        if extends is None or not isinstance(extends.template, jinja2.nodes.Const):
            return
        name = extends.template.value
        if name in seen:
            raise MaltError(f"prompt template {tpl.name} extends itself through {name}")
        seen.add(name)
        tpl = env.get_template(name)
        yield tpl


class PromptSet:
    """The templates of one prompts folder, compiled once."""

    def __init__(self, folder: Path | str | None = None) -> None:
        self.folder = resolve_prompts_dir(folder)
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
        self._fresh: dict[tuple[str, str], bool] = {}

    def hashes(self) -> dict[str, str]:
        """sha256 of every template file, recorded with a run so a changed prompt is noticed."""
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.folder.glob("*.j2"))
        }

    def template(self, role: str, task: str) -> jinja2.Template:
        name = f"{role}.{get_task(task).variant}.j2"
        if not (self.folder / name).is_file():
            name = f"{role}.j2"
        if name not in self._cache:
            try:
                self._cache[name] = self.env.get_template(name)
            except jinja2.TemplateError as exc:
                raise MaltError(f"prompt template {name}: {exc}") from exc
        return self._cache[name]

    def _block(self, role: str, task: str, block: str, ctx: TreeContext) -> str | None:
        return render_block(self.template(role, task), block, ctx.variables())

    def fresh(self, role: str, task: str) -> bool:
        """Whether `role` starts its own conversation for `task` (see the module docstring):
        the generator always does; another role when its template, or a template it extends
        short of another role's template, defines a `system` block."""
        if role == "generator":
            return True
        key = (role, task)
        if key not in self._fresh:
            self._fresh[key] = False
            others = tuple(r for r in ROLES if r != role)
            tpl = self.template(role, task)
            try:
                for t in (tpl, *_parents(tpl)):
                    if (t.name or "").split(".")[0] in others:
                        break
                    if "system" in t.blocks:
                        self._fresh[key] = True
                        break
            except jinja2.TemplateError as exc:
                raise MaltError(f"prompt template {tpl.name}: {exc}") from exc
        return self._fresh[key]

    def messages(self, role: str, ctx: TreeContext) -> list[Message]:
        """The exact chat messages a node of `role` is generated from."""
        task = ctx.question.task
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if role == "verifier" and ctx.generation is None:
            raise ValueError("a verifier prompt needs the generator's output")
        if role == "refiner" and ctx.critique is None:
            raise ValueError("a refiner prompt needs the verifier's output")
        if self.fresh(role, task):
            out: list[Message] = []
            system = self._block(role, task, "system", ctx)
            if system:
                out.append({"role": "system", "content": system})
        elif role == "verifier":
            out = self.messages("generator", ctx)
            out.append({"role": "assistant", "content": ctx.generation or ""})
        else:
            out = self.messages("verifier", ctx)
            out.append({"role": "assistant", "content": ctx.critique or ""})
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
            for role in ROLES:  # a role with a fresh conversation renders only its own
                self.messages(role, ctx)
