"""`malt export`: golden trees with known rewards, a real run's database, the trainers' loaders,
streaming, byte-identical re-export, and every way a user can get it wrong."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import tracemalloc
from collections import defaultdict
from dataclasses import fields as dataclass_fields
from pathlib import Path

import pytest
from click.testing import CliRunner

from malt_local.cli import cli
from malt_local.db.store import JudgedNode, NodeRecord, Store
from malt_local.engines.llama.chat import ChatTemplate
from malt_local.errors import MaltError
from malt_local.export import pairing, pipeline, writer
from malt_local.export.options import ExportOptions, parse_choice
from malt_local.prompts import PromptSet
from malt_local.questions.loading import Question
from malt_local.roles import ROLES
from malt_local.run import credit
from malt_local.run.settings import Run, RunSpec
from malt_local.run.tree import TreeRunner
from tests.fakes import FakeEngine

# --------------------------------------------------------------------------- golden trees

# Question A, n = 3: which refiner leaves answer right (reward 1). By hand:
#   verifiers 0.0 = 1, 0.1 = 2/3, 0.2 = 0 -> generator 0 = 5/9 (positive at θ 0.5)
#   verifiers 1.0 = 1/3, 1.1 = 0, 1.2 = 2/3 -> generator 1 = 1/3
#   verifiers 2.x = 0 -> generator 2 = 0
GOLD_A = {"0.0.0", "0.0.1", "0.0.2", "0.1.0", "0.1.1", "1.0.0", "1.2.0", "1.2.1"}
Q_A = Question("Golden question A: how many?", "18", "gsm8k")
# Question B is left incomplete (a leaf is deleted): it must be skipped and counted.
Q_B = Question("Golden question B: how many more?", "18", "gsm8k")


def make_run(store: Store, run_id: str, n: int, theta: float = 0.5, task: str | None = None):
    spec = RunSpec(
        model="/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        model_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        n=n, temperature=0.3, top_p=1.0, top_k=0, max_tokens=16, seed=7, theta=theta,
        task=task, prompts_sha256="p" * 64, prompt_hashes={"generator.j2": "h" * 64},
    )  # fmt: skip
    store.insert_run(spec.row(run_id))
    return store.run(run_id)


def scripted(correct: dict[str, set[str]]):
    """Leaves answer 18 (right) where `correct[question_id]` lists their path, else 7; every
    text names its path, so no two siblings say the same thing (the export writes that once)."""

    def script(request, key, seed):
        _, qid, path = key.split("/")
        depth = path.count(".") + 1
        if depth == 3:
            right = path in correct.get(qid, ())
            return f"Refined {path}. Final Answer: 18" if right else f"Leaf {path}. Final Answer: 7"
        if depth == 2:
            return "A critique without numbers: " + path.replace(".", " and ").translate(
                str.maketrans("0123456789", "abcdefghij")
            )
        return f"Solution {path}. Final Answer: " + ("18" if path == "0" else "5")

    return script


def build(
    db: Path,
    questions: list[Question],
    correct: dict[str, set[str]],
    *,
    n: int = 3,
    run_id: str = "rgold",
    theta: float = 0.5,
) -> Store:
    store = Store(db)
    run = make_run(store, run_id, n, theta)
    store.add_questions(run_id, questions)
    TreeRunner(
        store, Run.from_row(run), questions, FakeEngine(scripted(correct)), PromptSet()
    ).execute()
    return store


@pytest.fixture
def golden(tmp_path) -> Path:
    db = tmp_path / "gold.db"
    store = build(db, [Q_A, Q_B], {Q_A.id: GOLD_A, Q_B.id: {"0.0.0"}})
    store.db.execute("DELETE FROM nodes WHERE id = ?", [f"rgold/{Q_B.id}/2.2.2"])
    store.close()
    return db


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def paths(out: Path, role: str, fmt: str = "sft") -> list[str]:
    prov = read_jsonl(out / f"provenance/{role}.{fmt}.jsonl")
    return [p["node_id"].rsplit("/", 1)[1] for p in prov]


def pair_paths(out: Path, role: str) -> list[tuple[str, str]]:
    return [
        (p["chosen_id"].rsplit("/", 1)[1], p["rejected_id"].rsplit("/", 1)[1])
        for p in read_jsonl(out / f"provenance/{role}.dpo.jsonl")
    ]


def db_nodes(db: Path) -> dict[str, dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM nodes")}
    finally:
        conn.close()


def export(db: Path, out: Path, **kw) -> dict:
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return pipeline.export(db, out, ExportOptions(**kw))


GOLD_SFT = {
    "generator": ["0"],
    "verifier": ["0.0", "0.1", "1.2"],
    "refiner": sorted(GOLD_A),
}
GOLD_DPO = {
    # Largest value margin first: g0 (5/9) vs g2 (0), then vs g1 (1/3).
    "generator": [("0", "2"), ("0", "1")],
    "verifier": [("0.0", "0.2"), ("0.1", "0.2"), ("1.2", "1.1"), ("1.2", "1.0")],
    "refiner": [
        ("0.1.0", "0.1.2"), ("0.1.1", "0.1.2"),
        ("1.0.0", "1.0.1"), ("1.0.0", "1.0.2"),
        ("1.2.0", "1.2.2"), ("1.2.1", "1.2.2"),
    ],
}  # fmt: skip


def test_golden_sft_and_dpo_sets_for_every_role(golden, tmp_path):
    out = tmp_path / "out"
    manifest = export(golden, out)
    nodes = db_nodes(golden)
    for role in ROLES:
        assert paths(out, role) == GOLD_SFT[role], role
        assert pair_paths(out, role) == GOLD_DPO[role], role
        # Every line is exactly the node's prompt + its output, in TRL's conversational form.
        for line, prov in zip(
            read_jsonl(out / f"{role}.sft.jsonl"),
            read_jsonl(out / f"provenance/{role}.sft.jsonl"),
            strict=True,
        ):
            node = nodes[prov["node_id"]]
            assert line == {
                "messages": json.loads(node["messages"])
                + [{"role": "assistant", "content": node["output"]}]
            }
        for line, prov in zip(
            read_jsonl(out / f"{role}.dpo.jsonl"),
            read_jsonl(out / f"provenance/{role}.dpo.jsonl"),
            strict=True,
        ):
            chosen, rejected = nodes[prov["chosen_id"]], nodes[prov["rejected_id"]]
            assert chosen["messages"] == rejected["messages"]
            assert line == {
                "prompt": json.loads(chosen["messages"]),
                "chosen": [{"role": "assistant", "content": chosen["output"]}],
                "rejected": [{"role": "assistant", "content": rejected["output"]}],
            }
    assert manifest["questions"] == {"exported": 1, "incomplete_skipped": 1}
    assert manifest["counts"] == {
        role: {"sft": len(GOLD_SFT[role]), "dpo": len(GOLD_DPO[role]),
               "json": len(GOLD_SFT[role])}
        for role in ROLES
    }  # fmt: skip


def test_golden_cap_keeps_the_largest_margins(golden, tmp_path):
    out = tmp_path / "out"
    manifest = export(golden, out, formats=["dpo"], max_pairs_per_group=1)
    assert pair_paths(out, "generator") == [("0", "2")]
    assert pair_paths(out, "verifier") == [("0.0", "0.2"), ("1.2", "1.1")]
    assert pair_paths(out, "refiner") == [
        ("0.1.0", "0.1.2"),
        ("1.0.0", "1.0.1"),
        ("1.2.0", "1.2.2"),
    ]
    assert manifest["pairing"]["max_pairs_per_group"] == 1
    assert not (out / "generator.sft.jsonl").exists()


def test_golden_theta_relabels_without_touching_the_database(golden, tmp_path):
    before = hashlib.sha256(json.dumps(db_nodes(golden), sort_keys=True).encode()).hexdigest()
    out = tmp_path / "out"
    manifest = export(golden, out, theta=0.7)
    # Generator 0 (5/9) and verifiers 0.1, 1.2 (2/3) are negatives at θ 0.7.
    assert paths(out, "generator") == []
    assert pair_paths(out, "generator") == []
    assert paths(out, "verifier") == ["0.0"]
    assert pair_paths(out, "verifier") == [("0.0", "0.2"), ("0.0", "0.1")]
    # Refiner leaves are positive when their reward is 1, whatever θ.
    assert paths(out, "refiner") == GOLD_SFT["refiner"]
    assert pair_paths(out, "refiner") == GOLD_DPO["refiner"]
    assert manifest["theta"] == 0.7 and manifest["sources"][0]["run_theta"] == 0.5
    export(golden, tmp_path / "all", theta=1.0)
    assert paths(tmp_path / "all", "verifier") == []
    assert paths(tmp_path / "all", "refiner") == GOLD_SFT["refiner"]
    after = hashlib.sha256(json.dumps(db_nodes(golden), sort_keys=True).encode()).hexdigest()
    assert before == after


def test_golden_json_has_the_seed_format(golden, tmp_path):
    out = tmp_path / "out"
    export(golden, out, formats=["json"])
    nodes = db_nodes(golden)
    for role, fields in (
        ("generator", ["question", "solution"]),
        ("verifier", ["question", "solution", "feedback"]),
        ("refiner", ["question", "original_solution", "feedback", "refined_solution"]),
    ):
        raw = (out / f"{role}_training.json").read_text(encoding="utf-8")
        data = json.loads(raw)
        # Streamed, yet exactly what json.dump(indent=2) writes.
        assert raw == json.dumps(data, ensure_ascii=False, indent=2) + "\n"
        assert list(data) == ["metadata", "examples"]
        meta = data["metadata"]
        assert list(meta)[:3] == ["timestamp", "model", "total_examples"]
        assert meta["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert meta["total_examples"] == len(data["examples"]) == len(GOLD_SFT[role])
        assert meta["timestamp"] == max(
            n["created_at"] for n in nodes.values() if n["question_id"] == Q_A.id
        )
        for example in data["examples"]:
            node = nodes[example["node_id"]]
            assert list(example) == [*fields, "ground_truth", "score", "evaluation", "node_id"]
            assert example["question"] == Q_A.text and example["ground_truth"] == "18"
            assert example["score"] == (node["reward"] if role == "refiner" else node["value"])
            assert set(example["evaluation"]) == {
                "correctness_score",
                "reasoning_score",
                "explanation",
                "key_matches",
            }
            evaluation = example["evaluation"]
            assert evaluation["reasoning_score"] is None  # no judge in this run
            assert "deterministic grader" in evaluation["explanation"][0] or (
                "Not graded" in evaluation["explanation"][0]
            )
            if role == "refiner":
                assert example["refined_solution"] == node["output"]
                verifier = nodes[node["parent_id"]]
                assert example["feedback"] == verifier["output"]
                assert example["original_solution"] == nodes[verifier["parent_id"]]["output"]
                assert evaluation["correctness_score"] == 1.0
                assert evaluation["key_matches"] == ["18"]
            elif role == "verifier":
                assert example["feedback"] == node["output"]
                assert example["solution"] == nodes[node["parent_id"]]["output"]
                # The critique states no answer: nothing for a grader to say on its own.
                assert evaluation["correctness_score"] is None
            else:
                assert example["solution"] == node["output"]
                assert evaluation["correctness_score"] == 1.0  # "Final Answer: 18"


def test_json_for_an_empty_role_is_valid(golden, tmp_path):
    export(golden, tmp_path / "out", roles=["generator"], formats=["json"], theta=0.9)
    raw = (tmp_path / "out" / "generator_training.json").read_text()
    data = json.loads(raw)
    assert data["examples"] == [] and data["metadata"]["total_examples"] == 0
    assert raw == json.dumps(data, indent=2) + "\n"


# --------------------------------------------------------------------------- split


def sibling(path: str, value: float, output: str, finish: str = "stop") -> JudgedNode:
    """A verifier node under generator 0, for the pure rules below."""
    return JudgedNode(
        id=f"r/q/{path}", run_id="r", question_id="q", parent_id="r/q/0", role="verifier",
        depth=2, branch=int(path[-1]), path=path, messages='[{"role": "user", "content": "x"}]',
        output=output, finish_reason=finish, answer=None, correct=None, reward=None,
        value=value, label=None, prompt_tokens=0, completion_tokens=0, seed=0,
        duration_ms=None, created_at="",
    )  # fmt: skip


def test_length_stopped_positives_are_left_out_unless_kept():
    cut = sibling("0.0", 1.0, "An unfinished crit", "length")
    good, bad = sibling("0.1", 0.8, "A critique."), sibling("0.2", 0.0, "Wrong.")
    dropped = pairing.Dropped()
    assert pairing.positives([cut, good, bad], 0.5, dropped=dropped) == [good]
    assert dropped.length_stopped == 1
    assert pairing.positives([cut, good, bad], 0.5, keep_length_stopped=True) == [cut, good]
    # Never the chosen side; still a rejected one (a cut-off text is a fine example of bad).
    assert pairing.pairs_for_group([cut, good, bad], 0.5) == [(good, bad)]
    kept = pairing.pairs_for_group([cut, good, bad], 0.5, keep_length_stopped=True)
    assert kept == [(cut, bad), (good, bad)]
    cut_bad = sibling("0.2", 0.0, "Wrong and cut", "length")
    assert pairing.pairs_for_group([good, cut_bad], 0.5) == [(good, cut_bad)]


def test_identical_siblings_give_one_sft_line_and_no_pair():
    a, b = sibling("0.0", 1.0, "Same words."), sibling("0.1", 0.9, "Same words.")
    c = sibling("0.2", 0.0, "Same words.")
    d = sibling("0.3", 0.0, "Other words.")
    dropped = pairing.Dropped()
    assert pairing.positives([a, b, c, d], 0.5, dropped=dropped) == [a]
    assert pairing.pairs_for_group([a, b, c, d], 0.5, dropped=dropped) == [(a, d), (b, d)]
    assert dropped.as_dict() == {"length_stopped": 0, "duplicate_sft": 1, "identical_pairs": 2}
    # The cap counts only pairs that are kept.
    assert pairing.pairs_for_group([a, b, c, d], 0.5, max_pairs=1) == [(a, d)]


def test_export_reports_what_it_left_out(golden, tmp_path):
    """Through the files, the manifest and the CLI's summary, per role."""
    with sqlite3.connect(golden) as conn:
        # A positive verifier cut off at max_tokens; two right refiner leaves saying the same.
        conn.execute("UPDATE nodes SET finish_reason = 'length' WHERE path = '0.1'")
        conn.execute("UPDATE nodes SET output = 'Same. Final Answer: 18' WHERE path = '0.0.1'")
        conn.execute("UPDATE nodes SET output = 'Same. Final Answer: 18' WHERE path = '0.0.0'")
    conn.close()
    out = tmp_path / "out"
    r = run_cli("--db", str(golden), "--out", str(out))
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert paths(out, "verifier") == ["0.0", "1.2"]
    assert ("0.1", "0.2") not in pair_paths(out, "verifier")
    assert paths(out, "refiner") == [p for p in GOLD_SFT["refiner"] if p != "0.0.1"]
    assert manifest["keep_length_stopped"] is False
    assert manifest["left_out"] == {
        "generator": {"length_stopped": 0, "duplicate_sft": 0, "identical_pairs": 0},
        "verifier": {"length_stopped": 1, "duplicate_sft": 0, "identical_pairs": 0},
        "refiner": {"length_stopped": 0, "duplicate_sft": 1, "identical_pairs": 0},
    }
    assert manifest["counts"]["refiner"]["sft"] == len(GOLD_SFT["refiner"]) - 1
    assert "left out: 1 length-stopped, 0 duplicate SFT, 0 identical pairs" in r.stdout
    assert "left out: 0 length-stopped, 1 duplicate SFT, 0 identical pairs" in r.stdout
    r = run_cli("--db", str(golden), "--out", str(out), "--keep-length-stopped")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert paths(out, "verifier") == GOLD_SFT["verifier"]
    assert pair_paths(out, "verifier") == GOLD_DPO["verifier"]
    assert manifest["keep_length_stopped"] is True
    assert manifest["left_out"]["verifier"]["length_stopped"] == 0


