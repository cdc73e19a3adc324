"""The SQLite file: runs, questions and every tree node, written as they are made.

One file per project (`./malt.db` unless `--db`), WAL so `malt status` and Datasette can read
while a run writes, foreign keys on. A node is inserted in its own transaction the moment it is
generated, with an id that follows from its place in the tree, so a killed run loses at most the
nodes in flight and a resumed run cannot store one twice (the primary key refuses it).

Several processes may share the file (one per GPU): each connection waits up to BUSY_TIMEOUT
for another's write transaction, and who builds what is settled by claims (malt_local.db.claims).

Text: a TEXT value that is not valid UTF-8 (written by another tool, or by a malt before it
checked) must not end `malt status`, `show`, `export` or a `view` page in a traceback; every
connection decodes it with U+FFFD in place of the bad bytes, as a browser would show it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlite_utils import Database

from malt_local.db.migrations import known_names, migrations
from malt_local.diskspace import disk_full_error, is_disk_full
from malt_local.errors import MaltError
from malt_local.questions.loading import Question

BUSY_TIMEOUT = 60.0  # seconds a writer waits for another process's transaction


def decode_text(value: bytes) -> str:
    """SQLite TEXT as str; invalid UTF-8 becomes U+FFFD (the replacement character)."""
    return value.decode("utf-8", errors="replace")


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


@dataclass
class NodeRecord:
    """One row of `nodes`."""

    id: str
    run_id: str
    question_id: str
    parent_id: str | None
    role: str
    depth: int
    branch: int
    path: str
    messages: str
    output: str
    finish_reason: str
    answer: str | None
    correct: int | None
    reward: float | None
    value: float | None
    label: int | None
    prompt_tokens: int
    completion_tokens: int
    seed: int
    duration_ms: int | None
    created_at: str
    # The process that generated it (host:pid:token; see malt_local.db.claims), None before claims.
    builder: str | None = None
    # Why it got its grade, where the task says (the code task); NULL on a code node = not yet.
    grade_reason: str | None = None

    @property
    def branches(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.path.split("."))

    @property
    def group(self) -> str:
        """The sibling group: the parent node, or the question for generators."""
        return self.parent_id or self.question_id


@dataclass
class JudgedNode(NodeRecord):
    """A row of `nodes` with the LLM judge's verdict on it from `judgements` (None if unjudged)."""

    correctness_score: float | None = None
    reasoning_score: float | None = None
    explanation: str | None = None
    key_matches: str | None = None
    judge_valid: int | None = None
    judged_at: str | None = None

    @property
    def judged(self) -> bool:
        return self.judge_valid is not None


# The judgement's columns named as JudgedNode's fields; `n.*` as the store's other reads.
_JUDGED_NODES_SQL = """
    SELECT n.*, j.correctness_score AS correctness_score, j.reasoning_score AS reasoning_score,
           j.explanation AS explanation, j.key_matches AS key_matches, j.valid AS judge_valid,
           j.created_at AS judged_at
    FROM nodes n LEFT JOIN judgements j ON j.node_id = n.id
    WHERE n.id > ? AND n.id < ?
    ORDER BY n.id"""


def node_id(run_id: str, question_id: str, path: tuple[int, ...]) -> str:
    """The node's id is its address in the tree: run, question, branch path."""
    return f"{run_id}/{question_id}/" + ".".join(str(b) for b in path)


