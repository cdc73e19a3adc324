"""A broken or hostile chat template inside a GGUF: one line, exit 2, nothing written.

The template is planted in a copy of the small model (tests/ggufedit.py) and `malt run` is run
on it as a user would; the sandbox's bounds (steps, value sizes, output) are checked directly on
`ChatTemplate` too, where a template that would loop for hours or build gigabytes is refused.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from malt_local.engines.llama.chat import ChatTemplate
from malt_local.errors import MaltError
from malt_local.gguf import read_gguf_header
from tests.conftest import malt, run_argv
from tests.ggufedit import with_metadata_string

LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
HOSTILE = {
    "syntax error": ("{% for m in messages %}{{ m.content }}", "does not compile"),
    "raises at render": ("{{ raise_exception('this template refuses') }}", "refuses"),
    "reaches for attributes": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    "loops for hours": (LOOPS, "loops too long"),
    "renders gigabytes": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
        "{% endfor %}",
        "loops too long|renders more than",
    ),
    "one huge value": ("{{ 'x' * 10**10 }}", "repeats a value"),
    "doubles a string": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s }}",
        "builds a value",
    ),
    "a huge number": ("{{ 10 ** (10 ** 10) }}", "number too large"),
    "a huge width": ("{{ '%999999999d' % 1 }}{{ '{:>999999999}'.format(1) }}", "wide"),
    "a huge filter argument": ("{{ 'x'|center(10**9) }}", "passes 1000000000"),
    "exponential macros": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(60) }}",
        "loops too long",
    ),
    "a Python error": ("{{ 1 / 0 }}", "ZeroDivisionError"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_template_is_refused_in_one_line_when_made(name):
    source, message = HOSTILE[name]
    with pytest.raises(MaltError, match=message) as info:
        ChatTemplate(source, where="the chat template of m.gguf")
    assert "\n" not in info.value.message and "m.gguf" in info.value.message


def test_a_template_that_refuses_a_system_turn_says_so():
    source = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(MaltError, match="System role not supported.*system turn"):
        ChatTemplate(source)


def test_a_real_template_renders_as_an_unbounded_sandbox_does(small_model):
    """The bounds change nothing for an honest template (the small model's own)."""
    source = read_gguf_header(small_model).string("tokenizer.chat_template")
    assert source
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    messages = [
        {"role": "system", "content": "S " * 500},
        {"role": "user", "content": "é 2+3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Sure?"},
    ]
    ours = ChatTemplate(source).render(messages)
    assert ours == plain.render(messages=messages, add_generation_prompt=True)


def test_a_render_that_outgrows_the_conversation_stops():
    template = ChatTemplate(
        "{% for m in messages %}{% for i in range(10) %}{{ m['content'] }}{% endfor %}{% endfor %}"
    )
    assert len(template.render([{"role": "user", "content": "x" * 1000}])) == 10_000
    with pytest.raises(MaltError, match="renders more than"):
        template.render([{"role": "user", "content": "x" * 300_000}])


def _planted(small_model: Path, tmp_path: Path, source: str) -> Path:
    return with_metadata_string(
        small_model, tmp_path / "hostile.gguf", "tokenizer.chat_template", source
    )


@pytest.mark.parametrize(
    "name", ["syntax error", "raises at render", "reaches for attributes", "loops for hours"]
)
def test_malt_run_on_a_gguf_with_a_hostile_template_writes_nothing(small_model, tmp_path, name):
    source, message = HOSTILE[name]
    model = _planted(small_model, tmp_path, source)
    db = tmp_path / "runs.db"
    r = malt(*run_argv(db, model, n=2, max_tokens=8, limit=2), timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "hostile.gguf" in lines[0] and jinja2.__name__ not in lines[0].split(":")[0]
    assert "Traceback" not in r.stderr
    if db.exists():  # nothing half-written: no run, no question, no node
        conn = sqlite3.connect(db)
        try:
            tables = {t for (t,) in conn.execute("SELECT name FROM sqlite_master")}
            for table in {"runs", "questions", "nodes"} & tables:
                assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
        finally:
            conn.close()


def test_malt_run_on_a_gguf_with_an_honest_edited_template_still_runs(small_model, tmp_path):
    """The planting itself leaves a working model (so the refusals above are the template's)."""
    source = read_gguf_header(small_model).string("tokenizer.chat_template")
    model = _planted(small_model, tmp_path, (source or "") + "{# edited #}")
    r = malt(*run_argv(tmp_path / "ok.db", model, n=1, max_tokens=4, limit=1), timeout=300)
    assert r.returncode == 0, r.stderr