def many_questions(tmp_path, count: int = 12) -> Path:
    """n = 2 trees; in question i, leaf paths ending in .0 are right when i is even, and leaf
    0.0.0 only when i is odd: every role has positives in several questions."""
    questions = [Question(f"Split question {i}?", "18", "gsm8k") for i in range(count)]
    correct = {
        q.id: ({"0.0.0", "0.1.0", "1.0.0", "1.1.0", "0.0.1"} if i % 2 == 0 else {"0.0.0"})
        for i, q in enumerate(questions)
    }
    db = tmp_path / "many.db"
    build(db, questions, correct, n=2, run_id="rmany").close()
    return db


def test_split_is_by_question_deterministic_and_complete(tmp_path):
    db = many_questions(tmp_path)
    out = tmp_path / "out"
    manifest = export(db, out, valid_fraction=0.3)
    for role in ROLES:
        sft = read_jsonl(out / f"{role}.sft.jsonl")
        train = read_jsonl(out / role / "train.jsonl")
        valid = read_jsonl(out / role / "valid.jsonl")
        assert train and valid, role  # both files have data, as mlx-lm requires
        assert sorted(map(json.dumps, train + valid)) == sorted(map(json.dumps, sft))
        q_train = {p["question_id"] for p in read_jsonl(out / f"provenance/{role}.train.jsonl")}
        q_valid = {p["question_id"] for p in read_jsonl(out / f"provenance/{role}.valid.jsonl")}
        assert not q_train & q_valid
        assert manifest["counts"][role]["train"] == len(train)
        assert manifest["counts"][role]["valid"] == len(valid)
        # The rule: sha256 of the id below the fraction, unless the role needed an anchor.
        for qid in q_valid - set(manifest["split"]["moved_to_valid"].values()):
            assert pairing._fraction(qid) < 0.3
        for qid in q_train - set(manifest["split"]["moved_to_train"].values()):
            assert pairing._fraction(qid) >= 0.3
    again = tmp_path / "again"
    export(db, again, valid_fraction=0.3)
    for role in ROLES:
        for part in ("train", "valid"):
            assert (out / role / f"{part}.jsonl").read_bytes() == (
                again / role / f"{part}.jsonl"
            ).read_bytes()


