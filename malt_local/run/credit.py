"""Credit assignment: leaf rewards flow up the tree as values, values become labels.

MALT's "global pooling" (Motwani et al., §4.2): a verifier node's value is the mean reward of its
refiner children, a generator node's value the mean of its verifiers' values (so the mean of its
n² leaves). A node is positive when its value is strictly above θ. These are Monte-Carlo
estimates of each node's chance of leading to a correct final answer under the current policy.

Node paths are tuples of branch indices: (i,) a generator, (i, j) a verifier, (i, j, k) a refiner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from malt_local.roles import NodePath


@dataclass(frozen=True)
class Credit:
    value: float
    label: bool


def label_for(value: float, theta: float) -> bool:
    """Positive iff strictly above θ (Algorithm 1: ✓ if V > θ)."""
    return value > theta


def assign(rewards: Mapping[NodePath, float], n: int, theta: float) -> dict[NodePath, Credit]:
    """Values and labels for every node of one complete question tree.

    `rewards` maps each of the n³ leaf paths to its reward. An incomplete tree is a ValueError:
    a value computed from some of the leaves would be stored as if it were final.
    """
    expected = n**3
    if len(rewards) != expected or any(len(p) != 3 for p in rewards):
        raise ValueError(f"need all {expected} leaf rewards, got {len(rewards)}")
    out: dict[NodePath, Credit] = {}
    for leaf, reward in rewards.items():
        out[leaf] = Credit(float(reward), label_for(float(reward), theta))
    for i in range(n):
        verifier_values = []
        for j in range(n):
            leaves = [rewards[(i, j, k)] for k in range(n)]
            v = sum(leaves) / n
            out[(i, j)] = Credit(v, label_for(v, theta))
            verifier_values.append(v)
        g = sum(verifier_values) / n
        out[(i,)] = Credit(g, label_for(g, theta))
    return out
