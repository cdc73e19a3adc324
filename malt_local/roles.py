"""The tree's shape: the three roles in the order they run, each role's depth, and how many
nodes a question's tree of n holds.

A node's place in its tree is its path of branch indices from the question (`NodePath`): a
generator's path has one index, a verifier's two, a refiner's three. The run, the export, the
status and the view, training and evaluation all lean on these facts, so they stand here once.
"""

from __future__ import annotations

ROLES = ("generator", "verifier", "refiner")

# A node's branch indices from the question down: (2,) is the third generator answer, (2, 0)
# the first critique of it. Not a file path: the name says so.
NodePath = tuple[int, ...]


def depth_of(role: str) -> int:
    """1 for the generator, 2 for the verifier, 3 for the refiner."""
    return ROLES.index(role) + 1


def role_at(depth: int) -> str:
    return ROLES[depth - 1]


def nodes_per_role(n: int, role: str) -> int:
    """How many nodes of `role` one question's tree holds: n, n², n³."""
    return n ** depth_of(role)


def tree_size(n: int) -> int:
    """Nodes in one question's tree: n + n² + n³ (39 at n = 3)."""
    return sum(nodes_per_role(n, role) for role in ROLES)
