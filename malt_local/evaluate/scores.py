"""The measures, as pure functions of graded turns: no model, no database.

* **Columns.** SA and MA grade pass 0 (one sample, as the paper's no-MV cells); SA+MV and MA+MV
  take the majority vote over the `votes` passes (see `voting` for the comparison and the tie
  rule) and grade the winning answer.
* **Turn-wise accuracy** (MA): after G the generator's answer; after V the answer the critique
  states, or the generator's answer when the critique states none (a critique that names no
  answer leaves the answer standing); after R the refiner's. Reported for pass 0 and voted.
* **Self-correction** (MA): each question's generator answer against its refiner answer,
  wrong→right, right→right, wrong→wrong, right→wrong, pooled over seeds, for pass 0 (so
  wrong→right + right→right = MA and right→right + right→wrong = SA) and voted.
* **Over seeds.** Accuracy is computed per seed and reported as mean ± standard deviation over
  seeds; the standard deviation is the population one (ddof = 0), which is what the paper's
  numbers imply (MATH SA 49.50 ± 2.06 over 4 seeds of 100: 4·2.06² ≈ 17 = 0.25 + 2.25 + 2.25 +
  12.25, a sum of squared half-integer deviations; ddof = 1 would need 3·2.06² ≈ 12.7, which no
  such sum reaches).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from malt_local.evaluate.settings import EvalSettings
from malt_local.evaluate.voting import vote
from malt_local.questions.loading import Question

TRANSITIONS = ("wrong_to_right", "right_to_right", "wrong_to_wrong", "right_to_wrong")


@dataclass(frozen=True)
class Turn:
    """A graded turn: the answer it states (None: none) and whether that answer is right."""

    answer: str | None
    correct: bool


@dataclass(frozen=True)
class Chain:
    """One pass: the generator's turn and, for MA, the critique and the refinement."""

    generator: Turn
    verifier: Turn | None = None
    refiner: Turn | None = None

    @property
    def after_verifier(self) -> Turn:
        """The answer standing after the critique: the one it states, else the generator's."""
        if self.verifier is not None and self.verifier.answer is not None:
            return self.verifier
        return self.generator


@dataclass(frozen=True)
class QuestionScore:
    """Every measure of one question (booleans: correct or not)."""

    sa: bool
    sa_mv: bool
    turns: dict[str, tuple[bool, bool, bool]] | None = None  # "ma"/"ma_mv" -> (G, V, R)
    verifier_states: float = 0.0  # share of passes whose critique states an answer

    @property
    def ma(self) -> bool | None:
        return self.turns["ma"][2] if self.turns else None

    @property
    def ma_mv(self) -> bool | None:
        return self.turns["ma_mv"][2] if self.turns else None


def voted_correct(turns: Sequence[Turn], q: Question) -> bool:
    """Whether the majority-vote answer over `turns` is right (no answer at all: wrong)."""
    result = vote([t.answer for t in turns], q.task, list(q.options) or None)
    return result.index is not None and turns[result.index].correct


def score_question(chains: Sequence[Chain], q: Question) -> QuestionScore:
    """Pass 0 for the single-sample measures, all passes for the voted ones."""
    gens = [c.generator for c in chains]
    sa, sa_mv = gens[0].correct, voted_correct(gens, q)
    if chains[0].refiner is None:
        return QuestionScore(sa, sa_mv)
    after_v = [c.after_verifier for c in chains]
    refs = [c.refiner for c in chains if c.refiner is not None]
    turns = {
        "ma": (gens[0].correct, after_v[0].correct, refs[0].correct),
        "ma_mv": (sa_mv, voted_correct(after_v, q), voted_correct(refs, q)),
    }
    states = sum(1 for c in chains if c.verifier and c.verifier.answer is not None)
    return QuestionScore(sa, sa_mv, turns, states / len(chains))


def transition(before: bool, after: bool) -> str:
    return f"{'right' if before else 'wrong'}_to_{'right' if after else 'wrong'}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof = 0, as the paper's numbers imply)."""
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def stat(per_seed: Sequence[float]) -> dict:
    mean, std = mean_std(per_seed)
    return {
        "mean": round(mean, 4),
        "std": round(std, 4),
        "per_seed": [round(v, 4) for v in per_seed],
    }


def accuracy(flags: Sequence[bool]) -> float:
    """Percent correct."""
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


def summarize(per_seed: Sequence[Sequence[QuestionScore]], settings: EvalSettings) -> dict:
    """Accuracy, turn-wise accuracy and self-correction from per-seed question scores."""
    acc: dict[str, dict] = {
        "sa": stat([accuracy([s.sa for s in seed]) for seed in per_seed]),
        "sa_mv": stat([accuracy([s.sa_mv for s in seed]) for seed in per_seed]),
    }
    turnwise: dict[str, dict] = {}
    correction: dict[str, dict] = {}
    if settings.with_ma:
        for key in ("ma", "ma_mv"):
            per_turn = [
                stat([accuracy([s.turns[key][i] for s in seed if s.turns]) for seed in per_seed])
                for i in range(3)
            ]
            acc[key] = per_turn[2]
            states = [s.verifier_states for seed in per_seed for s in seed]
            turnwise[key] = {
                "after_generator": per_turn[0],
                "after_verifier": per_turn[1],
                "after_refiner": per_turn[2],
                "verifier_states_answer": round(100.0 * statistics.fmean(states), 4)
                if states
                else 0.0,
            }
            counts = dict.fromkeys(TRANSITIONS, 0)
            for seed in per_seed:
                for s in seed:
                    if s.turns:
                        g, _, r = s.turns[key]
                        counts[transition(g, r)] += 1
            total = sum(counts.values())
            correction[key] = {
                "questions": total,
                "counts": counts,
                "percent": {
                    k: round(100.0 * v / total, 4) if total else 0.0 for k, v in counts.items()
                },
            }
    return {"accuracy": acc, "turnwise": turnwise, "self_correction": correction}
