"""What runs inside the Ray Tune worker processes: one trial scores one sub-network config.

Two ways to score a trial (Klein et al. 2024):

* weight-sharing (default): the config's sub-network is selected in a trained supernet and
  scored on the validation split, no training. The fidelity is the number of validation
  examples seen (predicted tokens, for language modelling): a trial reports after each of
  `max_t` chunks of a fixed shuffled validation set, so MO-ASHA can stop weak sub-networks
  after a few chunks.
* standard NAS: the sub-network is cut from the fine-tuned model and fine-tuned for up to
  `max_t` epochs (DeepSpeed, as in `nas_prune.train`), reporting after each epoch.

Per-trial overhead is engineered: trials run with `reuse_actors=True`, and the supernet and the
tokenised, pre-collated validation batches are loaded once per worker process and kept there
(`resident_evaluator`), so a trial costs one forward pass over the validation set. The driver
side (the Tuner, the results callback) is nas_prune.search.driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nas_prune import data as data_lib
from nas_prune.errors import SearchError
from nas_prune.evaluate import Scorer, evaluate, scored_validation
from nas_prune.options import FinetuneOptions, SearchOptions, TaskOptions
from nas_prune.space import SearchSpace, make_space

log = logging.getLogger(__name__)

FIDELITY = "fidelity"
"""Result key of a trial's fidelity: validation examples scored, or epochs trained."""

LATENCY_ROWS = "latency_measurements"
"""Result key of a trial's first report holding its measured latencies (profiler rows), which
the results callback appends to the store's latency table."""


@dataclass(frozen=True)
class TrialSetup:
    """What a trial process needs to (re)build its resident evaluator: the search's options,
    paths and numbers only (it travels to every worker)."""

    checkpoint: str
    """The supernet (weight sharing) or fine-tuned model (standard NAS), an absolute path."""
    task: TaskOptions
    search: SearchOptions
    space: str
    """The search space's name (the search options' own, or the supernet's)."""
    max_length: int
    """Tokens per example: the supernet's training length."""
    latency_tables: dict[str, dict] = field(default_factory=dict)
    """Lookup tables (LatencyTable.to_dict) by hardware, for predicted latency objectives."""
    latency_actors: dict[str, str] = field(default_factory=dict)
    """Named profiler actors by hardware, for measured latency objectives."""


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
    from nas_prune.checkpoint import load_checkpoint

    started = time.perf_counter()
    opts = setup.search
    model, _ = load_checkpoint(setup.checkpoint)
    tokenizer = data_lib.load_tokenizer(setup.checkpoint)
    raw = data_lib.load_task(setup.task)
    if opts.mode == "weight_sharing":  # scores the validation subset only: tokenise nothing else
        raw = dataclasses.replace(raw, train=raw.train.select([]), test=raw.test.select([]))
    task = scored_validation(raw, tokenizer, setup.max_length, opts.validation_seed,
                             opts.valid_examples)
    batches = list(data_lib.make_loader(task.valid, tokenizer, opts.batch_size))
    bounds = np.linspace(0, len(batches), opts.max_t + 1).round().astype(int)
    chunks = [batches[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if any(not c for c in chunks):
        raise SearchError(
            f"{len(batches)} validation batches cannot make {opts.max_t} fidelity steps; "
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
    from nas_prune.profile import LatencyTable

    params = ev.model.num_params(sub)
    costs = {
        "params": params,
        "params_ratio": params / ev.full_params,
        "flops": ev.model.flops(sub, setup.search.flops_seq_len),
    }
    for hardware, table in setup.latency_tables.items():
        costs[f"latency:{hardware}"] = LatencyTable(**table).predict(sub)
    measurements = []
    if setup.latency_actors:
        import ray

        for hardware, name in setup.latency_actors.items():
            measured = ray.get(ray.get_actor(name).measure.remote(dict(config)))
            costs[f"latency:{hardware}"] = measured["median_ms"]
            measurements.append({**measured, "config": dict(config), "predicted": False})
    if measurements:
        costs[LATENCY_ROWS] = measurements
    return costs


# --------------------------------------------------------------------------- trials
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
    scorer, started = Scorer(ev.spec), time.perf_counter()
    ev.model.set_sub_network(sub)
    try:
        for chunk in ev.chunks:
            with torch.no_grad():
                for batch in chunk:
                    scorer.add(ev.model(**batch), batch)
            scores = scorer.result()
            yield {
                "error": scores["error"],
                "metric": scores["metric"],
                "metric_name": ev.spec.metric,
                FIDELITY: scores["tokens"] if ev.spec.is_lm else scores["examples"],
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

    from nas_prune.checkpoint import load_checkpoint
    from nas_prune.train import train

    opts = setup.search
    ev = resident_evaluator(setup)
    sub = ev.space.to_sub_network(config)
    costs = _costs(ev, sub, config, setup)
    first = costs
    costs = {k: v for k, v in costs.items() if k != LATENCY_ROWS}  # measurements: once
    model = ev.model.extract_sub_network(sub)
    valid = [b for chunk in ev.chunks for b in chunk]
    train_opts = FinetuneOptions(epochs=opts.max_t, batch_size=opts.train_batch_size,
                                 lr=opts.lr, seed=opts.seed, max_length=setup.max_length,
                                 log_every=10**9)
    steps_per_epoch = len(data_lib.make_loader(ev.task.train, ev.tokenizer,
                                               opts.train_batch_size))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nas_prune_trial_") as workdir:
        for epoch in range(1, opts.max_t + 1):
            train(model, ev.task, ev.tokenizer, workdir, train_opts,
                  stop_after=epoch * steps_per_epoch)
            model = load_checkpoint(workdir)[0]
            scores = evaluate(model, valid, ev.spec)
            tune.report({"error": scores["error"], "metric": scores["metric"],
                         "metric_name": ev.spec.metric, FIDELITY: epoch,
                         "eval_time_s": time.perf_counter() - started,
                         **(first if epoch == 1 else costs)})
