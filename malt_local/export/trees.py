"""The stored trees as export reads them: the source runs, and each question's tree in a run.

- **Only complete trees** are exported: all n + n² + n³ nodes stored, every value assigned
  (with `--task judge`: every leaf judged). Incomplete questions are skipped and counted.

How: one cursor per run walks the nodes in primary-key order (`run/question/path`: tree by
tree, no sort; `Store.judged_nodes`), and one tree is in memory at a time, so memory does not
grow with the database. The split's pre-pass (`complete_questions`) asks SQL which trees are
complete without reading any node text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from malt_local.db.store import JudgedNode, Store
from malt_local.errors import MaltError
from malt_local.export.options import ExportOptions
from malt_local.roles import ROLES, depth_of, nodes_per_role, tree_size

# Rows fetched from SQLite at a time.
CHUNK = 512


@dataclass(frozen=True)
class RunInfo:
    """What export needs of one source run."""

    id: str
    n: int
    theta: float  # the θ this export labels with (the run's own unless --theta)
    task: str | None
    model: str
    model_sha256: str | None
    row: dict = field(compare=False, repr=False)


@dataclass(frozen=True)
class QuestionInfo:
    id: str
    text: str
    ground_truth: str
    task: str


@dataclass
class Tree:
    """One question's tree in one run, nodes in id order (depth first, by path)."""

    run: RunInfo
    question: QuestionInfo
    nodes: list[JudgedNode]
    _by_id: dict[str, JudgedNode] = field(default_factory=dict, repr=False)

    def complete(self) -> bool:
        n = self.run.n
        counts = [0, 0, 0]
        for node in self.nodes:
            counts[node.depth - 1] += 1
            if node.value is None or (node.depth == 3 and node.reward is None):
                return False
        return counts == [nodes_per_role(n, r) for r in ROLES]

    def role_nodes(self, role: str) -> list[JudgedNode]:
        depth = depth_of(role)
        return [node for node in self.nodes if node.depth == depth]

    def node(self, node_id: str) -> JudgedNode | None:
        if not self._by_id:
            self._by_id = {node.id: node for node in self.nodes}
        return self._by_id.get(node_id)


def source_runs(store: Store, options: ExportOptions) -> list[RunInfo]:
    """The runs an export reads, each with the θ it labels with."""
    rows = store.runs()
    if not rows:
        raise MaltError(f"nothing to export: {store.path} has no runs (run `malt run` first)")
    if options.run_ids:
        known = {r["id"]: r for r in rows}
        for rid in options.run_ids:
            if rid not in known:
                raise MaltError(
                    f"no run '{rid}' in {store.path} (runs: {', '.join(sorted(known))})"
                )
        wanted = set(options.run_ids)
        rows = [r for r in rows if r["id"] in wanted]
    return [
        RunInfo(
            id=r["id"],
            n=r["n"],
            theta=r["theta"] if options.theta is None else options.theta,
            task=r["task"],
            model=r["model"],
            model_sha256=r["model_sha256"],
            row=r,
        )
        for r in rows
    ]


def iter_trees(store: Store, run: RunInfo, chunk: int = CHUNK) -> Iterator[Tree]:
    """A run's trees one at a time, read `chunk` rows at a time (complete or not), in the
    order `Store.judged_nodes` walks them."""
    nodes: list[JudgedNode] = []
    for node in store.judged_nodes(run.id, chunk=chunk):
        if nodes and node.question_id != nodes[0].question_id:
            yield Tree(run, _question(store, nodes[0].question_id), nodes)
            nodes = []
        nodes.append(node)
    if nodes:
        yield Tree(run, _question(store, nodes[0].question_id), nodes)


def _question(store: Store, question_id: str) -> QuestionInfo:
    row = store.question(question_id)
    assert row is not None
    return QuestionInfo(row["id"], row["question"], row["ground_truth"], row["task"])


def complete_questions(store: Store, run: RunInfo) -> Iterator[tuple[str, dict[str, bool]]]:
    """The run's complete trees and which roles have positives in each, by SQL (the split's
    pre-pass: no node text is read, rows stream from the (run_id, question_id) index)."""
    n = run.n
    for qid, g, v, r in store.db.conn.execute(
        """SELECT question_id, SUM(depth = 1 AND value > ?) > 0,
                  SUM(depth = 2 AND value > ?) > 0, SUM(depth = 3 AND reward = 1) > 0
           FROM nodes WHERE run_id = ? GROUP BY question_id
           HAVING COUNT(*) = ? AND SUM(depth = 1) = ? AND SUM(depth = 2) = ?
                  AND SUM(depth = 3) = ? AND SUM(value IS NULL) = 0
                  AND SUM(depth = 3 AND reward IS NULL) = 0""",
        [run.theta, run.theta, run.id, tree_size(n), *(nodes_per_role(n, r) for r in ROLES)],
    ):
        yield qid, {"generator": bool(g), "verifier": bool(v), "refiner": bool(r)}
