"""The search driver: builds the Ray Tune experiment, records every result, resumes.

`run_search` checks the supernet and the options before anything starts, sets up the latency
objectives (lookup tables or profiler actors per hardware type), and runs a `Tuner` whose
trials (nas_prune.search.worker) score one sub-network each. `ResultsCallback` writes every
reported result to the Parquet results store (one file per finished trial) and logs progress;
Tune's own CSV/JSON/TensorBoard loggers are off. A killed search resumes from Tune's
experiment state: finished trials are not run again, and MO-ASHA's rungs are rebuilt from the
rows already stored.

Statuses of the stored rows: a trial's intermediate results (rungs, for MO-ASHA) are
``rung``; its last result is ``ok`` when it reached full fidelity and ``stopped`` when the
scheduler stopped it earlier; ``error`` marks a trial that failed. ``df.status == "ok"`` is
therefore exactly the complete evaluations.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune

from nas_prune import data as data_lib
from nas_prune import registry
from nas_prune import results as results_lib
from nas_prune.checkpoint import check_supernet, check_teacher, read_meta
from nas_prune.errors import CheckpointError, ProfileError, SearchError
from nas_prune.models import load_config
from nas_prune.options import ProfileOptions, SearchOptions, TaskOptions
from nas_prune.search import pareto
from nas_prune.search.searchers import MultiObjectiveSearcher, make_searcher
from nas_prune.search.worker import (
    FIDELITY,
    LATENCY_ROWS,
    TrialSetup,
    standard_trial,
    weight_sharing_trial,
)
from nas_prune.space import make_space

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- results
def _result_row(result: dict, trial_id: str, config: dict, ctx: dict[str, Any]) -> dict:
    row = {
        **ctx,
        "trial_id": trial_id,
        "config": {k: int(v) for k, v in config.items()},
        "fidelity": float(result.get(FIDELITY, 0)),
        "error": float(result["error"]),
        "metric_value": float(result["metric"]),
        "metric_name": result.get("metric_name", ""),
        "params": int(result["params"]),
        "params_ratio": float(result["params_ratio"]),
        "flops": int(result["flops"]),
        "eval_time_s": float(result.get("eval_time_s", 0.0)),
        "wall_time_s": time.time() - ctx["_started"],
        "status": "rung",
    }
    latency = [k for k in result if k.startswith("latency:")]
    if latency:
        row["hardware"] = latency[0].split(":", 1)[1]
        row["latency_ms"] = float(result[latency[0]])
    row.pop("_started")
    return row


class ResultsCallback(tune.Callback):
    """Appends every reported result to the Parquet store (one file per finished trial)
    and logs progress: trials done / to go, the current Pareto front and an ETA."""

    def __init__(self, store: results_lib.ResultStore, ctx: dict, objectives: Sequence[str],
                 num_samples: int, max_fidelity: float):
        self.store, self.ctx = store, ctx
        self.objectives, self.num_samples = list(objectives), num_samples
        self.max_fidelity = max_fidelity
        self.pending: dict[str, list[dict]] = {}
        self.recorded: set[str] = set()
        self.done = 0
        self.front: list[np.ndarray] = []
        self.started = time.perf_counter()

    def setup(self, **info):
        """Called at the start of every fit, a resumed one too: trials the store already
        holds (finished before an interruption) are not recorded twice."""
        self.recorded = self.store.finished_trials()
        self.done = len(self.recorded)
        self.front = [self._objectives(row) for row in self._stored_complete()]
        self.pending = {}
        self.started = time.perf_counter()
        self._done_at_start = self.done

    def _objectives(self, row) -> np.ndarray:
        return np.array([row["latency_ms" if k.startswith("latency:") else k]
                         for k in self.objectives], float)

    def _stored_complete(self) -> list[dict]:
        """The complete evaluations of trials the store holds (a resumed search's progress
        line counts their Pareto front too)."""
        if not self.recorded:
            return []
        rows = self.store.evaluations()
        rows = rows[rows["trial_id"].isin(self.recorded) & (rows["status"] == "ok")]
        return rows.to_dict("records")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id in self.recorded:
            return
        if result.get(LATENCY_ROWS):
            self.store.append_latency([{**m, "trial_id": trial.trial_id, "method": "search"}
                                       for m in result[LATENCY_ROWS]])
        row = _result_row(result, trial.trial_id, trial.config, self.ctx)
        self.pending.setdefault(trial.trial_id, []).append(row)

    def _flush(self, trial, status: str | None = None, message: str | None = None):
        """Write the trial's buffered rows: the last one is ``ok`` at full fidelity, else
        ``stopped`` (or `status`); earlier ones stay ``rung``."""
        rows = self.pending.pop(trial.trial_id, [])
        if rows:
            last = rows[-1]
            last["status"] = status or ("ok" if last["fidelity"] >= self.max_fidelity
                                        else "stopped")
            last["message"] = message
            self.store.append_evaluations(rows)
        return rows

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id in self.recorded:
            return  # finished (and counted) before an interruption; Tune ran it again
        rows = self._flush(trial)
        self.done += 1
        if rows and rows[-1]["status"] == "ok":
            self.front.append(self._objectives(rows[-1]))
        front = int(pareto.pareto_mask(np.array(self.front)).sum()) if self.front else 0
        new = self.done - self._done_at_start
        rate = new / max(1e-9, time.perf_counter() - self.started)
        eta = (self.num_samples - self.done) / rate if rate > 0 else float("nan")
        log.info("trials %d/%d done, Pareto front %d (%s), ETA %.0f s", self.done,
                 self.num_samples, front, ", ".join(self.objectives), max(0.0, eta))

    def on_trial_error(self, iteration, trials, trial, **info):
        if not self.pending.get(trial.trial_id):
            return  # failed before reporting anything: nothing to record
        self._flush(trial, "error", str(getattr(trial, "error_file", "") or "trial failed"))
        self.done += 1

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            self._flush(trial)


# --------------------------------------------------------------------------- checks
def check_checkpoint(checkpoint: str | os.PathLike, opts: SearchOptions,
                     task: data_lib.TaskData | None = None) -> tuple[dict[str, Any], str, int]:
    """(metadata, space name, max_length) of the checkpoint a search scores through: a trained
    supernet (weight sharing) or a fine-tuned model (standard NAS), for `task`'s labels if
    given."""
    path = Path(checkpoint)
    if opts.mode == "weight_sharing":
        meta = check_supernet(path)
    else:
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
        meta = read_meta(path)
    if task is not None:
        check_teacher(meta, int(meta.get("num_labels", 0)), task, path)
    trained = meta.get("space")
    space = opts.space or trained or "small"
    if trained and trained != space:
        log.warning("supernet %s was trained on the %s space; searching the %s space", path,
                    trained, space)
    return meta, space, int(meta.get("options", {}).get("max_length", 128))


def _max_fidelity(opts: SearchOptions, task: data_lib.TaskData, checkpoint: str,
                  max_length: int) -> tuple[float, int]:
    """(fidelity of a complete evaluation, validation examples scored): examples scored,
    predicted tokens (language modelling: the validation text cut into blocks), or epochs."""
    n = len(task.valid)
    if task.spec.is_lm:
        from nas_prune.evaluate import scored_validation

        tokenizer = data_lib.load_tokenizer(checkpoint)
        without_train = dataclasses.replace(task, train=task.train.select([]),
                                            test=task.test.select([]))
        n = len(scored_validation(without_train, tokenizer, max_length, opts.validation_seed,
                                  opts.valid_examples).valid)
    else:
        n = min(n, opts.valid_examples) if opts.valid_examples else n
    if opts.mode == "standard":
        return float(opts.max_t), n
    return float(n * (max_length - 1) if task.spec.is_lm else n), n


# --------------------------------------------------------------------------- the search
def run_search(
    checkpoint: str | os.PathLike,
    task: TaskOptions,
    results_dir: str | os.PathLike,
    experiment: str,
    opts: SearchOptions,
    *,
    profile: ProfileOptions | None = None,
    storage_path: str | os.PathLike | None = None,
    space_bounds: dict[str, tuple[int, int]] | None = None,
):
    """Search sub-networks of the supernet (or, in standard mode, fine-tuned model) at
    `checkpoint` on `task`, writing every result to the Parquet store at `results_dir` under
    `experiment`. The space and the token length are the supernet's (unless `opts.space` names
    another space); latency objectives are measured with the `profile` settings. If the
    experiment's Tune state exists under `storage_path`, the search resumes: finished trials
    are not re-run.

    Returns:
        The experiment's evaluations as a pandas DataFrame.
    """
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # save the experiment state often enough that a killed search loses little
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Ctrl-C raises KeyboardInterrupt here (the CLI then says to re-run the same command, which
    # resumes) instead of Tune's handler, which ends the loop quietly and prints its own
    # `Tuner.restore` hint while the pipeline would go on with a partial search
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # Tune's result grid looks for the per-trial JSON/CSV logs we switched off; our results
    # are in the Parquet store, so its "failed to fetch metrics" warnings are noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

    profile = profile or ProfileOptions()
    task = task.resolved()  # trials run in their own working directories
    check_checkpoint(checkpoint, opts)  # before loading any data
    with results_lib.ResultStore(results_dir, experiment).lock():  # one search per experiment
        return _search(checkpoint, task, results_dir, experiment, opts, profile, storage_path,
                       space_bounds)


def _search(checkpoint, task: TaskOptions, results_dir, experiment: str, opts: SearchOptions,
            profile: ProfileOptions, storage_path, space_bounds):
    """run_search's work, under the experiment's lock."""
    task_data = data_lib.load_task(task)
    meta, space_name, max_length = check_checkpoint(checkpoint, opts, task_data)
    space = make_space(space_name, load_config(checkpoint), space_bounds)
    if not ray.is_initialized():
        ray.init()
    cpus = ray.cluster_resources().get("CPU", 0)
    workers = opts.num_workers or max(1, int(cpus))
    if workers > cpus:
        raise SearchError(
            f"{workers} concurrent trials need {workers} CPUs but the Ray cluster has {cpus:g}; "
            "lower num_workers or add nodes"
        )
    max_fidelity, n_valid = _max_fidelity(opts, task_data, str(checkpoint), max_length)
    if opts.mode == "weight_sharing" and math.ceil(n_valid / opts.batch_size) < opts.max_t:
        raise SearchError(
            f"{n_valid} validation examples in batches of {opts.batch_size} make "
            f"{math.ceil(n_valid / opts.batch_size)} batches, too few for max_t="
            f"{opts.max_t} fidelity steps; lower max_t or batch_size"
        )
    checkpoint = str(Path(checkpoint).resolve())
    tables, actors, cpu_actors = _latency_objectives(opts, profile, checkpoint, space_name,
                                                     experiment)
    try:
        # a CPU profiler actor holds a CPU for the whole search: leave it one
        if cpu_actors and not opts.num_workers:
            workers = max(1, workers - cpu_actors)
        if workers + cpu_actors > cpus:
            raise SearchError(
                f"{workers} trials and {cpu_actors} CPU profiler actor(s) need more than the "
                f"cluster's {cpus:g} CPUs; lower num_workers or use latency='predicted'"
            )
        setup = TrialSetup(checkpoint, task, opts, space_name, max_length, tables, actors)
        return _fit(setup, space, meta, task_data, results_dir, experiment, workers,
                    max_fidelity, storage_path)
    finally:
        _release_profilers()


def _fit(setup: TrialSetup, space, meta: dict, task_data, results_dir, experiment: str,
         workers: int, max_fidelity: float, storage_path):
    opts = setup.search
    fn = weight_sharing_trial if opts.mode == "weight_sharing" else standard_trial
    trainable = tune.with_resources(tune.with_parameters(fn, setup=setup), {"cpu": 1})
    storage = Path(storage_path or Path(results_dir).parent / "tune").resolve()
    store = results_lib.ResultStore(results_dir, experiment)
    ctx = {
        "method": "nas", "searcher": opts.searcher, "scheduler": opts.scheduler,
        "strategy": meta.get("strategy"), "space": setup.space, "task": task_data.spec.name,
        "model": meta.get("base_model") or setup.checkpoint, "seed": opts.seed,
        "fidelity_unit": "epochs" if opts.mode != "weight_sharing" else
                         "tokens" if task_data.spec.is_lm else "examples",
        "family": meta.get("family"),
        "_started": time.time(),
    }
    callback = ResultsCallback(store, ctx, opts.objectives, opts.num_samples, max_fidelity)
    exp_dir = storage / experiment
    recorded = store.evaluations()
    if tune.Tuner.can_restore(str(exp_dir)):
        log.info("resuming search %s from %s", experiment, exp_dir)
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
    else:
        initial = _budget_configs(opts, space, setup.checkpoint, meta)
        if not recorded.empty:  # those already evaluated are not suggested again
            done = {space.to_sub_network(json.loads(c)) for c in recorded["config"]}
            initial = [c for c in initial if space.to_sub_network(c) not in done]
        searcher = make_searcher(opts.searcher, space, opts.objectives, "min", opts.seed,
                                 fidelity_attr=FIDELITY, max_fidelity=max_fidelity,
                                 initial=initial)
        num_samples = opts.num_samples
        if not recorded.empty:  # interrupted before Tune saved any state: keep what we have
            finished = recorded["trial_id"].nunique()
            num_samples = max(0, opts.num_samples - finished)
            log.warning("no Tune state to resume in %s; %d trials of %s are already recorded, "
                        "running the %d left", exp_dir, finished, experiment, num_samples)
            _warm_start(searcher, recorded, opts.objectives)
            if num_samples == 0:
                return recorded
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, num_samples=num_samples,
                scheduler=_scheduler(opts, RungHistory(store, opts.objectives)),
                max_concurrent_trials=workers, reuse_actors=True,
                time_budget_s=opts.time_budget_s,
            ),
            run_config=tune.RunConfig(
                name=experiment, storage_path=str(storage), callbacks=[callback], verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    grid = tuner.fit()
    frame = store.evaluations()
    if frame.empty and grid.errors:
        raise SearchError(f"every trial failed; the first error: {grid.errors[0]}")
    return frame


def _budget_configs(opts: SearchOptions, space, checkpoint: str, meta: dict) -> list[dict]:
    """`opts.budget_samples` configs per budget of `opts.budgets`, drawn uniformly (seeded)
    among those whose params ratio lies in (budget - budget_band, budget], interleaved so
    every budget gets its first draws early; sizes come from the checkpoint's model class on
    the meta device (nothing loaded)."""
    if not opts.budgets:
        return []
    from nas_prune.models import cost_model

    model = cost_model(checkpoint, meta)
    rng = np.random.default_rng([opts.seed, 1])
    drawn = []
    for budget in opts.budgets:
        configs = space.sample_below(rng, model, budget, opts.budget_band, opts.budget_samples)
        if len(configs) < opts.budget_samples:
            log.warning("search: only %d sub-networks of the %s space have a params ratio in "
                        "(%.3f, %.3f]; widen search.budget_band to draw more", len(configs),
                        space.name, budget - opts.budget_band, budget)
        drawn.append(configs)
    initial = [c for group in itertools.zip_longest(*drawn) for c in group if c is not None]
    log.info("search: the first %d trials are drawn at the budgets %s (params ratio, band "
             "%.3f)", len(initial), opts.budgets, opts.budget_band)
    return initial


class RungHistory:
    """The results the experiment's trials reported so far, as MOASHA.record_history takes
    them: (trial id, report number, objectives) in the order they were stored. Picklable, so
    the scheduler that Tune pickles at the start of a search reads them when it is restored."""

    def __init__(self, store: results_lib.ResultStore, objectives: Sequence[str]):
        self.root, self.experiment = str(store.root), store.experiment
        self.objectives = list(objectives)

    def __call__(self) -> list[tuple[str, float, dict[str, float]]]:
        frame = results_lib.ResultStore(self.root, self.experiment).evaluations()
        if frame.empty:
            return []
        frame = frame[frame["status"].isin(["rung", "ok", "stopped"])].sort_values(
            ["timestamp", "fidelity"], kind="stable")
        frame = frame.assign(report=frame.groupby("trial_id")["fidelity"].rank(method="first"))
        return [(row.trial_id, float(row.report), {k: self._value(row, k) for k in self.objectives})
                for row in frame.itertuples(index=False)]

    @staticmethod
    def _value(row, objective: str) -> float:
        if objective.startswith("latency:"):
            return float(row.latency_ms)
        return float(getattr(row, objective))


def _scheduler(opts: SearchOptions, history: RungHistory | None = None):
    """The trial scheduler of `opts` (None: Tune's FIFO); MO-ASHA gets the run's `history`."""
    if registry.SCHEDULERS[opts.scheduler] is None:
        return None
    cls = registry.load(registry.SCHEDULERS, opts.scheduler, "scheduler", SearchError)
    return cls(opts.objectives, "min", time_attr="training_iteration",
               grace_period=opts.grace_period, reduction_factor=opts.reduction_factor,
               max_t=opts.max_t, history=history)


def _latency_objectives(opts: SearchOptions, profile: ProfileOptions, checkpoint: str,
                        space: str, experiment: str):
    """Lookup tables (predicted) or named profiler actors (measured) for each latency
    objective's hardware type, and how many of those actors hold a CPU; a type the cluster
    lacks is an error before any trial."""
    from nas_prune.profile import discover_hardware, measure_tables, resolve_hardware, start_pool

    names = [o.split(":", 1)[1] for o in opts.objectives if o.startswith("latency:")]
    if not names:
        return {}, {}, 0
    try:
        hardware = resolve_hardware(names, discover_hardware())
    except ProfileError as e:
        raise SearchError(f"latency objective: {e}") from None
    if opts.latency == "predicted":
        tables = measure_tables(checkpoint, space, names, profile)
        return {name: table.to_dict() for name, table in tables.items()}, {}, 0
    actors = {}
    for hw in hardware:
        name = f"nas_prune_profiler_{experiment}_{hw.name}"
        (actor,) = start_pool(checkpoint, space, hw, profile, name=name)
        actors[hw.name] = name
        _KEEP_ALIVE.append(actor)
    return {}, actors, sum(not hw.gpu for hw in hardware)


_KEEP_ALIVE: list[Any] = []
"""Handles of the named profiler actors of the running search (they die with their handles)."""


def _release_profilers() -> None:
    """End the running search's profiler actors: each holds a CPU or GPU that the next search
    in this process (or cluster) would otherwise wait for."""
    for actor in _KEEP_ALIVE:
        ray.kill(actor)
    _KEEP_ALIVE.clear()


def _warm_start(searcher, recorded, objectives: Sequence[str]) -> None:
    """Feed complete recorded results to one of our searchers (Optuna's keeps its own)."""
    if not isinstance(searcher, MultiObjectiveSearcher):
        return
    final = recorded[recorded["status"] == "ok"]
    for _, row in final.iterrows():
        searcher.observe(json.loads(row["config"]), np.array([row[k] for k in objectives],
                                                              dtype=float))
