"""Searchers and the Ray Tune search on a tiny trained supernet (real Tune, real Parquet)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import ray
from ray.tune.search.optuna import OptunaSearch

from nas_prune import checkpoint, data, registry, results, train
from nas_prune.errors import CheckpointError, SearchError
from nas_prune.export import export_sub_network
from nas_prune.options import (
    FinetuneOptions,
    ProfileOptions,
    SearchOptions,
    SupernetOptions,
    TaskOptions,
)
from nas_prune.search import pareto
from nas_prune.search.driver import run_search
from nas_prune.search.searchers import (
    LocalSearcher,
    MOREASearcher,
    RandomSearcher,
    make_searcher,
)
from nas_prune.search.worker import TrialSetup, resident_evaluator, score_sub_network
from nas_prune.space import SmallSpace
from tests.test_train import _synthetic_csv, save_tiny_bert

SPACE = SmallSpace(2, 4, 48)


# ------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"searcher": "bayes"}, "unknown searcher 'bayes'.*random, local, morea, nsga2"),
        ({"scheduler": "hyperband"}, "unknown scheduler 'hyperband'.*fifo, moasha"),
        ({"objectives": ["error", "speed"]}, "unknown objective 'speed'"),
        ({"objectives": []}, "at least one objective"),
        ({"searcher": "nsga2", "scheduler": "moasha", "max_t": 3}, "cannot serve the moasha"),
        ({"scheduler": "moasha", "max_t": 1}, "max_t >= 2"),
        ({"grace_period": 5, "max_t": 3}, "grace_period 5 exceeds max_t 3"),
        ({"space": "huge"}, "unknown space 'huge'"),
        ({"num_samples": 0}, "num_samples must be >= 1"),
    ],
)
def test_bad_search_options_fail_before_any_trial(kwargs, message):
    with pytest.raises(SearchError, match=message):
        SearchOptions(**kwargs)


def test_validation_order_follows_seed_unless_fixed():
    assert SearchOptions(seed=3).validation_seed == 3
    fixed = SearchOptions(seed=3, valid_seed=0)
    assert (fixed.seed, fixed.validation_seed) == (3, 0)


# ------------------------------------------------------------------------------- searchers
def _complete(searcher, trial_id, config, error):
    params = sum(config.values())
    searcher.on_trial_complete(trial_id, {"error": error, "params": params, "fidelity": 10})


def _drive(searcher, n: int) -> list[dict]:
    """`n` suggestions, each completed at full fidelity with an error that falls with size."""
    configs = []
    for i in range(n):
        config = searcher.suggest(str(i))
        configs.append(config)
        searcher.on_trial_complete(str(i), {"error": 1 / (1 + sum(config.values())),
                                            "params": sum(config.values()), "fidelity": 10})
    return configs


def test_random_searcher_is_seeded():
    a = RandomSearcher(SPACE, ["error", "params"], seed=3)
    b = RandomSearcher(SPACE, ["error", "params"], seed=3)
    c = RandomSearcher(SPACE, ["error", "params"], seed=4)
    seq_a = [a.suggest(str(i)) for i in range(10)]
    assert seq_a == [b.suggest(str(i)) for i in range(10)]
    assert seq_a != [c.suggest(str(i)) for i in range(10)]


@pytest.mark.parametrize("name", list(registry.SEARCHERS))
def test_every_searcher_is_seeded(name):
    """The same seed and results give the same suggestions, another seed others."""

    def run(seed: int) -> list[dict]:
        searcher = make_searcher(name, SPACE, ["error", "params"], "min", seed=seed,
                                 max_fidelity=10)
        return _drive(searcher, 12)

    assert run(5) == run(5)
    assert run(5) != run(6)


@pytest.mark.parametrize("name", list(registry.SEARCHERS))
def test_initial_configs_are_suggested_first_then_the_searchers_own(name):
    initial = [{"num_layers": 1, "num_heads": 3, "num_units": 7},
               {"num_layers": 2, "num_heads": 2, "num_units": 30}]
    searcher = make_searcher(name, SPACE, ["error", "params"], "min", seed=0,
                             max_fidelity=10, initial=initial)
    configs = _drive(searcher, 6)
    assert configs[:2] == initial
    assert all(c not in initial for c in configs[2:])  # each sub-network once
    if name == "local":  # then its own start: largest, smallest, middle
        assert configs[2:5] == [SPACE.largest(), SPACE.smallest(), SPACE.middle()]


def test_sample_within_draws_distinct_sub_networks_inside_the_band():
    def size(config):
        return sum(config.values()) / 54

    rng = np.random.default_rng(0)
    drawn = SPACE.sample_within(rng, size, 0.4, 0.5, n=10)
    assert len(drawn) == 10
    assert all(0.4 < size(c) <= 0.5 for c in drawn)
    assert len({SPACE.to_sub_network(c) for c in drawn}) == 10
    # a band nothing falls in gives nothing (after `tries` draws), not an endless loop
    assert SPACE.sample_within(rng, size, 1.5, 2.0, n=3, tries=200) == []


def test_local_search_starts_largest_smallest_middle_then_mutates_archive():
    s = LocalSearcher(SPACE, ["error", "params"], seed=0, max_fidelity=10)
    first = [s.suggest(str(i)) for i in range(3)]
    assert first == [SPACE.largest(), SPACE.smallest(), SPACE.middle()]
    for i, config in enumerate(first):
        _complete(s, str(i), config, error=[0.1, 0.5, 0.2][i])
    # all three trade error for size: all stay in the archive
    assert len(s.archive) == 3
    for i in range(3, 30):
        config = s.suggest(str(i))
        distances = [sum(config[k] != a[k] for k in config) for a, _ in s.archive]
        assert min(distances) == 1  # exactly one dimension re-sampled from an archive member


def test_local_search_archive_drops_dominated_and_ignores_low_fidelity():
    s = LocalSearcher(SPACE, ["error", "params"], seed=0, max_fidelity=10)
    a, b = {"num_layers": 1, "num_heads": 1, "num_units": 1}, {"num_layers": 2, "num_heads": 4,
                                                                   "num_units": 48}
    s.configs.update({"a": a, "b": b, "c": dict(a)})
    s.on_trial_complete("c", {"error": 0.0, "params": 0, "fidelity": 3})  # stopped early
    assert s.archive == []
    _complete(s, "b", b, error=0.5)
    _complete(s, "a", a, error=0.1)  # smaller and better: dominates b
    assert [config for config, _ in s.archive] == [a]


def test_morea_mutates_the_best_of_a_sample():
    s = MOREASearcher(SPACE, ["error", "params"], seed=0, population_size=4, sample_size=4,
                      max_fidelity=10)
    configs = [s.suggest(str(i)) for i in range(4)]
    for i, config in enumerate(configs):
        _complete(s, str(i), config, error=0.9)
    best = {"num_layers": 0, "num_heads": 1, "num_units": 1}
    s.configs["best"] = best
    s.on_trial_complete("best", {"error": 0.0, "params": 0, "fidelity": 10})
    child = s.suggest("child")
    assert sum(child[k] != best[k] for k in child) == 1


def test_searcher_state_round_trips(tmp_path):
    s = MOREASearcher(SPACE, ["error", "params"], seed=1, population_size=3, sample_size=2)
    for i in range(5):
        _complete(s, str(i), s.suggest(str(i)), error=0.1 * i)
    s.save(str(tmp_path / "state.pkl"))
    fresh = MOREASearcher(SPACE, ["error", "params"], seed=99, population_size=3, sample_size=2)
    fresh.restore(str(tmp_path / "state.pkl"))
    assert [s.suggest(f"n{i}") for i in range(5)] == [fresh.suggest(f"n{i}") for i in range(5)]


def test_nsga2_is_optuna():
    searcher = make_searcher("nsga2", SPACE, ["error", "params"], "min", seed=0)
    assert isinstance(searcher, OptunaSearch)
    with pytest.raises(ValueError, match="unknown searcher"):
        make_searcher("grid", SPACE, ["error"])


# ------------------------------------------------------------------------------- Tune runs
@pytest.fixture(scope="module")
def supernet(tmp_path_factory):
    """A tiny supernet trained with the `full` strategy on the synthetic task."""
    root = tmp_path_factory.mktemp("search")
    tokenizer = data.load_tokenizer(data.default_model_path())
    save_tiny_bert(root / "base", tokenizer)
    csv = _synthetic_csv(root / "toy.csv")
    task = data.tokenize(data.load_task(csv), tokenizer, 32)
    train.finetune(str(root / "base"), task, root / "teacher",
                   FinetuneOptions(epochs=2, batch_size=16, lr=3e-3, max_length=32))
    train.train_supernet(root / "teacher", task, root / "supernet",
                         SupernetOptions(strategy="full", max_steps=6, batch_size=16,
                                         max_length=32))
    return root, TaskOptions(task=str(csv))


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize(("searcher", "scheduler"),
                         [("random", "fifo"), ("local", "moasha"), ("morea", "fifo"),
                          ("nsga2", "fifo")])
def test_search_writes_every_result_to_parquet(supernet, ray_local, tmp_path, searcher,
                                               scheduler):
    root, csv = supernet
    max_t = 3 if scheduler == "moasha" else 1
    opts = SearchOptions(searcher=searcher, scheduler=scheduler, num_samples=8, max_t=max_t,
                         batch_size=16, objectives=["error", "params_ratio"])
    frame = run_search(root / "supernet", csv, tmp_path / "results", "exp", opts,
                       storage_path=tmp_path / "tune")
    assert frame["trial_id"].nunique() == 8
    final = frame.sort_values("fidelity").groupby("trial_id").tail(1)
    n_valid = len(data.load_task(csv).valid)
    assert set(frame["status"]) <= {"ok", "stopped", "rung"}
    # the README's recipe: status ok is exactly the complete evaluations
    assert (frame.loc[frame["status"] == "ok", "fidelity"] == n_valid).all()
    assert set(final["status"]) <= {"ok", "stopped"}
    assert (final.loc[final["status"] == "ok", "fidelity"] == n_valid).all()
    assert ((frame["error"] >= 0) & (frame["error"] <= 1)).all()
    assert (frame["params_ratio"] <= 1).all() and (frame["params_ratio"] > 0).all()
    assert set(frame["searcher"]) == {searcher} and set(frame["scheduler"]) == {scheduler}
    assert {"cfg_num_layers", "cfg_num_heads", "cfg_num_units"} <= set(frame.columns)
    for _, row in frame.iterrows():
        config = json.loads(row["config"])
        assert config["num_layers"] == row["cfg_num_layers"]
    # the same rows through pandas alone
    plain = pd.read_parquet(tmp_path / "results" / "evaluations")
    assert len(plain) == len(frame)
    if scheduler == "moasha":
        # rung results are rows too: fidelity grows over a trial's rows
        assert (frame.groupby("trial_id")["fidelity"].nunique() > 1).any()


def test_search_draws_its_first_trials_at_the_budgets(supernet, ray_local, tmp_path):
    """search.budgets: the first budget_samples trials per budget lie just below it (sizes
    from the checkpoint's model class on the meta device, checked here against the trials'
    own params_ratio), interleaved over budgets. (The tiny model's embeddings are most of
    it: its sub-networks span params ratios 0.985 to 1.)"""
    root, csv = supernet
    opts = SearchOptions(searcher="local", num_samples=7, batch_size=16, num_workers=1,
                         objectives=["error", "params_ratio"], budgets=[0.99, 0.997],
                         budget_samples=2, budget_band=0.003)
    frame = run_search(root / "supernet", csv, tmp_path / "results", "exp", opts,
                       storage_path=tmp_path / "tune")
    # one trial at a time: the order of their results is the order of the suggestions
    ratios = frame.sort_values("timestamp").groupby("trial_id", sort=False)["params_ratio"]
    ratios = ratios.first()
    assert len(ratios) == 7
    first = ratios.to_numpy()[:4]
    assert (0.987 < first[[0, 2]]).all() and (first[[0, 2]] <= 0.99).all()
    assert (0.994 < first[[1, 3]]).all() and (first[[1, 3]] <= 0.997).all()
    # then local search's own start: the largest sub-network
    assert ratios.to_numpy()[4] == 1.0


def test_search_budgets_must_be_ratios():
    with pytest.raises(SearchError, match=r"params ratios in \(0, 1\]"):
        SearchOptions(budgets=[0.5, 1.5])
    with pytest.raises(SearchError, match="budget_band"):
        SearchOptions(budgets=[0.5], budget_band=0)


def test_evaluator_is_loaded_once_per_process_and_scores_growing_prefixes(supernet):
    """The supernet and validation batches stay resident between trials; a trial reports the
    error on growing prefixes of the validation set and leaves the supernet full."""
    root, csv = supernet
    opts = SearchOptions(scheduler="moasha", max_t=3, batch_size=8, valid_examples=40)
    setup = TrialSetup(str(root / "supernet"), csv, opts, "small", 32)
    evaluator = resident_evaluator(setup)
    assert resident_evaluator(setup) is evaluator
    assert len(evaluator.chunks) == 3 and len(evaluator.task.train) == 0  # valid only
    full = list(score_sub_network(SPACE.largest(), setup))
    config = {"num_layers": 1, "num_heads": 2, "num_units": 24}
    scored = list(score_sub_network(config, setup))
    assert [r["fidelity"] for r in scored] == [16, 24, 40]  # batches 2 + 1 + 2
    assert full[-1]["params_ratio"] == 1 and scored[-1]["params_ratio"] < 1
    # scoring a sub-network leaves the supernet full, and scoring is deterministic
    assert list(score_sub_network(SPACE.largest(), setup))[-1]["error"] == full[-1]["error"]
    assert list(score_sub_network(config, setup))[-1]["error"] == scored[-1]["error"]


def test_moasha_stops_weak_subnetworks(supernet, ray_local, tmp_path):
    root, csv = supernet
    opts = SearchOptions(searcher="random", scheduler="moasha", num_samples=12, max_t=4,
                         grace_period=1, reduction_factor=2, batch_size=8, num_workers=1)
    frame = run_search(root / "supernet", csv, tmp_path / "results", "exp", opts,
                       storage_path=tmp_path / "tune")
    final = frame.sort_values("fidelity").groupby("trial_id").tail(1)
    assert (final["status"] == "stopped").any()
    assert (final["status"] == "ok").any()


def test_latency_objective_needs_profiled_hardware(supernet, ray_local, tmp_path):
    root, csv = supernet
    opts = SearchOptions(num_samples=2, objectives=["error", "latency:H100"])
    with pytest.raises(SearchError, match="H100"):
        run_search(root / "supernet", csv, tmp_path / "r", "exp", opts,
                   storage_path=tmp_path / "tune")


def test_search_rejects_a_non_supernet_and_infeasible_workers(supernet, ray_local, tmp_path):
    root, csv = supernet
    with pytest.raises(CheckpointError, match="no config.json"):
        run_search(tmp_path, csv, tmp_path / "r", "exp", SearchOptions(num_samples=1))
    with pytest.raises(CheckpointError, match="fine-tuned teacher, not a trained supernet"):
        run_search(root / "teacher", csv, tmp_path / "r", "exp", SearchOptions(num_samples=1))
    three = tmp_path / "three.csv"  # the supernet predicts 2 labels
    three.write_text("text,label\n" + "".join(f"w{i} x,{i % 3}\n" for i in range(60)))
    with pytest.raises(CheckpointError, match="fine-tuned for task"):
        run_search(root / "supernet", TaskOptions(task=str(three)), tmp_path / "r", "exp",
                   SearchOptions(num_samples=1))
    with pytest.raises(SearchError, match="need 5 CPUs but the Ray cluster has 2"):
        run_search(root / "supernet", csv, tmp_path / "r", "exp",
                   SearchOptions(num_samples=1, num_workers=5))
    with pytest.raises(Exception, match="out of range|outside|leave the model"):
        run_search(root / "supernet", csv, tmp_path / "r", "exp",
                   SearchOptions(num_samples=1), space_bounds={"num_layers": (0, 9)})
    model, _ = checkpoint.load_checkpoint(root / "supernet")
    tokenizer = data.load_tokenizer(str(root / "supernet"))
    exported = export_sub_network(model, SPACE.to_sub_network(SPACE.middle()),
                                  tmp_path / "exported", tokenizer)
    with pytest.raises(CheckpointError, match="exported sub-network, not a supernet"):
        run_search(exported, csv, tmp_path / "r", "exp", SearchOptions(num_samples=1))


_DRIVER = textwrap.dedent("""
    import logging
    import sys
    import ray
    from nas_prune.options import SearchOptions, TaskOptions
    from nas_prune.search.driver import run_search
    supernet, csv, out = sys.argv[1:4]
    logging.basicConfig(level=logging.INFO)
    ray.init(num_cpus=1, include_dashboard=False)
    opts = SearchOptions(searcher="local", num_samples=int(sys.argv[4]), batch_size=16,
                         num_workers=1)
    run_search(supernet, TaskOptions(task=csv), out + "/results", "exp", opts,
               storage_path=out + "/tune")
