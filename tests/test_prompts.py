import pytest

from malt_local.engines.llama.chat import ChatTemplate
from malt_local.errors import MaltError
from malt_local.prompts import PromptSet, TreeContext
from malt_local.questions.loading import Question, load_questions
from tests.conftest import EXAMPLES

Q = Question("What is 6 * 7?", "42", "gsm8k")


def test_each_level_extends_its_parent():
    ps = PromptSet()
    g = ps.messages("generator", TreeContext(Q))
    v = ps.messages("verifier", TreeContext(Q, generation="6*7=42\nFinal Answer: 42"))
    r = ps.messages("refiner", TreeContext(Q, "6*7=42\nFinal Answer: 42", "Looks right."))
    assert v[: len(g)] == g
    assert v[len(g)] == {"role": "assistant", "content": "6*7=42\nFinal Answer: 42"}
    assert r[: len(v)] == v
    assert r[len(v)] == {"role": "assistant", "content": "Looks right."}
    assert [m["role"] for m in r] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "Final Answer" in g[-1]["content"] and "Final Answer" in r[-1]["content"]
    assert "What is 6 * 7?" in g[-1]["content"]


def test_rendered_prompt_text_is_a_prefix_chain():
    ps = PromptSet()
    chat = ChatTemplate(None)
    g = chat.render(ps.messages("generator", TreeContext(Q)))
    v = chat.render(ps.messages("verifier", TreeContext(Q, generation="G")))
    assert v.startswith(g + "G")


def test_csqa_variant_shows_options():
    q = load_questions(EXAMPLES / "csqa.jsonl")[0]
    text = PromptSet().messages("generator", TreeContext(q))[-1]["content"]
    assert "A: bank" in text and "E: new york" in text and "letter" in text


def test_task_variant_keeps_the_blocks_it_inherits():
    """generator.csqa.j2 overrides only `user`: the shared system prompt comes from its parent,
    so every task's conversation starts with the same system turn."""
    q = load_questions(EXAMPLES / "csqa.jsonl")[0]
    ps = PromptSet()
    csqa = ps.messages("refiner", TreeContext(q, "G", "C"))
    gsm8k = ps.messages("generator", TreeContext(Q))
    assert [m["role"] for m in csqa] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert csqa[0] == gsm8k[0]
    assert "A: bank" in csqa[1]["content"]


def test_user_variant_may_call_super_through_two_levels(tmp_path):
    for role in ("verifier", "refiner"):
        (tmp_path / f"{role}.j2").write_text("{% block user %}" + role + "{% endblock %}")
    (tmp_path / "generator.j2").write_text(
        "{% block system %}SYS{% endblock %}{% block user %}Q: {{ question }}{% endblock %}"
    )
    (tmp_path / "middle.j2").write_text(
        '{% extends "generator.j2" %}{% block user %}{{ super() }} [{{ task }}]{% endblock %}'
    )
    (tmp_path / "generator.gsm8k.j2").write_text(
        '{% extends "middle.j2" %}{% block user %}{{ super() }}!{% endblock %}'
    )
    assert PromptSet(tmp_path).messages("generator", TreeContext(Q)) == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Q: What is 6 * 7? [gsm8k]!"},
    ]
    (tmp_path / "generator.j2").write_text('{% extends "generator.gsm8k.j2" %}')
    with pytest.raises(MaltError, match="extends itself"):
        PromptSet(tmp_path).messages("generator", TreeContext(Q))


def test_user_prompts_dir_replaces_templates_and_hashes_change(tmp_path):
    for role in ("generator", "verifier", "refiner"):
        (tmp_path / f"{role}.j2").write_text(
            "{% block user %}" + role.upper() + ": {{ question }}{% endblock %}"
        )
    ps = PromptSet(tmp_path)
    msgs = ps.messages("refiner", TreeContext(Q, "g", "c"))
    assert msgs[0] == {"role": "user", "content": "GENERATOR: What is 6 * 7?"}
    assert msgs[-1]["content"] == "REFINER: What is 6 * 7?"
    assert ps.hashes() != PromptSet().hashes()


def test_templates_render_in_a_sandbox(tmp_path):
    for role in ("generator", "verifier", "refiner"):
        (tmp_path / f"{role}.j2").write_text(
            "{% block user %}{{ question.__class__.__mro__ }}{% endblock %}"
        )
    with pytest.raises(MaltError):
        PromptSet(tmp_path).messages("generator", TreeContext(Q))


def test_undefined_variable_is_an_error_before_any_generation(tmp_path):
    for role in ("generator", "verifier", "refiner"):
        (tmp_path / f"{role}.j2").write_text("{% block user %}{{ qestion }}{% endblock %}")
    with pytest.raises(MaltError, match="qestion"):
        PromptSet(tmp_path).check([Q])


def test_missing_role_template(tmp_path):
    (tmp_path / "generator.j2").write_text("{% block user %}x{% endblock %}")
    with pytest.raises(MaltError, match="verifier.j2"):
        PromptSet(tmp_path)


def test_gguf_chat_template_is_sandboxed():
    evil = "{{ messages.__class__.__base__.__subclasses__() }}"
    with pytest.raises(MaltError, match="access to attribute '__class__' .* is unsafe"):
        ChatTemplate(evil).render([{"role": "user", "content": "hi"}])
