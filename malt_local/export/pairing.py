"""The pure rules of an export: which nodes are positive, which pairs DPO gets, and which
questions go to valid. No I/O: `malt view` and the tests call these on trees in memory.

- **Labels are recomputed** from the stored values with the export's θ (default: each run's own
  θ), so `--theta` relabels without touching the database. A generator or verifier node is
  positive when its value is strictly above θ, else negative; a refiner leaf is positive when
  its reward is 1 and negative when it is 0, whatever θ (`is_positive`).
- **DPO pairs** come from siblings only (same parent; the generators of one question are
  siblings). The pairing rule is `pairs_for_group`, stated in words as `PAIRING_RULE`.
- **Length-stopped nodes** (cut off at max_tokens, `length_stopped`) are no positive for SFT and
  no chosen side for DPO unless asked (`--keep-length-stopped`): their text stops mid-answer,
  and training on it teaches the model to stop mid-answer. They stay as rejected sides.
- **Duplicates**: a pair whose chosen text equals its rejected text teaches nothing and is
  dropped; identical SFT records of one tree are written once (`Dropped` counts both).
- **The train/valid split** is by question (`Splitter`), stated in words as `SPLIT_RULE`.

The two rule texts are what the manifest records, so they sit beside the code they describe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from malt_local.db.store import JudgedNode
from malt_local.export.trees import Tree
from malt_local.run import credit

PAIRING_RULE = (
    "pairs come only from siblings (children of one parent; the generators of one question "
    "are siblings), one positive (chosen) and one negative (rejected); a group whose nodes all "
    "have the same label gives none. Positives are ranked by value descending, negatives by "
    "value ascending (ties by path); all positive x negative combinations are listed by value "
    "margin (chosen - rejected) descending, then chosen rank, then rejected rank; "
    "max_pairs_per_group keeps the first K of that list (null: all). Before the cap, a "
    "length-stopped positive is no chosen side (unless keep_length_stopped) and a pair whose "
    "chosen output equals its rejected output is dropped"
)
SPLIT_RULE = (
    "by question: a question is in valid when the first 8 bytes of sha256('malt-split:' + "
    "question_id), read as a fraction of 2^64, are below valid_fraction, so growing the data "
    "never moves a question between files and no question is in both. Per role, if that puts "
    "none of the exported questions with positives for the role (or every one) in valid, the "
    "one with the smallest (largest) fraction is moved, so both of the role's files get data, "
    "as mlx-lm requires (needs two such questions)"
)


@dataclass
class Dropped:
    """What one role's export left out, per reason, as the manifest reports it."""

    length_stopped: int = 0  # positives cut off at max_tokens: not in SFT, not chosen in DPO
    duplicate_sft: int = 0  # SFT records equal to one already written for the tree
    identical_pairs: int = 0  # DPO pairs whose chosen output equals the rejected one

    def as_dict(self) -> dict[str, int]:
        return {
            "length_stopped": self.length_stopped,
            "duplicate_sft": self.duplicate_sft,
            "identical_pairs": self.identical_pairs,
        }


def length_stopped(node: JudgedNode) -> bool:
    """Cut off at max_tokens: the text is unfinished, not an answer to imitate."""
    return node.finish_reason == "length"


def is_positive(node: JudgedNode, theta: float) -> bool:
    """Refiner leaves: reward 1. Generators and verifiers: value strictly above θ."""
    if node.depth == 3:
        return node.reward == 1.0
    assert node.value is not None
    return credit.label_for(node.value, theta)


def score(node: JudgedNode) -> float:
    """What a node is ranked and reported by: a refiner leaf's reward, else its value."""
    value = node.reward if node.depth == 3 else node.value
    assert value is not None
    return float(value)


def positives(
    nodes: list[JudgedNode],
    theta: float,
    keep_length_stopped: bool = False,
    dropped: Dropped | None = None,
) -> list[JudgedNode]:
    """The nodes an SFT (and seed JSON) export writes, in order: the positives, less the
    length-stopped ones (unless kept) and less any whose prompt and output repeat an earlier
    one's (siblings that said the same thing: one line, not several), counted into `dropped`.
    Called per tree, so what it remembers stays small."""
    out: list[JudgedNode] = []
    seen: set[tuple[str, str]] = set()
    for node in nodes:
        if not is_positive(node, theta):
            continue
        if length_stopped(node) and not keep_length_stopped:
            if dropped is not None:
                dropped.length_stopped += 1
            continue
        key = (node.messages, node.output)
        if key in seen:
            if dropped is not None:
                dropped.duplicate_sft += 1
            continue
        seen.add(key)
        out.append(node)
    return out


def pairs_for_group(
    siblings: list[JudgedNode],
    theta: float,
    max_pairs: int | None = None,
    keep_length_stopped: bool = False,
    dropped: Dropped | None = None,
) -> list[tuple[JudgedNode, JudgedNode]]:
    """(chosen, rejected) pairs of one sibling group; the rule is `PAIRING_RULE`. Identical
    pairs are counted into `dropped` (the export's length-stopped count is of SFT positives)."""
    labelled = [(s, is_positive(s, theta)) for s in siblings]
    pos = sorted(
        (s for s, good in labelled if good and (keep_length_stopped or not length_stopped(s))),
        key=lambda s: (-score(s), s.path),
    )
    neg = sorted((s for s, good in labelled if not good), key=lambda s: (score(s), s.path))
    # Margins rounded so that equal margins tie exactly (2/3 - 1/3 against 1/3 - 0).
    ranked = [
        (round(score(p) - score(r), 9), i, j)
        for i, p in enumerate(pos)
        for j, r in enumerate(neg)
        if p.output != r.output
    ]
    if dropped is not None:
        dropped.identical_pairs += len(pos) * len(neg) - len(ranked)
    ranked.sort(key=lambda t: (-t[0], t[1], t[2]))
    if max_pairs is not None:
        ranked = ranked[:max_pairs]
    return [(pos[i], neg[j]) for _, i, j in ranked]


def tree_pairs(
    tree: Tree,
    role: str,
    max_pairs: int | None = None,
    keep_length_stopped: bool = False,
    dropped: Dropped | None = None,
) -> list[tuple[JudgedNode, JudgedNode]]:
    """The (chosen, rejected) pairs of `role` that a DPO export writes for one complete tree,
    in file order; `malt view` shows these, so the page and the file cannot disagree."""
    return [
        pair
        for group in sibling_groups(tree.role_nodes(role))
        for pair in pairs_for_group(group, tree.run.theta, max_pairs, keep_length_stopped, dropped)
    ]


def sibling_groups(nodes: list[JudgedNode]) -> list[list[JudgedNode]]:
    """Nodes of one role grouped by parent, groups in parent order (nodes are in path order)."""
    groups: dict[str, list[JudgedNode]] = {}
    for node in nodes:
        groups.setdefault(node.group, []).append(node)
    return list(groups.values())


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
