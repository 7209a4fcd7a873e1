"""Run a multi-objective search under Ray Tune: one trial per sub-network config.

Two ways to score a trial (Klein et al. 2024):

* weight-sharing (default): the config's sub-network is selected in a trained supernet and
  scored on the validation split, no training. The fidelity is the number of validation
  examples seen: a trial reports after each of `max_t` chunks of a fixed shuffled validation
  set, so MO-ASHA can stop weak sub-networks after a few chunks.
* standard NAS: the sub-network is cut from the fine-tuned model and fine-tuned for up to
  `max_t` epochs (DeepSpeed, as in `nas_prune.train`), reporting after each epoch.

Per-trial overhead is engineered: trials run with `reuse_actors=True`, and the supernet and the
tokenised, pre-collated validation batches are loaded once per worker process and kept there
(`resident_evaluator`), so a trial costs one forward pass over the validation set. Tune's automatic
CSV/JSON/TensorBoard loggers are off; every result goes to the Parquet results store instead
(`ResultsCallback`), one file per finished trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas_prune import data as data_lib
from nas_prune import results as results_lib
from nas_prune.search import pareto
from nas_prune.search.searchers import EARLY_STOPPING_OK, SEARCHERS, make_searcher
from nas_prune.space import SPACES, SearchSpace, make_space

log = logging.getLogger(__name__)

STATIC_OBJECTIVES = {
    "error": "validation error (1 - metric)",
    "params": "parameters of the sub-network (embeddings and head included)",
    "params_ratio": "parameters relative to the full model",
    "flops": "floating-point operations for one sequence of `flops_seq_len` tokens",
}
"""Objectives every trial reports. `latency:<hardware>` objectives come from nas_prune.profile."""

SCHEDULERS = ("fifo", "moasha")
"""Trial schedulers by name; `moasha` is nas_prune.search.moasha.MOASHA."""

FIDELITY = "fidelity"

LATENCY_ROWS = "latency_measurements"
"""Result key of a trial's first report holding its measured latencies (profiler rows), which
the results callback appends to the store's latency table."""


class SearchError(ValueError):
    """A search that cannot start as configured; raised before any trial runs."""


