"""Tests for malt_local.grading: the extractor T and reward R on real model-output shapes.

Every case is an output a small instruct model actually writes (chain of thought, markdown,
boxed answers, units, the option text instead of the letter, a repeated marker) paired with the
answer the grader must read from it and the reward it must give. A wrong extractor changes the
rewards, and with them every value, label and training pair MALT derives from a tree.
"""

from __future__ import annotations

import threading

import pytest

from malt_local.grading import TASKS, answers_equal, extract_answer, grade, normalize_answer

CSQA_OPTIONS = [
    ("A", "bank"),
    ("B", "library"),
    ("C", "river bank"),
    ("D", "post office"),
    ("E", "school"),
]

# (model output, ground truth, expected extracted answer, expected reward)
GSM8K_CASES = [
    pytest.param(
        "Janet's ducks lay 16 eggs per day. She eats 3 for breakfast and bakes muffins with 4.\n"
        "So she has 16 - 3 - 4 = 9 eggs left.\n"
        "She sells each egg for $2, so she makes 9 * 2 = $18.\n\n"
        "Final Answer: 18",
        "18",
        "18",
        1,
        id="gsm8k-plain-final-line",
    ),
    pytest.param(
        "Step 1: 16 - 3 - 4 = 9 eggs.\nStep 2: 9 x $2 = $18.\n\n**Final Answer:** $18",
        "18",
        "18",
        1,
        id="gsm8k-bold-marker-dollar-sign",
    ),
    pytest.param(
        "The robe needs 2 bolts of blue fiber and half that much white fiber, 2 / 2 = 1.\n"
        "Total = 2 + 1 = 3 bolts.\nFinal answer - 3 bolts.",
        "3",
        "3",
        1,
        id="gsm8k-dash-marker-with-unit",
    ),
    pytest.param(
        "Let me recompute: 100 + 25 = 125.\nFinal Answer: Final Answer: 125",
        "125",
        "125",
        1,
        id="gsm8k-repeated-marker-from-paper",
    ),
    pytest.param(
        "He buys 10 shirts at $100 each: 10 * 100 = 1,000.\nFinal Answer: 1,000 dollars.",
        "1000",
        "1000",
        1,
        id="gsm8k-thousands-comma-vs-plain-truth",
    ),
    pytest.param(
        "She earns 20 * 0.9 = 18.\n\nFinal Answer: 18.00",
        "18",
        "18.00",
        1,
        id="gsm8k-trailing-zero-decimals",
    ),
    pytest.param(
        "The temperature drops 8 degrees from 3 degrees: 3 - 8 = -5.\nFinal Answer: -5",
        "-5",
        "-5",
        1,
        id="gsm8k-negative",
    ),
    pytest.param(
        "The discount is 30 / 120 = 0.25, i.e. 25%.\nFinal Answer: 25%",
        "25",
        "25",
        1,
        id="gsm8k-percent-sign",
    ),
    pytest.param(
        "Final Answer: 5 + 13 = 18",
        "18",
        "18",
        1,
        id="gsm8k-equation-on-final-line",
    ),
    pytest.param(
        "Final Answer: 18 (9 eggs x $2 each)",
        "18",
        "18",
        1,
        id="gsm8k-parenthetical-aside-ignored",
    ),
    pytest.param(
        "Final Answer: 18. I hope it is correct, she keeps 3 eggs.",
        "18",
        "18",
        1,
        id="gsm8k-prose-after-answer-ignored",
    ),
    pytest.param(
        "Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes $18 every day.",
        "18",
        "18",
        1,
        id="gsm8k-no-marker-last-number-in-sentence",
    ),
    pytest.param(
        "First, 48 / 2 = 24 clips in May.\nThen 48 + 24 = 72.\nSo the answer is 72 clips. "
        "That is 3 times as many as 24.",
        "72",
        "72",
        1,
        id="gsm8k-answer-is-beats-later-numbers",
    ),
    pytest.param(
        "Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72",
        "72",
        "72",
        1,
        id="gsm8k-hash-marker",
    ),
    pytest.param(
        "To find the total we add the two.\n\n### Final Answer\n\n\\[\n\\boxed{18}\n\\]",
        "18",
        "18",
        1,
        id="gsm8k-heading-then-display-boxed",
    ),
    pytest.param(
        "The final answer is $\\boxed{42}$. I hope it is correct.",
        "42",
        "42",
        1,
        id="gsm8k-minerva-style",
    ),
    pytest.param(
        "First guess: Final Answer: 20\nWait, she eats 3 and bakes 4, so 16 - 7 = 9, 9 * 2 = 18.\n"
        "Final Answer: 18",
        "18",
        "18",
        1,
        id="gsm8k-corrected-answer-last-wins",
    ),
    pytest.param(
        "She has 16 - 3 - 4 = 9 eggs and sells them for $2 each.\nFinal Answer: 16",
        "18",
        "16",
        0,
        id="gsm8k-wrong-answer",
    ),
    pytest.param(
        "Final Answer: 17.5",
        "18",
        "17.5",
        0,
        id="gsm8k-close-but-wrong",
    ),
    pytest.param(
        "I am not sure how to solve this problem.",
        "18",
        None,
        0,
        id="gsm8k-no-number",
    ),
    pytest.param("", "18", None, 0, id="gsm8k-empty"),
]

