"""`malt export`: role datasets and LoRA-ready JSONL from the stored trees.

What is exported (MALT, Motwani et al., Algorithm 1 and §4.3):

- **Labels are recomputed** from the stored values with the export's θ (default: each run's own
  θ), so `--theta` relabels without touching the database. A generator or verifier node is
  positive when its value is strictly above θ, else negative; a refiner leaf is positive when
  its reward is 1 and negative when it is 0, whatever θ.
- **Only complete trees** are exported: all n + n² + n³ nodes stored, every value assigned
  (with `--task judge`: every leaf judged). Incomplete questions are skipped and counted.
- **SFT** (`ROLE.sft.jsonl`): one line per positive node, `{"messages": [...]}` = the exact
  messages the node was generated from, then its output as the assistant turn (TRL's
  conversational "messages" format, which mlx-lm's `chat` format and axolotl's `chat_template`
  type read too). With `--valid-fraction F`, `ROLE/train.jsonl` and `ROLE/valid.jsonl` as well,
  split by question (see `Splitter`), for `mlx_lm.lora --data export/ROLE`.
- **DPO** (`ROLE.dpo.jsonl`): TRL's conversational preference rows, `{"prompt": [messages],
  "chosen": [assistant], "rejected": [assistant]}`, from siblings only (same parent; the
  generators of one question are siblings). The pairing rule is `pairs_for_group`.
- **JSON** (`ROLE_training.json`): the seed implementation's format (Nimitkothari/MALT):
  `{"metadata": {...}, "examples": [...]}`, one example per positive, with `evaluation` from
  the LLM judge where the node was judged, else from the deterministic grader (and says so).
- **Provenance** (`provenance/<file>.jsonl`): line i names the node(s) behind line i of the
  data file, so training lines stay exactly in the trainers' schemas.
- **Manifest** (`manifest.json`): counts, θ, pairing and split rules, the source runs and their
  config, model sha256, prompt hashes, tool version, the licence notice the base model needs,
  and each file's line count and sha256.

How: one read transaction (a consistent snapshot), one cursor per run walking the nodes in
primary-key order (`run/question/path`: tree by tree, no sort), one tree in memory at a time,
every file written line by line. Memory does not grow with the database. Files are written
into a temporary folder and renamed into place only when all of them are complete, so a failed
export leaves nothing half-written. Nothing depends on the clock or on dict order, so exporting
the same data again gives byte-identical files, manifest included (its timestamp is the latest
`created_at` in the exported data).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from malt_local import __version__
from malt_local.db.store import Store
from malt_local.diskspace import disk_guard
from malt_local.errors import MaltError
from malt_local.hashing import sha256_file
from malt_local.models.catalog import licence_for_model_file
from malt_local.roles import ROLES, depth_of, nodes_per_role, tree_size
from malt_local.run import credit

FORMATS = ("sft", "dpo", "json")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# Rows fetched from SQLite at a time.
CHUNK = 512

PAIRING_RULE = (
    "pairs come only from siblings (children of one parent; the generators of one question "
    "are siblings), one positive (chosen) and one negative (rejected); a group whose nodes all "
    "have the same label gives none. Positives are ranked by value descending, negatives by "
    "value ascending (ties by path); all positive x negative combinations are listed by value "
    "margin (chosen - rejected) descending, then chosen rank, then rejected rank; "
    "max_pairs_per_group keeps the first K of that list (null: all)"
)
SPLIT_RULE = (
    "by question: a question is in valid when the first 8 bytes of sha256('malt-split:' + "
    "question_id), read as a fraction of 2^64, are below valid_fraction, so growing the data "
    "never moves a question between files and no question is in both. Per role, if that puts "
    "none of the exported questions with positives for the role (or every one) in valid, the "
    "one with the smallest (largest) fraction is moved, so both of the role's files get data, "
    "as mlx-lm requires (needs two such questions)"
)
TRAINING_NOTE = {
    "generator": "SFT only: the paper builds D_G but trains the generator with SFT (its DPO "
    "file is exported for experiments)",
    "verifier": "SFT, then DPO with the SFT adapter as reference (beta 0.2 in the paper)",
    "refiner": "SFT, then DPO with the SFT adapter as reference (beta 0.2 in the paper)",
}


# --------------------------------------------------------------------------- records


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


@dataclass(frozen=True)
class ExportNode:
    """One node as export reads it, with its judgement (if judged)."""

    id: str
    question_id: str
    parent_id: str | None
    role: str
    depth: int
    path: str
    messages: str
    output: str
    finish_reason: str
    answer: str | None
    correct: int | None
    reward: float | None
    value: float | None
    created_at: str
    correctness_score: float | None = None
    reasoning_score: float | None = None
    explanation: str | None = None
    key_matches: str | None = None
    judge_valid: int | None = None
    judged_at: str | None = None

    @property
    def judged(self) -> bool:
        return self.judge_valid is not None

    @property
    def group(self) -> str:
        """The sibling group: the parent node, or the question for generators."""
        return self.parent_id or self.question_id


_NODE_SQL = """
    SELECT n.id, n.question_id, n.parent_id, n.role, n.depth, n.path, n.messages, n.output,
           n.finish_reason, n.answer, n.correct, n.reward, n.value, n.created_at,
           j.correctness_score, j.reasoning_score, j.explanation, j.key_matches, j.valid,
           j.created_at
    FROM nodes n LEFT JOIN judgements j ON j.node_id = n.id
    WHERE n.id > ? AND n.id < ?
    ORDER BY n.id"""


@dataclass
class Tree:
    """One question's tree in one run, nodes in id order (depth first, by path)."""

    run: RunInfo
    question: QuestionInfo
    nodes: list[ExportNode]
    _by_id: dict[str, ExportNode] = field(default_factory=dict, repr=False)

    def complete(self) -> bool:
        n = self.run.n
        counts = [0, 0, 0]
        for node in self.nodes:
            counts[node.depth - 1] += 1
            if node.value is None or (node.depth == 3 and node.reward is None):
                return False
        return counts == [nodes_per_role(n, r) for r in ROLES]

    def role_nodes(self, role: str) -> list[ExportNode]:
        depth = depth_of(role)
        return [node for node in self.nodes if node.depth == depth]

    def node(self, node_id: str) -> ExportNode | None:
        if not self._by_id:
            self._by_id = {node.id: node for node in self.nodes}
        return self._by_id.get(node_id)


