"""The shipped paper prompt set (`--prompts paper`): each role its own conversation, `[system,
user]`, with the question and the earlier roles' outputs inside the user turn; and the rule that
decides a role's framing, which keeps the default set's shared conversation as it was."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from malt_local.cli import cli
from malt_local.errors import MaltError
from malt_local.paths import data_path
from malt_local.prompts import SHIPPED_SETS, PromptSet, TreeContext, resolve_prompts_dir
from malt_local.questions.loading import Question, load_questions
from malt_local.roles import ROLES
from malt_local.run.settings import prompts_digest
from tests.conftest import EXAMPLES, malt, run_argv

Q = Question("What is 6 * 7?", "42", "gsm8k")
GEN = "6*7=42\nFinal Answer: 42"
CRIT = "The answer is correct."
CTX = TreeContext(Q, generation=GEN, critique=CRIT)
CODE = Question('def add(a, b):\n    """Return a + b."""\n', "assert add(1, 2) == 3", "code")


def csqa() -> Question:
    return load_questions(EXAMPLES / "csqa.jsonl")[0]


# -- the paper set -------------------------------------------------------------------------------


@pytest.mark.parametrize("question", [Q, CODE, "csqa"], ids=["gsm8k", "code", "csqa"])
def test_every_paper_role_is_a_fresh_system_and_user_pair(question):
    q = csqa() if question == "csqa" else question
    ps = PromptSet("paper")
    ctx = TreeContext(q, generation=GEN, critique=CRIT)
    systems = set()
    for role in ROLES:
        msgs = ps.messages(role, ctx)
        assert [m["role"] for m in msgs] == ["system", "user"], role
        systems.add(msgs[0]["content"])
        user = msgs[1]["content"]
        assert q.text.strip().splitlines()[0] in user
        assert (GEN in user) == (role != "generator")
        assert (CRIT in user) == (role == "refiner")
    assert len(systems) == 3  # a system prompt of its own for every role


def test_paper_refiner_keeps_the_papers_system_prompt_and_the_final_answer_line():
    ps = PromptSet("paper")
    system, user = ps.messages("refiner", CTX)
    assert system["content"] == (
        "You are an expert problem solver that refines math solutions based on feedback."
    )
    assert user["content"].startswith("Question: What is 6 * 7?\n\nInitial Answer:\n" + GEN)
    assert user["content"].endswith('"Final Answer: N", where N is only the final number.')
    # The same end instruction as the default set's, so grading reads both alike.
    default_last = PromptSet().messages("refiner", CTX)[-1]["content"].splitlines()[-1]
    assert user["content"].splitlines()[-1] == default_last


def test_paper_csqa_variant_shows_the_options_to_every_role():
    q = csqa()
    ps = PromptSet("paper")
    for role in ROLES:
        user = ps.messages(role, TreeContext(q, GEN, CRIT))[1]["content"]
        assert "A: bank" in user and "E: new york" in user, role
        assert 'Final Answer: L"' in user or role == "verifier"
    # verifier.csqa.j2 overrides only `user`: its system prompt is verifier.j2's.
    assert ps.messages("verifier", TreeContext(q, GEN))[0] == ps.messages("verifier", CTX)[0]


def test_paper_set_checks_every_role(tmp_path):
    """With fresh conversations the refiner no longer renders the generator's template, so
    `check` renders every role: a typo in the generator's template is still caught."""
    for name in ("generator.j2", "verifier.j2", "refiner.j2"):
        (tmp_path / name).write_text((data_path("prompts") / "paper" / name).read_text())
    (tmp_path / "generator.j2").write_text(
        "{% block system %}S{% endblock %}{% block user %}{{ qestion }}{% endblock %}"
    )
    with pytest.raises(MaltError, match="qestion"):
        PromptSet(tmp_path).check([Q])


# -- the default set is unchanged ----------------------------------------------------------------


def test_default_set_keeps_one_shared_conversation():
    ps = PromptSet()
    g = ps.messages("generator", CTX)
    assert [m["role"] for m in g] == ["system", "user"]
    v_turn = ps.messages("verifier", CTX)[-1]
    assert ps.messages("verifier", CTX) == [*g, {"role": "assistant", "content": GEN}, v_turn]
    assert ps.messages("refiner", CTX) == [
        *g,
        {"role": "assistant", "content": GEN},
        v_turn,
        {"role": "assistant", "content": CRIT},
        ps.messages("refiner", CTX)[-1],
    ]
    assert "What is 6 * 7?" not in v_turn["content"]
    assert not any(ps.fresh(role, "gsm8k") for role in ("verifier", "refiner"))


def test_default_digest_ignores_the_paper_subfolder():
    """Runs and adapters record this digest: the shipped subfolder must not change it."""
    ps = PromptSet("default")
    assert ps.folder == PromptSet().folder == data_path("prompts")
    assert sorted(ps.hashes()) == sorted(
        [f"{role}{variant}.j2" for role in ROLES for variant in ("", ".csqa", ".code")]
        + ["judge.j2"]
    )
    assert prompts_digest(ps.hashes()) == (
        "2e5078b136119d46266afb5772b05cbb39df46035d26c9cd159346472375dbdb"
    )
    assert prompts_digest(PromptSet("paper").hashes()) != prompts_digest(ps.hashes())


# -- the rule ------------------------------------------------------------------------------------


def write(folder, **templates: str) -> None:
    for name, text in templates.items():
        (folder / f"{name.replace('_', '.')}.j2").write_text(text)


GENERATOR = "{% block system %}SYS{% endblock %}{% block user %}Q: {{ question }}{% endblock %}"


