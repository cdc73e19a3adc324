"""The LLM judge: grades answers no rule can check, with output held to a JSON schema.

The seed implementation (Nimitkothari/MALT) scores answers with an LLM evaluator that returns
`correctness_score`, `reasoning_score`, `explanation` and `key_matches`. This is the same judge
run locally: the run's model (or `--judge-model`) reads `prompts/judge.j2` and writes its
verdict under a llama.cpp grammar built from `JUDGE_SCHEMA`, so every reply parses as that
JSON object (scores from the eleven values 0.0, 0.1, ..., 1.0; bounded strings and lists, so a
verdict always fits in `JUDGE_MAX_TOKENS`).

When it runs: after the tree, as a pass over the run's refiner leaves that have no judgement
yet (`malt run --judge`). Each verdict is committed on its own with the leaf it grades, so a
killed pass resumes where it stopped and never judges a leaf twice. Several processes on one
run judge it together, question by question, each question under its claim (malt_local.db.claims).

What it decides:

- With `--judge` on a task that has a grader, the judgement is stored next to the leaf (table
  `judgements`) and exported in the JSON datasets' `evaluation`; rewards stay the grader's.
- With `--task judge` there is no grader: the tree stores each leaf with reward NULL, and the
  judge sets reward = 1 when `correctness_score >= PASS_THRESHOLD` (0.5), else 0. A reply that
  is not valid JSON (only possible when it was cut off by the context size) is reward 0, the
  way a leaf the grader cannot read is wrong. Once all of a question's leaves are rewarded its
  tree gets values and labels through the same credit assignment as every other task.

The judge decodes greedily (temperature 0): a verdict depends only on its prompt, so
re-judging the same leaf with the same model gives the same verdict.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jinja2

from malt_local.db.claims import ClaimCursor, Claims
from malt_local.db.store import Store, utcnow
from malt_local.engines.base import Completion, Engine, GenRequest, RequestQueue, SamplingParams
from malt_local.errors import MaltError
from malt_local.paths import data_path
from malt_local.progress import Progress
from malt_local.prompts import PromptSet, render_block, resolve_prompts_dir
from malt_local.run import credit
from malt_local.run.settings import Run
from malt_local.run.tree import JUDGE_TASK, assign_question_credit, derive_seed

__all__ = [
    "JUDGE_MAX_TOKENS",
    "JUDGE_SCHEMA",
    "JUDGE_TASK",
    "PASS_THRESHOLD",
    "JUDGE_PARAMS",
    "JudgeModel",
    "JudgePrompt",
    "JudgeSummary",
    "Judgement",
    "check_judge_model",
    "judge_run",
    "parse_judgement",
]

Message = dict[str, str]

# A leaf passes (reward 1) when the judge's correctness_score is at least this.
PASS_THRESHOLD = 0.5
# Room for the longest reply the schema allows (about 300 + 5 * 60 characters of strings).
JUDGE_MAX_TOKENS = 384
# Leaves fetched per query: the pass holds this many, however large the run.
_BATCH = 64

SCORES = [round(i / 10, 1) for i in range(11)]

# Field order is generation order: the judge explains before it scores. The grammar makes the
# model write exactly these fields, in this order, with these bounds.
JUDGE_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "explanation": {"type": "string", "minLength": 1, "maxLength": 300},
        "key_matches": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 60},
            "maxItems": 5,
        },
        "reasoning_score": {"type": "number", "enum": SCORES},
        "correctness_score": {"type": "number", "enum": SCORES},
    },
    "required": ["explanation", "key_matches", "reasoning_score", "correctness_score"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Judgement:
    """One verdict, as stored in `judgements` (scores None when the reply did not parse)."""

    correctness_score: float | None
    reasoning_score: float | None
    explanation: str
    key_matches: list[str]
    valid: bool

    @property
    def passed(self) -> bool:
        return self.correctness_score is not None and self.correctness_score >= PASS_THRESHOLD

    @property
    def reward(self) -> float:
        return 1.0 if self.passed else 0.0


def _score(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0.0 <= value <= 1.0 else None


def parse_judgement(text: str) -> Judgement:
    """The verdict in a judge reply, checked against the schema's types and ranges.

    Any reply that is not such an object (cut off, wrong types, a score outside [0, 1]) gives
    an invalid judgement with no scores, which grades the leaf as wrong: the reply is kept in
    `judgements.output` for a human to read.
    """
    try:
        # strict=False: llama-cpp-python's JSON grammar lets raw newlines into strings.
        data = json.loads(text, strict=False)
    except (json.JSONDecodeError, TypeError):
        return Judgement(None, None, "the judge's reply is not valid JSON", [], False)
    if not isinstance(data, dict):
        return Judgement(None, None, "the judge's reply is not a JSON object", [], False)
    correctness = _score(data.get("correctness_score"))
    reasoning = _score(data.get("reasoning_score"))
    explanation = data.get("explanation")
    matches = data.get("key_matches")
    if (
        correctness is None
        or reasoning is None
        or not isinstance(explanation, str)
        or not isinstance(matches, list)
        or not all(isinstance(m, str) for m in matches)
    ):
        return Judgement(None, None, "the judge's reply does not follow the schema", [], False)
    return Judgement(
        correctness, reasoning, explanation.strip(), [m.strip() for m in matches], True
    )


# --------------------------------------------------------------------------- prompt


class JudgePrompt:
    """`judge.j2` from the run's prompts folder, else the shipped one, in the same sandbox.

    The template renders in the environment `PromptSet` builds (immutable sandbox, undefined
    variables are errors), so a user's judge template is held to the same rules as the roles'.
    """

    NAME = "judge.j2"

    def __init__(self, prompts_dir: Path | str | None = None) -> None:
        folder = resolve_prompts_dir(prompts_dir)
        if not (folder / self.NAME).is_file():
            folder = data_path("prompts")
        if not (folder / self.NAME).is_file():
            raise MaltError(f"no judge template {self.NAME} in {folder}")
        self.path = folder / self.NAME
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        try:
            self.template = PromptSet(folder).env.get_template(self.NAME)
        except jinja2.TemplateError as exc:
            raise MaltError(f"judge template {self.path}: {exc}") from exc

    def _block(self, name: str, variables: dict) -> str | None:
        return render_block(self.template, name, variables, f"judge template {self.path}")

    def messages(
        self,
        *,
        question: str,
        ground_truth: str,
        answer: str,
        task: str,
        options: list[tuple[str, str]] | None = None,
        stated_answer: str | None = None,
    ) -> list[Message]:
        variables = {
            "question": question,
            "ground_truth": ground_truth,
            "answer": answer,
            "stated_answer": stated_answer,
            "task": task,
            "options": [{"letter": letter, "text": text} for letter, text in options or ()],
        }
        out: list[Message] = []
        system = self._block("system", variables)
        if system:
            out.append({"role": "system", "content": system})
        user = self._block("user", variables)
        if not user:
            raise MaltError(f"judge template {self.path} has no 'user' block")
        out.append({"role": "user", "content": user})
        return out

    def check(self) -> None:
        """Render once, so a broken template fails before any node is written."""
        self.messages(
            question="(question)",
            ground_truth="(truth)",
            answer="(answer)",
            task="exact",
            options=[("A", "(option)")],
            stated_answer="(answer)",
        )


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class JudgeModel:
    """Who judged: recorded with each verdict, so a run never mixes two judges."""

    name: str  # the judge model's file name, or the served model's id
    sha256: str | None


# Every verdict decodes greedily under the schema: it depends only on its prompt.
JUDGE_PARAMS = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=JUDGE_MAX_TOKENS)


# --------------------------------------------------------------------------- the pass


@dataclass
class JudgeSummary:
    """What one judge pass did (the `judge` part of `malt run --json`)."""

    model: str
    judged: int = 0  # verdicts written by this pass
    already: int = 0  # leaves judged by an earlier pass
    invalid: int = 0  # replies of this pass that did not parse (graded as wrong)
    passed: int = 0  # verdicts of this pass with correctness_score >= PASS_THRESHOLD
    credited: int = 0  # trees that got values and labels from this pass (--task judge)
    sets_rewards: bool = False


def check_judge_model(store: Store, run_id: str, name: str, sha256: str | None) -> None:
    """Refuse to mix verdicts of two judge models in one run."""
    rows = store.db.execute(
        "SELECT DISTINCT model, model_sha256 FROM judgements WHERE run_id = ?", [run_id]
    ).fetchall()
    for model, digest in rows:
        if digest != sha256 or (digest is None and model != name):
            raise MaltError(
                f"run {run_id} was judged with {model}"
                f"{f' (sha256 {digest[:12]})' if digest else ''}; judge it with the same model "
                "(--judge-model), or pass --new-run"
            )


def _pending(store: Store, after: str, before: str, limit: int) -> list[dict]:
    """The next refiner leaves without a verdict whose ids lie between `after` and `before`.

    A node's id is `run/question/path`, so walking the primary key over a question's id range
    visits its leaves in path order with no sort (keyset pagination: each query starts where
    the previous one stopped).
    """
    return list(
        store.db.query(
            """SELECT n.id, n.question_id, n.path, n.output, n.answer,
                      q.question, q.ground_truth, q.task, q.options
               FROM nodes n
               JOIN questions q ON q.id = n.question_id
               LEFT JOIN judgements j ON j.node_id = n.id
               WHERE n.id > ? AND n.id < ? AND n.depth = 3 AND j.node_id IS NULL
               ORDER BY n.id
               LIMIT ?""",
            # No run_id condition, which would lead SQLite to another index and a sort.
            [after, before, limit],
        )
    )


def _unjudged_questions(store: Store, run: Run) -> list[str]:
    """The run's finished trees with a refiner leaf that has no verdict, in id order.

    Only finished trees: another process may still be building a tree of its own questions
    file, and will judge it when it is done.
    """
    return [
        qid
        for (qid,) in store.db.execute(
            """SELECT n.question_id FROM nodes n
               LEFT JOIN judgements j ON j.node_id = n.id
               WHERE n.run_id = ? AND n.depth = 3
               GROUP BY n.question_id
               HAVING COUNT(*) = ? AND SUM(j.node_id IS NULL) > 0
               ORDER BY n.question_id""",
            [run.id, run.spec.n**3],
        )
    ]


def _options(raw: str | None) -> list[tuple[str, str]]:
    return [(str(a), str(b)) for a, b in json.loads(raw)] if raw else []


def judge_run(
    store: Store,
    run: Run,
    engine: Engine,
    prompt: JudgePrompt,
    *,
    model: JudgeModel,
    on_progress: Callable[[Progress], None] | None = None,
) -> JudgeSummary:
    """Judge every refiner leaf of `run` that has no verdict yet, committing one by one.

    Leaves go to the engine a batch at a time, each as one request held to `JUDGE_SCHEMA`, so an
    engine with requests in flight (a server) judges a batch concurrently. With the run's task
    `judge`, each verdict also sets its leaf's reward, and every tree whose leaves are all
    rewarded gets its values and labels.
    """
    run_id = run.id
    sets_rewards = run.spec.task == JUDGE_TASK
    check_judge_model(store, run_id, model.name, model.sha256)
    summary = JudgeSummary(model=model.name, sets_rewards=sets_rewards)
    db = store.db
    total = db.execute(
        "SELECT COUNT(*) FROM nodes WHERE run_id = ? AND depth = 3", [run_id]
    ).fetchone()[0]
    summary.already = db.execute(
        "SELECT COUNT(*) FROM judgements WHERE run_id = ?", [run_id]
    ).fetchone()[0]
    progress = Progress(total=total, done=summary.already, stage="judge")
    if on_progress:
        on_progress(progress)
    # Several processes on one run judge question by question, each under its claim.
    claims = Claims(store, "judge", run_id)
    unjudged = _unjudged_questions(store, run)
    claims.reopen(unjudged)
    cursor = ClaimCursor(claims, unjudged)
    with claims:
        while True:
            qid = cursor.next()
            if qid is None:
                if not cursor.waiting:
                    break
                cursor.pause()
                continue
            done = _judge_question(
                store, run, engine, prompt, model, qid, claims, summary, progress, on_progress
            )
            if not done:
                cursor.watch(qid)  # another process took it over
                continue
            if sets_rewards:
                summary.credited += _credit(store, run, qid)
            claims.finish(qid)
    if sets_rewards:
        # Trees whose last verdict was written by a pass that stopped before their credit.
        for (qid,) in db.execute(
            """SELECT question_id FROM nodes WHERE run_id = ? GROUP BY question_id
               HAVING SUM(depth = 3) = ? AND SUM(depth = 3 AND reward IS NULL) = 0
                      AND SUM(value IS NULL) > 0""",
            [run_id, run.spec.n**3],
        ).fetchall():
            summary.credited += _credit(store, run, qid)
    return summary


def _credit(store: Store, run: Run, question_id: str) -> int:
    return int(assign_question_credit(store, run.id, question_id, run.spec.n, run.spec.theta))


def _judge_question(
    store: Store,
    run: Run,
    engine: Engine,
    prompt: JudgePrompt,
    model: JudgeModel,
    question_id: str,
    claims: Claims,
    summary: JudgeSummary,
    progress: Progress,
    on_progress: Callable[[Progress], None] | None = None,
) -> bool:
    """Judge one claimed question's unjudged leaves, a batch of requests at a time (an engine
    with requests in flight, a server, judges a batch concurrently); False when the claim was
    lost."""
    sets_rewards = run.spec.task == JUDGE_TASK
    prefix = f"{run.id}/{question_id}/"
    after, before = prefix, prefix[:-1] + "0"  # "0" sorts right after "/"
    while batch := _pending(store, after, before, _BATCH):
        after = batch[-1]["id"]
        leaves = {leaf["id"]: leaf for leaf in batch}
        queue = RequestQueue()
        for leaf in batch:
            queue.push(_request(run, prompt, leaf), priority=(leaf["id"],))
        for out in engine.generate(queue):
            leaf = leaves[out.key]
            if not _store_verdict(store, run, model, leaf, out, sets_rewards, summary, claims):
                return False
            progress.done += 1
            progress.generated += 1
            if on_progress:
                on_progress(progress)
    return True


def _request(run: Run, prompt: JudgePrompt, leaf: dict) -> GenRequest:
    messages = prompt.messages(
        question=leaf["question"],
        ground_truth=leaf["ground_truth"],
        answer=leaf["output"],
        task=run.spec.task or leaf["task"],
        options=_options(leaf["options"]),
        stated_answer=leaf["answer"],
    )
    seed = derive_seed(
        run.spec.seed,
        "judge:" + leaf["question_id"],
        tuple(int(b) for b in leaf["path"].split(".")),
    )
    return GenRequest(
        messages=messages,
        keys=[leaf["id"]],
        seeds=[seed],
        params=JUDGE_PARAMS,
        json_schema=JUDGE_SCHEMA,
        group=leaf["question_id"],
        role="judge",
    )


def _store_verdict(
    store: Store,
    run: Run,
    model: JudgeModel,
    leaf: dict,
    out: Completion,
    sets_rewards: bool,
    summary: JudgeSummary,
    claims: Claims,
) -> bool:
    """Store one verdict, if this process still holds its question."""
    verdict = parse_judgement(out.text)
    with store.immediate():
        if not claims.keep(leaf["question_id"]):
            return False
        store.db.execute(
            """INSERT INTO judgements (node_id, run_id, correctness_score, reasoning_score,
                   explanation, key_matches, valid, output, model, model_sha256,
                   prompt_tokens, completion_tokens, duration_ms, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [
                leaf["id"],
                run.id,
                verdict.correctness_score,
                verdict.reasoning_score,
                verdict.explanation,
                json.dumps(verdict.key_matches, ensure_ascii=False),
                int(verdict.valid),
                out.text,
                model.name,
                model.sha256,
                out.prompt_tokens,
                out.completion_tokens,
                int(out.seconds * 1000),
                utcnow(),
            ],
        )
        if sets_rewards:
            reward = verdict.reward
            store.db.execute(
                "UPDATE nodes SET reward = ?, correct = ?, value = ?, label = ? WHERE id = ?",
                [
                    reward,
                    int(reward),
                    reward,
                    int(credit.label_for(reward, run.spec.theta)),
                    leaf["id"],
                ],
            )
    summary.judged += 1
    summary.invalid += not verdict.valid
    summary.passed += verdict.passed
    return True


