"""`malt eval`: the three roles at test time, with majority voting, against the paper's baselines.

The protocol follows the paper (§5) where it is stated and fixes what it leaves open:

* **Sampling.** For seed index s = 0..seeds-1 a question sample is drawn from each benchmark file
  with ``random.Random(f"malt-eval:{seed}:{s}")``: the file's questions are shuffled and the
  first `samples` kept (all of them when the file is smaller). Shuffling and then taking a prefix
  makes a smaller `--samples` a prefix of a larger one, so growing an evaluation reuses what is
  stored. Accuracy is computed per seed and reported as mean ± standard deviation over seeds;
  the standard deviation is the population one (ddof = 0), which is what the paper's numbers
  imply (MATH SA 49.50 ± 2.06 over 4 seeds of 100: 4·2.06² ≈ 17 = 0.25 + 2.25 + 2.25 + 12.25,
  a sum of squared half-integer deviations; ddof = 1 would need 3·2.06² ≈ 12.7, which no such
  sum reaches).
* **Passes.** Each sampled question gets `votes` independent passes. A pass is one generator
  turn (SA), or one Generator → Verifier → Refiner chain (MA), each turn with its own seed
  derived from (run seed, seed index, question, pass, role). The prompts are the ones `malt run`
  uses, so a chain is one root-to-leaf path of a MALT tree.
* **SA and MA share the generator turn.** SA is "the model alone answers with the generator
  prompt"; that is exactly the chain's first turn with the same seed, so it is generated once
  and graded twice (as SA, and as the start of MA). This makes the after-G turn-wise accuracy
  equal to SA, as in the paper's self-correction figure, and saves a quarter of the compute.
* **Columns.** SA and MA grade pass 0 (one sample, as the paper's no-MV cells); SA+MV and MA+MV
  take the majority vote over the `votes` passes (see `voting` for the comparison and the tie
  rule) and grade the winning answer.
* **Turn-wise accuracy** (MA): after G the generator's answer; after V the answer the critique
  states, or the generator's answer when the critique states none (a critique that names no
  answer leaves the answer standing); after R the refiner's. Reported for pass 0 and voted.
* **Self-correction** (MA): each question's generator answer against its refiner answer,
  wrong→right, right→right, wrong→wrong, right→wrong, pooled over seeds, for pass 0 (so
  wrong→right + right→right = MA and right→right + right→wrong = SA) and voted.
* **Adapters.** With `--adapter`, every configuration is evaluated twice: on the base model (the
  paper's untrained baselines) and with the adapters (a role without one uses the base weights).
  llama.cpp applies adapters per context, so work runs role by role: every generator turn of a
  configuration with the generator's adapters, then every critique, then every refinement.
  Generation seeds do not depend on the adapters, so base and adapted outputs are paired and
  an adapter at scale 0 reproduces the base outputs exactly.

Storage (tables from migration m003_eval): `eval_runs` (one row per evaluation identity: model
by sha256, sampling settings, seed, task, prompts; its id is a hash of those, so re-running the
same command resumes it), `eval_adapter_sets` (the base set and each adapter set used, with
path, sha256 and scale per role), `eval_samples` (which questions each benchmark's seed
sampled) and `eval_generations` (every generated turn, with an id that is its place: eval run,
adapter set, seed index, question, pass, role). A generation is inserted in its own transaction
as soon as it arrives; a resumed evaluation generates only what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from malt_local import __version__
from malt_local.db.claims import ClaimCursor, ClaimingQueue, Claims
from malt_local.db.store import Store, utcnow
from malt_local.diskspace import disk_guard
from malt_local.engines.base import (
    AdapterEngine,
    Completion,
    Engine,
    GenRequest,
    RequestQueue,
    SamplingParams,
)
from malt_local.engines.registry import EngineOptions, engine_kind, identify_model, make_engine
from malt_local.errors import MaltError
from malt_local.evaluate.voting import vote
from malt_local.grading import TASKS, grade
from malt_local.progress import Progress
from malt_local.prompts import PromptSet, TreeContext
from malt_local.questions.loading import Question, load_questions
from malt_local.roles import ROLES

MODES = ("sa", "ma", "all")
BASE = "base"
TRANSITIONS = ("wrong_to_right", "right_to_right", "wrong_to_wrong", "right_to_wrong")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class EvalSettings:
    """What `malt eval` was asked for.

    Temperature 0.3 is the paper's generation temperature; it does not state one for test time,
    and a positive temperature is what makes k votes differ at all.
    """

    mode: str = "all"
    votes: int = 3
    samples: int = 100
    seeds: int = 4
    temperature: float = 0.3
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 512
    seed: int = 0
    task: str | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise MaltError(f"--mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.votes < 1:
            raise MaltError(f"--votes must be at least 1 (got {self.votes})")
        if self.samples < 1:
            raise MaltError(f"--samples must be at least 1 (got {self.samples})")
        if self.seeds < 1:
            raise MaltError(f"--seeds must be at least 1 (got {self.seeds})")
        if self.max_tokens < 1:
            raise MaltError(f"--max-tokens must be positive (got {self.max_tokens})")
        if self.temperature < 0:
            raise MaltError(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise MaltError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise MaltError(f"--top-k must be >= 0 (got {self.top_k})")
        if self.task is not None and self.task not in TASKS:
            raise MaltError(f"unknown task '{self.task}': choose one of {', '.join(TASKS)}")

    @property
    def roles(self) -> tuple[str, ...]:
        return ("generator",) if self.mode == "sa" else ROLES

    @property
    def with_sa(self) -> bool:
        return self.mode in ("sa", "all")

    @property
    def with_ma(self) -> bool:
        return self.mode in ("ma", "all")

    def params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
        )


def identity(settings: EvalSettings, model_sha256: str, prompts_sha256: str) -> dict:
    """What shapes a generation; its hash is the eval run id.

    Mode, votes, samples and seeds are not in it: they only choose which generations are
    needed, and everything already stored under the same identity is reused.
    """
    return {
        "model_sha256": model_sha256,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
        "max_tokens": settings.max_tokens,
        "seed": settings.seed,
        "task": settings.task,
        "prompts_sha256": prompts_sha256,
    }


def eval_run_id(ident: dict) -> str:
    return "e" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class Benchmark:
    """One questions file: a row of the results table."""

    label: str
    path: Path
    questions: tuple[Question, ...]


def benchmark_label(path: Path) -> str:
    """'gsm8k/test.jsonl': the folder says which benchmark when files are all called test."""
    parent = path.resolve().parent.name
    return f"{parent}/{path.name}" if parent else path.name


def load_benchmarks(paths: Sequence[Path], task: str | None) -> list[Benchmark]:
    out: list[Benchmark] = []
    seen: dict[Path, str] = {}
    labels: set[str] = set()
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            continue
        questions = tuple(load_questions(path, task))
        label = base = benchmark_label(path)
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


# --------------------------------------------------------------------------- storage


@dataclass
class EvalGeneration:
    """One row of `eval_generations`: one turn of one pass."""

    id: str
    eval_run_id: str
    adapter_set: str
    seed_index: int
    question_id: str
    pass_index: int
    role: str
    parent_id: str | None
    messages: str
    output: str
    finish_reason: str
    answer: str | None
    correct: int | None
    prompt_tokens: int
    completion_tokens: int
    seed: int
    duration_ms: int | None
    created_at: str


def ensure_eval_run(store: Store, row: dict) -> dict:
    with store.db.atomic():
        store.db.execute(
            "INSERT OR IGNORE INTO eval_runs ("
            + ", ".join(row)
            + ") VALUES ("
            + ", ".join("?" for _ in row)
            + ")",
            list(row.values()),
        )
    return next(store.db.query("SELECT * FROM eval_runs WHERE id = ?", [row["id"]]))


def ensure_adapter_set(store: Store, run_id: str, aset: AdapterSet) -> None:
    with store.db.atomic():
        store.db.execute(
            "INSERT OR IGNORE INTO eval_adapter_sets (eval_run_id, id, adapters, created_at) "
            "VALUES (?, ?, ?, ?)",
            [run_id, aset.id, json.dumps(aset.records, sort_keys=True), utcnow()],
        )


def record_samples(
    store: Store, run_id: str, label: str, seed_index: int, question_ids: Sequence[str]
) -> None:
    with store.db.atomic():
        store.db.conn.executemany(
            "INSERT OR REPLACE INTO eval_samples "
            "(eval_run_id, benchmark, seed_index, position, question_id) VALUES (?, ?, ?, ?, ?)",
            [(run_id, label, seed_index, pos, qid) for pos, qid in enumerate(question_ids)],
        )


def insert_generation(store: Store, gen: EvalGeneration) -> None:
    """One generation, one transaction: committed before the next one is generated."""
    with store.db.atomic():
        store.db["eval_generations"].insert(asdict(gen))


def load_generations(
    store: Store, run_id: str, question: Question | None = None
) -> dict[str, EvalGeneration]:
    """The run's stored turns (of one question only, when given)."""
    sql, args = "SELECT * FROM eval_generations WHERE eval_run_id = ?", [run_id]
    if question is not None:
        sql, args = sql + " AND question_id = ?", [*args, question.id]
    return {r["id"]: EvalGeneration(**r) for r in store.db.query(sql, args)}


