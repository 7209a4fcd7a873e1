"""Searcher behaviour found wrong in review: MO-REA's parent choice and NSGA-II's duplicates.

Searchers are driven directly (suggest / on_trial_complete), no Tune run.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from nas_prune.search import pareto
from nas_prune.search.searchers import MOREASearcher, make_searcher
from nas_prune.space import SmallSpace

OBJECTIVES = ["error", "params"]
BIG = SmallSpace(12, 12, 3072)  # BERT-base shape: 1 + 12 * 12 * 3072 distinct sub-networks


def _two_objective_problem(config: dict[str, int]) -> dict[str, float]:
    """Error falls and size grows with the kept fraction, with a wobble in the head count: a
    function of the sub-network (every config with 0 layers scores the same)."""
    size = config["num_layers"] * (64 * config["num_heads"] + config["num_units"])
    fraction = size / (12 * (64 * 12 + 3072))
    error = 1 / (1 + 10 * fraction) + 0.01 * (config["num_heads"] % 3) * (fraction > 0)
    return {"error": error, "params": fraction}


def _parent(child: dict[str, int], candidates: list[dict[str, int]]) -> int:
    """Index of the one candidate that `child` differs from in exactly one dimension."""
    distances = [sum(child[k] != c[k] for k in child) for c in candidates]
    assert distances.count(1) == 1, distances
    return distances.index(1)


def test_morea_parent_is_a_random_non_dominated_member_of_the_sample():
    """The sample (here the whole population) has three non-dominated members and one
    dominated one: parents are spread over the three, never the dominated member, and not
    only the lowest-error member (which rank-based selection always took)."""
    members = [
        ({"num_layers": 2, "num_heads": 2, "num_units": 100}, {"error": 0.3, "params": 1.0}),
        ({"num_layers": 5, "num_heads": 5, "num_units": 500}, {"error": 0.2, "params": 2.0}),
        ({"num_layers": 8, "num_heads": 8, "num_units": 1000}, {"error": 0.1, "params": 3.0}),
        ({"num_layers": 11, "num_heads": 11, "num_units": 2000}, {"error": 0.4, "params": 4.0}),
    ]
    searcher = MOREASearcher(BIG, OBJECTIVES, seed=0, population_size=4, sample_size=4)
    for i, (config, result) in enumerate(members):
        searcher.configs[f"m{i}"] = config
        searcher.on_trial_complete(f"m{i}", result)
    configs = [config for config, _ in members]
    draws = 300
    parents = Counter(_parent(searcher.suggest(f"c{i}"), configs) for i in range(draws))
    assert parents[3] == 0  # dominated
    for member in range(3):  # expected draws / 3 = 100 each
        assert parents[member] >= 60, parents


def test_morea_parents_spread_over_the_front_of_a_two_objective_problem():
    """The sample is the whole population, so every parent must be non-dominated in it; over
    a run the children are not mostly mutants of the lowest-error member."""
    searcher = MOREASearcher(BIG, OBJECTIVES, seed=1, population_size=12, sample_size=12)
    near_lowest_error, total = 0, 0
    for i in range(300):
        config = searcher.suggest(str(i))
        members = list(searcher.population)
        if len(members) == searcher.population_size:
            vectors = np.array([v for _, v in members])
            distances = [sum(config[k] != m[k] for k in config) for m, _ in members]
            if distances.count(1) == 1:  # the parent is known
                assert pareto.pareto_mask(vectors)[distances.index(1)]
            near_lowest_error += distances[int(np.argmin(vectors[:, 0]))] == 1
            total += 1
        searcher.on_trial_complete(str(i), _two_objective_problem(config))
    assert total == 300 - 12
    # rank-based selection mutated the lowest-error member every time
    assert near_lowest_error < 0.5 * total, (near_lowest_error, total)


def _drive(searcher, space, n: int) -> list[dict[str, int]]:
    """Suggests n configs, completing each before the next, and returns them."""
    configs = []
    for i in range(n):
        config = searcher.suggest(str(i))
        configs.append(config)
        searcher.on_trial_complete(str(i), _two_objective_problem(config))
    return configs


def _assert_no_duplicates(configs, space):
    as_tuples = [tuple(sorted(c.items())) for c in configs]
    assert len(set(as_tuples)) == len(as_tuples)
    sub_networks = [space.to_sub_network(c) for c in configs]
    assert len(set(sub_networks)) == len(sub_networks)


def test_nsga2_never_hands_out_a_config_twice():
    searcher = make_searcher("nsga2", BIG, OBJECTIVES, "min", seed=0, population_size=20)
    configs = _drive(searcher, BIG, 600)
    _assert_no_duplicates(configs, BIG)


def test_nsga2_does_not_duplicate_a_config_in_flight():
    """Eight trials in flight at a time, completed out of order."""
    searcher = make_searcher("nsga2", BIG, OBJECTIVES, "min", seed=3, population_size=10)
    rng = np.random.default_rng(0)
    running: dict[str, dict[str, int]] = {}
    configs = []
    for i in range(400):
        config = searcher.suggest(str(i))
        configs.append(config)
        running[str(i)] = config
        if len(running) == 8:
            done = list(running)[int(rng.integers(len(running)))]
            searcher.on_trial_complete(done, _two_objective_problem(running.pop(done)))
    _assert_no_duplicates(configs, BIG)


def test_nsga2_still_learns_from_told_duplicates():
    """Duplicates are told to Optuna, not dropped: every Optuna trial ends complete."""
    searcher = make_searcher("nsga2", BIG, OBJECTIVES, "min", seed=0, population_size=20)
    configs = _drive(searcher, BIG, 200)
    trials = searcher._ot_study.get_trials(deepcopy=False)
    assert len(trials) >= len(configs)
    assert all(t.state.name == "COMPLETE" for t in trials)
    # a told duplicate carries the values of the evaluated config with its sub-network
    values = {BIG.to_sub_network(c): tuple(_two_objective_problem(c).values()) for c in configs}
    for t in trials:
        assert tuple(t.values) == pytest.approx(values[BIG.to_sub_network(t.params)])


def test_nsga2_small_space_is_exhausted_without_duplicates():
    """A space with fewer sub-networks than requested trials: every one is handed out once,
    then the searcher says it is finished."""
    space = SmallSpace(2, 2, 3)  # 1 + 2 * 2 * 3 = 13 sub-networks
    searcher = make_searcher("nsga2", space, OBJECTIVES, "min", seed=0, population_size=4)
    configs = []
    for i in range(20):
        config = searcher.suggest(str(i))
        if config == searcher.FINISHED:
            break
        configs.append(config)
        searcher.on_trial_complete(str(i), _two_objective_problem(config))
    _assert_no_duplicates(configs, space)
    assert len(configs) == 13


def test_nsga2_state_round_trip_keeps_deduplicating(tmp_path):
    """Tune saves and restores searchers on resume: the restored searcher goes on as the
    original would, still without duplicates."""
    original = make_searcher("nsga2", BIG, OBJECTIVES, "min", seed=0, population_size=10)
    first = _drive(original, BIG, 150)
    in_flight = original.suggest("150")
    original.save(str(tmp_path / "nsga2.pkl"))
    restored = make_searcher("nsga2", BIG, OBJECTIVES, "min", seed=7, population_size=10)
    restored.restore(str(tmp_path / "nsga2.pkl"))
    later = {}
    for searcher in (original, restored):
        searcher.on_trial_complete("150", _two_objective_problem(in_flight))
        configs = []
        for i in range(151, 300):
            configs.append(searcher.suggest(str(i)))
            searcher.on_trial_complete(str(i), _two_objective_problem(configs[-1]))
        later[searcher is restored] = configs
    assert later[True] == later[False]
    _assert_no_duplicates([*first, in_flight, *later[True]], BIG)