@dataclass
class SearchOptions:
    """How to search."""

    searcher: str = "random"
    """One of SEARCHERS: random, local, morea, nsga2."""
    scheduler: str = "fifo"
    """fifo (every trial runs to the end) or moasha (multi-objective early stopping)."""
    objectives: list[str] = field(default_factory=lambda: ["error", "params_ratio"])
    """Minimised objectives: error, params, params_ratio, flops, latency:<hardware>."""
    space: str | None = None
    """Search space (default: the one the supernet was trained with)."""
    num_samples: int = 100
    """Trials (sub-network configs) to evaluate."""
    seed: int = 0
    """Seed of the searcher (and of the validation order unless `valid_seed` is given)."""
    valid_seed: int | None = None
    """Seed of the validation order, hence of the `valid_examples` subset and the MO-ASHA
    prefixes (default: `seed`). Fix it to compare searcher seeds on the same examples."""
    num_workers: int | None = None
    """Trials at a time (default: one per CPU of the Ray cluster)."""
    mode: str = "weight_sharing"
    """weight_sharing (score through the supernet) or standard (fine-tune each sub-network)."""
    max_t: int = 1
    """Fidelity steps of a full evaluation: validation chunks (weight sharing) or epochs."""
    grace_period: int = 1
    """MO-ASHA: fidelity steps every trial gets before it can be stopped."""
    reduction_factor: float = 3.0
    """MO-ASHA: keep the top 1/reduction_factor of the trials at each rung."""
    valid_examples: int | None = None
    """Validation examples a full evaluation scores (default: the whole validation split)."""
    batch_size: int = 64
    """Validation batch size of the scoring forward passes."""
    flops_seq_len: int = 128
    """Sequence length at which the FLOPs objective is counted."""
    time_budget_s: float | None = None
    """Stop starting trials after this many seconds."""
    latency: str = "predicted"
    """For latency:<hardware> objectives: "predicted" (lookup table measured once per hardware
    type, Kwon et al.) or "measured" (each sub-network timed by the profiler actor there)."""
    latency_batch_size: int = 1
    """Batch size at which latency objectives are measured."""
    latency_seq_len: int = 128
    """Sequence length at which latency objectives are measured."""
    train_batch_size: int = 32
    """Standard NAS: batch size of each sub-network's fine-tuning."""
    lr: float = 5e-5
    """Standard NAS: learning rate."""

    def __post_init__(self) -> None:
        if self.searcher not in SEARCHERS:
            raise SearchError(
                f"unknown searcher {self.searcher!r}; choose one of {', '.join(SEARCHERS)}"
            )
        if self.scheduler not in SCHEDULERS:
            raise SearchError(
                f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        if self.scheduler == "moasha" and self.searcher not in EARLY_STOPPING_OK:
            raise SearchError(
                f"searcher {self.searcher!r} cannot serve the moasha scheduler (it needs "
                f"complete evaluations); use {', '.join(sorted(EARLY_STOPPING_OK))} with moasha"
                f" or scheduler fifo with {self.searcher}"
            )
        if self.space is not None and self.space not in SPACES:
            raise SearchError(f"unknown space {self.space!r}; choose one of {', '.join(SPACES)}")
        if self.mode not in ("weight_sharing", "standard"):
            raise SearchError(f"mode must be weight_sharing or standard, got {self.mode!r}")
        if not self.objectives:
            raise SearchError("give at least one objective")
        for name in self.objectives:
            if name not in STATIC_OBJECTIVES and not name.startswith("latency:"):
                raise SearchError(
                    f"unknown objective {name!r}; choose from {', '.join(STATIC_OBJECTIVES)} "
                    "or latency:<hardware>"
                )
        if self.latency not in ("predicted", "measured"):
            raise SearchError(f"latency must be predicted or measured, got {self.latency!r}")
        if len(set(self.objectives)) != len(self.objectives):
            raise SearchError(f"objectives repeat: {self.objectives}")
        for name in ("num_samples", "max_t", "grace_period", "batch_size", "flops_seq_len"):
            if getattr(self, name) < 1:
                raise SearchError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.scheduler == "moasha" and self.max_t < 2:
            raise SearchError("moasha needs max_t >= 2 fidelity steps to stop anything early")
        if self.grace_period > self.max_t:
            raise SearchError(f"grace_period {self.grace_period} exceeds max_t {self.max_t}")
        if self.reduction_factor <= 1:
            raise SearchError(f"reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class TrialSetup:
    """What a trial process needs to (re)build its resident evaluator: paths and numbers only."""

    checkpoint: str
    task: dict[str, Any]
    space: str
    mode: str
    max_t: int
    batch_size: int
    valid_examples: int | None
    flops_seq_len: int
    seed: int
    valid_seed: int
    max_length: int
    objectives: tuple[str, ...]
    train_batch_size: int
    lr: float
    latency_tables: dict[str, dict] = field(default_factory=dict)
    """Lookup tables (LatencyTable.to_dict) by hardware, for predicted latency objectives."""
    latency_actors: dict[str, str] = field(default_factory=dict)
    """Named profiler actors by hardware, for measured latency objectives."""


def trial_setup(
    checkpoint: str | os.PathLike,
    task: dict[str, Any],
    opts: SearchOptions,
    space: str,
    max_length: int = 128,
    latency_tables: dict[str, dict] | None = None,
    latency_actors: dict[str, str] | None = None,
) -> TrialSetup:
    """The TrialSetup `run_search` gives its trials (`score_sub_network` takes it too)."""
    return TrialSetup(
        checkpoint=str(Path(checkpoint).resolve()), task=task, space=space, mode=opts.mode,
        max_t=opts.max_t, batch_size=opts.batch_size, valid_examples=opts.valid_examples,
        flops_seq_len=opts.flops_seq_len, seed=opts.seed,
        valid_seed=opts.seed if opts.valid_seed is None else opts.valid_seed,
        max_length=max_length, objectives=tuple(opts.objectives),
        train_batch_size=opts.train_batch_size, lr=opts.lr,
        latency_tables=latency_tables or {}, latency_actors=latency_actors or {},
    )


# --------------------------------------------------------------------------- resident state
_RESIDENT: dict[str, Any] = {}


@dataclass
class Evaluator:
    """What a worker process keeps between trials: the supernet, the space, the validation
    batches split into `max_t` fidelity chunks, and (standard NAS) the task to train on."""

    model: Any
    space: SearchSpace
    spec: data_lib.TaskSpec
    chunks: list[list[dict[str, torch.Tensor]]]
    full_params: int
    task: Any = None
    tokenizer: Any = None


def resident_evaluator(setup: TrialSetup) -> Evaluator:
    """The evaluator of this worker process, built on first use and kept for later trials."""
    key = json.dumps(dataclasses.asdict(setup), sort_keys=True, default=str)
    if key in _RESIDENT:
        return _RESIDENT[key]
    from nas_prune.train import load_checkpoint

    started = time.perf_counter()
    model, _ = load_checkpoint(setup.checkpoint)
    tokenizer = data_lib.load_tokenizer(setup.checkpoint)
    raw = data_lib.load_task(**setup.task)
    valid = raw.valid.shuffle(seed=setup.valid_seed)
    if setup.valid_examples is not None:
        valid = valid.select(range(min(setup.valid_examples, len(valid))))
    raw = dataclasses.replace(raw, valid=valid)
    if setup.mode == "weight_sharing":  # scores the validation subset only: tokenise nothing else
        raw = dataclasses.replace(raw, train=raw.train.select([]), test=raw.test.select([]))
    task = data_lib.tokenize(raw, tokenizer, setup.max_length)
    batches = list(data_lib.make_loader(task.valid, tokenizer, setup.batch_size))
    bounds = np.linspace(0, len(batches), setup.max_t + 1).round().astype(int)
    chunks = [batches[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if any(not c for c in chunks):
        raise SearchError(
            f"{len(batches)} validation batches cannot make {setup.max_t} fidelity steps; "
            "lower max_t or batch_size"
        )
    evaluator = Evaluator(model, make_space(setup.space, model.config), task.spec, chunks,
                           model.num_params(), task, tokenizer)
    _RESIDENT.clear()  # one experiment per process at a time
    _RESIDENT[key] = evaluator
    log.info("worker %d loaded %s in %.1fs", os.getpid(), setup.checkpoint,
             time.perf_counter() - started)
    return evaluator


def _costs(ev: Evaluator, sub, config, setup: TrialSetup) -> dict[str, Any]:
    """Size, FLOPs and the latency objectives of one sub-network; measured latencies also in
    full (`LATENCY_ROWS`, for the results store's latency table)."""
    import ray

    from nas_prune.profile import LatencyTable

    params = ev.model.num_params(sub)
    costs = {
        "params": params,
        "params_ratio": params / ev.full_params,
        "flops": ev.model.flops(sub, setup.flops_seq_len),
    }
    for hardware, table in setup.latency_tables.items():
        costs[f"latency:{hardware}"] = LatencyTable(**table).predict(sub)
    measurements = []
    for hardware, name in setup.latency_actors.items():
        measured = ray.get(ray.get_actor(name).measure.remote(dict(config)))
        costs[f"latency:{hardware}"] = measured["median_ms"]
        measurements.append({**measured, "config": dict(config), "predicted": False})
    if measurements:
        costs[LATENCY_ROWS] = measurements
    return costs


def score_sub_network(config: dict[str, int], setup: TrialSetup) -> Iterator[dict[str, Any]]:
    """Score `config` through this process's resident supernet: one result per fidelity step,
    the error on a growing prefix of the validation set (all of it at the last step), with the
    size, FLOPs and latency objectives. The work of one weight-sharing trial, without Tune
    (benchmarks/bench_search.py runs it in a plain loop to measure Tune's overhead)."""
    ev = resident_evaluator(setup)
    sub = ev.space.to_sub_network(config)
    costs = _costs(ev, sub, config, setup)
    first = costs
    costs = {k: v for k, v in costs.items() if k != LATENCY_ROWS}  # measurements: once
    logits, labels, seen, started = [], [], 0, time.perf_counter()
    ev.model.set_sub_network(sub)
    try:
        for chunk in ev.chunks:
            with torch.no_grad():
                for batch in chunk:
                    logits.append(ev.model(**batch).logits.float())
                    labels.append(batch["labels"])
                    seen += len(batch["labels"])
            metric = data_lib.compute_metric(
                ev.spec, torch.cat(logits).numpy(), torch.cat(labels).numpy()
            )
            yield {
                "error": data_lib.error_from_metric(metric),
                "metric": metric,
                "metric_name": ev.spec.metric,
                FIDELITY: seen,
                "eval_time_s": time.perf_counter() - started,
                **first,
            }
            first = costs
    finally:
        ev.model.reset_super_network()


def weight_sharing_trial(config: dict[str, int], setup: TrialSetup) -> None:
    """Ray Tune function trainable: score `config` through the resident supernet, reporting
    the error on growing prefixes of the validation set (`score_sub_network`)."""
    from ray import tune

    # closing: if Tune stops the trial inside report, reset the supernet now, not whenever the
    # generator is collected (that could be in the middle of this process's next trial)
    with contextlib.closing(score_sub_network(config, setup)) as results:
        for result in results:
            tune.report(result)


def standard_trial(config: dict[str, int], setup: TrialSetup) -> None:
    """Ray Tune function trainable: cut `config`'s sub-network from the fine-tuned model and
    fine-tune it with DeepSpeed for up to `max_t` epochs, reporting after each."""
    import tempfile

    from ray import tune

    from nas_prune.train import TrainOptions, evaluate, train

    ev = resident_evaluator(setup)
    sub = ev.space.to_sub_network(config)
    costs = _costs(ev, sub, config, setup)
    first = costs
    costs = {k: v for k, v in costs.items() if k != LATENCY_ROWS}  # measurements: once
    model = ev.model.extract_sub_network(sub)
    valid = [b for chunk in ev.chunks for b in chunk]
    opts = TrainOptions(strategy="standard", epochs=setup.max_t, batch_size=setup.train_batch_size,
                        lr=setup.lr, rewire=False, seed=setup.seed, log_every=10**9)
    steps_per_epoch = len(data_lib.make_loader(ev.task.train, ev.tokenizer,
                                               setup.train_batch_size))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nas_prune_trial_") as workdir:
        for epoch in range(1, setup.max_t + 1):
            train(model, ev.task, ev.tokenizer, workdir, opts, stop_after=epoch * steps_per_epoch)
            model = _load_trained(workdir)
            scores = evaluate(model, valid, ev.spec)
            tune.report({"error": scores["error"], "metric": scores["metric"],
                         "metric_name": ev.spec.metric, FIDELITY: epoch,
                         "eval_time_s": time.perf_counter() - started,
                         **(first if epoch == 1 else costs)})


def _load_trained(path: str):
    from nas_prune.train import load_checkpoint

    return load_checkpoint(path)[0]


# --------------------------------------------------------------------------- results
def _result_row(result: dict, trial, ctx: dict[str, Any], max_fidelity: float) -> dict:
    fidelity = float(result.get(FIDELITY, 0))
    row = {
        **ctx,
        "trial_id": trial.trial_id,
        "config": {k: int(v) for k, v in trial.config.items()},
        "fidelity": fidelity,
        "error": float(result["error"]),
        "metric_value": float(result["metric"]),
        "params": int(result["params"]),
        "params_ratio": float(result["params_ratio"]),
        "flops": int(result["flops"]),
        "eval_time_s": float(result.get("eval_time_s", 0.0)),
        "wall_time_s": time.time() - ctx["_started"],
        "metric_name": result.get("metric_name", ""),
        "status": "ok" if fidelity >= max_fidelity else "stopped",
    }
    latency = [k for k in result if k.startswith("latency:")]
    if latency:
        row["hardware"] = latency[0].split(":", 1)[1]
        row["latency_ms"] = float(result[latency[0]])
    row.pop("_started")
    return row


def _callback_class():
    from ray.tune import Callback

    class ResultsCallback(Callback):
        """Appends every reported result to the Parquet store (one file per finished trial)
        and logs progress: trials done / to go and the current Pareto front."""

        def __init__(self, store: results_lib.ResultStore, ctx: dict, objectives: Sequence[str],
                     num_samples: int, max_fidelity: float):
            self.store, self.ctx = store, ctx
            self.objectives, self.num_samples = list(objectives), num_samples
            self.max_fidelity = max_fidelity
            self.pending: dict[str, list[dict]] = {}
            self.recorded: set[str] = set()
            self.done = 0
            self.front: list[np.ndarray] = []

        def setup(self, **info):
            """Called at the start of every fit, a resumed one too: trials the store already
            holds (finished before an interruption) are not recorded twice."""
            self.recorded = self.store.finished_trials()
            self.done = len(self.recorded)
            self.pending = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if trial.trial_id in self.recorded:
                return
            if result.get(LATENCY_ROWS):
                self.store.append_latency([{**m, "trial_id": trial.trial_id, "method": "search"}
                                           for m in result[LATENCY_ROWS]])
            row = _result_row(result, trial, {**self.ctx}, self.max_fidelity)
            self.pending.setdefault(trial.trial_id, []).append(row)

        def _flush(self, trial, status: str | None = None, message: str | None = None):
            """Write the trial's buffered rows; rows below full fidelity are rung results
            ("ok"), unless they are the last one ("stopped" early by the scheduler)."""
            rows = self.pending.pop(trial.trial_id, [])
            for row in rows[:-1]:
                row["status"] = "ok"
            if rows and status is not None:
                rows[-1]["status"] = status
                rows[-1]["message"] = message
            if rows:
                self.store.append_evaluations(rows)
            return rows

        def on_trial_complete(self, iteration, trials, trial, **info):
            rows = self._flush(trial)
            self.done += 1
            if rows and rows[-1]["status"] == "ok":
                self.front.append(np.array([rows[-1][k] for k in self.objectives], float))
            front = int(pareto.pareto_mask(np.array(self.front)).sum()) if self.front else 0
            log.info("trials %d/%d done, Pareto front %d (%s)", self.done, self.num_samples,
                     front, ", ".join(self.objectives))

        def on_trial_error(self, iteration, trials, trial, **info):
            if not self.pending.get(trial.trial_id):
                return  # failed before reporting anything: nothing to record
            self._flush(trial, "error", str(getattr(trial, "error_file", "") or "trial failed"))
            self.done += 1

        def on_experiment_end(self, trials, **info):
            for trial in trials:
                self._flush(trial)

    return ResultsCallback


# --------------------------------------------------------------------------- the search
def _check_supernet(checkpoint: str | os.PathLike, space_name: str | None):
    from nas_prune.train import TrainingError, read_meta

    path = Path(checkpoint)
    if not (path / "config.json").exists():
        raise SearchError(f"{path} is not a supernet checkpoint (no config.json)")
    try:
        meta = read_meta(path)
    except TrainingError as e:
        raise SearchError(str(e)) from None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if getattr(config, "layer_heads", None) is not None:
        raise SearchError(f"{path} is an exported sub-network, not a supernet")
    space_name = space_name or meta.get("space") or "small"
    trained = meta.get("space")
    if trained and trained != space_name:
        log.warning("supernet %s was trained on the %s space; searching the %s space", path,
                    trained, space_name)
    return meta, config, space_name


def run_search(
    checkpoint: str | os.PathLike,
    task: dict[str, Any],
    results_dir: str | os.PathLike,
    experiment: str,
    opts: SearchOptions,
    *,
    storage_path: str | os.PathLike | None = None,
    max_length: int = 128,
    space_bounds: dict[str, tuple[int, int]] | None = None,
):
    """Search sub-networks of the supernet (or, in standard mode, fine-tuned model) at
    `checkpoint` on `task` (keyword arguments of `nas_prune.data.load_task`), writing every
    result to the Parquet store at `results_dir` under `experiment`. If the experiment's Tune
    state exists under `storage_path`, the search resumes: finished trials are not re-run.

    Returns:
        The experiment's evaluations as a pandas DataFrame.
    """
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # save the experiment state often enough that a killed search loses little
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    import ray
    from ray import tune

    from nas_prune.search.moasha import MOASHA

    # Tune's result grid looks for the per-trial JSON/CSV logs we switched off; our results
    # are in the Parquet store, so its "failed to fetch metrics" warnings are noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

    meta, model_config, space_name = _check_supernet(checkpoint, opts.space)
    space = make_space(space_name, model_config, space_bounds)
    if not ray.is_initialized():
        ray.init()
    cpus = ray.cluster_resources().get("CPU", 0)
    workers = opts.num_workers or max(1, int(cpus))
    if workers > cpus:
        raise SearchError(
            f"{workers} concurrent trials need {workers} CPUs but the Ray cluster has {cpus:g}; "
            "lower num_workers or add nodes"
        )
    max_fidelity = _max_fidelity(opts, task, max_length, checkpoint)
    tables, actors, cpu_actors = _latency_objectives(
        opts, str(Path(checkpoint).resolve()), space_name, experiment)
    # a CPU profiler actor holds a CPU for the whole search: leave it one
    if cpu_actors and not opts.num_workers:
        workers = max(1, workers - cpu_actors)
    if workers + cpu_actors > cpus:
        _release_profilers()
        raise SearchError(
            f"{workers} trials and {cpu_actors} CPU profiler actor(s) need more than the "
            f"cluster's {cpus:g} CPUs; lower num_workers or use latency='predicted'"
        )
    setup = trial_setup(checkpoint, task, opts, space_name, max_length, tables, actors)
    fn = weight_sharing_trial if opts.mode == "weight_sharing" else standard_trial
    trainable = tune.with_resources(tune.with_parameters(fn, setup=setup), {"cpu": 1})
    storage = Path(storage_path or Path(results_dir).parent / "tune").resolve()
    store = results_lib.ResultStore(results_dir, experiment)
    ctx = {
        "method": "nas", "searcher": opts.searcher, "scheduler": opts.scheduler,
        "strategy": meta.get("strategy"), "space": space_name, "task": _task_name(task),
        "model": meta.get("base_model") or str(checkpoint), "seed": opts.seed,
        "metric_name": None, "fidelity_unit": "examples" if opts.mode == "weight_sharing"
        else "epochs", "_started": time.time(),
    }
    callback = _callback_class()(store, ctx, opts.objectives, opts.num_samples, max_fidelity)
    exp_dir = storage / experiment
    if tune.Tuner.can_restore(str(exp_dir)):
        log.info("resuming search %s from %s", experiment, exp_dir)
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
    else:
        searcher = make_searcher(opts.searcher, space, opts.objectives, "min", opts.seed,
                                 fidelity_attr=FIDELITY, max_fidelity=max_fidelity)
        recorded = store.evaluations()
        num_samples = opts.num_samples
        if not recorded.empty:  # interrupted before Tune saved any state: keep what we have
            finished = recorded["trial_id"].nunique()
            num_samples = max(0, opts.num_samples - finished)
            log.warning("no Tune state to resume in %s; %d trials of %s are already recorded, "
                        "running the %d left", exp_dir, finished, experiment, num_samples)
            _warm_start(searcher, recorded, opts.objectives)
            if num_samples == 0:
                _release_profilers()
                return recorded
        scheduler = None
        if opts.scheduler == "moasha":
            scheduler = MOASHA(opts.objectives, "min", time_attr="training_iteration",
                               grace_period=opts.grace_period,
                               reduction_factor=opts.reduction_factor, max_t=opts.max_t)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                max_concurrent_trials=workers, reuse_actors=True,
                time_budget_s=opts.time_budget_s,
            ),
            run_config=tune.RunConfig(
                name=experiment, storage_path=str(storage), callbacks=[callback], verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    try:
        grid = tuner.fit()
    finally:
        _release_profilers()
    frame = store.evaluations()
    if frame.empty and grid.errors:
        raise SearchError(f"every trial failed; the first error: {grid.errors[0]}")
    return frame


def _latency_objectives(opts: SearchOptions, checkpoint: str, space: str, experiment: str):
    """Lookup tables (predicted) or named profiler actors (measured) for each latency
    objective's hardware type, and how many of those actors hold a CPU; a type the cluster
    lacks is an error before any trial."""
    from nas_prune.profile import (
        ProfileError,
        ProfileSettings,
        discover_hardware,
        measure_tables,
        resolve_hardware,
        start_pool,
    )

    names = [o.split(":", 1)[1] for o in opts.objectives if o.startswith("latency:")]
    if not names:
        return {}, {}, 0
    try:
        hardware = resolve_hardware(names, discover_hardware())
    except ProfileError as e:
        raise SearchError(f"latency objective: {e}") from None
    settings = ProfileSettings(batch_size=opts.latency_batch_size, seq_len=opts.latency_seq_len)
    if opts.latency == "predicted":
        tables = measure_tables(checkpoint, space, names, settings)
        return {name: table.to_dict() for name, table in tables.items()}, {}, 0
    actors = {}
    for hw in hardware:
        name = f"nas_prune_profiler_{experiment}_{hw.name}"
        (actor,) = start_pool(checkpoint, space, hw, settings, name=name)
        actors[hw.name] = name
        _KEEP_ALIVE.append(actor)
    return {}, actors, sum(not hw.gpu for hw in hardware)


_KEEP_ALIVE: list[Any] = []
"""Handles of the named profiler actors of the running search (they die with their handles)."""


def _release_profilers() -> None:
    """End the running search's profiler actors: each holds a CPU or GPU that the next search
    in this process (or cluster) would otherwise wait for."""
    import ray

    for actor in _KEEP_ALIVE:
        ray.kill(actor)
    _KEEP_ALIVE.clear()


def _warm_start(searcher, recorded, objectives: Sequence[str]) -> None:
    """Feed complete recorded results to one of our searchers (Optuna's keeps its own)."""
    from nas_prune.search.searchers import MultiObjectiveSearcher

    if not isinstance(searcher, MultiObjectiveSearcher):
        return
    final = recorded.sort_values("fidelity").groupby("trial_id").tail(1)
    for _, row in final[final["status"] == "ok"].iterrows():
        searcher._observe(json.loads(row["config"]), np.array([row[k] for k in objectives],
                                                               dtype=float))


def _task_name(task: dict[str, Any]) -> str:
    name = str(task.get("task", ""))
    return Path(name).stem if os.sep in name or "." in name else name


def _max_fidelity(opts: SearchOptions, task: dict, max_length: int, checkpoint) -> float:
    """Fidelity of a complete evaluation: validation examples scored, or epochs."""
    if opts.mode == "standard":
        return float(opts.max_t)
    n = len(data_lib.load_task(**task).valid)
    return float(min(n, opts.valid_examples) if opts.valid_examples else n)


def search_options_from_dict(values: dict[str, Any]) -> SearchOptions:
    """SearchOptions from a plain dict (e.g. a YAML file), naming unknown keys."""
    known = {f.name for f in dataclasses.fields(SearchOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SearchError(f"unknown search option(s) {unknown}; known: {sorted(known)}")
    return SearchOptions(**values)
