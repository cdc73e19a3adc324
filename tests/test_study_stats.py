"""`malt study`'s statistics: exact McNemar, the question-level paired bootstrap, Wilson.

The expected values are worked by hand (binomial tails over 2^n, Wilson's formula at z = 1.96),
never by calling the code under test another way.
"""

from __future__ import annotations

import json
import random
import time

import pytest

from malt_local.errors import MaltError
from malt_local.study.stats import Comparison, Unit, mcnemar_exact, paired_comparison, wilson


def units_from(flags: list[tuple[bool, bool]], seeds: int = 1) -> list[Unit]:
    """One question per (base, other) pair, the same pair under every seed."""
    return [
        Unit(f"q{i:03d}", s, base, other)
        for i, (base, other) in enumerate(flags)
        for s in range(seeds)
    ]


def discordant(b: int, c: int, same: int = 0) -> list[Unit]:
    """b units only the base gets right, c only the other, `same` both right."""
    flags = [(True, False)] * b + [(False, True)] * c + [(True, True)] * same
    return units_from(flags)


# --- McNemar ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 6, 0.03125),  # 2 · 1/64
        (6, 0, 0.03125),  # symmetric
        (1, 9, 0.021484375),  # 2 · (1 + 10)/1024
        (2, 8, 0.109375),  # 2 · (1 + 10 + 45)/1024
        (0, 1, 1.0),  # 2 · 1/2
        (3, 3, 1.0),  # b = c: capped
        (0, 0, 1.0),  # no discordant pairs
    ],
)
def test_mcnemar_exact_by_hand(b: int, c: int, p: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p, abs=1e-15)


def test_mcnemar_exact_stays_exact_for_large_counts() -> None:
    # 2^2000 is far past a float's range: float pmfs would overflow or lose everything; the
    # integer tail over the integer 2^n is one correctly rounded division (here to 0.0).
    assert 0.0 <= mcnemar_exact(0, 2000) < 1e-300
    assert mcnemar_exact(1000, 1000) == 1.0


def test_comparison_carries_mcnemar_of_its_discordant_units() -> None:
    c = paired_comparison(discordant(1, 9, same=5), resamples=200)
    assert (c.base_only, c.other_only) == (1, 9)
    assert c.p_mcnemar == pytest.approx(0.021484375)


# --- bootstrap -------------------------------------------------------------------------------


def mixed(seed: int, questions: int = 100, seeds: int = 2) -> list[Unit]:
    r = random.Random(seed)
    return [
        Unit(f"q{i}", s, r.random() < 0.5, r.random() < 0.6)
        for i in range(questions)
        for s in range(seeds)
    ]


def test_bootstrap_is_deterministic_for_a_seed_and_independent_of_unit_order() -> None:
    units = mixed(1)
    a = paired_comparison(units, resamples=2000, seed=7)
    b = paired_comparison(list(reversed(units)), resamples=2000, seed=7)
    assert a == b
    # The seed is what draws the resamples (a few hundred, so the percentiles move).
    assert len({paired_comparison(units, resamples=200, seed=s).ci for s in range(6)}) > 1


def test_clear_effect_excludes_zero() -> None:
    # 100 questions × 2 seeds: the other is right on 40 questions (both seeds) where the base
    # is wrong, never the reverse; the other 60 agree (30 both right, 30 both wrong).
    flags = [(False, True)] * 40 + [(True, True)] * 30 + [(False, False)] * 30
    c = paired_comparison(units_from(flags, seeds=2))
    assert (c.n, c.questions) == (200, 100)
    assert (c.base, c.other, c.diff) == (30.0, 70.0, 40.0)
    assert c.excludes_zero and c.ci[0] > 0
    assert c.ci[0] < 40.0 < c.ci[1] <= 100.0
    assert (c.base_only, c.other_only) == (0, 80)
    assert c.p_mcnemar < 1e-20


def test_no_effect_gives_a_zero_interval() -> None:
    flags = [(True, True)] * 30 + [(False, False)] * 20
    c = paired_comparison(units_from(flags, seeds=3))
    assert c.diff == 0.0 and c.ci == (0.0, 0.0)
    assert not c.excludes_zero
    assert c.p_mcnemar == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_interval_contains_the_point_estimate(seed: int) -> None:
    c = paired_comparison(mixed(seed), resamples=2000, seed=seed)
    assert c.ci[0] <= c.diff <= c.ci[1]
    assert c.excludes_zero == (c.ci[0] > 0 or c.ci[1] < 0)


def width(c: Comparison) -> float:
    return c.ci[1] - c.ci[0]


