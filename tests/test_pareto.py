"""Pareto sort, ranks and hypervolume against hand-computed values."""

from __future__ import annotations

import math

import moocore
import numpy as np
import pytest

from nas_prune.search import pareto


def _fronts(points) -> list[list[int]]:
    return [front.tolist() for front in pareto.non_dominated_sort(np.array(points, float))]


def test_fronts_of_six_points():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (5, 5), (3, 2)]
    assert _fronts(points) == [[0, 1, 3, 5], [2], [4]]
    assert pareto.pareto_mask(points).tolist() == [True, True, False, True, False, True]


def test_duplicates_share_a_front():
    assert _fronts([(1, 1), (2, 2), (1, 1), (2, 2)]) == [[0, 2], [1, 3]]


def test_nan_rows_form_a_final_front_and_inf_compares():
    points = [(1, 1), (np.nan, 0), (2, 2), (0, np.inf)]
    assert _fronts(points) == [[0, 3], [2], [1]]
    assert pareto.pareto_mask(points).tolist() == [True, False, False, True]
    assert pareto.rank(points)[1] == 3
    assert pareto.pareto_mask([(np.nan, 1.0)]).tolist() == [False]


def test_empty_input():
    assert pareto.non_dominated_sort(np.zeros((0, 2))) == []
    assert pareto.rank(np.zeros((0, 2))).tolist() == []


def test_epsilon_net_order_spreads_a_front():
    points = [(2, 2), (4, 0), (0, 4), (3, 1), (1, 3)]
    # start with the compromise (2, 2), nearest the ideal (0, 0); (4, 0) and (0, 4) are then
    # equally far: the lower index goes first, then the other extreme; (3, 1) and (1, 3) are
    # then equally far from the chosen points: the lower index first.
    assert pareto.epsilon_net_order(points).tolist() == [0, 1, 2, 3, 4]


def test_epsilon_net_order_starts_at_the_compromise_not_an_end():
    points = np.array([(0, 10), (1, 6), (3, 3), (6, 1), (10, 0)], float)
    # normalised: (0.3, 0.3) is nearest the ideal (0, 0); then the extremes, then the rest
    assert pareto.epsilon_net_order(points).tolist() == [2, 0, 4, 1, 3]
    assert pareto.epsilon_net_order(points[:, ::-1]).tolist() == [2, 0, 4, 1, 3]
    skewed = np.array([(0, 1.0), (0.05, 0.5), (0.3, 0.2), (0.6, 0.1), (1.0, 0.0)])
    # distances to the ideal: 1, 0.502, 0.361, 0.608, 1
    assert pareto.epsilon_net_order(skewed)[0] == 2


def test_epsilon_net_order_does_not_depend_on_the_objective_order():
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = np.sort(rng.uniform(0, 1, size=rng.integers(2, 12)))
        front = np.column_stack([x, 1 - x ** rng.uniform(0.3, 3)])  # all non-dominated
        assert pareto.pareto_mask(front).all()
        order = pareto.epsilon_net_order(front)
        assert order.tolist() == pareto.epsilon_net_order(front[:, ::-1]).tolist()
        three = np.column_stack([front, rng.permutation(front[:, 0])])
        for columns in ([1, 0, 2], [2, 0, 1], [1, 2, 0]):
            assert pareto.epsilon_net_order(three[:, columns])[0] == pareto.epsilon_net_order(
                three)[0]


def test_epsilon_net_order_is_scale_free():
    points = np.array([(0.0, 4.0), (1.0, 3.0), (3.0, 1.0), (4.0, 0.0), (2.5, 1.5)])
    scaled = points * np.array([1.0, 1000.0])
    assert pareto.epsilon_net_order(points).tolist() == pareto.epsilon_net_order(scaled).tolist()


def test_rank_is_the_inverse_of_the_ordering():
    # The syne-tune bug case: the last point dominates all others. The ordering puts it first
    # (order[0] == 4) but order[4] == 3, the index of the worst point; reading the ordering as
    # ranks would give the best point rank 3 of 5 (stopped by a top-1/3 cutoff).
    points = [(2, 6), (6, 2), (4, 4), (5, 5), (1, 1)]
    order = pareto.sort_order(points)
    ranks = pareto.rank(points)
    # front 1 {(2, 6), (6, 2), (4, 4)}: the compromise (4, 4), then (2, 6) (tie, lower index)
    assert order.tolist() == [4, 2, 0, 1, 3]
    assert ranks.tolist() == [2, 3, 1, 4, 0]
    assert order[4] >= math.ceil(5 / 3)  # misread: would stop
    assert ranks[4] == 0