# --------------------------------------------------------------------------- pure rules


def is_positive(node: ExportNode, theta: float) -> bool:
    """Refiner leaves: reward 1. Generators and verifiers: value strictly above θ."""
    if node.depth == 3:
        return node.reward == 1.0
    assert node.value is not None
    return credit.label_for(node.value, theta)


def chat(node: ExportNode) -> list[dict[str, str]]:
    """The exact messages the node was generated from."""
    return json.loads(node.messages)


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def sft_record(node: ExportNode) -> dict:
    return {"messages": [*chat(node), assistant(node.output)]}


def dpo_record(chosen: ExportNode, rejected: ExportNode) -> dict:
    return {
        "prompt": chat(chosen),
        "chosen": [assistant(chosen.output)],
        "rejected": [assistant(rejected.output)],
    }


def _score(node: ExportNode) -> float:
    value = node.reward if node.depth == 3 else node.value
    assert value is not None
    return float(value)


def pairs_for_group(
    siblings: list[ExportNode], theta: float, max_pairs: int | None = None
) -> list[tuple[ExportNode, ExportNode]]:
    """(chosen, rejected) pairs of one sibling group; the rule is `PAIRING_RULE`."""
    labelled = [(s, is_positive(s, theta)) for s in siblings]
    pos = sorted((s for s, good in labelled if good), key=lambda s: (-_score(s), s.path))
    neg = sorted((s for s, good in labelled if not good), key=lambda s: (_score(s), s.path))
    # Margins rounded so that equal margins tie exactly (2/3 - 1/3 against 1/3 - 0).
    ranked = [
        (round(_score(p) - _score(r), 9), i, j)
        for i, p in enumerate(pos)
        for j, r in enumerate(neg)
    ]
    ranked.sort(key=lambda t: (-t[0], t[1], t[2]))
    if max_pairs is not None:
        ranked = ranked[:max_pairs]
    return [(pos[i], neg[j]) for _, i, j in ranked]


def tree_pairs(
    tree: Tree, role: str, max_pairs: int | None = None
) -> list[tuple[ExportNode, ExportNode]]:
    """The (chosen, rejected) pairs of `role` that a DPO export writes for one complete tree,
    in file order; `malt view` shows these, so the page and the file cannot disagree."""
    return [
        pair
        for group in sibling_groups(tree.role_nodes(role))
        for pair in pairs_for_group(group, tree.run.theta, max_pairs)
    ]


