"""The model's own chat template, rendered in a sandbox with bounded work and output.

GGUF files carry their chat template as Jinja (`tokenizer.chat_template`). A downloaded file is
untrusted input: it renders in Jinja's immutable sandbox (no `''.__class__.__mro__`), and the
sandbox is bounded too, since a template can also loop for hours or render gigabytes:

- every loop iteration and every call counts against a budget of steps, and a render stops at a
  wall-clock deadline (checked at each step);
- `*`, `**`, `+`, `~`, calls and filters refuse to build a value larger than `MAX_VALUE`;
- the rendered text is streamed and stops past a size proportional to the conversation.

Whatever goes wrong (a syntax error, `raise_exception`, a refused attribute, a runaway loop, a
Python error inside the template) is one `MaltError` naming the template. `ChatTemplate` renders
a probe conversation when it is made, so a broken template fails before anything is written,
not at the first node. Files without a template fall back to ChatML.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from malt_local.errors import MaltError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Loop iterations plus calls one render may take: real templates take tens to a few hundred.
MAX_STEPS = 200_000
# Seconds one render may take: real templates take milliseconds.
RENDER_SECONDS = 10.0
# The largest string, list or number of digits a template may build in one operation.
MAX_VALUE = 1 << 20
# Rendered text allowed beyond the conversation's own: a template adds markers and, at most, a
# long fixed system text; far more than that is a template that renders without end.
EXTRA_OUTPUT = 1 << 20

# What `ChatTemplate` renders once when it is made: alternating turns (every chat template
# takes them), then the shape malt's prompts send (a system turn first).
PROBE_TURNS = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. Final Answer: 5"},
    {"role": "user", "content": "Check the answer above."},
]
PROBE_WITH_SYSTEM = [{"role": "system", "content": "Answer step by step."}, *PROBE_TURNS]


class _Budget:
    """One render's allowance of steps and time."""

    def __init__(self) -> None:
        self.left = MAX_STEPS
        self.deadline = time.monotonic() + RENDER_SECONDS

    def step(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise SecurityError(f"it loops too long (more than {MAX_STEPS} steps)")
        if time.monotonic() > self.deadline:
            raise SecurityError(f"it takes too long (more than {RENDER_SECONDS:.0f} s)")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "malt_chat_budget", default=None
)


def _step() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.step()


def _check_size(value: Any) -> Any:
    """`value`, unless it is a string, list or number larger than the sandbox allows."""
    if isinstance(value, str | bytes | list | tuple | dict) and len(value) > MAX_VALUE:
        raise SecurityError(f"it builds a value of {len(value)} items (at most {MAX_VALUE})")
    if isinstance(value, int) and value.bit_length() > MAX_VALUE:
        raise SecurityError("it builds a number too large")
    return value


def _check_args(args: Iterable[Any]) -> None:
    """Refuse an integer argument that would make a call build a huge value in one go
    (`'x'.center(10**9)`, `indent(10**9)`) before the call allocates it."""
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_VALUE:
            raise SecurityError(f"it passes {arg} to a function (at most {MAX_VALUE})")


# The widths and precisions of `%` and `str.format` specs: `'%999999999d' % 1` builds a
# gigabyte in one operation.
_PERCENT_SPEC = re.compile(r"%[#0 +-]*(\d*)(?:\.(\d*))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*\}")


def _check_format(text: str, spec: re.Pattern[str]) -> None:
    for match in spec.finditer(text):
        for digits in re.findall(r"\d+", match.group(0)):
            if int(digits) > MAX_VALUE:
                raise SecurityError(f"it formats a value {digits} characters wide")


def _bounded_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    """What every `{% for %}` iterates: the loop's items, each one a step of the budget."""
    for item in iterable:
        _step()
        yield item


def _bounded_filter(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)  # keeps `jinja_pass_arg` (pass_context and friends)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _step()
        _check_args([*args, *kwargs.values()])
        return _check_size(func(*args, **kwargs))

    return wrapper


