"""From stored turns to the results table: one benchmark's measures, keyed by column.

`malt eval` prints them after generating (`EvalRunner.results`) and `malt view` draws them from
the database alone, so both read the same stored generations through this one function: each
pass's graded turns become a `Chain`, and the pure measures of `scores` do the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from malt_local.errors import MaltError
from malt_local.evaluate.benchmarks import AdapterSet, Slot, column_names, generation_id
from malt_local.evaluate.scores import Chain, QuestionScore, Turn, score_question, summarize
from malt_local.evaluate.settings import EvalSettings
from malt_local.evaluate.tables import EvalGeneration
from malt_local.questions.loading import Question


def benchmark_measures(
    stored: dict[str, EvalGeneration],
    run_id: str,
    label: str,
    samples: Sequence[Sequence[Question]],
    settings: EvalSettings,
    adapter_sets: Sequence[AdapterSet],
) -> dict:
    """Accuracy, turn-wise accuracy and self-correction of one benchmark, keyed by column
    (SA, MA+MV, ...), from stored generations: `malt eval` prints them, `malt view` draws them."""
    out: dict = {"accuracy": {}, "turnwise": {}, "self_correction": {}}
    for aset in adapter_sets:
        per_seed: list[list[QuestionScore]] = []
        for s, questions in enumerate(samples):
            scores = []
            for q in questions:
                chains = [
                    stored_chain(stored, run_id, aset.id, Slot(s, q, p), settings.roles)
                    for p in range(settings.votes)
                ]
                if any(c is None for c in chains):
                    raise MaltError(f"evaluation {run_id} is incomplete for {label}")
                scores.append(score_question(chains, q))  # type: ignore[arg-type]
            per_seed.append(scores)
        measures = summarize(per_seed, settings)
        for measure, column in column_names(settings, aset).items():
            out["accuracy"][column] = measures["accuracy"][measure]
            if measure.startswith("ma"):
                out["turnwise"][column] = measures["turnwise"][measure]
                out["self_correction"][column] = measures["self_correction"][measure]
    return out


def stored_chain(
    stored: dict[str, EvalGeneration],
    run_id: str,
    adapter_set: str,
    slot: Slot,
    roles: Sequence[str],
) -> Chain | None:
    """One pass's graded turns, or None while any of them is missing."""
    turns = []
    for role in roles:
        gid = generation_id(
            run_id, adapter_set, slot.seed_index, slot.question.id, slot.pass_index, role
        )
        gen = stored.get(gid)
        if gen is None:
            return None
        turns.append(Turn(gen.answer, bool(gen.correct)))
    return Chain(*turns)