def test_split_anchor_moves_one_question_when_the_fraction_gives_none():
    qids = [f"q{i:012x}" for i in range(5)]
    splitter = pairing.Splitter.anchored(
        1e-12,
        ((q, {"generator": True, "refiner": q != qids[0]}) for q in qids),
        ("generator", "refiner"),
    )
    lowest = min(qids, key=pairing._fraction)
    assert [q for q in qids if splitter.split(q, "generator") == "valid"] == [lowest]
    assert splitter.force_train == {}
    one = pairing.Splitter.anchored(0.5, iter([("qonly", {"generator": True})]), ("generator",))
    assert one.force_valid == {} == one.force_train  # one question: nothing to balance


# --------------------------------------------------------------------------- a real run


def dpo_groups_expected(
    nodes: dict[str, dict], theta: float, keep_length_stopped: bool = False
) -> dict[str, int]:
    """Pairs per role counted straight from the database: positive x negative per group, less
    length-stopped chosen sides (unless kept) and pairs whose two outputs are the same."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for n in nodes.values():
        groups[(n["role"], n["parent_id"] or n["question_id"])].append(n)
    out = dict.fromkeys(ROLES, 0)
    for (role, _), members in groups.items():
        pos = [n for n in members if is_db_positive(n, theta)]
        neg = [n for n in members if not is_db_positive(n, theta)]
        out[role] += sum(
            (keep_length_stopped or p["finish_reason"] != "length") and p["output"] != r["output"]
            for p in pos
            for r in neg
        )
    return out


def is_db_positive(n: dict, theta: float) -> bool:
    return n["reward"] == 1.0 if n["role"] == "refiner" else n["value"] > theta


def test_real_run_every_line_follows_the_rules(real_run_db, tmp_path):
    out = tmp_path / "out"
    # The run's 40-token budget cuts nearly every node off: kept, or there would be no pairs.
    manifest = export(real_run_db, out, valid_fraction=0.5, keep_length_stopped=True)
    nodes = db_nodes(real_run_db)
    (run,) = manifest["sources"]
    theta = run["theta"]
    conn = sqlite3.connect(real_run_db)
    (sha,) = conn.execute("SELECT model_sha256 FROM runs").fetchone()
    conn.close()
    # The small model gets some right and some wrong in every role.
    for role in ROLES:
        labels = {
            (n["reward"] == 1.0) if role == "refiner" else (n["value"] > theta)
            for n in nodes.values()
            if n["role"] == role
        }
        assert labels == {True, False}, role
    expected_pairs = dpo_groups_expected(nodes, theta, keep_length_stopped=True)
    assert sum(expected_pairs.values()) > 0  # the pair checks below are not vacuous
    for role in ROLES:
        positives = {
            nid for nid, n in nodes.items()
            if n["role"] == role
            and ((n["reward"] == 1.0) if role == "refiner" else n["value"] > theta)
        }  # fmt: skip
        sft = read_jsonl(out / f"{role}.sft.jsonl")
        prov = read_jsonl(out / f"provenance/{role}.sft.jsonl")
        # Positives only; all of them but the length-stopped, each distinct text once.
        kept = positives  # length-stopped ones too (keep_length_stopped)
        texts = {(nodes[nid]["messages"], nodes[nid]["output"]) for nid in kept}
        assert {p["node_id"] for p in prov} <= kept
        assert {(nodes[p["node_id"]]["messages"], nodes[p["node_id"]]["output"]) for p in prov} == (
            texts
        )
        left = manifest["left_out"][role]
        assert left["length_stopped"] == len(positives) - len(kept)
        assert left["duplicate_sft"] == len(kept) - len(texts)
        assert len(sft) == len(prov) == manifest["counts"][role]["sft"] == len(texts)
        for line, p in zip(sft, prov, strict=True):
            node = nodes[p["node_id"]]
            assert node["role"] == role
            assert line["messages"][:-1] == json.loads(node["messages"])
            assert line["messages"][-1] == {"role": "assistant", "content": node["output"]}
        dpo = read_jsonl(out / f"{role}.dpo.jsonl")
        dprov = read_jsonl(out / f"provenance/{role}.dpo.jsonl")
        assert len(dpo) == len(dprov) == expected_pairs[role] == manifest["counts"][role]["dpo"]
        for line, p in zip(dpo, dprov, strict=True):
            chosen, rejected = nodes[p["chosen_id"]], nodes[p["rejected_id"]]
            assert chosen["role"] == rejected["role"] == role
            assert chosen["parent_id"] == rejected["parent_id"]
            assert chosen["question_id"] == rejected["question_id"]
            assert p["chosen_id"] in positives and p["rejected_id"] not in positives
            assert line["prompt"] == json.loads(chosen["messages"])
            assert line["chosen"] == [{"role": "assistant", "content": chosen["output"]}]
            assert line["rejected"] == [{"role": "assistant", "content": rejected["output"]}]
        data = json.loads((out / f"{role}_training.json").read_text())
        assert data["metadata"]["total_examples"] == len(sft)
        assert {e["node_id"] for e in data["examples"]} == {p["node_id"] for p in prov}
        for e in data["examples"]:
            assert {"question", "score", "evaluation"} <= set(e)
            assert set(e["evaluation"]) == {
                "correctness_score",
                "reasoning_score",
                "explanation",
                "key_matches",
            }
    assert manifest["models"][0]["sha256"] == sha
    assert manifest["licence_notices"] == [
        "SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), licensed under the Apache "
        "License 2.0."
    ]
    assert run["prompt_hashes"] and run["config"]["n"] == 2
    assert manifest["questions"] == {"exported": 4, "incomplete_skipped": 0}
    for name, info in manifest["files"].items():
        data = (out / name).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
        assert info["lines"] == data.count(b"\n")


def test_real_export_is_training_ready(real_run_db, tmp_path, small_model):
    """The trainers' own loader reads the files; the model's chat template renders them."""
    import datasets
    from gguf import GGUFReader

    out = tmp_path / "out"
    export(real_run_db, out, formats=["sft", "dpo"], keep_length_stopped=True)  # 40-token run
    cache = tmp_path / "hf-cache"
    field = GGUFReader(str(small_model)).fields["tokenizer.chat_template"]
    template = ChatTemplate(bytes(field.parts[field.data[0]]).decode("utf-8"))
    rendered = 0
    for role in ROLES:
        sft = datasets.load_dataset(
            "json", data_files=str(out / f"{role}.sft.jsonl"), split="train", cache_dir=str(cache)
        )
        assert sft.column_names == ["messages"]
        assert len(sft) == len(read_jsonl(out / f"{role}.sft.jsonl"))
        for example in sft.select(range(min(2, len(sft)))):
            messages = example["messages"]
            assert messages[-1]["role"] == "assistant"
            assert all(set(m) == {"role", "content"} for m in messages)
            text = template.render(messages, add_generation_prompt=False)
            # ChatML: every turn is there, the assistant's output last, closed for training.
            assert text.endswith(
                "<|im_start|>assistant\n" + messages[-1]["content"] + "<|im_end|>\n"
            )
            for m in messages:
                assert f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" in text
            rendered += 1
        dpo_file = out / f"{role}.dpo.jsonl"
        if dpo_file.stat().st_size:
            dpo = datasets.load_dataset(
                "json", data_files=str(dpo_file), split="train", cache_dir=str(cache)
            )
            assert dpo.column_names == ["prompt", "chosen", "rejected"]
            for row in dpo:
                # TRL's conversational preference checks: message lists with role/content,
                # one assistant turn each, and the prompt renders as a prefix of prompt+chosen.
                assert all(set(m) == {"role", "content"} for m in row["prompt"])
                assert [m["role"] for m in row["chosen"]] == ["assistant"]
                assert [m["role"] for m in row["rejected"]] == ["assistant"]
                prompt = template.render(row["prompt"], add_generation_prompt=True)
                full = template.render(row["prompt"] + row["chosen"], add_generation_prompt=False)
                assert full.startswith(prompt)
    assert rendered >= 3


def test_reexport_is_byte_identical(real_run_db, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    export(real_run_db, a, valid_fraction=0.5)
    export(real_run_db, b, valid_fraction=0.5)
    export(real_run_db, a, valid_fraction=0.5)  # again, into the same folder
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and Path("manifest.json") in files_a
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert not [p for p in a.iterdir() if p.name.startswith(".")]


def test_cli_export_prints_counts(real_run_db, tmp_path):
    out = tmp_path / "cli-out"
    r = CliRunner().invoke(cli, ["export", "--db", str(real_run_db), "--out", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"{manifest['questions']['exported']} questions" in r.stdout
    for role in ROLES:
        assert f"sft {manifest['counts'][role]['sft']}" in r.stdout
    assert "licence: SmolLM2" in r.stdout
    r = CliRunner().invoke(
        cli, ["export", "--db", str(real_run_db), "--out", str(out), "--role", "refiner",
              "--format", "sft", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["manifest"]["counts"] == {"refiner": {"sft": manifest["counts"]["refiner"]["sft"]}}
    # Files of the previous export that this one did not write are gone with it.
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "manifest.json",
        "refiner.sft.jsonl",
        "refiner.sft.jsonl",
    ]
    assert not (out / "generator").exists()


# --------------------------------------------------------------------------- runs and trees


def test_run_filter_and_incomplete_runs(golden, tmp_path):
    store = Store(golden)
    run = make_run(store, "rsecond", 3, theta=0.5)
    q = Question("Golden question C?", "18", "gsm8k")
    store.add_questions(run["id"], [q])
    TreeRunner(
        store, Run.from_row(run), [q], FakeEngine(scripted({q.id: GOLD_A})), PromptSet()
    ).execute()
    store.close()
    both = export(golden, tmp_path / "both")
    assert [s["run_id"] for s in both["sources"]] == ["rgold", "rsecond"]
    assert both["questions"] == {"exported": 2, "incomplete_skipped": 1}
    assert both["counts"]["refiner"]["sft"] == 2 * len(GOLD_A)
    only = export(golden, tmp_path / "only", run_ids=["rsecond"])
    assert [s["run_id"] for s in only["sources"]] == ["rsecond"]
    assert only["questions"] == {"exported": 1, "incomplete_skipped": 0}
    prov = read_jsonl(tmp_path / "only" / "provenance" / "refiner.sft.jsonl")
    assert {p["run_id"] for p in prov} == {"rsecond"}


def test_questions_without_nodes_count_as_incomplete(golden, tmp_path):
    store = Store(golden)
    store.add_questions("rgold", [Question("Never started?", "1", "gsm8k")])
    store.close()
    assert export(golden, tmp_path / "o")["questions"] == {"exported": 1, "incomplete_skipped": 2}


# --------------------------------------------------------------------------- bad input


def run_cli(*args: str):
    result = CliRunner().invoke(cli, ["export", *args])
    return result


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "critic"], "unknown role 'critic'"),
        (["--format", "xml"], "unknown format 'xml'"),
        (["--theta", "1.5"], "--theta must be in [0, 1]"),
        (["--theta", "-0.1"], "--theta must be in [0, 1]"),
        (["--run", "rnope"], "no run 'rnope'"),
        (["--valid-fraction", "1"], "--valid-fraction must be in (0, 1)"),
        (["--valid-fraction", "0.2", "--format", "dpo"], "--valid-fraction splits the SFT"),
        (["--max-pairs-per-group", "0"], "--max-pairs-per-group must be at least 1"),
    ],
)
def test_bad_flags_one_line_exit_2_no_files(golden, tmp_path, args, message):
    out = tmp_path / "out"
    r = run_cli("--db", str(golden), "--out", str(out), *args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    assert message in r.stderr
    assert not out.exists()
    assert all(p.name.startswith("gold.db") for p in tmp_path.iterdir())


def test_empty_database_missing_database_and_output_file(tmp_path):
    empty = tmp_path / "empty.db"
    Store(empty).close()
    r = run_cli("--db", str(empty), "--out", str(tmp_path / "o1"))
    assert r.exit_code == 2 and "has no runs" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "o1").exists()
    r = run_cli("--db", str(tmp_path / "nowhere.db"), "--out", str(tmp_path / "o2"))
    assert r.exit_code == 2 and "no database at" in r.stderr
    assert not (tmp_path / "nowhere.db").exists() and not (tmp_path / "o2").exists()
    store = Store(empty)
    make_run(store, "rnone", 2)
    store.close()
    r = run_cli("--db", str(empty), "--out", str(tmp_path / "o3"))
    assert r.exit_code == 2 and "no complete trees" in r.stderr
    assert not (tmp_path / "o3").exists()
    assert not [p for p in tmp_path.iterdir() if "malt-export" in p.name]


def test_output_folder_that_is_a_file(golden, tmp_path):
    target = tmp_path / "export"
    target.write_text("mine")
    r = run_cli("--db", str(golden), "--out", str(target))
    assert r.exit_code == 2 and "is a file" in r.stderr and r.stderr.count("\n") == 1
    assert target.read_text() == "mine"


def test_failure_midway_leaves_nothing_behind(golden, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export(golden, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []

    def boom(node, tree):
        calls.append(node.id)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return {"x": 1}

    monkeypatch.setattr(pipeline, "json_example", boom)
    with pytest.raises(RuntimeError):
        export(golden, out, theta=0.0)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    fresh = tmp_path / "fresh"
    calls.clear()
    with pytest.raises(RuntimeError):
        export(golden, fresh)
    assert not fresh.exists()
    assert not [p for p in tmp_path.iterdir() if "malt-export" in p.name]


def test_library_validates_before_writing(golden, tmp_path):
    with pytest.raises(MaltError, match="unknown role"):
        export(golden, tmp_path / "x", roles=["judge"])
    assert parse_choice("ALL", ROLES, "role") == ROLES
    assert parse_choice("Verifier", ROLES, "role") == ("verifier",)
    assert not (tmp_path / "x").exists()


def tree_of(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.mark.parametrize("depth", [1, 3])
def test_output_folder_under_a_regular_file_is_one_line_and_writes_nothing(golden, tmp_path, depth):
    # Under a regular file: refused for root too (chmod does not stop root; this does).
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    out = blocker.joinpath(*["sub"] * (depth - 1), "out")
    before = sorted(tmp_path.iterdir())
    r = run_cli("--db", str(golden), "--out", str(out))
    assert r.exit_code == 2, r.output
    assert r.stderr == f"Error: output folder {out} is under {blocker}, which is not a folder\n"
    assert blocker.read_text() == "mine" and sorted(tmp_path.iterdir()) == before


def test_a_read_only_output_folder_is_one_line_and_writes_nothing(golden, tmp_path, monkeypatch):
    """A folder malt may not write: as a user, a real chmod 555 folder; as root (which chmod
    does not stop, and the test machines run as root) the EACCES the kernel gives a user,
    raised where the export makes its first file."""
    parent = tmp_path / "ro"
    parent.mkdir()
    existing = tmp_path / "ro-existing"
    existing.mkdir()
    if os.geteuid() == 0:
        real_mkdtemp = tempfile.mkdtemp

        def refused(*args, dir=None, **kw):
            if dir is not None and Path(dir) in (parent, existing):
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real_mkdtemp(*args, dir=dir, **kw)

        monkeypatch.setattr(tempfile, "mkdtemp", refused)
    try:
        for folder in (parent, existing):
            folder.chmod(0o555)
        for out, where in ((parent / "out", parent), (existing, existing)):
            r = run_cli("--db", str(golden), "--out", str(out))
            assert r.exit_code == 2, r.output
            assert r.stderr == (
                f"Error: cannot write the export into {out}: Permission denied ({where})\n"
            )
        assert not list(parent.iterdir()) and not list(existing.iterdir())
    finally:
        for folder in (parent, existing):
            folder.chmod(0o755)


def test_reexport_never_removes_or_writes_through_a_symlinked_subfolder(golden, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--db", str(golden), "--out", str(out), "--format", "sft").exit_code == 0
    # Another folder, holding files of the same names, linked in place of provenance/.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "provenance", elsewhere)
    kept = tree_of(elsewhere)
    assert kept and all(n.endswith(".sft.jsonl") for n in kept)
    shutil.rmtree(out / "provenance")
    (out / "provenance").symlink_to(elsewhere, target_is_directory=True)
    # An export that writes into provenance/ is refused before anything moves.
    before = tree_of(out)
    r = run_cli("--db", str(golden), "--out", str(out), "--format", "dpo")
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and "through a symbolic link" in r.stderr
    assert tree_of(out) == before and tree_of(elsewhere) == kept
    # One that does not (json only) replaces the old manifest's files, but never removes
    # what the link points to: provenance/*.sft.jsonl of the old manifest are left alone.
    r = run_cli("--db", str(golden), "--out", str(out), "--format", "json")
    assert r.exit_code == 0, r.output
    assert tree_of(elsewhere) == kept
    assert not list(out.glob("*.sft.jsonl"))  # the old files inside `out` itself are gone
    assert json.loads((out / "manifest.json").read_text())["files"].keys() == {
        f"{role}_training.json" for role in ROLES
    }
    assert not [p for p in tmp_path.iterdir() if "malt-export" in p.name]
    assert not [p for p in out.iterdir() if "malt-export" in p.name]


def test_old_files_under_a_link_or_a_file_are_not_old_files(tmp_path):
    out = tmp_path / "out"
    (out / "real").mkdir(parents=True)
    (tmp_path / "target").mkdir()
    (out / "linked").symlink_to(tmp_path / "target", target_is_directory=True)
    (out / "plain").write_text("x")
    names = ["a.jsonl", "real/b.jsonl", "linked/c.jsonl", "plain/d.jsonl", "../e", "/f", "."]
    (out / "manifest.json").write_text(json.dumps({"files": dict.fromkeys(names, {})}))
    assert writer._old_files(out) == {"a.jsonl", "real/b.jsonl"}


# --------------------------------------------------------------------------- streaming


def synthetic_db(path: Path, trees: int, n: int = 2) -> None:
    """`trees` complete trees written straight into SQLite (no engine), rewards from a hash."""
    store = Store(path)
    make_run(store, "rbig", n)
    rows_q, rows_rq, rows_n = [], [], []
    for t in range(trees):
        qid = f"q{t:012x}"
        rows_q.append((qid, "gsm8k", f"Question {t}?", "18", None, None, None, "2026-01-01"))
        rows_rq.append(("rbig", qid, t))
        rewards = {
            (i, j, k): float(hashlib.sha256(f"{t}{i}{j}{k}".encode()).digest()[0] % 2)
            for i in range(n) for j in range(n) for k in range(n)
        }  # fmt: skip
        values = credit.assign(rewards, n, 0.5)
        for p, c in values.items():
            path_s = ".".join(map(str, p))
            parent = f"rbig/{qid}/" + ".".join(map(str, p[:-1])) if len(p) > 1 else None
            rows_n.append((
                f"rbig/{qid}/{path_s}", "rbig", qid, parent, ROLES[len(p) - 1], len(p), p[-1],
                path_s, json.dumps([{"role": "user", "content": f"Question {t}? " + "x" * 200}]),
                "y" * 300, "stop", None, None, rewards.get(p), c.value, int(c.label), 10, 10, 1,
                1, "2026-01-01T00:00:00",
            ))  # fmt: skip
    with store.db.atomic():
        store.db.conn.executemany("INSERT INTO questions VALUES (?,?,?,?,?,?,?,?)", rows_q)
        store.db.conn.executemany("INSERT INTO run_questions VALUES (?,?,?)", rows_rq)
        # Parents before children: sorted by depth.
        rows_n.sort(key=lambda r: r[5])
        skip = ("builder", "grade_reason")
        columns = ", ".join(f.name for f in dataclass_fields(NodeRecord) if f.name not in skip)
        store.db.conn.executemany(
            f"INSERT INTO nodes ({columns}) VALUES (" + ",".join("?" * 21) + ")", rows_n
        )
    store.close()


def peak_export_memory(db: Path, out: Path) -> tuple[int, dict]:
    tracemalloc.start()
    try:
        manifest = export(db, out, valid_fraction=0.2)
        return tracemalloc.get_traced_memory()[1], manifest
    finally:
        tracemalloc.stop()


def test_export_memory_does_not_grow_with_the_database(tmp_path):
    small, big = tmp_path / "small.db", tmp_path / "big.db"
    synthetic_db(small, 300)
    synthetic_db(big, 2400)  # 8x the nodes: 33,600
    peak_small, m_small = peak_export_memory(small, tmp_path / "s")
    peak_big, m_big = peak_export_memory(big, tmp_path / "b")
    assert m_small["questions"]["exported"] == 300 and m_big["questions"]["exported"] == 2400
    assert m_big["counts"]["refiner"]["sft"] > 7 * m_small["counts"]["refiner"]["sft"] // 2
    # Holding the nodes, or even one line per node, would grow 8x; a tree at a time does not.
    assert peak_big < 1.5 * peak_small, (peak_small, peak_big)