def sibling_groups(nodes: list[ExportNode]) -> list[list[ExportNode]]:
    """Nodes of one role grouped by parent, groups in parent order (nodes are in path order)."""
    groups: dict[str, list[ExportNode]] = {}
    for node in nodes:
        groups.setdefault(node.group, []).append(node)
    return list(groups.values())


def evaluation(node: ExportNode, question: QuestionInfo, task: str) -> dict:
    """The seed's `evaluation` object: the judge's verdict, or what the grader can say."""
    if node.judged:
        return {
            "correctness_score": node.correctness_score,
            "reasoning_score": node.reasoning_score,
            "explanation": [node.explanation or ""],
            "key_matches": json.loads(node.key_matches) if node.key_matches else [],
        }
    if node.correct is not None:
        truth = question.ground_truth
        if node.answer is None:
            said = f"states no final answer the {task} grader can read"
        elif node.correct:
            said = f"states {node.answer!r}, which the {task} grader finds equal to {truth!r}"
        else:
            said = f"states {node.answer!r}, which the {task} grader finds different from {truth!r}"
        return {
            "correctness_score": float(node.correct),
            "reasoning_score": None,
            "explanation": [
                f"No LLM judge: deterministic grader. The output {said}.",
                "reasoning_score needs the LLM judge (malt run --judge).",
            ],
            "key_matches": [node.answer] if node.correct and node.answer is not None else [],
        }
    return {
        "correctness_score": None,
        "reasoning_score": None,
        "explanation": [
            "Not graded on its own: no LLM judge verdict and no final answer stated; its score "
            "is the mean reward of the refiner leaves below it."
        ],
        "key_matches": [],
    }


def json_example(node: ExportNode, tree: Tree) -> dict:
    """One example of `ROLE_training.json`, with the seed's fields (and node_id, ground_truth)."""
    q = tree.question
    out: dict[str, Any] = {"question": q.text}
    if node.depth == 1:
        out["solution"] = node.output
    else:
        generator = tree.node(node.id.rsplit("/", 1)[0] + "/" + node.path.split(".")[0])
        assert generator is not None
        if node.depth == 2:
            out["solution"] = generator.output
            out["feedback"] = node.output
        else:
            verifier = tree.node(node.parent_id or "")
            assert verifier is not None
            out["original_solution"] = generator.output
            out["feedback"] = verifier.output
            out["refined_solution"] = node.output
    out["ground_truth"] = q.ground_truth
    out["score"] = _score(node)
    out["evaluation"] = evaluation(node, q, tree.run.task or q.task)
    out["node_id"] = node.id
    return out


