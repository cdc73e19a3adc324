"""What `malt view` reads from the database, as plain dicts and dataclasses for its templates.

Every function takes a `Store` opened with `Store.read_only`, so nothing here can write. The
rules that decide what the data means are not restated: run figures come from `run.status`, DPO
pairs from `export`'s own pairing (`export.pairing.tree_pairs`), evaluation measures from
`evaluate`'s scoring (`evaluate.results.benchmark_measures`); this module only gathers their
inputs and shapes the results for pages.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from malt_local.db.store import JudgedNode, Store
from malt_local.errors import MaltError
from malt_local.evaluate.benchmarks import AdapterSet
from malt_local.evaluate.results import benchmark_measures
from malt_local.evaluate.settings import EvalSettings
from malt_local.evaluate.tables import EvalGeneration
from malt_local.export.options import ExportOptions
from malt_local.export.pairing import tree_pairs
from malt_local.export.records import dpo_record
from malt_local.export.trees import iter_trees, source_runs
from malt_local.questions.loading import Question
from malt_local.roles import ROLES, nodes_per_role, tree_size
from malt_local.run.status import run_status

VALUE_BINS = 10  # value histograms: ten bins of width 0.1 over [0, 1]
LENGTH_BINS = 8  # output-length histograms: eight bins from 0 to the run's max tokens


# --------------------------------------------------------------------------- runs


def runs(store: Store) -> list[dict]:
    """Every run with `malt status`'s figures, newest first."""
    return [run_status(store, r) for r in reversed(store.runs())]


