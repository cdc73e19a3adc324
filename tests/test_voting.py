"""Majority voting: grouping like the grader, the tie rule, and answers that state nothing."""

from __future__ import annotations

import pytest

from malt_local.evaluate.voting import majority_vote, vote


def exact(a: str, b: str) -> bool:
    return a == b


def test_most_votes_wins_regardless_of_position():
    r = majority_vote(["a", "b", "b"], exact)
    assert (r.answer, r.index, r.count, r.total) == ("b", 1, 2, 3)
    assert not r.tied
    assert [(g.answer, g.passes) for g in r.groups] == [("a", (0,)), ("b", (1, 2))]


@pytest.mark.parametrize(
    ("answers", "winner", "index"),
    [
        (["a", "b", "c"], "a", 0),  # three-way tie: the first pass's answer
        (["b", "a", "c"], "b", 0),
        (["x", "a", "b", "b", "a"], "a", 1),  # a and b tie on 2; a was voted for first
        (["x", "b", "a", "a", "b"], "b", 1),
    ],
)
def test_ties_go_to_the_answer_voted_for_first(answers, winner, index):
    r = majority_vote(answers, exact)
    assert (r.answer, r.index) == (winner, index)
    assert r.tied


def test_no_answer_never_wins_while_any_pass_states_one():
    r = majority_vote([None, None, "7"], exact)
    assert (r.answer, r.index, r.count) == ("7", 2, 1)
    r = majority_vote([None, "3", None, "4", None], exact)
    assert (r.answer, r.index) == ("3", 1)  # the None "majority" is not a candidate


def test_all_none_is_no_answer():
    r = majority_vote([None, None, None], exact)
    assert r.answer is None and r.index is None and r.groups == ()
    assert majority_vote([], exact).answer is None


def test_an_answer_joins_the_first_group_it_equals():
    # "ab" equals both "a*" groups under this relation; it joins the earlier one.
    def prefix(a: str, b: str) -> bool:
        return a[0] == b[0]

    r = majority_vote(["a1", "b1", "a2", "b2", "b3"], prefix)
    assert [(g.answer, g.passes) for g in r.groups] == [("a1", (0, 2)), ("b1", (1, 3, 4))]
    assert (r.answer, r.index, r.count) == ("b1", 1, 3)


def test_equivalent_math_answers_vote_together():
    # 0.5, \frac12, 1/2 and \dfrac{1}{2} are one answer; 2/3 twice is not a majority over them.
    r = vote(["\\frac{2}{3}", "0.5", "\\frac12", "2/3", "1/2", "\\dfrac{1}{2}"], "math")
    assert r.count == 4 and r.index == 1 and r.answer == "0.5"
    assert [g.passes for g in r.groups] == [(0, 3), (1, 2, 4, 5)]


def test_symbolically_equal_math_answers_vote_together():
    # No string key makes \sqrt{4} and 2 equal; the grader's symbolic check does.
    r = vote(["3", "\\sqrt{4}", "2"], "math")
    assert r.answer == "\\sqrt{4}" and r.count == 2 and r.index == 1


def test_math_tie_between_equivalence_classes_uses_pass_order():
    r = vote(["\\frac{1}{3}", "0.5", "1/3", "\\frac12"], "math")
    assert r.tied and r.answer == "\\frac{1}{3}" and r.index == 0


def test_gsm8k_numbers_vote_by_value():
    r = vote(["18", "17", "18.00", "$18", "17"], "gsm8k")
    assert r.count == 3 and r.answer == "18"


def test_csqa_letter_and_option_text_are_one_vote():
    options = [("A", "bank"), ("B", "library"), ("C", "mall")]
    r = vote(["C", "bank", "A", "mall", "B"], "csqa", options)
    # C: passes 0 and 3 (letter and text), A: passes 1 and 2; tie -> C, voted for first.
    assert [g.passes for g in r.groups] == [(0, 3), (1, 2), (4,)]
    assert r.answer == "C" and r.tied
