import itertools

import pytest

from malt_local.run.credit import assign, label_for


def leaves(n, fn):
    return {p: fn(p) for p in itertools.product(range(n), repeat=3)}


def test_values_are_means_of_leaves_and_labels_strict():
    n = 3
    # generator 0: all leaves right; generator 1: verifier (1,0) has 2/3 right, others 0;
    # generator 2: exactly half can't happen at n=3, so use 5/9 right.
    right = {(0, j, k) for j in range(3) for k in range(3)}
    right |= {(1, 0, 0), (1, 0, 1)}
    right |= {(2, 0, 0), (2, 0, 1), (2, 0, 2), (2, 1, 0), (2, 1, 1)}
    c = assign(leaves(n, lambda p: 1.0 if p in right else 0.0), n, 0.5)
    assert c[(0,)].value == 1.0 and c[(0,)].label
    assert c[(1, 0)].value == pytest.approx(2 / 3) and c[(1, 0)].label
    assert c[(1,)].value == pytest.approx(2 / 9) and not c[(1,)].label
    assert c[(2,)].value == pytest.approx(5 / 9) and c[(2,)].label
    assert c[(2, 1)].value == pytest.approx(2 / 3)
    assert c[(1, 0, 2)].value == 0.0 and not c[(1, 0, 2)].label
    assert len(c) == 3 + 9 + 27


def test_value_equal_to_theta_is_negative():
    n = 2
    c = assign(leaves(n, lambda p: 1.0 if p[2] == 0 else 0.0), n, 0.5)
    assert c[(0, 0)].value == 0.5 and not c[(0, 0)].label
    assert label_for(0.5000001, 0.5) and not label_for(0.5, 0.5)


def test_incomplete_tree_is_refused():
    r = leaves(2, lambda p: 1.0)
    del r[(1, 1, 1)]
    with pytest.raises(ValueError):
        assign(r, 2, 0.5)