def _fraction(question_id: str) -> float:
    digest = hashlib.sha256(("malt-split:" + question_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class Splitter:
    """Train/valid by question; the rule is `SPLIT_RULE`.

    The base rule is the same for every role; only the anchors (a question moved so that a
    role's train and valid files both get data) are per role, since a question can have
    positives for one role and none for another.
    """

    fraction: float
    force_valid: dict[str, str] = field(default_factory=dict)  # role -> question id
    force_train: dict[str, str] = field(default_factory=dict)

    def split(self, question_id: str, role: str) -> str:
        if question_id == self.force_train.get(role):
            return "train"
        if question_id == self.force_valid.get(role) or _fraction(question_id) < self.fraction:
            return "valid"
        return "train"

    @classmethod
    def anchored(
        cls,
        fraction: float,
        questions: Iterator[tuple[str, dict[str, bool]]],
        roles: tuple[str, ...],
    ) -> Splitter:
        """Anchor over (question id, {role: has positives}) of the exported trees, holding
        two ids per role rather than all of them."""
        lo: dict[str, tuple[float, str]] = {}
        hi: dict[str, tuple[float, str]] = {}
        any_valid: set[str] = set()
        any_train: set[str] = set()
        for qid, has in questions:
            f = _fraction(qid)
            for role in roles:
                if not has.get(role):
                    continue
                (any_valid if f < fraction else any_train).add(role)
                lo[role] = min(lo.get(role, (f, qid)), (f, qid))
                hi[role] = max(hi.get(role, (f, qid)), (f, qid))
        splitter = cls(fraction)
        for role in roles:
            if role not in lo or lo[role][1] == hi[role][1]:
                continue  # fewer than two questions: nothing to balance
            if role not in any_valid:
                splitter.force_valid[role] = lo[role][1]
            if role not in any_train:
                splitter.force_train[role] = hi[role][1]
        return splitter


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ExportOptions:
    roles: tuple[str, ...] = ROLES
    formats: tuple[str, ...] = FORMATS
    theta: float | None = None
    run_ids: tuple[str, ...] = ()
    valid_fraction: float | None = None
    max_pairs_per_group: int | None = None

    def validate(self) -> None:
        for role in self.roles:
            if role not in ROLES:
                raise MaltError(f"unknown role '{role}': choose {', '.join(ROLES)} or all")
        for fmt in self.formats:
            if fmt not in FORMATS:
                raise MaltError(f"unknown format '{fmt}': choose {', '.join(FORMATS)} or all")
        if not self.roles or not self.formats:
            raise MaltError("nothing to export: no role or no format chosen")
        if self.theta is not None and not 0 <= self.theta <= 1:
            raise MaltError(f"--theta must be in [0, 1] (got {self.theta})")
        if self.valid_fraction is not None:
            if not 0 < self.valid_fraction < 1:
                raise MaltError(f"--valid-fraction must be in (0, 1) (got {self.valid_fraction})")
            if "sft" not in self.formats:
                raise MaltError("--valid-fraction splits the SFT data: use it with --format sft")
        if self.max_pairs_per_group is not None and self.max_pairs_per_group < 1:
            raise MaltError(
                f"--max-pairs-per-group must be at least 1 (got {self.max_pairs_per_group})"
            )


def parse_choice(value: str, choices: tuple[str, ...], what: str) -> tuple[str, ...]:
    """`all` or one of `choices` (case-insensitive) as a tuple."""
    v = value.strip().lower()
    if v == "all":
        return choices
    if v not in choices:
        raise MaltError(f"unknown {what} '{value}': choose {', '.join(choices)} or all")
    return (v,)


# --------------------------------------------------------------------------- writing


class _Writer:
    """A file written line by line, counting lines and hashing what it writes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh: IO[str] = path.open("w", encoding="utf-8", newline="\n")
        self.lines = 0

    def write_line(self, obj: Any) -> None:
        self._fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.lines += 1

    def write_raw(self, text: str) -> None:
        self._fh.write(text)

    def close(self) -> None:
        self._fh.close()


def _indented(obj: Any, prefix: str) -> str:
    text = json.dumps(obj, ensure_ascii=False, indent=2)
    return "\n".join(prefix + line for line in text.splitlines())


class _JsonDataset:
    """`ROLE_training.json`, streamed: examples go to a body file, then the whole file is
    assembled with `total_examples` known. The bytes equal `json.dumps(whole, indent=2)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.body = _Writer(path.with_name(path.name + ".body"))

    def add(self, example: dict) -> None:
        self.body.write_raw(("," if self.body.lines else "") + "\n" + _indented(example, "    "))
        self.body.lines += 1

    def finish(self, metadata: dict) -> int:
        self.body.close()
        count = self.body.lines
        metadata = {**metadata, "total_examples": count}
        with self.path.open("w", encoding="utf-8", newline="\n") as out:
            out.write('{\n  "metadata": ' + _indented(metadata, "  ").lstrip() + ",\n")
            if count == 0:
                out.write('  "examples": []\n}\n')
            else:
                out.write('  "examples": [')
                with self.body.path.open(encoding="utf-8") as body:
                    shutil.copyfileobj(body, out)
                out.write("\n  ]\n}\n")
        self.body.path.unlink()
        return count


@dataclass
class _RoleFiles:
    sft: _Writer | None = None
    sft_prov: _Writer | None = None
    dpo: _Writer | None = None
    dpo_prov: _Writer | None = None
    seed_json: _JsonDataset | None = None
    split: dict[str, tuple[_Writer, _Writer]] = field(default_factory=dict)

    def writers(self) -> list[_Writer]:
        out = [w for w in (self.sft, self.sft_prov, self.dpo, self.dpo_prov) if w is not None]
        for pair in self.split.values():
            out.extend(pair)
        return out


def file_names(role: str, formats: tuple[str, ...], split: bool) -> dict[str, str]:
    """Every file an export of `role` writes, by purpose, relative to the output folder."""
    names: dict[str, str] = {}
    if "sft" in formats:
        names["sft"] = f"{role}.sft.jsonl"
        names["sft_prov"] = f"provenance/{role}.sft.jsonl"
        if split:
            for part in ("train", "valid"):
                names[part] = f"{role}/{part}.jsonl"
                names[part + "_prov"] = f"provenance/{role}.{part}.jsonl"
    if "dpo" in formats:
        names["dpo"] = f"{role}.dpo.jsonl"
        names["dpo_prov"] = f"provenance/{role}.dpo.jsonl"
    if "json" in formats:
        names["json"] = f"{role}_training.json"
    return names


# --------------------------------------------------------------------------- reading


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


def _question(store: Store, question_id: str) -> QuestionInfo:
    row = store.db.execute(
        "SELECT id, question, ground_truth, task FROM questions WHERE id = ?", [question_id]
    ).fetchone()
    return QuestionInfo(*row)


def iter_trees(store: Store, run: RunInfo, chunk: int = CHUNK) -> Iterator[Tree]:
    """A run's trees one at a time, read `chunk` rows at a time (complete or not).

    Node ids are `run/question/path`, so the id range [run + "/", run + "0") is exactly the
    run's nodes ("0" sorts right after "/"), and walking it in the primary key's order yields
    tree after tree, each depth first, with no sort (a `run_id = ?` condition would lead
    SQLite to another index and a sort of the whole run).
    """
    cur = store.db.conn.execute(_NODE_SQL, [run.id + "/", run.id + "0"])
    nodes: list[ExportNode] = []
    while batch := cur.fetchmany(chunk):
        for row in batch:
            node = ExportNode(*row)
            if nodes and node.question_id != nodes[0].question_id:
                yield Tree(run, _question(store, nodes[0].question_id), nodes)
                nodes = []
            nodes.append(node)
    if nodes:
        yield Tree(run, _question(store, nodes[0].question_id), nodes)


def _complete_questions(store: Store, run: RunInfo) -> Iterator[tuple[str, dict[str, bool]]]:
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


# --------------------------------------------------------------------------- export


@dataclass
class _Stats:
    complete: int = 0
    incomplete: int = 0
    latest: str = ""


def export(db_path: Path, out: Path, options: ExportOptions) -> dict:
    """Write the datasets of `options` for the database at `db_path` into folder `out`.

    Returns the manifest. Every error a user can cause is raised (MaltError) before a file is
    written; if anything fails later, the temporary folder is removed and `out` is untouched.
    """
    options.validate()
    if out.exists() and not out.is_dir():
        raise MaltError(f"output folder {out} is a file")
    if not db_path.exists():
        raise MaltError(f"no database at {db_path} (run `malt run` first, or pass --db)")
    store = Store(db_path, create=False)
    try:
        store.db.execute("BEGIN")  # one snapshot for the whole export
        try:
            runs = source_runs(store, options)
            splitter = None
            if options.valid_fraction is not None:
                splitter = Splitter.anchored(
                    options.valid_fraction,
                    (q for run in runs for q in _complete_questions(store, run)),
                    options.roles,
                )
            tmp = _temp_folder(out)
            try:
                with disk_guard(out):
                    manifest = _write_all(store, runs, options, splitter, tmp)
                    _publish(tmp, out, manifest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            store.db.execute("ROLLBACK")
    finally:
        store.close()
    return manifest


def _temp_folder(out: Path) -> Path:
    if out.is_dir():
        return Path(tempfile.mkdtemp(prefix=".malt-export.", dir=out))
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.malt-export.", dir=out.parent))


def _write_all(
    store: Store,
    runs: list[RunInfo],
    options: ExportOptions,
    splitter: Splitter | None,
    tmp: Path,
) -> dict:
    names = {r: file_names(r, options.formats, splitter is not None) for r in options.roles}
    files: dict[str, _RoleFiles] = {}
    for role, nm in names.items():
        rf = _RoleFiles()
        if "sft" in nm:
            rf.sft, rf.sft_prov = _Writer(tmp / nm["sft"]), _Writer(tmp / nm["sft_prov"])
            if splitter is not None:
                for part in ("train", "valid"):
                    rf.split[part] = (_Writer(tmp / nm[part]), _Writer(tmp / nm[part + "_prov"]))
        if "dpo" in nm:
            rf.dpo, rf.dpo_prov = _Writer(tmp / nm["dpo"]), _Writer(tmp / nm["dpo_prov"])
        if "json" in nm:
            rf.seed_json = _JsonDataset(tmp / nm["json"])
        files[role] = rf
    stats = _Stats()
    per_run: dict[str, dict[str, int]] = {}
    judged_runs: set[str] = set()
    try:
        for run in runs:
            counts = per_run.setdefault(run.id, {"complete": 0, "incomplete": 0})
            for tree in iter_trees(store, run):
                if not tree.complete():
                    counts["incomplete"] += 1
                    continue
                counts["complete"] += 1
                for node in tree.nodes:
                    stats.latest = max(stats.latest, node.created_at, node.judged_at or "")
                    if node.judged:
                        judged_runs.add(run.id)
                for role in options.roles:
                    part = splitter.split(tree.question.id, role) if splitter else None
                    _write_tree(tree, role, files[role], options, part)
            started = store.db.execute(
                "SELECT COUNT(DISTINCT question_id) FROM nodes WHERE run_id = ?", [run.id]
            ).fetchone()[0]
            listed = store.db.execute(
                "SELECT COUNT(*) FROM run_questions WHERE run_id = ? AND question_id NOT IN "
                "(SELECT DISTINCT question_id FROM nodes WHERE run_id = ?)",
                [run.id, run.id],
            ).fetchone()[0]
            assert started == counts["complete"] + counts["incomplete"]
            counts["incomplete"] += listed  # questions of the run with no node yet
            stats.complete += counts["complete"]
            stats.incomplete += counts["incomplete"]
    finally:
        for rf in files.values():
            for w in rf.writers():
                w.close()
    if stats.complete == 0:
        raise MaltError(
            f"nothing to export: no complete trees in {store.path} ({stats.incomplete} "
            "questions incomplete; `malt run` finishes them)"
        )
    models = _models(runs)
    counts: dict[str, dict[str, int]] = {}
    for role, rf in files.items():
        c: dict[str, int] = {}
        if rf.sft:
            c["sft"] = rf.sft.lines
            for part, (w, _) in rf.split.items():
                c[part] = w.lines
        if rf.dpo:
            c["dpo"] = rf.dpo.lines
        if rf.seed_json:
            meta = _json_metadata(role, runs, models, stats, options, judged_runs)
            c["json"] = rf.seed_json.finish(meta)
        counts[role] = c
    manifest = _manifest(runs, options, splitter, stats, per_run, models, counts, names, tmp)
    return manifest


def _write_tree(
    tree: Tree, role: str, rf: _RoleFiles, options: ExportOptions, part: str | None
) -> None:
    theta = tree.run.theta
    role_nodes = tree.role_nodes(role)
    for node in role_nodes:
        if not is_positive(node, theta):
            continue
        prov = _node_provenance(tree, node)
        if rf.sft and rf.sft_prov:
            record = sft_record(node)
            rf.sft.write_line(record)
            rf.sft_prov.write_line(prov)
            if part:
                data, prov_w = rf.split[part]
                data.write_line(record)
                prov_w.write_line(prov)
        if rf.seed_json:
            rf.seed_json.add(json_example(node, tree))
    if rf.dpo and rf.dpo_prov:
        for chosen, rejected in tree_pairs(tree, role, options.max_pairs_per_group):
            rf.dpo.write_line(dpo_record(chosen, rejected))
            rf.dpo_prov.write_line(
                {
                    "run_id": tree.run.id,
                    "question_id": tree.question.id,
                    "parent_id": chosen.parent_id,
                    "chosen_id": chosen.id,
                    "rejected_id": rejected.id,
                    "chosen_score": _score(chosen),
                    "rejected_score": _score(rejected),
                }
            )


def _node_provenance(tree: Tree, node: ExportNode) -> dict:
    return {
        "node_id": node.id,
        "run_id": tree.run.id,
        "question_id": tree.question.id,
        "parent_id": node.parent_id,
        "path": node.path,
        "score": _score(node),
        "finish_reason": node.finish_reason,
    }


def _models(runs: list[RunInfo]) -> list[dict]:
    seen: dict[tuple[str, str | None], dict] = {}
    for run in runs:
        key = (Path(run.model).name, run.model_sha256)
        if key not in seen:
            alias, notice = licence_for_model_file(run.model, run.model_sha256)
            seen[key] = {
                "file": key[0],
                "sha256": run.model_sha256,
                "alias": alias,
                "licence_notice": notice,
            }
    return list(seen.values())


def _json_metadata(
    role: str,
    runs: list[RunInfo],
    models: list[dict],
    stats: _Stats,
    options: ExportOptions,
    judged_runs: set[str],
) -> dict:
    """The seed's metadata (timestamp, model, total_examples), then malt's own fields."""
    return {
        "timestamp": stats.latest,
        "model": ", ".join(m["file"] for m in models),
        "total_examples": None,  # known once the examples are written
        "role": role,
        "theta": _theta(runs),
        "positives": "refiner: reward 1" if role == "refiner" else "value > theta",
        "evaluation": (
            "LLM judge where judged (malt run --judge), else the deterministic grader"
            if judged_runs
            else "deterministic grader (no LLM judge in these runs)"
        ),
        "source_runs": [r.id for r in runs],
        "tool": f"malt {__version__}",
    }


def _theta(runs: list[RunInfo]) -> float | None:
    """The θ the export labelled with; None when the runs differ (each source names its own)."""
    thetas = {r.theta for r in runs}
    return thetas.pop() if len(thetas) == 1 else None


def _manifest(
    runs: list[RunInfo],
    options: ExportOptions,
    splitter: Splitter | None,
    stats: _Stats,
    per_run: dict[str, dict[str, int]],
    models: list[dict],
    counts: dict[str, dict[str, int]],
    names: dict[str, dict[str, str]],
    tmp: Path,
) -> dict:
    files = {}
    for role in options.roles:
        for name in names[role].values():
            path = tmp / name
            with path.open("rb") as fh:
                lines = sum(1 for _ in fh)
            files[name] = {"lines": lines, "sha256": sha256_file(path)}
    notices = sorted({m["licence_notice"] for m in models if m["licence_notice"]})
    return {
        "tool": "malt",
        "tool_version": __version__,
        "manifest_version": MANIFEST_VERSION,
        "timestamp": stats.latest,
        "theta": _theta(runs),
        "theta_source": "--theta" if options.theta is not None else "each run's theta",
        "roles": list(options.roles),
        "formats": list(options.formats),
        "counts": counts,
        "questions": {"exported": stats.complete, "incomplete_skipped": stats.incomplete},
        "positives": {
            "generator": "value > theta",
            "verifier": "value > theta",
            "refiner": "reward == 1",
        },
        "pairing": {"rule": PAIRING_RULE, "max_pairs_per_group": options.max_pairs_per_group},
        "split": (
            {
                "valid_fraction": options.valid_fraction,
                "rule": SPLIT_RULE,
                "moved_to_valid": dict(sorted(splitter.force_valid.items())),
                "moved_to_train": dict(sorted(splitter.force_train.items())),
            }
            if splitter
            else None
        ),
        "training": {role: TRAINING_NOTE[role] for role in options.roles},
        "licence_notices": notices,
        "models": models,
        "sources": [
            {
                "run_id": r.id,
                "created_at": r.row["created_at"],
                "theta": r.theta,
                "run_theta": r.row["theta"],
                "n": r.n,
                "task": r.task,
                "model": Path(r.model).name,
                "model_sha256": r.model_sha256,
                "prompts_sha256": r.row["prompts_sha256"],
                "prompt_hashes": json.loads(r.row["prompt_hashes"]),
                "tool_version": r.row["tool_version"],
                "questions_exported": per_run[r.id]["complete"],
                "questions_incomplete": per_run[r.id]["incomplete"],
                "config": json.loads(r.row["config"]),
            }
            for r in runs
        ],
        "files": files,
    }


def _publish(tmp: Path, out: Path, manifest: dict) -> None:
    """Move the finished files into `out`: one rename when `out` is new, else file by file
    with the manifest last; files a previous export listed and this one did not are removed."""
    (tmp / MANIFEST).write_text(
        json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    if not out.exists():
        os.rename(tmp, out)
        return
    old = _old_files(out)
    for name in manifest["files"]:
        dest = out / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, dest)
    os.replace(tmp / MANIFEST, out / MANIFEST)
    for name in sorted(old - set(manifest["files"])):
        with contextlib.suppress(OSError):
            (out / name).unlink()
            parent = (out / name).parent
            while parent != out and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    shutil.rmtree(tmp, ignore_errors=True)


def _old_files(out: Path) -> set[str]:
    """The files the manifest already in `out` lists (safe relative names only)."""
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        names = data.get("files", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return set()
    safe = set()
    for name in names if isinstance(names, dict) else ():
        p = Path(name)
        if isinstance(name, str) and not p.is_absolute() and ".." not in p.parts:
            safe.add(name)
    return safe