def run_page(store: Store, run_id: str) -> dict:
    """One run: its configuration, `malt status` figures and the per-role distributions."""
    row = store.run(run_id)
    if row is None:
        raise MaltError(f"no run '{run_id}' in {store.path}")
    status = run_status(store, row)
    values: dict[str, list[int]] = {r: [0] * VALUE_BINS for r in ROLES}
    lengths: dict[str, list[int]] = {r: [0] * LENGTH_BINS for r in ROLES}
    finish: dict[str, Counter] = {r: Counter() for r in ROLES}
    mean_len: dict[str, float] = {}
    cap = max(1, row["max_tokens"])
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for role, value, tokens, reason in store.db.execute(
        "SELECT role, value, completion_tokens, finish_reason FROM nodes WHERE run_id = ?",
        [run_id],
    ):
        if value is not None:
            values[role][min(VALUE_BINS - 1, int(value * VALUE_BINS))] += 1
        lengths[role][min(LENGTH_BINS - 1, tokens * LENGTH_BINS // cap)] += 1
        finish[role][reason] += 1
        totals[role][0] += tokens
        totals[role][1] += 1
    for role, (tokens, count) in totals.items():
        mean_len[role] = tokens / count
    return {
        "run": status,
        "config": json.loads(row["config"]),
        "complete": status["nodes"] >= status["nodes_expected"] and status["nodes_expected"] > 0,
        "value_hist": values,
        "length_hist": lengths,
        "length_cap": cap,
        "mean_length": mean_len,
        "finish_reasons": {r: dict(sorted(finish[r].items())) for r in ROLES},
    }


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class QuestionFilter:
    """The Questions page's search and filters; None means "either"."""

    search: str = ""
    task: str = ""
    solved: bool | None = None  # some refiner leaf has reward 1
    positives: bool | None = None  # some node is labelled positive
    truncated: bool | None = None  # some output stopped at max tokens


def questions(store: Store, run_id: str, flt: QuestionFilter) -> list[dict]:
    """The run's questions in run order, with per-question counts, filtered."""
    if store.run(run_id) is None:
        raise MaltError(f"no run '{run_id}' in {store.path}")
    sql = """
        SELECT q.id, q.task, q.question, q.ground_truth, rq.position,
               COUNT(n.id) AS nodes,
               COALESCE(SUM(n.depth = 3 AND n.reward = 1), 0) AS solved_leaves,
               COALESCE(SUM(n.depth = 3), 0) AS leaves,
               COALESCE(SUM(n.label = 1), 0) AS positives,
               COALESCE(SUM(n.finish_reason = 'length'), 0) AS truncated
        FROM run_questions rq JOIN questions q ON q.id = rq.question_id
        LEFT JOIN nodes n ON n.run_id = rq.run_id AND n.question_id = rq.question_id
        WHERE rq.run_id = ?"""
    args: list = [run_id]
    if flt.search:
        sql += " AND (q.question LIKE ? ESCAPE '\\' OR q.id LIKE ? ESCAPE '\\')"
        like = "%" + flt.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args += [like + "%", like + "%"]
    if flt.task:
        sql += " AND q.task = ?"
        args.append(flt.task)
    sql += " GROUP BY q.id"
    having = []
    for wanted, expr in (
        (flt.solved, "solved_leaves > 0"),
        (flt.positives, "positives > 0"),
        (flt.truncated, "truncated > 0"),
    ):
        if wanted is not None:
            having.append(expr if wanted else f"NOT ({expr})")
    if having:
        sql += " HAVING " + " AND ".join(having)
    sql += " ORDER BY rq.position"
    return [dict(r) for r in store.db.query(sql, args)]


def tasks(store: Store, run_id: str) -> list[str]:
    return [
        r[0]
        for r in store.db.execute(
            "SELECT DISTINCT q.task FROM run_questions rq JOIN questions q ON q.id = rq.question_id"
            " WHERE rq.run_id = ? ORDER BY q.task",
            [run_id],
        )
    ]


# --------------------------------------------------------------------------- tree


@dataclass
class TreeNode:
    """A node of the Tree page, with its children and judgement (if judged)."""

    id: str
    role: str
    path: str
    output: str
    answer: str | None
    correct: int | None
    reward: float | None
    value: float | None
    label: int | None
    finish_reason: str
    completion_tokens: int
    judgement: dict | None = None
    children: list[TreeNode] = field(default_factory=list)

    @property
    def name(self) -> str:
        """G1, V1.2, R1.2.1: the role's initial and the 1-based branch path."""
        return self.role[0].upper() + ".".join(str(int(b) + 1) for b in self.path.split("."))


def tree(store: Store, run_id: str, question_id: str) -> dict:
    """The question, its ground truth and its nodes as a G → V → R tree."""
    run = store.run(run_id)
    if run is None:
        raise MaltError(f"no run '{run_id}' in {store.path}")
    q = store.question(question_id)
    if q is None:
        raise MaltError(f"no question '{question_id}' in {store.path}")
    has_judgements = "judgements" in store.db.table_names()
    judged: dict[str, dict] = {}
    if has_judgements:
        for row in store.db.query(
            "SELECT * FROM judgements WHERE run_id = ? AND node_id LIKE ?",
            [run_id, f"{run_id}/{question_id}/%"],
        ):
            judged[row["node_id"]] = row
    by_id: dict[str, TreeNode] = {}
    roots: list[TreeNode] = []
    counts = Counter()
    for rec in store.nodes(run_id, question_id):
        node = TreeNode(
            rec.id,
            rec.role,
            rec.path,
            rec.output,
            rec.answer,
            rec.correct,
            rec.reward,
            rec.value,
            rec.label,
            rec.finish_reason,
            rec.completion_tokens,
            judged.get(rec.id),
        )
        by_id[rec.id] = node
        counts[rec.role] += 1
        parent = by_id.get(rec.parent_id or "")
        (parent.children if parent else roots).append(node)
    n = run["n"]
    return {
        "run": run,
        "question": q,
        "options": json.loads(q["options"]) if q["options"] else None,
        "roots": roots,
        "counts": {r: counts[r] for r in ROLES},
        "expected": {r: nodes_per_role(n, r) for r in ROLES},
        "total": sum(counts.values()),
        "total_expected": tree_size(n),
    }


# --------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """One DPO pair as `malt export --format dpo` writes it, with where it came from."""

    question_id: str
    question: str
    prompt: list[dict]
    chosen: JudgedNode
    rejected: JudgedNode


def pairs(
    store: Store,
    run_id: str,
    role: str,
    theta: float | None = None,
    start: int = 0,
    limit: int | None = None,
) -> dict:
    """The DPO pairs of `role` an export of this run writes, in file order (export's rule):
    all are counted, only `limit` of them from index `start` are kept (a page)."""
    if role not in ROLES:
        raise MaltError(f"unknown role '{role}': choose {', '.join(ROLES)}")
    options = ExportOptions(roles=(role,), formats=("dpo",), theta=theta, run_ids=(run_id,))
    options.validate()
    (run,) = source_runs(store, options)
    out: list[Pair] = []
    complete = incomplete = total = 0
    end = None if limit is None else start + limit
    for t in iter_trees(store, run):
        if not t.complete():
            incomplete += 1
            continue
        complete += 1
        for chosen, rejected in tree_pairs(t, role):
            if total >= start and (end is None or total < end):
                record = dpo_record(chosen, rejected)
                out.append(Pair(t.question.id, t.question.text, record["prompt"], chosen, rejected))
            total += 1
    return {
        "theta": run.theta,
        "pairs": out,
        "start": start,
        "total": total,
        "complete": complete,
        "incomplete": incomplete,
    }


# --------------------------------------------------------------------------- evaluations


def evaluations(store: Store) -> list[dict]:
    """Every `malt eval` run in the database with its measures per benchmark, computed by
    `evaluate`'s own scoring from what is stored (votes and seeds as they were generated)."""
    if "eval_runs" not in store.db.table_names():
        return []
    out = []
    for run in store.db.query("SELECT * FROM eval_runs ORDER BY created_at DESC, id"):
        out.append(_evaluation(store, run))
    return out


def _evaluation(store: Store, run: dict) -> dict:
    rid = run["id"]
    stored = {
        r["id"]: EvalGeneration(**r)
        for r in store.db.query("SELECT * FROM eval_generations WHERE eval_run_id = ?", [rid])
    }
    roles = {g.role for g in stored.values()}
    votes = 1 + max((g.pass_index for g in stored.values()), default=0)
    samples: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for row in store.db.query(
        "SELECT benchmark, seed_index, question_id FROM eval_samples WHERE eval_run_id = ? "
        "ORDER BY benchmark, seed_index, position",
        [rid],
    ):
        samples[row["benchmark"]][row["seed_index"]].append(row["question_id"])
    asets = [
        AdapterSet(r["id"], json.loads(r["adapters"]))
        for r in store.db.query(
            "SELECT id, adapters FROM eval_adapter_sets WHERE eval_run_id = ? "
            "ORDER BY id != 'base', created_at",
            [rid],
        )
    ]
    qcache: dict[str, Question] = {}
    benchmarks = []
    for label, seeds in samples.items():
        per_seed = [[_question(store, qid, qcache) for qid in seeds[s]] for s in sorted(seeds)]
        settings = EvalSettings(
            mode="all" if "refiner" in roles else "sa",
            votes=votes,
            samples=max(len(qs) for qs in per_seed),
            seeds=len(per_seed),
        )
        entry = {"benchmark": label, "seeds": len(per_seed), "samples": settings.samples}
        try:
            entry.update(benchmark_measures(stored, rid, label, per_seed, settings, asets))
        except MaltError as exc:
            entry["error"] = str(exc)
        benchmarks.append(entry)
    return {
        "run": run,
        "votes": votes,
        "adapter_sets": [a.id for a in asets],
        "generations": len(stored),
        "benchmarks": benchmarks,
    }


@dataclass(frozen=True)
class _StoredQuestion(Question):
    """A question under the id it is stored with (generation ids name it), even when its text
    in the database no longer hashes to that id."""

    stored_id: str = ""

    @property
    def id(self) -> str:
        return self.stored_id


def _question(store: Store, qid: str, cache: dict[str, Question]) -> Question:
    if qid not in cache:
        row = store.question(qid)
        if row is None:
            raise MaltError(f"eval sample names question {qid}, which is not stored")
        options = tuple(tuple(o) for o in json.loads(row["options"])) if row["options"] else ()
        cache[qid] = _StoredQuestion(
            row["question"], row["ground_truth"], row["task"], options, stored_id=qid
        )  # type: ignore[arg-type]
    return cache[qid]


# --------------------------------------------------------------------------- training


TRAIN_MANIFEST = "manifest.json"


def training(path: Path | None) -> dict | None:
    """Loss curves from a `malt train` output folder (or its manifest file).

    The minimal format read: ``{"roles": {ROLE: {STAGE: {"log": [{"step": s, "loss": l},
    ...]}}}}``; other keys are ignored, log entries without a numeric step and loss skipped.
    None when no folder is given and ./adapters/manifest.json does not exist.
    """
    if path is None:
        path = Path("adapters")
        if not (path / TRAIN_MANIFEST).is_file():
            return None
    file = path / TRAIN_MANIFEST if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MaltError(f"cannot read training manifest {file}: {exc}") from exc
    roles = data.get("roles") if isinstance(data, dict) else None
    if not isinstance(roles, dict):
        raise MaltError(f"{file} has no 'roles' object: not a `malt train` manifest")
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for role, stages in roles.items():
        if not isinstance(stages, dict):
            continue
        for stage, body in stages.items():
            log = body.get("log") if isinstance(body, dict) else None
            points = [
                (float(e["step"]), float(e["loss"]))
                for e in (log if isinstance(log, list) else [])
                if isinstance(e, dict)
                and isinstance(e.get("step"), (int, float))
                and isinstance(e.get("loss"), (int, float))
            ]
            if points:
                curves.setdefault(str(role), {})[str(stage)] = points
    return {"file": str(file), "curves": curves}