# --------------------------------------------------------------------------- malt run --judge


@dataclass(frozen=True)
class JudgePlan:
    """The judge a `malt run` will use, settled before anything is written."""

    model: JudgeModel
    prompt: JudgePrompt
    # What the engine loads or asks for: a GGUF path, or a served model name.
    target: str

    @property
    def name(self) -> str:
        return self.model.name


def plan_judge(
    *,
    judge: bool,
    judge_model: str | None,
    task: str | None,
    prompts_dir: Path | None,
    run_model: JudgeModel,
    run_target: str,
    resolve: Callable[[str], tuple[JudgeModel, str]],
) -> JudgePlan | None:
    """None without a judge; else the judge model (the run's unless `--judge-model`, which
    `resolve` turns into its identity and target) and its template, both checked.
    `--judge-model` implies `--judge`; `--task judge` needs a judge.
    """
    if not (judge or judge_model or task == JUDGE_TASK):
        return None
    prompt = JudgePrompt(prompts_dir)
    prompt.check()
    if not judge_model:
        return JudgePlan(run_model, prompt, run_target)
    model, target = resolve(judge_model)
    return JudgePlan(model, prompt, target)


def run_judge(
    plan: JudgePlan,
    db_path: Path,
    run: Run,
    make: Callable[[], Engine],
    *,
    on_progress: Callable[[Progress], None] | None = None,
) -> JudgeSummary:
    """Judge the run's unjudged leaves (after the tree is built), making the judge's engine
    (`make`) only if there is a leaf to judge.

    The engine is made afresh, after the tree's engine has let go of the model, so the judge
    never shares a context with an engine that manages the KV cache its own way.
    """
    engine = _LazyEngine(make)
    store = Store(db_path)
    try:
        return judge_run(store, run, engine, plan.prompt, model=plan.model, on_progress=on_progress)
    finally:
        engine.close()
        store.close()


class _LazyEngine:
    """An engine made on its first request (a finished pass loads nothing)."""

    name = "lazy"

    def __init__(self, make: Callable[[], Engine]) -> None:
        self._make = make
        self._engine: Engine | None = None

    def generate(self, queue: RequestQueue) -> Iterator[Completion]:
        if self._engine is None:
            self._engine = self._make()
        return self._engine.generate(queue)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