MATH_CASES = [
    pytest.param(
        "We have $\\sin \\theta = \\frac{1}{2}$ so ...\n\nFinal Answer: $\\frac12$",
        "0.5",
        "\\frac12",
        1,
        id="math-frac12-vs-decimal-truth",
    ),
    pytest.param(
        "Simplifying gives one half.\n\nFinal Answer: $\\dfrac{1}{2}$.",
        "\\frac{1}{2}",
        "\\dfrac{1}{2}",
        1,
        id="math-dfrac-trailing-period",
    ),
    pytest.param(
        "Dividing, x = 1/2.\n\n**Final Answer:** 0.5",
        "\\frac{1}{2}",
        "0.5",
        1,
        id="math-decimal-vs-frac-truth",
    ),
    pytest.param(
        "Converting to polar coordinates, $r = 3$ and $\\theta = \\frac{\\pi}{2}$.\n"
        "Final Answer: $(3, \\frac{\\pi}{2})$",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "(3, \\frac{\\pi}{2})",
        1,
        id="math-tuple-left-right",
    ),
    pytest.param(
        "First I got $\\boxed{\\frac{1}{2}}$, but rechecking the angle,\n"
        "the value is $\\boxed{\\frac{\\sqrt{3}}{2}}$.",
        "\\frac{\\sqrt{3}}{2}",
        "\\frac{\\sqrt{3}}{2}",
        1,
        id="math-no-marker-last-boxed-nested-braces",
    ),
    pytest.param(
        "The final answer is $p - q$. I hope it is correct.",
        "p - q",
        "p - q",
        1,
        id="math-final-answer-is-minerva",
    ),
    pytest.param(
        "Final Answer: q - p",
        "p - q",
        "q - p",
        0,
        id="math-wrong-sign-expression",
    ),
    pytest.param(
        "Reducing the improper fraction, the answer is $4\\frac{2}{3}$.",
        "\\frac{14}{3}",
        "4\\frac{2}{3}",
        1,
        id="math-answer-is-mixed-number",
    ),
    pytest.param(
        "Solving the linear equation:\n2x + 3 = 13\n2x = 10\nFinal Answer: x = 5",
        "5",
        "x = 5",
        1,
        id="math-assignment-vs-number",
    ),
    pytest.param(
        "**Final Answer**\n$$\n\\boxed{2\\sqrt{2}}\n$$",
        "\\sqrt{8}",
        "2\\sqrt{2}",
        1,
        id="math-bold-heading-display-math-symbolic",
    ),
    pytest.param(
        "The day of the week is found by counting mod 7.\nFinal Answer: \\text{Monday}",
        "\\text{Monday}",
        "\\text{Monday}",
        1,
        id="math-text-answer",
    ),
    pytest.param(
        "Final Answer: $\\frac{14}{3}$",
        "\\frac{13}{3}",
        "\\frac{14}{3}",
        0,
        id="math-wrong-fraction",
    ),
    pytest.param(
        "Let me think about the geometry of the triangle. I could not finish.",
        "5",
        None,
        0,
        id="math-no-answer",
    ),
]

