"""What `malt view` reads from the database, as plain dicts and dataclasses for its templates.

Every function takes a `Store` opened read-only (`storage.open_read_only`), so nothing here can
write. The rules that decide what the data means are not restated: DPO pairs come from
`export`'s own pairing (`export.pairing.tree_pairs`), evaluation measures from `evaluate`'s
scoring (`evaluate.results.benchmark_measures`); run figures keep `run.status`'s definitions
but are gathered from one index scan (`run_figures`; a test holds them equal), because at the
paper's scale `run_status`'s reads take seconds. Every list is read a page at a time, so a
page's cost does not grow with the run.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

from malt_local.db.store import JudgedNode, NodeRecord, Store
from malt_local.errors import MaltError
from malt_local.evaluate.benchmarks import AdapterSet
from malt_local.evaluate.results import benchmark_measures
from malt_local.evaluate.settings import EvalSettings
from malt_local.evaluate.tables import EvalGeneration
from malt_local.export.options import ExportOptions
from malt_local.export.pairing import tree_pairs
from malt_local.export.records import dpo_record
from malt_local.export.trees import CHUNK, QuestionInfo, Tree, iter_trees, source_runs
from malt_local.questions.loading import Question
from malt_local.roles import ROLES, depth_of, nodes_per_role, tree_size
from malt_local.run.too_long import skipped_in_run

VALUE_BINS = 10  # value histograms: ten bins of width 0.1 over [0, 1]
LENGTH_BINS = 8  # output-length histograms: eight bins from 0 to the run's max tokens


# --------------------------------------------------------------------------- runs


def runs(store: Store, cache: FiguresCache | None = None) -> list[dict]:
    """Every run with `malt status`'s figures, newest first."""
    figures = cache.get if cache else run_figures
    return [figures(store, r)["run"] for r in reversed(store.runs())]


