"""The statistics of `malt study`: is a configuration's accuracy different from the base's?

Pure functions of paired observations, no model and no numpy (stdlib only, so the core
package can report without the training extras).

* **Pairing.** Every configuration answers the same test questions under the same eval seeds
  (and per-turn sampling seeds), so one question under one seed gives one `Unit`: right or
  wrong under the base, right or wrong under the other configuration. Comparing the pairs
  rather than two independent accuracies removes the between-question variance, which is
  most of it (an easy question is easy for both).
* **Cluster bootstrap.** The seeds of one question are not independent draws: a question the
  model cannot do is wrong under every seed. Treating its units as independent would count
  one question's luck several times and make the interval too narrow by up to √seeds. So the
  bootstrap resamples *questions* with replacement, each drawn question bringing all its
  seeds' units, and takes the percentile interval of the difference in accuracy. It needs no
  normality and handles any number of seeds per question.
* **McNemar.** A second, assumption-light test of the same null (the two configurations are
  equally often right): the exact two-sided binomial test on the discordant pairs (base
  right and other wrong, or the reverse) with p = 1/2, computed with integers so it is exact
  for any count. It pools seeds (so it treats units as independent, unlike the bootstrap)
  and is there as a cross-check: when the two disagree, the clustering is what matters.
* **Wilson.** The interval for a single accuracy, which stays inside [0, 100] and behaves at
  0 and n correct, unlike the normal approximation.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from malt_local.errors import MaltError


@dataclass(frozen=True)
class Unit:
    """One paired observation: a question under one eval seed, right or not under each side."""

    question: str
    seed: int
    base: bool
    other: bool


@dataclass(frozen=True)
class Comparison:
    """The other configuration against the base on the same units.

    Accuracies in percent, `diff` and `ci` in percentage points (other − base); `base_only`
    and `other_only` count the discordant units (only that side right), pooled over seeds.
    """

    n: int
    questions: int
    base: float
    other: float
    diff: float
    ci: tuple[float, float]
    base_only: int
    other_only: int
    p_mcnemar: float
    excludes_zero: bool
    level: float = 0.95
    resamples: int = 10_000
    seed: int = 0
    cluster: bool = True

    def as_dict(self) -> dict:
        """For results.json: floats rounded to 4 places, the interval as a two-item list."""
        return {
            "n": self.n,
            "questions": self.questions,
            "base": round(self.base, 4),
            "other": round(self.other, 4),
            "diff": round(self.diff, 4),
            "ci": [round(self.ci[0], 4), round(self.ci[1], 4)],
            "base_only": self.base_only,
            "other_only": self.other_only,
            "p_mcnemar": round(self.p_mcnemar, 4),
            "excludes_zero": self.excludes_zero,
            "level": self.level,
            "resamples": self.resamples,
            "seed": self.seed,
            "cluster": self.cluster,
        }


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise MaltError(f"confidence level must be between 0 and 1, got {level}")


def mcnemar_exact(base_only: int, other_only: int) -> float:
    """Exact two-sided McNemar p: twice the binomial tail of the rarer discordant count.

    Integers throughout (`math.comb`, one division at the end), so no rounding builds up for
    large counts; capped at 1.0 (b = c sums more than half the mass twice). No discordant
    pairs: no evidence either way, p = 1.0.
    """
    if base_only < 0 or other_only < 0:
        raise MaltError("discordant counts cannot be negative")
    total = base_only + other_only
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, i) for i in range(min(base_only, other_only) + 1))
    return min(1.0, 2 * tail / 2**total)


def _percentile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, linear between order statistics (numpy's default)."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _clusters(units: Sequence[Unit], cluster: bool) -> list[tuple[int, int]]:
    """Per cluster, (sum of other − base, number of units), in a fixed order.

    The order is sorted by question id (then seed), never the input's, so the same units in
    any order give the same interval for a seed.
    """
    sums: dict[tuple[str, int], list[int]] = {}
    for u in units:
        key = (u.question, u.seed if not cluster else 0)
        entry = sums.setdefault(key, [0, 0])
        entry[0] += int(u.other) - int(u.base)
        entry[1] += 1
    return [(d, m) for _, (d, m) in sorted(sums.items())]


def _bootstrap(clusters: list[tuple[int, int]], resamples: int, rng: random.Random) -> list[float]:
    """The difference in points for each resample of the clusters, sorted.

    Each cluster is packed into one integer, d·K + m with K above any resample's unit total,
    so a resample is one `random.choices` and one `sum` (both in C) and `divmod` unpacks the
    totals exactly (floor division keeps m in [0, K) even when the sum of d is negative).
    """
    k = len(clusters)
    scale = k * max(m for _, m in clusters) + 1
    packed = [d * scale + m for d, m in clusters]
    out = []
    for _ in range(resamples):
        diff, count = divmod(sum(rng.choices(packed, k=k)), scale)
        out.append(100.0 * diff / count)
    out.sort()
    return out


def paired_comparison(
    units: Sequence[Unit],
    *,
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    cluster: bool = True,
) -> Comparison:
    """The other configuration against the base, with a question-level bootstrap interval.

    `cluster=False` resamples units as if independent; it exists to show (and test) how much
    too narrow that is, not for reports.
    """
    if not units:
        raise MaltError("no paired results to compare")
    if resamples < 1:
        raise MaltError(f"resamples must be at least 1, got {resamples}")
    _check_level(level)
    seen: set[tuple[str, int]] = set()
    for u in units:
        if (u.question, u.seed) in seen:
            raise MaltError(f"question {u.question!r} appears twice under seed {u.seed}")
        seen.add((u.question, u.seed))
    n = len(units)
    base = 100.0 * sum(u.base for u in units) / n
    other = 100.0 * sum(u.other for u in units) / n
    base_only = sum(1 for u in units if u.base and not u.other)
    other_only = sum(1 for u in units if u.other and not u.base)
    draws = _bootstrap(_clusters(units, cluster), resamples, random.Random(seed))
    tail = (1.0 - level) / 2
    lo, hi = _percentile(draws, tail), _percentile(draws, 1.0 - tail)
    return Comparison(
        n=n,
        questions=len({u.question for u in units}),
        base=base,
        other=other,
        diff=other - base,
        ci=(lo, hi),
        base_only=base_only,
        other_only=other_only,
        p_mcnemar=mcnemar_exact(base_only, other_only),
        excludes_zero=lo > 0 or hi < 0,
        level=level,
        resamples=resamples,
        seed=seed,
        cluster=cluster,
    )


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for k right of n, in percent.

    No observations (n = 0) say nothing, so the interval is all of [0, 100].
    """
    _check_level(level)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise MaltError(f"cannot take {k} correct of {n}")
    if n == 0:
        return 0.0, 100.0
    z = statistics.NormalDist().inv_cdf(1.0 - (1.0 - level) / 2)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 and k = n the bound is exactly 0 or 100; the formula leaves rounding dust there.
    lo = 0.0 if k == 0 else 100.0 * max(0.0, centre - half)
    hi = 100.0 if k == n else 100.0 * min(1.0, centre + half)
    return lo, hi