def test_rank_methods_differ_inside_a_front():
    points = [(3, 1), (1, 3), (2, 2), (4, 4)]
    assert pareto.rank(points, "nondominated").tolist() == [0, 1, 2, 3]
    assert pareto.rank(points, "epsilon_net").tolist() == [1, 2, 0, 3]  # (2, 2) first
    with pytest.raises(ValueError, match="unknown rank method"):
        pareto.rank(points, "crowding")


@pytest.mark.parametrize(
    ("points", "reference", "expected"),
    [
        ([(1, 3), (2, 2), (3, 1)], (4, 4), 6.0),
        ([(1, 3), (2, 2), (3, 1), (3, 3), (2, 2)], (4, 4), 6.0),  # dominated and duplicate
        ([(1, 1)], (2, 3), 2.0),
        ([(5, 1), (1, 5), (4, 1)], (4, 4), 0.0),  # beyond or on the reference
        ([(1, 3), (5, 0), (np.nan, 0)], (4, 4), 3.0),
        (np.zeros((0, 2)), (4, 4), 0.0),
    ],
)
def test_hypervolume_2d_by_hand(points, reference, expected):
    assert pareto.hypervolume(np.array(points, float), reference) == pytest.approx(expected)


def test_hypervolume_3d_box_union():
    # Boxes to (3, 3, 3): A 9, B 9, C 8; A&B 3, A&C 4, B&C 4, A&B&C 2 -> 9+9+8-3-4-4+2 = 17.
    points = [(0, 0, 2), (2, 0, 0), (1, 1, 1)]
    assert pareto.hypervolume(points, (3, 3, 3)) == pytest.approx(17.0)
    assert pareto.hypervolume([(0, 0, 2), (4, 0, 0)], (3, 3, 3)) == pytest.approx(9.0)


def test_hypervolume_2d_matches_moocore():
    rng = np.random.default_rng(0)
    for _ in range(20):
        points = rng.uniform(0, 1, size=(rng.integers(1, 40), 2))
        reference = np.array([0.9, 1.0])
        inside = points[(points < reference).all(axis=1)]
        expected = float(moocore.hypervolume(inside, ref=reference)) if len(inside) else 0.0
        assert pareto.hypervolume(points, reference) == pytest.approx(expected)


def test_normaliser_fit_transform_and_round_trip():
    normaliser = pareto.Normaliser.fit([(1, 10), (3, 30), (2, np.nan)])
    assert normaliser.lower.tolist() == [1, 10]
    assert normaliser.upper.tolist() == [3, 30]
    assert normaliser.transform([(2, 20), (5, 0)]).tolist() == [[0.5, 0.5], [2.0, -0.5]]
    restored = pareto.Normaliser.from_dict(normaliser.to_dict())
    assert restored.to_dict() == {"lower": [1.0, 10.0], "upper": [3.0, 30.0]}


def test_normaliser_rejects_bad_bounds():
    with pytest.raises(ValueError, match="upper must be >= lower"):
        pareto.Normaliser(np.array([1.0]), np.array([0.0]))
    with pytest.raises(ValueError, match="one bound per objective"):
        pareto.Normaliser(np.array([0.0, 0.0]), np.array([1.0]))


def test_normalised_hypervolume_and_record():
    normaliser = pareto.Normaliser(np.array([1.0, 10.0]), np.array([3.0, 30.0]))
    points = [(1, 10), (3, 30)]  # -> (0, 0) and (1, 1): the second is dominated
    assert pareto.normalised_hypervolume(points, normaliser) == pytest.approx(1.21)
    assert pareto.normalised_hypervolume(points, normaliser, reference=2.0) == pytest.approx(4.0)
    record = pareto.hypervolume_record(points, normaliser)
    assert record["hypervolume"] == pytest.approx(1.21)
    assert record["reference"] == pytest.approx([1.1, 1.1])
    assert record["normaliser"] == normaliser.to_dict()


def test_quantile_normalise_pools_runs():
    runs = [np.array([(1, 400), (3, 200)]), np.array([(2, np.nan), (4, 100), (1, 300)])]
    first, second = pareto.quantile_normalise(runs)
    # objective 0 pooled: 1, 1, 2, 3, 4 -> #smaller / 4; objective 1 pooled: 100..400 -> /3
    np.testing.assert_allclose(first, [(0, 1), (0.75, 1 / 3)])
    np.testing.assert_allclose(second, [(0.5, np.nan), (1, 0), (0, 2 / 3)])
    best = np.zeros((1, 2))
    assert pareto.hypervolume(best, (pareto.QUANTILE_REFERENCE,) * 2) == pytest.approx(4.0)