class FiguresCache:
    """Each run's figures, kept by the server until the run's data changes.

    One scan of a covering index is ~80 ms on 292,500 nodes on a quiet 2-core machine: fine
    once, too slow for every reload of a run page and the runs page on a busy one. What can
    change them is cheap to ask: a node inserted (the highest rowid of `nodes`), values
    assigned (the run's nodes without a value, counted in the partial index `nodes_unvalued`),
    a judge's verdict (which rewrites rewards and values and inserts a `judgements` row), the
    run's questions (added, or skipped as too long), and the file itself replaced. malt never
    deletes nodes or changes a value without one of these; a hand edit (`sqlite3` UPDATE) is
    seen when the server restarts or the next node arrives.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[tuple, dict]] = {}

    def get(self, store: Store, row: dict) -> dict:
        key = self.fingerprint(store, row)
        with self._lock:
            kept = self._kept.get(row["id"])
        if kept is not None and kept[0] == key:
            return kept[1]
        figures = run_figures(store, row)
        with self._lock:
            self._kept[row["id"]] = (key, figures)
        return figures

    @staticmethod
    def fingerprint(store: Store, row: dict) -> tuple:
        db, run_id = store.db.conn, row["id"]
        st = store.path.stat()
        # `+run_id`: not an index term, so SQLite walks the small partial index of unvalued
        # nodes rather than the run's whole stretch of `nodes_figures`.
        return (
            st.st_dev,
            st.st_ino,
            json.dumps(row, sort_keys=True, default=str),
            *db.execute(
                """SELECT (SELECT MAX(rowid) FROM nodes),
                          (SELECT COUNT(*) FROM nodes WHERE +run_id = ? AND value IS NULL),
                          (SELECT MAX(rowid) FROM judgements),
                          (SELECT COUNT(*) FROM run_questions WHERE run_id = ?),
                          (SELECT COUNT(*) FROM skipped_questions WHERE run_id = ?)""",
                [run_id, run_id, run_id],
            ).fetchone(),
        )


def run_figures(store: Store, row: dict) -> dict:
    """One run's `malt status` figures (the same definitions as `run.status.run_status`) and
    its per-role distributions, from two scans of indexes and no node row.

    `run_status`'s aggregates read every node's row, and so did the run page: 2 s on the
    paper's 292,500 nodes. Here one query walks the covering index `nodes_figures` grouped in
    its own order (a few thousand groups: values, lengths and labels repeat), and Python folds
    the groups into the figures (a database an older malt made, opened read-only and so not
    migrated, has no such index: the same query then reads the rows, slowly but right); the
    complete-tree count counts each question's nodes in `nodes_run_question`. A tree is
    complete when all its n + n² + n³ nodes are stored, which is the same as `run_status`'s
    "n³ leaves" (a leaf's parent and grandparent are stored before it, and paths are unique).
    Prompt tokens and node-seconds are not shown by the view, so they are not gathered.
    """
    run_id, n = row["id"], row["n"]
    db = store.db.conn
    too_long = skipped_in_run(store, run_id)
    n_questions = db.execute(
        "SELECT COUNT(*) FROM run_questions WHERE run_id = ?", [run_id]
    ).fetchone()[0]
    n_trees = n_questions - len(too_long)
    cap = max(1, row["max_tokens"])
    values = {r: [0] * VALUE_BINS for r in ROLES}
    lengths = {r: [0] * LENGTH_BINS for r in ROLES}
    finish: dict[str, Counter] = {r: Counter() for r in ROLES}
    # per role: nodes, labelled, positives, correct, graded, reward sum, rewarded, tokens
    acc = {r: [0, 0, 0, 0, 0, 0.0, 0, 0] for r in ROLES}
    for role, value, tokens, reason, label, correct, reward, count in db.execute(
        """SELECT role, value, completion_tokens, finish_reason, label, correct, reward,
                  COUNT(*)
           FROM nodes WHERE run_id = ?
           GROUP BY role, value, completion_tokens, finish_reason, label, correct, reward""",
        [run_id],
    ):
        if role not in acc:
            continue
        a = acc[role]
        a[0] += count
        if label is not None:
            a[1] += count
            a[2] += count if label == 1 else 0
        if correct is not None:
            a[3] += count * correct
            a[4] += count
        if reward is not None:
            a[5] += count * reward
            a[6] += count
        a[7] += count * tokens
        if value is not None:
            values[role][min(VALUE_BINS - 1, max(0, int(value * VALUE_BINS)))] += count
        lengths[role][min(LENGTH_BINS - 1, max(0, tokens * LENGTH_BINS // cap))] += count
        finish[role][reason] += count
    complete = db.execute(
        """SELECT COUNT(*) FROM run_questions rq WHERE rq.run_id = ?
           AND (SELECT COUNT(*) FROM nodes n
                WHERE n.run_id = rq.run_id AND n.question_id = rq.question_id) = ?""",
        [run_id, tree_size(n)],
    ).fetchone()[0]
    roles = {
        r: {
            "nodes": a[0],
            "expected": n_trees * nodes_per_role(n, r),
            "labelled": a[1],
            "positives": a[2],
            "positive_rate": a[2] / a[1] if a[1] else None,
            "accuracy": a[3] / a[4] if a[4] else None,
            "completion_tokens": a[7],
        }
        for r, a in acc.items()
    }
    leaves = acc["refiner"]
    done = sum(r["nodes"] for r in roles.values())
    status = {
        "run_id": run_id,
        "created_at": row["created_at"],
        "model": row["model"],
        "model_sha256": row["model_sha256"],
        "n": n,
        "theta": row["theta"],
        "temperature": row["temperature"],
        "max_tokens": row["max_tokens"],
        "questions": n_questions,
        "questions_complete": complete,
        "too_long": too_long,
        "nodes": done,
        "nodes_expected": n_trees * tree_size(n),
        "leaf_accuracy": leaves[5] / leaves[6] if leaves[6] else None,
        "completion_tokens": sum(r["completion_tokens"] for r in roles.values()),
        "roles": roles,
    }
    return {
        "run": status,
        "value_hist": values,
        "length_hist": lengths,
        "length_cap": cap,
        "mean_length": {r: a[7] / a[0] for r, a in acc.items() if a[0]},
        "finish_reasons": {r: dict(sorted(finish[r].items())) for r in ROLES},
    }


def run_page(store: Store, run_id: str, cache: FiguresCache | None = None) -> dict:
    """One run: its configuration, `malt status` figures and the per-role distributions."""
    row = store.run(run_id)
    if row is None:
        raise MaltError(f"no run '{run_id}' in {store.path}")
    page = cache.get(store, row) if cache else run_figures(store, row)
    status = page["run"]
    return {
        **page,
        "config": json.loads(row["config"]),
        "complete": status["nodes"] >= status["nodes_expected"] and status["nodes_expected"] > 0,
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


MAX_SEARCH = 200  # characters: longer is refused (SQLite refuses a LIKE pattern over 50,000)

# The filters as lookups in their partial indexes (migration m006): the conditions repeat the
# indexes' WHERE clauses word for word, which is what lets SQLite use them.
_FILTERS = {
    "solved": "n.depth = 3 AND n.reward = 1",
    "positives": "n.label = 1",
    "truncated": "n.finish_reason = 'length'",
}


def _question_where(run_id: str, flt: QuestionFilter) -> tuple[str, list]:
    if len(flt.search) > MAX_SEARCH:
        raise MaltError(f"search is at most {MAX_SEARCH} characters (got {len(flt.search)})")
    sql = """
        FROM run_questions rq JOIN questions q ON q.id = rq.question_id
        WHERE rq.run_id = ?"""
    args: list = [run_id]
    if flt.search:
        sql += " AND (q.question LIKE ? ESCAPE '\\' OR q.id LIKE ? ESCAPE '\\')"
        like = "%" + flt.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        args += [like + "%", like + "%"]
    if flt.task:
        sql += " AND q.task = ?"
        args.append(flt.task)
    for name, wanted in (
        ("solved", flt.solved),
        ("positives", flt.positives),
        ("truncated", flt.truncated),
    ):
        if wanted is not None:
            exists = (
                "EXISTS (SELECT 1 FROM nodes n WHERE n.run_id = rq.run_id "
                f"AND n.question_id = rq.question_id AND {_FILTERS[name]})"
            )
            sql += f" AND {exists}" if wanted else f" AND NOT {exists}"
    return sql, args


def questions(
    store: Store, run_id: str, flt: QuestionFilter, start: int = 0, limit: int | None = None
) -> list[dict]:
    """The run's questions in run order, filtered, `limit` of them from index `start` (a
    page), each with its counts: nodes, correct and all leaves, positives, truncated outputs.

    The page is chosen first (LIMIT/OFFSET over the `run_questions_position` index, filters
    as index look-ups), then the counts are read for its questions only, so a page costs the
    same on 7,500 questions as on 10.
    """
    if store.run(run_id) is None:
        raise MaltError(f"no run '{run_id}' in {store.path}")
    where, args = _question_where(run_id, flt)
    rows = [
        dict(r)
        for r in store.db.query(
            "SELECT q.id, q.task, q.question, q.ground_truth, rq.position"
            + where
            + " ORDER BY rq.position LIMIT ? OFFSET ?",
            [*args, -1 if limit is None else limit, start],
        )
    ]
    counts: dict[str, dict] = {}
    for i in range(0, len(rows), 500):  # SQLite's variable limit is 999 on older builds
        ids = [r["id"] for r in rows[i : i + 500]]
        for c in store.db.query(
            """SELECT question_id, COUNT(*) AS nodes,
                      SUM(depth = 3 AND reward = 1) AS solved_leaves,
                      SUM(depth = 3) AS leaves, SUM(label = 1) AS positives,
                      SUM(finish_reason = 'length') AS truncated
               FROM nodes WHERE run_id = ? AND question_id IN ("""
            + ", ".join("?" * len(ids))
            + ") GROUP BY question_id",
            [run_id, *ids],
        ):
            counts[c["question_id"]] = c
    empty = {"nodes": 0, "solved_leaves": 0, "leaves": 0, "positives": 0, "truncated": 0}
    for r in rows:
        c = counts.get(r["id"], empty)
        r.update({k: c[k] for k in empty})
    return rows


def question_count(store: Store, run_id: str, flt: QuestionFilter) -> int:
    """How many of the run's questions pass the filter (the pager's total)."""
    where, args = _question_where(run_id, flt)
    return store.db.execute("SELECT COUNT(*)" + where, args).fetchone()[0]


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
        raise MaltError(f"unknown role '{role[:40]}': choose {', '.join(ROLES)}")
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
        pairs = tree_pairs(t, role, options.max_pairs_per_group, options.keep_length_stopped)
        for chosen, rejected in pairs:
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


# A run's nodes from node id `lo` (exclusive) up to `hi`, in primary-key order: tree after
# tree, each depth first (the order `Store.judged_nodes` and export walk). Every row starts with
# what says whether its tree is complete (question, depth, value, reward); only the nodes at the
# page's depth carry the rest, judgement included (a pair is made of them, its prompt is
# theirs), so the other nodes of a tree cost SQLite no text and Python no object.
_JUDGED = [f"n.{f.name}" for f in fields(NodeRecord)] + [
    "j.correctness_score", "j.reasoning_score", "j.explanation", "j.key_matches", "j.valid",
    "j.created_at",
]  # fmt: skip
_JUDGED_FROM_SQL = (
    "SELECT n.question_id, n.depth, n.value, n.reward, "
    + ", ".join(f"CASE WHEN n.depth = :depth THEN {c} END" for c in _JUDGED)
    + """
    FROM nodes n LEFT JOIN judgements j ON j.node_id = n.id
    WHERE n.id > :lo AND n.id < :hi
    ORDER BY n.id"""
)
_JUDGED_NAMES = [f.name for f in fields(JudgedNode)]


def pairs_page(
    store: Store,
    run_id: str,
    role: str,
    theta: float | None = None,
    after: str = "",
    limit: int = 100,
    max_trees: int = 500,
    keep_length_stopped: bool = False,
) -> dict:
    """One page of the DPO pairs of `role` an export of this run writes, in file order: the
    pairs of the trees after question `after` ("" = from the first), whole trees, until at
    least `limit` pairs or `max_trees` trees are read. `next` is the question to continue
    after (None on the last page).

    Keyset paging by tree: a page reads only its own trees through the primary key (node ids
    are `run/question/path`), never the run's other nodes, so the 100th page costs what the
    first does. The run's total is not counted (that would read every tree); the pairs are
    still export's, by its own pairing code.
    """
    if role not in ROLES:
        raise MaltError(f"unknown role '{role[:40]}': choose {', '.join(ROLES)}")
    options = ExportOptions(
        roles=(role,),
        formats=("dpo",),
        theta=theta,
        run_ids=(run_id,),
        keep_length_stopped=keep_length_stopped,
    )
    options.validate()
    (run,) = source_runs(store, options)
    # "0" sorts right after "/": "run/q0" is above every id of question q, below the next one's.
    lo = f"{run_id}/{after}0" if after else f"{run_id}/"
    hi = f"{run_id}0"
    depth = depth_of(role)
    expected = [nodes_per_role(run.n, r) for r in ROLES]
    out: list[Pair] = []
    complete = incomplete = 0
    last = ""
    cur = store.db.conn.execute(_JUDGED_FROM_SQL, {"depth": depth, "lo": lo, "hi": hi})
    qid = ""
    counts = [0, 0, 0]
    valued = True  # every node has a value, every leaf a reward
    nodes: list[JudgedNode] = []

    def take() -> None:
        # Tree.complete's rule, on the tallies (the tree's other nodes were never built).
        nonlocal complete, incomplete, last
        last = qid
        if not (valued and counts == expected):
            incomplete += 1
            return
        complete += 1
        t = Tree(run, _question_info(store, qid), nodes)
        pairs = tree_pairs(t, role, options.max_pairs_per_group, options.keep_length_stopped)
        for chosen, rejected in pairs:
            record = dpo_record(chosen, rejected)
            out.append(Pair(qid, t.question.text, record["prompt"], chosen, rejected))

    full = False
    while not full and (batch := cur.fetchmany(CHUNK)):
        for row in batch:
            if row[0] != qid:
                if qid:
                    take()
                    if len(out) >= limit or complete + incomplete >= max_trees:
                        full = True
                        break
                qid, counts, valued, nodes = row[0], [0, 0, 0], True, []
            d = row[1]
            if 1 <= d <= 3:
                counts[d - 1] += 1
            if row[2] is None or (d == 3 and row[3] is None):
                valued = False
            if d == depth:
                nodes.append(JudgedNode(**dict(zip(_JUDGED_NAMES, row[4:], strict=True))))
    cur.close()
    if not full and qid:
        take()
    return {
        "theta": run.theta,
        "pairs": out,
        "after": after,
        "next": last if full else None,
        "complete": complete,
        "incomplete": incomplete,
    }


def _question_info(store: Store, question_id: str) -> QuestionInfo:
    row = store.question(question_id)
    if row is None:
        raise MaltError(f"node of question {question_id}, which is not stored")
    return QuestionInfo(row["id"], row["question"], row["ground_truth"], row["task"])


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
    ...]}}}}``; other keys are ignored, log entries without a finite step and loss skipped.
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
                (step, loss)
                for e in (log if isinstance(log, list) else [])
                if isinstance(e, dict)
                and (step := _finite(e.get("step"))) is not None
                and (loss := _finite(e.get("loss"))) is not None
            ]
            if points:
                curves.setdefault(str(role), {})[str(stage)] = points
    return {"file": str(file), "curves": curves}


def _finite(x: object) -> float | None:
    """A log entry's number, or None: not a number, or not finite (a NaN or infinite loss,
    which Python's JSON reader accepts, or an integer too big for a float) is a gap in the
    curve, not a point no chart can place."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        value = float(x)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None