class Store:
    """Typed access to one malt database."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise MaltError(f"no database at {self.path} (run `malt run` first, or pass --db)")
        if self.path.is_dir():
            raise MaltError(f"database path is a folder: {self.path}")
        try:
            # The busy timeout lets several processes share the file (one per GPU): a writer
            # waits for another's short transaction instead of failing.
            conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=BUSY_TIMEOUT)
            conn.text_factory = decode_text
            self.db = Database(conn)
            self.db.execute("PRAGMA foreign_keys = ON")
            if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.db.enable_wal()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            if is_disk_full(exc):
                raise disk_full_error(exc, self.path) from None
            raise MaltError(f"{self.path} is not a malt database: {exc}") from exc

    @classmethod
    def read_only(cls, path: str | Path) -> Store:
        """The database opened read-only (SQLite `mode=ro`): no migration, no WAL switch, and
        every write through this connection fails, so a viewer can never change the data. WAL
        lets it read while `malt run` writes."""
        p = Path(path)
        if not p.is_file():
            raise MaltError(f"no database at {p} (run `malt run` first, or pass --db)")
        store = cls.__new__(cls)
        store.path = p
        try:
            conn = sqlite3.connect(
                p.resolve().as_uri() + "?mode=ro", uri=True, timeout=30, check_same_thread=False
            )
            conn.text_factory = decode_text
            store.db = Database(conn)
            tables = set(store.db.table_names())
        except sqlite3.DatabaseError as exc:
            raise MaltError(f"{p} is not a malt database: {exc}") from exc
        if not {"runs", "questions", "nodes"} <= tables:
            store.close()
            raise MaltError(f"{p} is not a malt database (no runs/questions/nodes tables)")
        return store

    def _migrate(self) -> None:
        """Bring an older database up to date; refuse one written by a newer malt.

        Migrations run under the write lock (BEGIN IMMEDIATE) and are looked up again once it is
        held, so processes started together on a new file create its tables once.
        """
        self._refuse_newer()
        if not migrations.pending(self.db):
            return
        with self.immediate():
            self._refuse_newer()
            migrations.apply(self.db)

    def _refuse_newer(self) -> None:
        known = known_names()
        unknown = [m.name for m in migrations.applied(self.db) if m.name not in known]
        if unknown:
            raise MaltError(
                f"{self.path} was written by a newer malt (schema {unknown[-1]}); "
                "upgrade malt to open it"
            )

    @contextlib.contextmanager
    def immediate(self) -> Iterator[Database]:
        """A transaction that holds the write lock from its first statement.

        For read-then-write steps (a claim, a checked insert): a deferred transaction could read,
        lose the race for the lock to another process, and fail instead of waiting.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.conn.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    # runs ---------------------------------------------------------------------------------

    def insert_run(self, row: dict) -> None:
        with self.db.atomic():
            self.db["runs"].insert(row)

    def set_run_layout(self, run_id: str, layout: dict) -> None:
        """Record the engine layout a run is continued under (its config's `layout`)."""
        with self.db.atomic():
            (row,) = self.db.query("SELECT config FROM runs WHERE id = ?", [run_id])
            config = {**json.loads(row["config"]), "layout": layout}
            self.db.execute(
                "UPDATE runs SET config = ? WHERE id = ?",
                [json.dumps(config, sort_keys=True), run_id],
            )

    def run(self, run_id: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM runs WHERE id = ?", [run_id]))
        return rows[0] if rows else None

    def runs(self) -> list[dict]:
        return list(self.db.query("SELECT * FROM runs ORDER BY created_at, id"))

    def latest_run(self) -> dict | None:
        rows = list(self.db.query("SELECT * FROM runs ORDER BY created_at DESC, id DESC LIMIT 1"))
        return rows[0] if rows else None

    # questions ----------------------------------------------------------------------------

    def insert_questions(self, questions: Iterable[Question]) -> None:
        """Record questions not stored yet; a stored one is kept (an id is the content)."""
        for q in questions:
            self.db.execute(
                "INSERT OR IGNORE INTO questions "
                "(id, task, question, ground_truth, options, source, metadata, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    q.id,
                    q.task,
                    q.text,
                    q.ground_truth,
                    json.dumps([list(o) for o in q.options]) if q.options else None,
                    q.source,
                    json.dumps(q.extra) if q.extra else None,
                    utcnow(),
                ],
            )

    def add_questions(self, run_id: str, questions: Iterable[Question]) -> None:
        """Record the questions and their place in the run; existing ones are kept as they are."""
        questions = list(questions)
        with self.db.atomic():
            self.insert_questions(questions)
            next_pos = self.db.execute(
                "SELECT COALESCE(MAX(position), -1) + 1 FROM run_questions WHERE run_id = ?",
                [run_id],
            ).fetchone()[0]
            for q in questions:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO run_questions (run_id, question_id, position) "
                    "VALUES (?, ?, ?)",
                    [run_id, q.id, next_pos],
                )
                next_pos += cur.rowcount

    def question(self, question_id: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM questions WHERE id = ?", [question_id]))
        return rows[0] if rows else None

    def find_question(self, prefix: str) -> list[dict]:
        return list(
            self.db.query("SELECT * FROM questions WHERE id LIKE ? ORDER BY id", [prefix + "%"])
        )

    def run_question_ids(self, run_id: str) -> list[str]:
        return [
            r["question_id"]
            for r in self.db.query(
                "SELECT question_id FROM run_questions WHERE run_id = ? ORDER BY position",
                [run_id],
            )
        ]

    # nodes --------------------------------------------------------------------------------

    def insert_node(self, node: NodeRecord) -> None:
        """One node, one transaction: committed before the next node is generated."""
        with self.db.atomic():
            self.db["nodes"].insert(asdict(node))

    def node(self, nid: str) -> NodeRecord | None:
        rows = list(self.db.query("SELECT * FROM nodes WHERE id = ?", [nid]))
        return NodeRecord(**rows[0]) if rows else None

    def nodes(self, run_id: str, question_id: str | None = None) -> Iterator[NodeRecord]:
        sql = "SELECT * FROM nodes WHERE run_id = ?"
        args: list = [run_id]
        if question_id is not None:
            sql += " AND question_id = ?"
            args.append(question_id)
        for row in self.db.query(sql + " ORDER BY question_id, depth, path", args):
            yield NodeRecord(**row)

    def judged_nodes(self, run_id: str, *, chunk: int) -> Iterator[JudgedNode]:
        """A run's nodes with their judgements, tree after tree, each depth first (by path),
        fetched `chunk` rows at a time, so memory does not grow with the run.

        Node ids are `run/question/path`, so the id range [run + "/", run + "0") is exactly the
        run's nodes ("0" sorts right after "/"), and walking it in the primary key's order yields
        tree after tree, each depth first, with no sort (a `run_id = ?` condition would lead
        SQLite to another index and a sort of the whole run).
        """
        cur = self.db.conn.execute(_JUDGED_NODES_SQL, [run_id + "/", run_id + "0"])
        names = [d[0] for d in cur.description]
        while batch := cur.fetchmany(chunk):
            for row in batch:
                yield JudgedNode(**dict(zip(names, row, strict=True)))

    def set_grade(
        self, nid: str, answer: str | None, correct: int | None, reward: float | None, reason: str
    ) -> None:
        """A node's grade, given after it was stored (a `SlowGrading` task's pool)."""
        with self.db.atomic():
            self.db.conn.execute(
                "UPDATE nodes SET answer = ?, correct = ?, reward = ?, value = ?, "
                "grade_reason = ? WHERE id = ?",
                (answer, correct, reward, reward, reason, nid),
            )

    def ungraded_nodes(self, run_id: str, question_ids: list[str]) -> list[NodeRecord]:
        """Nodes of these questions still waiting for a slow grader (`grade_reason` NULL)."""
        out: list[NodeRecord] = []
        for i in range(0, len(question_ids), 500):
            chunk = question_ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.query(
                f"SELECT * FROM nodes WHERE run_id = ? AND grade_reason IS NULL "
                f"AND question_id IN ({marks})",
                [run_id, *chunk],
            )
            out.extend(NodeRecord(**row) for row in rows)
        return out

    def set_credit(self, updates: Iterable[tuple[str, float, int]]) -> None:
        """Values and labels of one question's nodes, all in one transaction."""
        with self.db.atomic():
            self.db.conn.executemany(
                "UPDATE nodes SET value = ?, label = ? WHERE id = ?",
                [(value, label, nid) for nid, value, label in updates],
            )