CSQA_CASES = [
    pytest.param(
        "A library is where books are kept for borrowing.\nFinal Answer: B",
        "B",
        "B",
        1,
        id="csqa-letter",
    ),
    pytest.param(
        "Books are borrowed from a library.\n\nFinal Answer: B) library",
        "B",
        "B",
        1,
        id="csqa-letter-paren-and-text",
    ),
    pytest.param("Final Answer: **(B)**", "B", "B", 1, id="csqa-bold-parens"),
    pytest.param("Final Answer: B.", "B", "B", 1, id="csqa-letter-period"),
    pytest.param(
        "People go to a library to borrow books.\nFinal Answer: library",
        "B",
        "B",
        1,
        id="csqa-option-text-instead-of-letter",
    ),
    pytest.param(
        "Final Answer: Library.",
        "B",
        "B",
        1,
        id="csqa-option-text-case-insensitive",
    ),
    pytest.param(
        "Final Answer: river bank",
        "C",
        "C",
        1,
        id="csqa-exact-text-beats-containment",
    ),
    pytest.param(
        "Final Answer: You would find it at the post office",
        "D",
        "D",
        1,
        id="csqa-unique-containment",
    ),
    pytest.param(
        "Let's consider each option.\n(A) bank - no.\n(B) library - yes.\nThe answer is (B).",
        "B",
        "B",
        1,
        id="csqa-answer-is-parens-no-marker",
    ),
    pytest.param(
        "Thinking about where books are kept...\n\nB",
        "B",
        "B",
        1,
        id="csqa-lone-letter-last-line",
    ),
    pytest.param(
        "A bank keeps money, not books.\nFinal Answer: A",
        "B",
        "A",
        0,
        id="csqa-wrong-letter",
    ),
    pytest.param(
        "Final Answer: F",
        "B",
        None,
        0,
        id="csqa-letter-beyond-options",
    ),
    pytest.param(
        "Hmm, it could be many places.",
        "B",
        None,
        0,
        id="csqa-no-answer",
    ),
]

EXACT_CASES = [
    pytest.param(
        "The capital of France is Paris.\nFinal Answer: Paris.",
        "paris",
        "Paris",
        1,
        id="exact-case-and-period",
    ),
    pytest.param(
        "Thinking...\nNew   York  City\n",
        "new york city",
        "New   York  City",
        1,
        id="exact-last-line-whitespace",
    ),
    pytest.param(
        "Final Answer: **Lyon**",
        "Paris",
        "Lyon",
        0,
        id="exact-wrong",
    ),
    pytest.param("   \n  ", "Paris", None, 0, id="exact-blank-output"),
]


@pytest.mark.parametrize(("text", "truth", "answer", "reward"), GSM8K_CASES)
def test_gsm8k_outputs(text: str, truth: str, answer: str | None, reward: int) -> None:
    assert grade(text, truth, "gsm8k") == (answer, reward)


@pytest.mark.parametrize(("text", "truth", "answer", "reward"), MATH_CASES)
def test_math_outputs(text: str, truth: str, answer: str | None, reward: int) -> None:
    assert grade(text, truth, "math") == (answer, reward)


@pytest.mark.parametrize(("text", "truth", "answer", "reward"), CSQA_CASES)
def test_csqa_outputs(text: str, truth: str, answer: str | None, reward: int) -> None:
    assert grade(text, truth, "csqa", CSQA_OPTIONS) == (answer, reward)


@pytest.mark.parametrize(("text", "truth", "answer", "reward"), EXACT_CASES)
def test_exact_outputs(text: str, truth: str, answer: str | None, reward: int) -> None:
    assert grade(text, truth, "exact") == (answer, reward)


def test_csqa_letter_without_options_accepts_a_to_e_only() -> None:
    """Without options the letter set is A-E; with fewer options it shrinks to their count."""
    assert extract_answer("Final Answer: (e)", "csqa") == "E"
    assert extract_answer("Final Answer: F", "csqa") is None
    three = CSQA_OPTIONS[:3]
    assert extract_answer("Final Answer: D", "csqa", three) is None
    assert extract_answer("Final Answer: C", "csqa", three) == "C"


def test_csqa_sentence_starting_with_article_is_not_letter_a() -> None:
    """ "A person would ..." must not read as option A; the option text decides."""
    assert extract_answer("Final Answer: A person would go to school", "csqa", CSQA_OPTIONS) == "E"


def test_csqa_ambiguous_containment_is_no_answer() -> None:
    """Two unrelated option texts in one answer cannot be resolved to a letter."""
    text = "Final Answer: either the library or the school"
    assert extract_answer(text, "csqa", CSQA_OPTIONS) is None


def test_empty_final_answer_falls_back_to_reasoning() -> None:
    """A generation cut off right after "Final Answer:" still states its answer above."""
    text = "So the total is 9 * 2 = 18 dollars.\nFinal Answer:"
    assert extract_answer(text, "gsm8k") == "18"


# ----------------------------------------------------------------------------------------------
# normalize_answer / answers_equal: the keys majority voting groups by
# ----------------------------------------------------------------------------------------------