# --------------------------------------------------------------------------- scheduling


@dataclass(frozen=True)
class Slot:
    """One pass of one sampled question of one seed (what a chain is generated for)."""

    seed_index: int
    question: Question
    pass_index: int


@dataclass
class _Pending:
    slot: Slot
    role: str
    messages: list[dict[str, str]]
    seed: int
    parent_id: str | None


class EvalRunner:
    """Generates every missing turn of an evaluation, configuration by configuration, role by
    role, so adapters switch only between batches of one role's work."""

    def __init__(
        self,
        store: Store,
        run_id: str,
        benchmarks: Sequence[Benchmark],
        settings: EvalSettings,
        engine: Engine,
        prompts: PromptSet,
        adapter_sets: Sequence[AdapterSet],
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.benchmarks = list(benchmarks)
        self.settings = settings
        self.engine = engine
        self.prompts = prompts
        self.adapter_sets = list(adapter_sets)
        self.on_progress = on_progress
        self.params = settings.params()
        self._claims = Claims(store, "eval", run_id, remember_done=False)
        if any(not a.is_base for a in self.adapter_sets) and not isinstance(engine, AdapterEngine):
            raise MaltError(
                f"the {engine.name} engine cannot apply LoRA adapters: serve each role's adapter "
                "under its own model name and pass --role-model ROLE=NAME"
            )

    def samples(self, bench: Benchmark) -> list[list[Question]]:
        """The questions of each seed, in sampled order."""
        n = len(bench.questions)
        return [
            [
                bench.questions[i]
                for i in sample_indices(n, self.settings.samples, self.settings.seed, s)
            ]
            for s in range(self.settings.seeds)
        ]

    def slots(self) -> list[Slot]:
        """Every distinct (seed, question, pass), in benchmark, seed, sample and pass order."""
        out: list[Slot] = []
        seen: set[tuple[int, str, int]] = set()
        for bench in self.benchmarks:
            for s, questions in enumerate(self.samples(bench)):
                for q in questions:
                    for p in range(self.settings.votes):
                        if (s, q.id, p) not in seen:
                            seen.add((s, q.id, p))
                            out.append(Slot(s, q, p))
        return out

    def gid(self, aset: AdapterSet, slot: Slot, role: str) -> str:
        return generation_id(
            self.run_id, aset.id, slot.seed_index, slot.question.id, slot.pass_index, role
        )

    def prepare(self) -> None:
        """Sampled questions, samples and adapter sets into the database (idempotent)."""
        for bench in self.benchmarks:
            for s, questions in enumerate(self.samples(bench)):
                with self.store.db.atomic():
                    self.store.insert_questions(questions)
                record_samples(self.store, self.run_id, bench.label, s, [q.id for q in questions])
        for aset in self.adapter_sets:
            ensure_adapter_set(self.store, self.run_id, aset)

    def execute(self) -> Progress:
        """Generate what is missing; returns the final progress.

        Several processes may evaluate one eval run together: within a role, each question is
        generated by the process holding its claim (malt_local.db.claims), and every process waits
        for a role to be finished everywhere before it starts the next (whose prompts extend
        this role's turns).
        """
        self.prepare()
        stored = load_generations(self.store, self.run_id)
        slots = self.slots()
        roles = self.settings.roles
        wanted = [self.gid(a, s, r) for a in self.adapter_sets for s in slots for r in roles]
        progress = Progress(total=len(wanted), done=sum(1 for g in wanted if g in stored))
        if self.on_progress:
            self.on_progress(progress)
        with self._claims:
            for aset in self.adapter_sets:
                for role in roles:
                    self._role_pass(aset, role, slots, progress)
        stored = load_generations(self.store, self.run_id)
        progress.done = sum(1 for g in wanted if g in stored)
        return progress

    def _item(self, aset: AdapterSet, role: str, question_id: str) -> str:
        return f"{aset.id}/{role}/{question_id}"

    def _role_pass(
        self, aset: AdapterSet, role: str, slots: list[Slot], progress: Progress
    ) -> None:
        """One role's missing turns for one adapter set, question by question under claims."""
        stored = load_generations(self.store, self.run_id)  # the earlier roles, from everyone
        by_question: dict[str, list[Slot]] = {}
        for slot in slots:
            by_question.setdefault(slot.question.id, []).append(slot)
        items = {
            self._item(aset, role, qid): qslots
            for qid, qslots in by_question.items()
            if any(self.gid(aset, s, role) not in stored for s in qslots)
        }
        if not items:
            return
        cursor = ClaimCursor(self._claims, list(items))
        pending: dict[str, _Pending] = {}
        left: dict[str, int] = {}  # turns requested and not yet stored, per claimed item

        def refill() -> bool:
            while (item := cursor.next()) is not None:
                # What is stored now: a process that held the item before may have added some.
                stored.update(load_generations(self.store, self.run_id, items[item][0].question))
                left[item] = self._requests(aset, role, items[item], stored, queue, pending)
                if left[item]:
                    return True
                self._claims.finish(item)
            return False

        queue = ClaimingQueue(refill)
        if isinstance(self.engine, AdapterEngine):
            self.engine.use_adapters(aset.for_role(role))
        while True:
            for completion in self.engine.generate(queue):
                info = pending.pop(completion.key)
                item = self._item(aset, role, info.slot.question.id)
                gen = self._store(aset, info, completion, item)
                if gen is None:
                    cursor.watch(item)  # another process took the question over
                    continue
                progress.done += 1
                progress.generated += 1
                progress.completion_tokens += completion.completion_tokens
                left[item] -= 1
                if left[item] == 0:
                    self._claims.finish(item)
                if self.on_progress:
                    self.on_progress(progress)
            if refill():
                continue
            if not cursor.waiting:
                return
            cursor.pause()

    def _requests(
        self,
        aset: AdapterSet,
        role: str,
        slots: list[Slot],
        stored: dict[str, EvalGeneration],
        queue: RequestQueue,
        pending: dict[str, _Pending],
    ) -> int:
        """One request per distinct prompt (a question's generator passes share theirs), for
        the slots' missing turns; returns how many turns were requested."""
        by_prompt: dict[str, GenRequest] = {}
        requested = 0
        for slot in slots:
            key = self.gid(aset, slot, role)
            if key in stored:
                continue
            q = slot.question
            parent_id = None
            if role == "generator":
                ctx = TreeContext(q)
            elif role == "verifier":
                parent_id = self.gid(aset, slot, "generator")
                if parent_id not in stored:
                    continue
                ctx = TreeContext(q, generation=stored[parent_id].output)
            else:
                g = stored.get(self.gid(aset, slot, "generator"))
                parent_id = self.gid(aset, slot, "verifier")
                if g is None or parent_id not in stored:
                    continue
                ctx = TreeContext(q, generation=g.output, critique=stored[parent_id].output)
            messages = self.prompts.messages(role, ctx)
            seed = generation_seed(self.settings.seed, slot.seed_index, q.id, slot.pass_index, role)
            pending[key] = _Pending(slot, role, messages, seed, parent_id)
            requested += 1
            prompt_key = json.dumps(messages)
            request = by_prompt.get(prompt_key) if role == "generator" else None
            if request is None:
                request = GenRequest(
                    messages=messages,
                    keys=[],
                    seeds=[],
                    params=self.params,
                    parent_key=parent_id,
                    # Children come in the next role's batch, after `use_adapters` has
                    # dropped every kept prefix: keeping this KV would only cost room.
                    expects_children=False,
                    group=q.id,
                    role=role,
                )
                by_prompt[prompt_key] = request
                queue.push(request)
            request.keys.append(key)
            request.seeds.append(seed)
        return requested

    def _store(
        self, aset: AdapterSet, info: _Pending, c: Completion, item: str
    ) -> EvalGeneration | None:
        """Store one turn, if this process still holds its claim (None: it was lost)."""
        q = info.slot.question
        answer, correct = grade(c.text, q.ground_truth, q.task, list(q.options) or None)
        gen = EvalGeneration(
            id=c.key,
            eval_run_id=self.run_id,
            adapter_set=aset.id,
            seed_index=info.slot.seed_index,
            question_id=q.id,
            pass_index=info.slot.pass_index,
            role=info.role,
            parent_id=info.parent_id,
            messages=json.dumps(info.messages, ensure_ascii=False),
            output=c.text,
            finish_reason=c.finish_reason,
            answer=answer,
            # A critique that states no answer has no grade; answers always have one.
            correct=None if info.role == "verifier" and answer is None else int(correct),
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            seed=info.seed if c.seed is None else c.seed,
            duration_ms=int(c.seconds * 1000),
            created_at=utcnow(),
        )
        with self.store.immediate():
            if not self._claims.keep(item):
                return None
            insert_generation(self.store, gen)
        return gen

    # results ------------------------------------------------------------------------------

    def results(self) -> dict:
        """The measures of every benchmark and configuration, from what is stored."""
        stored = load_generations(self.store, self.run_id)
        out = []
        for bench in self.benchmarks:
            samples = self.samples(bench)
            entry: dict = {
                "benchmark": bench.label,
                "file": str(bench.path),
                "task": ",".join(sorted({q.task for q in bench.questions})),
                "questions": len(bench.questions),
                "samples": len(samples[0]),
                "seeds": self.settings.seeds,
                **benchmark_measures(
                    stored, self.run_id, bench.label, samples, self.settings, self.adapter_sets
                ),
                "sampled": [[q.id for q in qs] for qs in samples],
            }
            out.append(entry)
        return {"benchmarks": out}


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


# --------------------------------------------------------------------------- measures (pure)


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


# --------------------------------------------------------------------------- one `malt eval`


def run_eval(
    paths: Sequence[Path],
    settings: EvalSettings,
    *,
    db_path: Path,
    model_spec: str | None,
    adapter_values: Sequence[str] = (),
    prompts_dir: Path | None = None,
    options: EngineOptions | None = None,
    engine_kind_name: str = "batched",
    on_progress: Callable[[Progress], None] | None = None,
) -> dict:
    """Check everything a user can get wrong, load the model once, evaluate, report.

    Every check (settings, adapters, questions, templates, model, adapter files) happens before
    the database is written, so a bad flag leaves nothing half-made.
    """
    from malt_local.engines.llama.adapters import check_adapters, parse_adapters
    from malt_local.run.settings import prompts_digest

    settings.validate()
    specs = parse_adapters(list(adapter_values))
    if not paths:
        raise MaltError("no questions file given")
    benchmarks = load_benchmarks(paths, settings.task)
    prompts = PromptSet(prompts_dir)
    prompts.check([q for b in benchmarks for q in b.questions])
    hashes = prompts.hashes()
    base = dataclasses.replace(
        options or EngineOptions(max_tokens=settings.max_tokens), max_tokens=settings.max_tokens
    )
    kind = engine_kind(engine_kind_name)
    if specs and not kind.local:
        raise MaltError(
            f"--adapter needs a llama.cpp engine; with --engine {kind.name} serve each role's "
            "adapter under its own model name and pass --role-model ROLE=NAME"
        )
    model = identify_model(kind.name, model_spec, base)
    infos = check_adapters(specs, Path(model.model)) if specs else {}
    engine_options = base.for_model(kind.local, model.served_model or model.model)
    model_sha = model.sha256
    remote = engine_options.remote
    role_models = dict(remote.role_models) if remote is not None else {}
    if role_models:
        # Other served names for some roles are other weights: another evaluation.
        model_sha += "|roles:" + json.dumps(role_models, sort_keys=True)
    ident = identity(settings, model_sha, prompts_digest(hashes))
    run_id = eval_run_id(ident)

    engine = make_engine(kind.name, engine_options)
    try:
        records = {role: [i.record() for i in role_infos] for role, role_infos in infos.items()}
        handles = {}
        if records:
            assert isinstance(engine, AdapterEngine)
            handles = {
                role: [(engine.load_adapter(i.path), i.scale) for i in role_infos]
                for role, role_infos in infos.items()
            }
        adapter_sets = [AdapterSet(BASE)]
        if records:
            adapter_sets.append(AdapterSet(adapter_set_id(records), records, handles))
        with disk_guard(db_path):
            store = Store(db_path)
            try:
                row = {
                    "id": run_id,
                    "created_at": utcnow(),
                    "model": model.model,
                    **{k: v for k, v in ident.items()},
                    "prompt_hashes": json.dumps(hashes, sort_keys=True),
                    "tool_version": __version__,
                    "config": json.dumps(ident, sort_keys=True),
                }
                ensure_eval_run(store, row)
                runner = EvalRunner(
                    store, run_id, benchmarks, settings, engine, prompts, adapter_sets, on_progress
                )
                started = time.monotonic()
                progress = runner.execute()
                elapsed = time.monotonic() - started
                results = runner.results()
            finally:
                store.close()
    finally:
        engine.close()
    columns: list[str] = []
    for aset in adapter_sets:
        columns += list(column_names(settings, aset).values())
    return {
        "eval_run": run_id,
        "db": str(db_path),
        "model": model.model,
        "model_sha256": model_sha,
        "settings": asdict(settings),
        "adapter_set": adapter_sets[-1].id if records else None,
        "adapters": records,
        "columns": columns,
        "generations_total": progress.total,
        "generations_new": progress.generated,
        "completion_tokens": progress.completion_tokens,
        "seconds": round(elapsed, 3),
        **results,
    }
