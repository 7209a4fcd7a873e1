"""MO-ASHA: unit tests with stub trials (no cluster), then one real Ray Tune run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from ray.tune.schedulers import TrialScheduler

from nas_prune.search import pareto
from nas_prune.search.moasha import MOASHA, rung_levels

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


@dataclass
class StubTrial:
    """All the scheduler reads from a trial."""

    trial_id: str
    config: dict = field(default_factory=dict)


def report(scheduler: MOASHA, trial_id: str, t: int, a: float, b: float, keys=("a", "b")) -> str:
    trial = StubTrial(trial_id)
    scheduler.on_trial_add(None, trial)
    result = {"training_iteration": t, keys[0]: a, keys[1]: b}
    return scheduler.on_trial_result(None, trial, result)


def test_rung_levels():
    assert rung_levels(1, 3, 81) == [1, 3, 9, 27, 81]
    assert rung_levels(2, 2, 20) == [2, 4, 8, 16]
    assert rung_levels(1, 3, 1) == [1]
    scheduler = MOASHA(["a", "b"], grace_period=1, reduction_factor=3, max_t=81, brackets=3)
    assert scheduler.milestones(0) == [1, 3, 9, 27, 81]
    assert scheduler.milestones(1) == [3, 9, 27, 81]
    assert scheduler.milestones(2) == [9, 27, 81]


def test_brackets_are_assigned_round_robin():
    scheduler = MOASHA(["a", "b"], max_t=9, brackets=2)
    for i in range(4):
        scheduler.on_trial_add(None, StubTrial(f"t{i}"))
    # t1 is in bracket 1, whose first rung is 3: iteration 1 records nothing there.
    assert report(scheduler, "t1", 1, 0.0, 0.0) == CONTINUE
    assert "t=3: 0 trials" in scheduler.debug_string().splitlines()[2]
    assert report(scheduler, "t2", 1, 0.0, 0.0) == CONTINUE
    assert "t=1: 1 trials" in scheduler.debug_string().splitlines()[1]


def test_dominated_trial_stops_and_spread_trial_continues():
    scheduler = MOASHA(["a", "b"], ["min", "min"], max_t=8, grace_period=1, reduction_factor=2)
    assert report(scheduler, "A", 1, 2, 2) == CONTINUE  # first at the rung
    assert report(scheduler, "B", 1, 3, 3) == STOP  # dominated by A; rank 1, keep 1
    # front {A, C} normalised: C (0, 1), A (1, 0): equally near the ideal, the newcomer first
    assert report(scheduler, "C", 1, 1, 4) == CONTINUE
    # front {A, C, D} normalised: C (0, 1), A (1/3, 1/3), D (1, 0): the compromise A first,
    # then C and D are equally far from it: the newcomer D first.
    assert report(scheduler, "D", 1, 4, 1) == CONTINUE  # rank 1 < ceil(4 / 2)
    assert report(scheduler, "E", 1, 2.5, 2.5) == STOP  # dominated by A; rank 3 >= 3
    # only the first report past a rung decides: A continues at iteration 1 again
    assert report(scheduler, "A", 1, 9, 9) == CONTINUE
    assert report(scheduler, "A", 2, 9, 9) == CONTINUE  # first at rung 2
    assert report(scheduler, "C", 3, 10, 10) == STOP  # dominated by A at rung 2


def test_trial_dominating_its_rung_continues():
    """The syne-tune bug case: the newcomer dominates all four trials already at the rung."""
    scheduler = MOASHA(["a", "b"], max_t=9, grace_period=1, reduction_factor=3)
    earlier = [(2, 6), (6, 2), (4, 4), (5, 5)]
    for i, (a, b) in enumerate(earlier):
        report(scheduler, f"t{i}", 1, a, b)
    # syne-tune ranks [recorded..., newcomer] and reads the ordering as ranks: the newcomer
    # (index 4) would get order[4] == 3, the index of the worst trial, and be stopped.
    points = np.array([*earlier, (1, 1)], float)
    assert pareto.sort_order(points)[4] >= math.ceil(len(points) / 3)
    assert pareto.rank(points)[4] == 0
    assert report(scheduler, "new", 1, 1, 1) == CONTINUE


@pytest.mark.parametrize("metrics", [("a", "b"), ("b", "a")])
def test_only_slot_goes_to_the_compromise_not_the_first_objective_end(metrics):
    """Three non-dominated trials at a rung with rf=3: one may continue. It is the compromise
    point (4, 4), nearest the ideal point after normalisation, whichever objective comes
    first and whichever trial arrives last; the ends (1, 9) and (9, 1) are stopped."""
    points = {"end_a": (1, 9), "middle": (4, 4), "end_b": (9, 1)}
    for newcomer in points:
        scheduler = MOASHA(list(metrics), max_t=9, grace_period=1, reduction_factor=3)
        for other in points:
            if other != newcomer:
                report(scheduler, other, 1, *points[other])
        expected = CONTINUE if newcomer == "middle" else STOP
        assert report(scheduler, newcomer, 1, *points[newcomer]) == expected, newcomer


def test_num_stopped_counts_early_stops_only():
    scheduler = MOASHA(["a", "b"], max_t=3, grace_period=1, reduction_factor=3)
    assert report(scheduler, "A", 1, 0, 0) == CONTINUE
    assert report(scheduler, "A", 3, 0, 0) == STOP  # finished at max_t: not stopped early
    assert "num_stopped=0" in scheduler.debug_string()
    assert report(scheduler, "B", 1, 1, 1) == STOP  # dominated at rung 1
    assert report(scheduler, "C", 1, 2, 2) == STOP
    assert report(scheduler, "D", 1, -1, -1) == CONTINUE
    assert report(scheduler, "D", 3, -1, -1) == STOP  # max_t again
    assert "num_stopped=2" in scheduler.debug_string()


def _history_run(scheduler: MOASHA) -> list[tuple[str, int, dict[str, float]]]:
    """Reports a fixed history to `scheduler` as Tune would, returning it as rows."""
    history = [
        ("t0", 1, 2, 2), ("t1", 1, 3, 3), ("t0", 2, 1.8, 1.9), ("t2", 1, 1, 4),
        ("t0", 3, 1.5, 1.5), ("t3", 1, 4, 1), ("t2", 2, 0.9, 3.5), ("t2", 3, 0.8, 3.2),
        ("t4", 1, 2.5, 2.5), ("t5", 1, 0.5, 5), ("t3", 2, 3, 0.9), ("t5", 2, 0.5, 4.5),
        ("t3", 3, 2.5, 0.8), ("t5", 3, 0.4, 4), ("t0", 9, 1, 1),
    ]
    rows, stopped = [], set()
    for trial_id, t, a, b in history:
        if trial_id in stopped:
            continue
        if report(scheduler, trial_id, t, a, b) == STOP:
            stopped.add(trial_id)
        rows.append((trial_id, t, {"a": a, "b": b}))
    return rows


@pytest.mark.parametrize("brackets", [1, 2])
def test_record_history_rebuilds_the_rungs(brackets):
    """After Tuner.restore Tune never calls restore(): record_history refills the rungs from
    recorded results, and newcomers are then judged as by the uninterrupted scheduler."""

    def fresh() -> MOASHA:
        return MOASHA(["a", "b"], max_t=9, grace_period=1, reduction_factor=3,
                      brackets=brackets)

    uninterrupted = fresh()
    rows = _history_run(uninterrupted)
    rebuilt = fresh()
    rebuilt.record_history(rows)
    assert rebuilt.debug_string().splitlines()[1:] == uninterrupted.debug_string().splitlines()[1:]
    newcomers = [("n0", 1, 2.2, 2.2), ("n1", 1, 0.2, 0.2), ("n2", 3, 1.6, 1.6),
                 ("n3", 3, 0.3, 6), ("n4", 3, 1.4, 1.4), ("n5", 3, 3, 3)]
    decisions = []
    for trial_id, t, a, b in newcomers:
        decision = report(rebuilt, trial_id, t, a, b)
        assert decision == report(uninterrupted, trial_id, t, a, b), trial_id
        decisions.append(decision)
    assert STOP in decisions and CONTINUE in decisions
    # an empty scheduler (what Tuner.restore leaves) would let a dominated newcomer through
    assert report(fresh(), "late", 1, 9, 9) == CONTINUE
    assert report(rebuilt, "late", 1, 9, 9) == report(uninterrupted, "late", 1, 9, 9) == STOP


def test_record_history_sorts_each_trials_rows_and_checks_keys():
    in_order, shuffled = (MOASHA(["a", "b"], max_t=9, reduction_factor=3) for _ in range(2))
    in_order.record_history([("t0", 1, {"a": 2, "b": 2}), ("t0", 2, {"a": 1, "b": 1}),
                             ("t1", 3, {"a": 3, "b": 0})])
    # t0's second report listed first: the rung at 1 must still hold its first report
    shuffled.record_history([("t0", 2, {"a": 1, "b": 1}), ("t0", 1, {"a": 2, "b": 2}),
                             ("t1", 3, {"a": 3, "b": 0})])
    assert "t=1: 1 trials | t=3: 1 trials" in shuffled.debug_string()
    for scheduler in (in_order, shuffled):
        # against (2, 2) it continues; had t0's report at 2 taken rung 1, (1, 1) would stop it
        assert report(scheduler, "new", 1, 1.5, 1.5) == CONTINUE
    with pytest.raises(ValueError, match=r"\['b'\], missing"):
        in_order.record_history([("t2", 1, {"a": 0.5})])


def test_max_mode_flips_the_sign():
    maximise = MOASHA(["acc", "size"], ["max", "min"], max_t=8, reduction_factor=2)
    assert report(maximise, "A", 1, 0.9, 10, keys=("acc", "size")) == CONTINUE
    assert report(maximise, "B", 1, 0.8, 20, keys=("acc", "size")) == STOP  # dominated
    assert report(maximise, "C", 1, 0.95, 10, keys=("acc", "size")) == CONTINUE
    minimise = MOASHA(["acc", "size"], "min", max_t=8, reduction_factor=2)
    assert report(minimise, "A", 1, 0.9, 10, keys=("acc", "size")) == CONTINUE
    assert report(minimise, "B", 1, 0.8, 20, keys=("acc", "size")) == CONTINUE  # best acc


def test_stops_at_max_t():
    scheduler = MOASHA(["a", "b"], max_t=3, grace_period=1, reduction_factor=3)
    assert report(scheduler, "A", 1, 0, 0) == CONTINUE
    assert report(scheduler, "A", 2, 0, 0) == CONTINUE  # no rung at 2
    assert report(scheduler, "A", 3, 0, 0) == STOP  # first at rung 3 but at max_t
    assert "t=3: 1 trials" in scheduler.debug_string()


def test_on_trial_complete_records_without_deciding():
    scheduler = MOASHA(["a", "b"], max_t=9)
    trial = StubTrial("A")
    scheduler.on_trial_add(None, trial)
    scheduler.on_trial_complete(None, trial, {"training_iteration": 3, "a": 0, "b": 0})
    scheduler.on_trial_complete(None, StubTrial("B"), {"training_iteration": 3})  # skipped
    assert "t=1: 0 trials | t=3: 1 trials" in scheduler.debug_string()


def test_save_restore_round_trip(tmp_path):
    def fresh() -> MOASHA:
        return MOASHA(["a", "b"], max_t=8, grace_period=1, reduction_factor=2, brackets=2)

    scheduler = fresh()
    for i, (a, b) in enumerate([(2, 2), (3, 3), (1, 4), (4, 1), (0, 5), (5, 0)]):
        report(scheduler, f"t{i}", 2, a, b)
    path = tmp_path / "moasha.pkl"
    scheduler.save(str(path))
    restored = fresh()
    restored.restore(str(path))
    assert restored.debug_string() == scheduler.debug_string()
    for i, (a, b) in enumerate([(2.5, 2.5), (0.5, 0.5), (6, 6)], start=6):
        assert report(restored, f"t{i}", 2, a, b) == report(scheduler, f"t{i}", 2, a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["moasha.pkl"]  # no temp file left
    with pytest.raises(ValueError, match="cannot restore MOASHA state"):
        MOASHA(["a", "c"], max_t=8, reduction_factor=2, brackets=2).restore(str(path))


def test_missing_metric_names_the_keys():
    scheduler = MOASHA(["a", "b"], max_t=9)
    trial = StubTrial("A")
    scheduler.on_trial_add(None, trial)
    expected = r"\['b'\], missing.*present: \['a', 'training_iteration'\]"
    with pytest.raises(ValueError, match=expected):
        scheduler.on_trial_result(None, trial, {"training_iteration": 1, "a": 0.5})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": []}, "at least one metric"),
        ({"metrics": ["a", "a"]}, "distinct"),
        ({"modes": ["min"]}, r"1 modes \[.min.\] for 2 objectives"),
        ({"modes": "maximise"}, "'min' or 'max'"),
        ({"grace_period": 0}, "grace_period must be > 0"),
        ({"reduction_factor": 1}, "reduction_factor must be > 1"),
        ({"max_t": 0.5}, r"max_t \(0.5\) must be >= grace_period"),
        ({"brackets": 0}, "brackets must be between 1 and"),
        ({"max_t": 9, "brackets": 4}, r"brackets must be between 1 and the number of rungs \(3"),
        ({"rank_method": "crowding"}, "rank_method must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    kwargs = {"metrics": ["a", "b"], **kwargs}
    with pytest.raises(ValueError, match=message):
        MOASHA(**kwargs)


def test_set_search_properties():
    scheduler = MOASHA(["a", "b"], ["min", "max"])
    assert scheduler.set_search_properties(None, None, num_samples=4)
    assert scheduler.set_search_properties("b", "max")
    assert scheduler.set_search_properties("a", None)
    assert not scheduler.set_search_properties("b", "min")
    assert not scheduler.set_search_properties("c", "min")


@pytest.fixture
def ray_cluster(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_tuner_stops_dominated_configs(ray_cluster, tmp_path):
    from ray import tune

    # x=0 and x=1 are the Pareto front; x>=2 are ever worse. Trials run one at a time in grid
    # order, so every rung sees the front first: with epsilon-net ranks and rf=3, the second
    # front member ties with the first (both extremes of a two-point front) and, as the
    # newcomer, wins the tie.
    objectives = {0: (1.0, 0.0), 1: (0.0, 1.0)}

    def trainable(config):
        a, b = objectives.get(config["x"], (config["x"], config["x"]))
        for iteration in range(1, 10):
            tune.report({"a": a + 1 / iteration, "b": b + 1 / iteration})

    scheduler = MOASHA(["a", "b"], ["min", "min"], max_t=9, grace_period=1, reduction_factor=3)
    tuner = tune.Tuner(
        trainable,
        param_space={"x": tune.grid_search(list(range(8)))},
        tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=1, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="moasha", verbose=0),
    )
    results = tuner.fit()
    assert not results.errors
    iterations = {r.config["x"]: r.metrics["training_iteration"] for r in results}
    assert iterations == {0: 9, 1: 9, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}