class _Bounds(NodeTransformer):
    """Rewrites a parsed template so loops and `~` go through the budget and the size check."""

    def _call(self, name: str, arg: nodes.Expr, lineno: int) -> nodes.Call:
        return nodes.Call(nodes.Name(name, "load", lineno=lineno), [arg], [], None, None,
                          lineno=lineno)  # fmt: skip

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = self._call("__malt_iter__", node.iter, node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        return self._call("__malt_sized__", self.generic_visit(node), node.lineno)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with operators and calls that cannot build huge values."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any):
        _step()
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(count, int)
                    and len(seq) * count > MAX_VALUE
                ):
                    raise SecurityError(f"it repeats a value {count} times")
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right.bit_length() > MAX_VALUE
            ):
                raise SecurityError("it builds a number too large")
        elif operator == "**":
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and abs(left) > 1
                and right * left.bit_length() > MAX_VALUE
            ):
                raise SecurityError("it builds a number too large")
        elif operator == "%":
            if isinstance(left, str):
                _check_format(left, _PERCENT_SPEC)
                _check_args(right if isinstance(right, tuple) else [right])
        elif operator == "+":
            sizes = [len(v) for v in (left, right) if isinstance(v, str | list | tuple)]
            if len(sizes) == 2 and sum(sizes) > MAX_VALUE:
                raise SecurityError(f"it builds a value of {sum(sizes)} items")
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`str.format` as the sandbox gives it, refusing huge widths in the format string."""
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__, _FORMAT_SPEC)
        return wrapped

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any):  # noqa: N805
        _step()
        _check_args([*args, *kwargs.values()])
        return _check_size(super().call(__context, __obj, *args, **kwargs))


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


class ChatTemplate:
    """Turns chat messages into the prompt text the model was trained on.

    `where` names the template in messages (the GGUF it came from). Making one renders the
    probe conversations, so a template that cannot render is refused before any work starts.
    """

    def __init__(
        self,
        source: str | None,
        bos_token: str = "",
        eos_token: str = "",
        *,
        where: str = "the model's chat template",
    ) -> None:
        self.source = source or CHATML
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.where = where
        env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        env.globals["__malt_iter__"] = _bounded_iter
        env.globals["__malt_sized__"] = _check_size
        try:
            self._template = env.from_string(_Bounds().visit(env.parse(self.source)))
        except Exception as exc:  # untrusted code: every failure is the file's, not malt's
            raise MaltError(f"{where} does not compile: {_describe(exc)}") from exc
        self.render(PROBE_TURNS)
        try:
            self.render(PROBE_WITH_SYSTEM)
        except MaltError as exc:
            raise MaltError(f"{exc.message} (a conversation with a system turn)") from exc

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text; `MaltError` for a template that fails, loops or grows without end."""
        limit = EXTRA_OUTPUT + 2 * sum(len(m.get("content") or "") for m in messages)
        token = _budget.set(_Budget())
        try:
            parts, size = [], 0
            for part in self._template.generate(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            ):
                size += len(part)
                if size > limit:
                    raise SecurityError(f"it renders more than {limit} characters")
                parts.append(part)
                _step()
            return "".join(parts)
        except Exception as exc:  # untrusted code: every failure is the file's, not malt's
            raise MaltError(f"{self.where} cannot be rendered: {_describe(exc)}") from exc
        finally:
            _budget.reset(token)


def _describe(exc: BaseException) -> str:
    """One line for what went wrong inside a template."""
    text = " ".join(str(exc).split())[:300]
    if isinstance(exc, jinja2.TemplateSyntaxError) and exc.lineno:
        text = f"line {exc.lineno}: {text}"
    kind = "" if isinstance(exc, jinja2.TemplateError) else f"{type(exc).__name__}: "
    return (kind + text) or type(exc).__name__