def test_a_verifier_extending_the_generator_does_not_inherit_its_system_block(tmp_path):
    write(
        tmp_path,
        generator=GENERATOR,
        verifier='{% extends "generator.j2" %}{% block user %}V{% endblock %}',
        refiner="{% block user %}R{% endblock %}",
    )
    ps = PromptSet(tmp_path)
    assert not ps.fresh("verifier", "gsm8k")
    assert ps.messages("verifier", CTX) == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Q: What is 6 * 7?"},
        {"role": "assistant", "content": GEN},
        {"role": "user", "content": "V"},
    ]
    # Saying so in its own template makes it fresh, with the generator's system prompt.
    write(
        tmp_path,
        verifier='{% extends "generator.j2" %}{% block system %}{{ super() }}!{% endblock %}'
        "{% block user %}V {{ generation }}{% endblock %}",
    )
    assert PromptSet(tmp_path).messages("verifier", CTX) == [
        {"role": "system", "content": "SYS!"},
        {"role": "user", "content": f"V {GEN}"},
    ]


def test_a_system_block_from_a_shared_base_or_a_task_variants_parent_counts(tmp_path):
    write(
        tmp_path,
        base="{% block system %}BASE {{ task }}{% endblock %}",
        generator=GENERATOR,
        verifier='{% extends "base.j2" %}{% block user %}V {{ generation }}{% endblock %}',
        verifier_csqa='{% extends "verifier.j2" %}{% block user %}VC{% endblock %}',
        refiner="{% block user %}R{% endblock %}",
    )
    ps = PromptSet(tmp_path)
    assert ps.messages("verifier", CTX) == [
        {"role": "system", "content": "BASE gsm8k"},
        {"role": "user", "content": f"V {GEN}"},
    ]
    q = csqa()
    assert [m["content"] for m in ps.messages("verifier", TreeContext(q, GEN))] == [
        "BASE csqa",
        "VC",
    ]
    # The refiner has no system block: it continues the verifier's fresh conversation.
    assert ps.messages("refiner", CTX) == [
        *ps.messages("verifier", CTX),
        {"role": "assistant", "content": CRIT},
        {"role": "user", "content": "R"},
    ]


# -- the flag ------------------------------------------------------------------------------------


def test_names_resolve_to_the_shipped_sets_and_a_folder_wins(tmp_path, monkeypatch):
    assert set(SHIPPED_SETS) == {"default", "paper"}
    assert resolve_prompts_dir(None) == resolve_prompts_dir("default") == data_path("prompts")
    assert resolve_prompts_dir("paper") == data_path("prompts") / "paper"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "paper").mkdir()
    assert resolve_prompts_dir("paper") == Path("paper")
    with pytest.raises(MaltError, match="no generator.j2"):
        PromptSet("paper")
    with pytest.raises(MaltError) as err:
        resolve_prompts_dir("papr")
    assert str(err.value) == "prompts folder not found: papr (shipped sets: default, paper)"


@pytest.mark.parametrize("command", ["run", "eval"])
def test_an_unknown_set_is_one_line_and_exit_2(tmp_path, monkeypatch, small_model, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text('{"question": "a", "answer": "1"}\n')
    result = CliRunner().invoke(
        cli, [command, "--model", str(small_model), "--prompts", "papr", "q.jsonl"]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "Error: prompts folder not found: papr (shipped sets: default, paper)\n"
    )
    assert not (tmp_path / "malt.db").exists()


def test_help_names_the_shipped_sets():
    result = CliRunner().invoke(cli, ["run", "--help"])
    assert "--prompts DIR|NAME" in result.output and "paper" in result.output


# -- a real run ----------------------------------------------------------------------------------


def test_real_run_with_paper_prompts_stores_and_exports_fresh_prompts(tmp_path, small_model):
    """`malt run --prompts paper` on the small model: every stored verifier and refiner node was
    generated from a `[system, user]` pair, and the verifier's SFT lines hold that pair and the
    node's output. The first seed whose export has a verifier positive is used (the model is
    weak, and its outputs differ between CPUs)."""
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        '{"question": "What is 2 + 2?", "answer": "4"}\n'
        '{"question": "What is 3 + 5?", "answer": "8"}\n'
    )
    env = {"MALT_HOME": str(tmp_path / "home")}
    for seed in range(1, 9):
        db = tmp_path / f"malt-{seed}.db"
        argv = run_argv(
            db, small_model, "--prompts", "paper", "--seed", str(seed),
            max_tokens=24, limit=2, questions=questions,
        )  # fmt: skip
        r = malt(*argv, env=env)
        assert r.returncode == 0, r.stderr
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT role, messages FROM nodes").fetchall()
        assert len(rows) == 2 * (2 + 4 + 8)
        for role, messages in rows:
            msgs = json.loads(messages)
            assert [m["role"] for m in msgs] == ["system", "user"], role
            assert "What is" in msgs[1]["content"]
        out = tmp_path / f"export-{seed}"
        r = malt(
            "export", "--db", str(db), "--out", str(out), "--theta", "0",
            "--keep-length-stopped", env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        lines = (out / "verifier.sft.jsonl").read_text().splitlines()
        if not lines:
            continue
        with sqlite3.connect(db) as conn:
            stored = conn.execute(
                "SELECT messages, output FROM nodes WHERE role = 'verifier'"
            ).fetchall()
        nodes = [[*json.loads(m), {"role": "assistant", "content": o}] for m, o in stored]
        for line in lines:
            record = json.loads(line)["messages"]
            assert [m["role"] for m in record] == ["system", "user", "assistant"]
            assert record in nodes
            assert "Initial Answer:" in record[1]["content"]
        return
    pytest.fail("no seed gave a verifier positive")
