"""The lines of the data files, each in its trainer's schema.

- **SFT** (`ROLE.sft.jsonl`): one line per positive node, `{"messages": [...]}` = the exact
  messages the node was generated from, then its output as the assistant turn (TRL's
  conversational "messages" format, which mlx-lm's `chat` format and axolotl's `chat_template`
  type read too). With `--valid-fraction F`, `ROLE/train.jsonl` and `ROLE/valid.jsonl` as well,
  split by question (see `pairing.Splitter`), for `mlx_lm.lora --data export/ROLE`.
- **DPO** (`ROLE.dpo.jsonl`): TRL's conversational preference rows, `{"prompt": [messages],
  "chosen": [assistant], "rejected": [assistant]}`, from the pairs of `pairing.tree_pairs`.
- **JSON** (`ROLE_training.json`): the seed implementation's format (Nimitkothari/MALT):
  `{"metadata": {...}, "examples": [...]}`, one example per positive, with `evaluation` from
  the LLM judge where the node was judged, else from the deterministic grader (and says so).
"""

from __future__ import annotations

import json
from typing import Any

from malt_local.db.store import JudgedNode
from malt_local.export.pairing import score
from malt_local.export.trees import QuestionInfo, Tree


def chat(node: JudgedNode) -> list[dict[str, str]]:
    """The exact messages the node was generated from."""
    return json.loads(node.messages)


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def sft_record(node: JudgedNode) -> dict:
    return {"messages": [*chat(node), assistant(node.output)]}


def dpo_record(chosen: JudgedNode, rejected: JudgedNode) -> dict:
    return {
        "prompt": chat(chosen),
        "chosen": [assistant(chosen.output)],
        "rejected": [assistant(rejected.output)],
    }


def evaluation(node: JudgedNode, question: QuestionInfo, task: str) -> dict:
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


def json_example(node: JudgedNode, tree: Tree) -> dict:
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
    out["score"] = score(node)
    out["evaluation"] = evaluation(node, q, tree.run.task or q.task)
    out["node_id"] = node.id
    return out
