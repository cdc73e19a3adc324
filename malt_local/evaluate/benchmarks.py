"""The evaluation protocol: which questions, which passes, which configurations, which seeds.

The protocol follows the paper (§5) where it is stated and fixes what it leaves open:

* **Sampling.** For seed index s = 0..seeds-1 a question sample is drawn from each benchmark file
  with ``random.Random(f"malt-eval:{seed}:{s}")``: the file's questions are shuffled and the
  first `samples` kept (all of them when the file is smaller). Shuffling and then taking a prefix
  makes a smaller `--samples` a prefix of a larger one, so growing an evaluation reuses what is
  stored.
* **Passes.** Each sampled question gets `votes` independent passes. A pass is one generator
  turn (SA), or one Generator → Verifier → Refiner chain (MA), each turn with its own seed
  derived from (run seed, seed index, question, pass, role). The prompts are the ones `malt run`
  uses, so a chain is one root-to-leaf path of a MALT tree.
* **Adapters.** With `--adapter`, every configuration is evaluated twice: on the base model (the
  paper's untrained baselines) and with the adapters (a role without one uses the base weights).
  Generation seeds do not depend on the adapters, so base and adapted outputs are paired and
  an adapter at scale 0 reproduces the base outputs exactly.

A turn's place (eval run, adapter set, seed index, question, pass, role) is its generation id,
so every stored turn can be found again from the protocol alone.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from malt_local.datasets.fields import FieldMap
from malt_local.datasets.sources import load_source, source_label
from malt_local.datasets.splits import is_hf_source
from malt_local.evaluate.settings import BASE, EvalSettings
from malt_local.questions.loading import Question


@dataclass(frozen=True)
class Benchmark:
    """One questions file: a row of the results table."""

    label: str
    path: Path | str  # a file, or an hf: source (`malt_local.datasets.sources`)
    questions: tuple[Question, ...]


def benchmark_label(path: Path) -> str:
    """'gsm8k/test.jsonl': the folder says which benchmark when files are all called test."""
    parent = path.resolve().parent.name
    return f"{parent}/{path.name}" if parent else path.name


def load_benchmarks(
    paths: Sequence[Path | str], task: str | None, fields: FieldMap | None = None
) -> list[Benchmark]:
    out: list[Benchmark] = []
    seen: dict[Path | str, str] = {}
    labels: set[str] = set()
    for given in paths:
        path: Path | str = source_label(given) if is_hf_source(given) else Path(given)
        resolved = path if isinstance(path, str) else path.resolve()
        if resolved in seen:
            continue
        questions = tuple(load_source(path, task, fields))
        label = base = path if isinstance(path, str) else benchmark_label(path)
        k = 2
        while label in labels:
            label = f"{base} ({k})"
            k += 1
        labels.add(label)
        seen[resolved] = label
        out.append(Benchmark(label, path, questions))
    return out


def sample_indices(n_questions: int, samples: int, seed: int, seed_index: int) -> list[int]:
    """The questions seed `seed_index` evaluates: a prefix of a seeded shuffle."""
    order = list(range(n_questions))
    random.Random(f"malt-eval:{seed}:{seed_index}").shuffle(order)
    return order[: min(samples, n_questions)]


def generation_seed(
    seed: int, seed_index: int, question_id: str, pass_index: int, role: str
) -> int:
    """A turn's sampling seed, from its place only (not the adapters: base and LoRA pair up)."""
    text = f"{seed}:{seed_index}:{question_id}:{pass_index}:{role}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def generation_id(
    run_id: str, adapter_set: str, seed_index: int, question_id: str, pass_index: int, role: str
) -> str:
    return f"{run_id}/{adapter_set}/{seed_index}/{question_id}/{pass_index}/{role}"


@dataclass(frozen=True)
class Slot:
    """One pass of one sampled question of one seed (what a chain is generated for)."""

    seed_index: int
    question: Question
    pass_index: int


@dataclass(frozen=True)
class AdapterSet:
    """One model configuration: the base model (no adapters) or one adapter per given role.

    `records` (path, sha256, scale of each adapter, per role) are stored; `handles` are the
    loaded adapters the engine sets, as (handle, scale) pairs per role.
    """

    id: str
    records: dict[str, list[dict]] = field(default_factory=dict)
    handles: dict[str, list[tuple[object, float]]] = field(default_factory=dict, repr=False)

    @property
    def is_base(self) -> bool:
        return not self.records

    def for_role(self, role: str) -> list[tuple[object, float]]:
        return list(self.handles.get(role, []))


def adapter_set_id(records: dict[str, list[dict]]) -> str:
    """'base', or 'lora-' + a digest of (role, adapter sha256, scale): same adapters, same id."""
    if not records:
        return BASE
    key = {role: [[r["sha256"], r["scale"]] for r in recs] for role, recs in records.items()}
    return "lora-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def column_names(settings: EvalSettings, adapter_set: AdapterSet) -> dict[str, str]:
    """Column name per measure for one configuration: SA, SA+MV, MA, MA+MV (+LoRA).

    The MV columns appear only when there is more than one vote.
    """
    tag = "" if adapter_set.is_base else "+LoRA"
    out = {}
    for mode, wanted in (("SA", settings.with_sa), ("MA", settings.with_ma)):
        if not wanted:
            continue
        out[f"{mode.lower()}"] = f"{mode}{tag}"
        if settings.votes > 1:
            out[f"{mode.lower()}_mv"] = f"{mode}{tag}+MV"
    return out