""")


def test_killed_search_resumes_without_rerunning_finished_trials(supernet, tmp_path):
    root, csv = supernet
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    args = [sys.executable, str(script), str(root / "supernet"), csv.task, str(tmp_path), "60"]
    proc = subprocess.Popen(args, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = results.ResultStore(tmp_path / "results", "exp")
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len(store.finished_trials()) < 4:
            assert proc.poll() is None, "the search finished before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = store.evaluations()
    assert 4 <= before["trial_id"].nunique() < 60
    # every trial finished before the kill is readable
    assert (before["status"] == "ok").all()

    done = subprocess.run(args, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    after = store.evaluations()
    # Tune re-runs unfinished trials and tops up to 60 trials it knows of; trials that finished
    # after Tune's last state save (at most a few seconds' worth) are kept as extra results
    assert 60 <= after["trial_id"].nunique() <= 60 + before["trial_id"].nunique()
    assert after.groupby("trial_id").size().max() == 1  # nothing recorded twice
    kept = after.set_index("trial_id").loc[before["trial_id"]]
    np.testing.assert_allclose(kept["error"], before.set_index("trial_id")["error"])
    assert set(before["timestamp"]) <= set(after["timestamp"])  # old rows kept, not re-run
    # the progress line's front counts the trials finished before the kill too
    last = re.findall(r"trials (\d+)/60 done, Pareto front (\d+)", done.stderr)[-1]
    front = pareto.pareto_mask(after[["error", "params_ratio"]].to_numpy(float)).sum()
    assert (int(last[0]), int(last[1])) == (after["trial_id"].nunique(), front)


def test_latency_objective_in_moasha_search(supernet, ray_local, tmp_path):
    """`latency:cpu` (predicted by the lookup table measured on the cpu type) is an objective
    like the others, here under MO-ASHA with local search."""
    root, csv = supernet
    opts = SearchOptions(searcher="local", scheduler="moasha", max_t=2, num_samples=6,
                         batch_size=16, objectives=["error", "latency:cpu"])
    frame = run_search(root / "supernet", csv, tmp_path / "results", "exp", opts,
                       profile=ProfileOptions(seq_len=16), storage_path=tmp_path / "tune")
    assert frame["trial_id"].nunique() == 6
    assert (frame["hardware"] == "cpu").all() and (frame["latency_ms"] > 0).all()
    by_layers = frame.groupby("cfg_num_layers")["latency_ms"].mean()
    assert by_layers.index.min() < by_layers.index.max()
    assert by_layers.loc[by_layers.index.min()] < by_layers.loc[by_layers.index.max()]


def test_standard_nas_trains_each_subnetwork(supernet, ray_local, tmp_path):
    """Standard NAS: each sub-network is cut from the fine-tuned model and trained for up to
    max_t epochs, reporting after each (fidelity = epochs)."""
    root, csv = supernet
    opts = SearchOptions(searcher="random", mode="standard", max_t=2, num_samples=2,
                         batch_size=16, train_batch_size=32, lr=1e-3)
    frame = run_search(root / "teacher", csv, tmp_path / "results", "std", opts,
                       storage_path=tmp_path / "tune")
    assert frame["trial_id"].nunique() == 2
    assert sorted(frame["fidelity"].unique()) == [1.0, 2.0]
    assert set(frame["fidelity_unit"]) == {"epochs"}


def test_measured_latency_objective_and_its_actor_is_released(supernet, ray_local, tmp_path):
    """`latency="measured"`: every sub-network is timed by the named CPU profiler actor, the
    measurement goes to the latency table too; the actor ends with the search, so the next
    search gets its CPU back."""
    root, csv = supernet
    opts = SearchOptions(searcher="random", num_samples=3, num_workers=1, batch_size=16,
                         objectives=["error", "latency:cpu"], latency="measured")
    frame = run_search(root / "supernet", csv, tmp_path / "results", "exp", opts,
                       profile=ProfileOptions(seq_len=16), storage_path=tmp_path / "tune")
    assert frame["trial_id"].nunique() == 3
    assert (frame["hardware"] == "cpu").all() and (frame["latency_ms"] > 0).all()
    # each measurement in full in the latency table, once per trial
    latency = results.load(tmp_path / "results", table="latency")
    assert sorted(latency["trial_id"]) == sorted(frame["trial_id"].unique())
    assert (latency["hardware"] == "cpu").all() and (latency["seq_len"] == 16).all()
    assert (latency["dtype"] == "fp32").all() and not latency["predicted"].any()
    merged = frame.merge(latency, on="trial_id", suffixes=("", "_measured"))
    np.testing.assert_allclose(merged["latency_ms"], merged["median_ms"])
    assert (merged["config"] == merged["config_measured"]).all()
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2