HALF_FORMS = ["\\frac12", "0.5", "\\dfrac{1}{2}", "1/2", "$\\frac{1}{2}$", "\\boxed{\\tfrac{1}{2}}"]


@pytest.mark.parametrize("form", HALF_FORMS)
def test_math_half_forms_share_a_key(form: str) -> None:
    assert normalize_answer(form, "math") == normalize_answer("\\frac{1}{2}", "math")


@pytest.mark.parametrize("form", HALF_FORMS)
def test_math_half_forms_are_equal(form: str) -> None:
    assert answers_equal(form, "\\frac{1}{2}", "math")
    assert answers_equal("\\frac{1}{2}", form, "math")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("3.0", "3"),
        ("x = 5", "5"),
        ("10^\\circ", "10"),
        ("\\text{Monday}", "monday"),
        ("-\\frac{3}{4}", "-0.75"),
    ],
)
def test_math_equivalent_forms_share_a_key(a: str, b: str) -> None:
    assert normalize_answer(a, "math") == normalize_answer(b, "math")
    assert answers_equal(a, b, "math")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
        ("4\\frac{2}{3}", "\\frac{14}{3}"),
        ("[-2, 7]", "[-2,7]"),
    ],
)
def test_math_symbolic_equivalence_needs_math_verify(a: str, b: str) -> None:
    """Equal values that no string key unifies: only math_verify can say they are equal."""
    assert answers_equal(a, b, "math")
    assert answers_equal(b, a, "math")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("\\frac{1}{2}", "0.51"),
        ("p - q", "q - p"),
        ("\\text{odd}", "\\text{dod}"),
        ("(3, \\frac{\\pi}{2})", "(3, \\pi)"),
        ("5", None),
        (None, None),
    ],
)
def test_math_different_answers_are_not_equal(a: str | None, b: str | None) -> None:
    assert not answers_equal(a, b, "math")


def test_gsm8k_keys_and_equality() -> None:
    assert normalize_answer("$1,000.00", "gsm8k") == "1000"
    assert normalize_answer("18 eggs", "gsm8k") == normalize_answer("18.0", "gsm8k") == "18"
    assert normalize_answer("0.50", "gsm8k") == "0.5"
    assert normalize_answer("no idea", "gsm8k") is None
    assert answers_equal("1,000", "1000.0000001", "gsm8k")
    assert not answers_equal("1000", "1001", "gsm8k")
    assert not answers_equal("18", "-18", "gsm8k")


def test_csqa_keys_map_text_to_letter() -> None:
    assert normalize_answer("library", "csqa", CSQA_OPTIONS) == "B"
    assert normalize_answer("(b)", "csqa", CSQA_OPTIONS) == "B"
    assert answers_equal("post office", "D", "csqa", CSQA_OPTIONS)
    assert not answers_equal("A", "C", "csqa", CSQA_OPTIONS)


def test_exact_keys() -> None:
    assert normalize_answer("  New   York! ", "exact") == "new york"
    assert normalize_answer('"Paris"', "exact") == "paris"
    assert answers_equal("PARIS.", "paris", "exact")
    assert not answers_equal("Paris", "Pariss", "exact")
    assert normalize_answer("   ", "exact") is None


def test_unknown_task_is_rejected() -> None:
    """A misspelt task must fail loudly instead of silently grading every leaf 0."""
    assert "gsm8k" in TASKS
    with pytest.raises(ValueError, match="unknown task"):
        grade("Final Answer: 1", "1", "gsm8")


def test_grade_never_raises_on_garbage_math() -> None:
    """Unparseable LaTeX is a wrong answer, not a crash."""
    text = "Final Answer: \\frac{{{{}\\left( \\sqrt[ ]"
    answer, reward = grade(text, "\\frac{1}{2}", "math")
    assert reward == 0
    assert answer is not None


def test_math_grading_works_off_the_main_thread() -> None:
    """math_verify's SIGALRM timeouts fail in worker threads; grading there must still work."""
    results: list[tuple[str | None, int]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(grade("Final Answer: $2\\sqrt{2}$", "\\sqrt{8}", "math"))
            results.append(grade("Final Answer: $\\frac{14}{3}$", "\\frac{13}{3}", "math"))
        except BaseException as exc:  # pragma: no cover - the failure is reported below
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=60)
    assert not errors
    assert results == [("2\\sqrt{2}", 1), ("\\frac{14}{3}", 0)]