def test_repeating_a_question_across_seeds_does_not_narrow_the_interval() -> None:
    """Why the bootstrap clusters: four seeds that all say the same thing about a question are
    one observation, not four. Copying every unit across 4 seeds leaves the question-level
    interval exactly where it was (each resample draws the same questions, each now with 4
    identical units, so the same ratio), while resampling units as if independent halves it
    (√4), which is the overconfidence the clustering prevents."""
    flags = (
        [(True, False)] * 15 + [(False, True)] * 25 + [(True, True)] * 30 + [(False, False)] * 30
    )
    one, four = units_from(flags, seeds=1), units_from(flags, seeds=4)
    clustered_one = paired_comparison(one, resamples=4000, seed=3)
    clustered_four = paired_comparison(four, resamples=4000, seed=3)
    assert clustered_four.diff == clustered_one.diff == 10.0
    assert clustered_four.ci == pytest.approx(clustered_one.ci)

    naive_four = paired_comparison(four, resamples=4000, seed=3, cluster=False)
    ratio = width(naive_four) / width(clustered_four)
    assert 0.4 < ratio < 0.6, ratio  # √(1/4) = 0.5
    # One unit per question: the clusters are the units, so the flag changes nothing.
    assert paired_comparison(one, resamples=4000, seed=3, cluster=False).ci == clustered_one.ci


def test_clustered_width_matches_the_analytic_one() -> None:
    """The percentile interval's width ≈ 2 · 1.96 · SE of the mean per-question difference
    (here d = +1 for 25 questions, −1 for 15, 0 for 60: SE = sd(d)/√100)."""
    flags = [(True, False)] * 15 + [(False, True)] * 25 + [(True, True)] * 60
    c = paired_comparison(units_from(flags, seeds=2), resamples=10_000, seed=0)
    mean = 0.10
    var = (25 * (1 - mean) ** 2 + 15 * (-1 - mean) ** 2 + 60 * mean**2) / 100
    expected = 2 * 1.959964 * 100 * (var / 100) ** 0.5
    assert width(c) == pytest.approx(expected, rel=0.1)


def test_units_of_one_question_can_have_different_seed_counts() -> None:
    units = [Unit("a", 0, False, True), Unit("a", 1, False, True), Unit("b", 0, True, True)]
    c = paired_comparison(units, resamples=500)
    assert (c.base, c.other) == pytest.approx((100 / 3, 100.0))  # pooled over units
    # Every resample is all-"a" (100), all-"b" (0) or a mix with a's 2 units against b's 1.
    assert 0.0 <= c.ci[0] <= c.ci[1] <= 100.0


def test_fast_enough_for_a_real_study() -> None:
    units = mixed(2, questions=300, seeds=2)
    start = time.perf_counter()
    paired_comparison(units, resamples=10_000)
    assert time.perf_counter() - start < 3.0  # ~0.25 s on one core; slack for a busy machine


def test_empty_and_duplicate_units_are_refused() -> None:
    with pytest.raises(MaltError, match="no paired results"):
        paired_comparison([])
    with pytest.raises(MaltError, match="twice under seed 1"):
        paired_comparison([Unit("q", 1, True, False), Unit("q", 1, True, True)])
    with pytest.raises(MaltError, match="level"):
        paired_comparison(discordant(1, 1), level=1.5)


def test_as_dict_is_json_with_rounded_floats() -> None:
    c = paired_comparison(discordant(1, 2, same=0), resamples=100)
    d = c.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["base"] == 33.3333 and d["other"] == 66.6667 and d["diff"] == 33.3333
    assert isinstance(d["ci"], list) and len(d["ci"]) == 2
    assert d["excludes_zero"] is c.excludes_zero
    assert {"n", "questions", "base_only", "other_only", "p_mcnemar"} <= d.keys()


# --- Wilson ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (5, 10, 23.6593, 76.3407),
        (0, 10, 0.0, 27.7533),  # z²/(n + z²) = 3.8415/13.8415
        (10, 10, 72.2467, 100.0),
        (1, 1, 20.6543, 100.0),
        (50, 100, 40.3832, 59.6168),
    ],
)
def test_wilson_known_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-3)


def test_wilson_edges() -> None:
    assert wilson(0, 0) == (0.0, 100.0)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 100.0
    narrow, wide = wilson(5, 10, level=0.5), wilson(5, 10, level=0.99)
    assert wide[0] < narrow[0] < 50.0 < narrow[1] < wide[1]
    with pytest.raises(MaltError):
        wilson(11, 10)
    with pytest.raises(MaltError):
        wilson(-1, 10)
