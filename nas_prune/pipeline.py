"""The stages of a run, one function each: finetune, supernet, search, profile, baselines,
refine, export, compare, report; `run` chains them.

Every stage takes the run's output directory (a `RunDir`) and the `PipelineOptions`, reads what
earlier stages wrote there (or an explicit input path), and is skipped or resumed when its
output is already complete, so re-running the same command continues an interrupted run
instead of starting over. `nas-prune run` calls `run`; each `nas-prune <stage>` calls the stage
function of the same name with the same options, so both give the same results.

Baselines (`baselines: [pins, grain, layer_drop]`, none by default) run after the search on the
same teacher and data; their rows go to the experiments `baseline-<method>-seed<seed>` and
appear in the same report.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nas_prune import data as data_lib
from nas_prune import results as results_lib
from nas_prune.checkpoint import (
    check_model_files,
    check_supernet,
    is_finished,
    position_limit,
    read_meta,
)
from nas_prune.errors import CheckpointError, OptionsError
from nas_prune.options import PipelineOptions, TrainOptions
from nas_prune.rundir import RunDir

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- training
def finetune(run: RunDir, opts: PipelineOptions) -> Path:
    """Fine-tune `opts.model` into ``run.teacher`` (skipped when finished there). With
    ``finetune.epochs`` 0 (language modelling) the pre-trained model is the teacher as is."""
    from nas_prune import models

    if _finished(run.teacher, "teacher", opts):
        log.info("teacher already fine-tuned in %s", run.teacher)
        return run.teacher
    kind = data_lib.task_kind(opts.data)
    model = models.resolve(opts.model)
    check_model_files(model)
    models.check_model(model, kind)
    _check_length(model, opts.finetune.max_length, "finetune")
    if opts.finetune.epochs == 0 and opts.finetune.max_steps is None:
        if kind != "lm":
            raise OptionsError("finetune.epochs 0 keeps the pre-trained model as the teacher, "
                               "which only language modelling can do (a classification head "
                               "must be trained); set --finetune.epochs > 0")
        _adopt(model, run.teacher, opts)
        return run.teacher
    _train("finetune", model, run.teacher, opts, opts.finetune)
    return run.teacher


def _adopt(model_path: str, out: Path, opts: PipelineOptions) -> None:
    """Save the pre-trained causal LM at `model_path` as the run's (finished) teacher."""
    import dataclasses

    from nas_prune.checkpoint import save_checkpoint
    from nas_prune.models import load_pretrained

    model = load_pretrained(model_path, "lm")
    tokenizer = data_lib.load_tokenizer(model_path)
    save_checkpoint(out, model, tokenizer, {
        "kind": "teacher", "task": data_lib.task_name(opts.data), "task_kind": "lm",
        "base_model": model_path, "family": model.config.family, "finished": True,
        "strategy": "none", "options": dataclasses.asdict(opts.finetune), "steps_done": 0,
        "total_steps": 0, "num_labels": 0, "train_examples": 0, "train_seconds": 0.0})
    log.info("teacher: the pre-trained %s as is (finetune.epochs 0)", model_path)


def supernet(run: RunDir, opts: PipelineOptions, teacher: str | Path | None = None) -> Path:
    """Train the supernet from `teacher` (default ``run.teacher``) into ``run.supernet``
    (skipped when finished there)."""
    if _finished(run.supernet, "supernet", opts):
        log.info("supernet already trained in %s", run.supernet)
        return run.supernet
    teacher = Path(teacher or run.teacher)
    if not is_finished(teacher):
        raise CheckpointError(f"{teacher} holds no finished fine-tuned teacher; run "
                              "`nas-prune finetune` first (or give --teacher)")
    _check_length(teacher, opts.supernet.max_length, "supernet")
    _train("supernet", teacher, run.supernet, opts, opts.supernet)
    return run.supernet


def _check_length(model: str | Path, max_length: int, section: str) -> None:
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise OptionsError(f"--{section}.max_length {max_length} exceeds the {limit} positions "
                           f"of {model}; choose at most {limit}")


def _finished(path: Path, kind: str, opts: PipelineOptions) -> bool:
    """Whether `path` holds a finished `kind` checkpoint for this run's task; a finished
    checkpoint of another kind or task is refused before any training."""
    if not is_finished(path):
        return False
    meta = read_meta(path)
    task = data_lib.task_name(opts.data)
    if meta.get("kind") != kind or meta.get("task") != task:
        raise CheckpointError(
            f"{path} already holds a finished {meta.get('kind')} for task {meta.get('task')!r}; "
            f"this run needs a {kind} for {task!r}: choose another --out"
        )
    return True


def _train(stage: str, source: str | Path, out_dir: Path, opts: PipelineOptions,
           train_opts: TrainOptions) -> None:
    from nas_prune import train as train_lib

    if opts.workers > 1:
        train_lib.train_distributed(stage, source, opts.data, out_dir, train_opts,
                                    num_workers=opts.workers)
        return
    tokenizer = data_lib.load_tokenizer(str(source))
    task = data_lib.tokenize(data_lib.load_task(opts.data), tokenizer, train_opts.max_length)
    if stage == "finetune":
        train_lib.finetune(str(source), task, out_dir, train_opts, tokenizer=tokenizer)
    else:
        train_lib.train_supernet(source, task, out_dir, train_opts)


# --------------------------------------------------------------------------- search
def search(run: RunDir, opts: PipelineOptions, supernet_dir: str | Path | None = None
           ) -> pd.DataFrame:
    """Search sub-networks of the supernet (default ``run.supernet``) into ``run.results``
    under `opts.search_experiment` (resumed from ``run.tune`` if interrupted), and store the
    dense teacher's row scored on the same validation examples. Returns the experiment's
    evaluations."""
    from nas_prune.search.driver import run_search

    supernet_dir = Path(supernet_dir or run.supernet)
    experiment = opts.search_experiment
    frame = run_search(supernet_dir, opts.data, run.results, experiment, opts.search,
                       profile=opts.profile, storage_path=run.tune)
    teacher = _teacher_of(run, read_meta(supernet_dir))
    if teacher.exists():
        _dense_row(run, opts, teacher, supernet_dir)
    return frame


def _teacher_of(run: RunDir, supernet_meta: dict[str, Any]) -> Path:
    """The teacher a supernet was trained from: the path its checkpoint names, or this run's
    own teacher when there is none or when the named path is not found from here (a supernet
    trained before its teacher was stored by an absolute path names it relative to the working
    directory of its training)."""
    named = supernet_meta.get("teacher")
    if not named:
        return run.teacher
    if not Path(named).exists() and (run.teacher / "config.json").exists():
        log.warning("the supernet names its teacher %s, not found from %s; using this run's "
                    "teacher %s", named, Path.cwd(), run.teacher)
        return run.teacher
    return Path(named)


def _dense_row(run: RunDir, opts: PipelineOptions, teacher: Path, supernet_dir: Path) -> None:
    """The dense (unpruned, fine-tuned) model's row, scored on the search's validation subset
    at the supernet's token length; stored once per results store."""
    from nas_prune.evaluate import dense_evaluation

    store = results_lib.ResultStore(run.results, opts.search_experiment)
    if not (stored := store.evaluations()).empty and (stored["method"] == "dense").any():
        return
    max_length = read_meta(supernet_dir).get("options", {}).get("max_length", 128)
    tokenizer = data_lib.load_tokenizer(str(teacher))
    task = data_lib.tokenize(data_lib.load_task(opts.data), tokenizer, max_length)
    s = opts.search
    store.append_evaluations([dense_evaluation(teacher, task, tokenizer, s.validation_seed,
                                               s.valid_examples, s.flops_seq_len, s.batch_size)])


def pareto_set(run: RunDir, opts: PipelineOptions, objectives: Sequence[str] | None = None
               ) -> pd.DataFrame:
    """The Pareto-optimal complete evaluations of the search experiment in ``run.results``."""
    from nas_prune import report as report_lib

    objectives = list(objectives or opts.search.objectives)
    return report_lib.front(complete_evaluations(run, opts), objectives)


def _search_experiment(run: RunDir, opts: PipelineOptions) -> str:
    """The experiment a reading stage uses: the options' own, else the only search experiment
    in the store."""
    if opts.experiment:
        return opts.experiment
    found = results_lib.load(run.results)
    names = sorted(set(found.loc[found["method"] == "nas", "experiment"])) if not found.empty \
        else []
    if opts.search_experiment in names or not names:
        return opts.search_experiment
    if len(names) == 1:
        return names[0]
    raise OptionsError(f"{run.results} holds several searches ({', '.join(names)}); choose "
                       "one with --experiment")


# --------------------------------------------------------------------------- after the search
def profile(run: RunDir, opts: PipelineOptions, supernet_dir: str | Path | None = None,
            configs: list[dict[str, int]] | None = None) -> pd.DataFrame:
    """Measure the latency of `configs` (default: the Pareto set, and the dense model in the
    small space) on every hardware type of `opts.profile`; rows go to the latency table
    (measured once per config, hardware and shape). Returns the latency table."""
    from nas_prune.profile import profile_configs

    supernet_dir = Path(supernet_dir or run.supernet)
    meta = check_supernet(supernet_dir)
    space = opts.search.space or meta.get("space") or "small"
    experiment = _search_experiment(run, opts)
    if configs is None:
        front = pareto_set(run, opts)
        configs, ids = [json.loads(c) for c in front["config"]], list(front["trial_id"])
        dense = results_lib.load(run.results, experiment=experiment).query("method == 'dense'")
        if space in ("small", "decoder_small") and not dense.empty:  # the dense model
            configs.append(json.loads(dense["config"].iloc[-1]))
            ids.append("dense")
    else:
        ids = [None] * len(configs)
    store = results_lib.ResultStore(run.results, experiment)
    profile_configs(str(supernet_dir), space, configs, settings=opts.profile, store=store,
                    trial_ids=ids)
    return store.latency()


def baselines(run: RunDir, opts: PipelineOptions, teacher: str | Path | None = None
              ) -> list[str]:
    """Run each of `opts.baselines` on the teacher (default ``run.teacher``); models its
    experiment already holds are kept, not trained again (an interrupted stage resumes at the
    first missing model). Returns their experiments."""
    from nas_prune import baselines as baselines_lib
    from nas_prune.evaluate import dense_evaluation
    from nas_prune.models import is_decoder

    teacher = Path(teacher or run.teacher)
    if not is_finished(teacher):
        raise CheckpointError(f"{teacher} holds no finished fine-tuned teacher; run "
                              "`nas-prune finetune` first (or give --teacher)")
    tokenizer = data_lib.load_tokenizer(str(teacher))
    family = "decoder" if is_decoder(teacher) else "encoder"
    experiments = []
    for name in opts.baselines:
        baselines_lib.check_applies(name, family, data_lib.task_kind(opts.data))
        method_opts = baselines_lib.make_options(name, opts.baseline_options.get(name))
        experiment = baselines_lib.experiment_name(name, method_opts)
        experiments.append(experiment)
        store = results_lib.ResultStore(run.results, experiment)
        task = data_lib.tokenize(data_lib.load_task(opts.data), tokenizer,
                                 getattr(method_opts, "max_length", 128))
        baselines_lib.run_method(name, teacher, task, tokenizer, run.baseline(name),
                                 method_opts, run.results, latency=opts.profile,
                                 experiment=experiment)
        everything = results_lib.load(run.results)
        if not (everything["method"] == "dense").any():  # the reference point, once
            dense = dense_evaluation(teacher, task, tokenizer, getattr(method_opts, "seed", 0))
            dense.update(baselines_lib.measure_latency(teacher, opts.profile))
            store.append_evaluations([dense])
    return experiments


def refine(run: RunDir, opts: PipelineOptions, supernet_dir: str | Path | None = None,
           teacher: str | Path | None = None) -> pd.DataFrame:
    """Distil the chosen sub-networks from the teacher (default: the one the supernet was
    trained from) into ``run.export(trial_id)``, the models users deploy: every Pareto-optimal
    one (refine.select "pareto"), or per compare budget the candidates refine.select "budgets"
    picks, screened with refine.screen_steps when set (the search's choice for each budget,
    or a candidate significantly better on validation after that many steps, is refined to
    the end: refine.screen_z). Rows (method ``nas+refine``, with their
    cost; a screened-out candidate's row has status "rung") go to the experiment
    ``refine-<search experiment>``. Finished refines and screens are not redone. Returns the
    refine rows."""
    from nas_prune import refine as refine_lib

    supernet_dir = Path(supernet_dir or run.supernet)
    meta = check_supernet(supernet_dir)
    teacher = Path(teacher) if teacher else _teacher_of(run, meta)
    r = opts.refine
    space = opts.search.space or meta.get("space") or "small"
    store = results_lib.ResultStore(run.results, f"refine-{_search_experiment(run, opts)}")
    if r.select == "budgets":
        chosen = _near_budgets(opts, complete_evaluations(run, opts), supernet_dir, space, store)
    else:
        chosen = pareto_set(run, opts).assign(budget=float("nan"))
    stored = store.evaluations()
    finished = set() if stored.empty else set(stored.loc[stored["status"] == "ok", "trial_id"])
    screens = {} if stored.empty else {
        row.trial_id: row.error for row in stored[stored["status"] == "rung"].itertuples()}
    if chosen.empty or set(chosen["trial_id"]) <= finished:
        return stored
    # refine.total_examples: one group per model refined to the end, the rest screened out
    r = r.split([1] * chosen["trial_id"].nunique() if r.screen_steps is None else
                [len(group) for _, group in chosen.groupby("budget", dropna=False)])
    tokenizer = data_lib.load_tokenizer(str(supernet_dir))
    task = data_lib.tokenize(data_lib.load_task(opts.data), tokenizer, r.max_length)
    steps = r.steps(len(task.train))
    if r.screen_steps is not None and r.screen_steps >= steps:
        raise OptionsError(f"refine: screen_steps {r.screen_steps} must be fewer than the "
                           f"refine's {steps} steps (one pass over {len(task.train)} training "
                           "examples); lower it or set refine.examples")

    def run_refine(row, stop_after: int | None = None) -> dict:
        result = refine_lib.refine(supernet_dir, teacher, json.loads(row.config), space, task,
                                   tokenizer, run.export(row.trial_id), r,
                                   trial_id=row.trial_id, stop_after=stop_after)
        store.append_evaluations([{k: v for k, v in result.items()
                                   if k not in ("teacher_examples", "model_dir")}])
        return result

    rates = task.spec.metric == "accuracy"  # an error that is a rate of examples
    winners, screened = [], set()
    for budget, group in chosen.groupby("budget", sort=True, dropna=False):
        if r.screen_steps is None or len(group) == 1:
            winners += list(group.itertuples())
            continue
        for row in group.itertuples():
            if row.trial_id not in screens and row.trial_id not in finished:
                log.info("refine: screening %s (params ratio %.3f) for budget %s, %d steps",
                         row.trial_id, row.params_ratio, budget, r.screen_steps)
                screens[row.trial_id] = run_refine(row, stop_after=r.screen_steps)["error"]
        scored = {row.trial_id: screens.get(row.trial_id, np.inf) for row in group.itertuples()}
        best = refine_lib.screen_winner(scored, group["trial_id"].iloc[0],
                                        len(task.valid) if rates else None, r.screen_z)
        log.info("refine: budget %s: %s chosen of %d after %d steps (the search's choice %s; "
                 "validation error %s)", budget, best, len(group), r.screen_steps,
                 group["trial_id"].iloc[0], ", ".join(f"{t} {e:.4f}" for t, e in scored.items()))
        winners += [row for row in group.itertuples() if row.trial_id == best]
        screened |= set(scored)
    todo = list({row.trial_id: row for row in winners
                 if row.trial_id not in finished}.values())
    for i, row in enumerate(todo, 1):
        log.info("refine %d/%d: %s (params ratio %.3f)", i, len(todo), row.trial_id,
                 row.params_ratio)
        run_refine(row)
    for trial in screened - {row.trial_id for row in winners}:  # their checkpoints
        shutil.rmtree(refine_lib.work_dir(run.export(trial)), ignore_errors=True)
    return store.evaluations()


def complete_evaluations(run: RunDir, opts: PipelineOptions) -> pd.DataFrame:
    """The search experiment's complete evaluations in ``run.results``, one per trial."""
    from nas_prune import report as report_lib

    frame = results_lib.load(run.results, experiment=_search_experiment(run, opts))
    rows = report_lib.final_rows(frame[frame["method"] == "nas"]) if not frame.empty else frame
    if rows.empty:
        raise OptionsError(f"no finished search results in {run.results}; run "
                           "`nas-prune search` first")
    return rows


def _near_budgets(opts: PipelineOptions, rows: pd.DataFrame, supernet_dir: Path, space: str,
                  store: results_lib.ResultStore) -> pd.DataFrame:
    """The candidates refine.select "budgets" refines, with a ``budget`` column: per compare
    budget, the validation-best `refine.per_budget` of `rows` within it (and within
    refine.band below it) on the compare axis. On the latency axis every row is timed here
    (`retime`), as the compare stage times the models it compares, not taken from the
    profile stage's timing of the search's Pareto set."""
    from nas_prune.refine import near_budgets

    axis = opts.compare.axis
    if axis == "latency_ms":
        rows = retime(opts, rows, supernet_dir, space, store)
    chosen = near_budgets(rows, opts.compare.budgets, axis, opts.refine.per_budget,
                          opts.refine.band)
    if chosen.empty:
        log.warning("refine: no evaluated sub-network fits any of the budgets %s on %s; "
                    "nothing to refine", opts.compare.budgets, axis)
    else:
        log.info("refine: %d candidates (%d distinct) of %d evaluated sub-networks for the "
                 "budgets %s on %s", len(chosen), chosen["trial_id"].nunique(), len(rows),
                 opts.compare.budgets, axis)
    return chosen


def retime(opts: PipelineOptions, rows: pd.DataFrame, supernet_dir: Path, space: str,
           store: results_lib.ResultStore) -> pd.DataFrame:
    """`rows` (search evaluations) with ``latency_ms`` / ``hardware`` timed now by the profiler
    actors with `opts.profile` (the runtime and settings the compare stage times its models
    with), each config once: the timings go to `store` (the refine experiment's latency
    table), so a resumed refine chooses from the same numbers. Why not the profile stage's
    timings: those are taken right after the search, of the Pareto set only, and on a loaded
    2-core CPU one sub-network's timing there and in the compare stage differed by 1.4 ms
    (5.40 vs 4.00), enough for refine and the comparison to disagree on which models fit a
    budget."""
    from nas_prune import report as report_lib
    from nas_prune.profile import profile_configs

    profile_configs(str(supernet_dir), space, [json.loads(c) for c in rows["config"]],
                    settings=opts.profile, store=store, trial_ids=list(rows["trial_id"]))
    timed = report_lib.attach_latency(rows.drop(columns=["latency_ms", "hardware"],
                                                errors="ignore"), store.latency())
    log.info("refine: timed %d sub-networks on %s: %.2f-%.2f ms", len(timed),
             timed["hardware"].iloc[0], timed["latency_ms"].min(), timed["latency_ms"].max())
    return timed


def compare(run: RunDir, opts: PipelineOptions) -> Path:
    """The comparison on the test split (nas_prune.compare): the Pareto set unrefined and
    refined, every baseline model and the dense teacher, budgets matched on validation,
    bootstrap intervals, paired tests and counted cost, the compared models' latency timed
    by the profiler actors on every hardware type (unless profile.enabled is false); written
    to ``run.compare``. A
    language-modelling task is compared by test perplexity over the supernet's token blocks;
    ``compare.max_test_examples`` caps the test examples (blocks) scored. With
    ``compare.pool`` it scores nothing: it pools those runs' comparisons
    (`nas_prune.compare.pool_seeds`) into ``run.compare``."""
    from nas_prune import compare as compare_lib

    c = opts.compare
    if c.pool:
        pooled = compare_lib.pool_seeds(
            [RunDir(d).compare for d in c.pool], n_bootstrap=c.n_bootstrap,
            n_paired=c.n_paired, seed=c.seed, level=c.level, alpha=c.alpha)
        return compare_lib.write_comparison(pooled, run.compare)
    supernet_dir = run.supernet
    meta = check_supernet(supernet_dir)
    teacher = _teacher_of(run, meta)
    experiment = _search_experiment(run, opts)
    everything = results_lib.load(run.results)
    front = pareto_set(run, opts)
    # what every NAS model shares: the supernet's training and the search
    search_rows = everything[everything["experiment"] == experiment]
    shared = {"shared_train_examples": read_meta(supernet_dir).get("train_examples"),
              "shared_train_time_s": (read_meta(supernet_dir).get("train_seconds") or 0.0)
              + float(search_rows["eval_time_s"].sum())}
    unrefined = export(run, opts, supernet_dir, {row.trial_id: json.loads(row.config)
                                                 for row in front.itertuples()},
                       into=run.compare / "nas")
    candidates = [front.assign(model_dir=[str(p) for p in unrefined], train_examples=0,
                               train_time_s=0.0, **shared)]
    refined = refined_candidates(
        run, everything[everything["experiment"] == f"refine-{experiment}"], shared)
    if not refined.empty:
        candidates.append(refined)
    for name in opts.baselines:
        rows = everything[everything["experiment"].str.startswith(f"baseline-{name}-")
                          & (everything["method"] != "dense")]
        candidates.append(rows.assign(
            model_dir=[str(run.baseline(name) / t) for t in rows["trial_id"]]))
    table = pd.concat(candidates, ignore_index=True)
    tokenizer = data_lib.load_tokenizer(str(teacher))
    max_length = read_meta(supernet_dir).get("options", {}).get("max_length", 128)
    task = data_lib.tokenize(data_lib.load_task(opts.data), tokenizer, max_length)
    scores: dict[str, np.ndarray] = {}
    frame = compare_lib.compare(
        table, teacher, task, tokenizer, c.budgets, c.axis, reference=c.reference,
        latency=opts.profile, measure_latency=c.axis == "latency_ms" or opts.profile.enabled,
        n_bootstrap=c.n_bootstrap, n_paired=c.n_paired, seed=c.seed, level=c.level,
        alpha=c.alpha, batch_size=c.batch_size,
        max_test_examples=c.max_test_examples, scores_out=scores)
    return compare_lib.write_comparison(frame, run.compare, table, scores)


def refined_candidates(run: RunDir, rows: pd.DataFrame, shared: dict[str, float | None]
                       ) -> pd.DataFrame:
    """The compare stage's ``nas+refine`` candidates from the refine experiment's `rows`: the
    finished refines, each with its model directory and the NAS `shared` cost
    (``shared_train_examples``, ``shared_train_time_s``) plus the steps of the candidates
    refine.screen_steps screened out, which every refined model shares."""
    if rows.empty:
        return rows
    refined = rows[rows["status"] == "ok"]
    dropped = rows[(rows["status"] == "rung") & ~rows["trial_id"].isin(refined["trial_id"])]
    cost = {key: None if shared.get(key) is None else shared[key] + float(dropped[own].sum())
            for key, own in (("shared_train_examples", "train_examples"),
                             ("shared_train_time_s", "train_time_s"))}
    return refined.assign(model_dir=[str(run.export(t)) for t in refined["trial_id"]], **cost)


def report(run: RunDir, opts: PipelineOptions, objectives: Sequence[str] | None = None
           ) -> Path:
    """Pareto plot and Markdown summary of every experiment in ``run.results``, with the
    measured latency of the profiled configs attached; returns the summary's path."""
    from nas_prune import report as report_lib

    objectives = list(objectives or opts.search.objectives)
    frame = results_lib.load(run.results)
    if frame.empty:
        raise OptionsError(f"no results under {run.results}; run `nas-prune search` first")
    rows = report_lib.final_rows(frame)
    latency = results_lib.load(run.results, table="latency")
    rows = report_lib.attach_latency(rows, latency)
    dense = rows[rows["method"] == "dense"]
    out = report_lib.write_report(rows, run.report, objectives, latency=latency,
                                  dense=dense.iloc[-1] if not dense.empty else None)
    comparison = run.compare / "comparison.md"
    if comparison.exists():  # the test-split comparison of the compare stage, alongside
        with open(out / "summary.md", "a") as summary:
            summary.write("\n## Comparison on the test split\n\n![comparison]"
                          "(../compare/comparison.png)\n\n" + comparison.read_text())
    return out / "summary.md"


def export(run: RunDir, opts: PipelineOptions, supernet_dir: str | Path | None = None,
           configs: dict[str, dict[str, int]] | None = None,
           objectives: Sequence[str] | None = None, onnx: bool = False,
           into: Path | None = None) -> list[Path]:
    """Export `configs` (name -> config; default: the Pareto set by trial id) of the supernet
    (default ``run.supernet``) to ``run.export(name)`` (or ``into / name``); existing exports
    (refined ones included) are kept. With
    `onnx`, each also gets a ``model.onnx`` (dynamic batch and sequence axes) checked against
    PyTorch with onnxruntime (nas_prune.onnx_export)."""
    from nas_prune import export as export_lib
    from nas_prune.checkpoint import load_checkpoint
    from nas_prune.space import make_space

    supernet_dir = Path(supernet_dir or run.supernet)
    meta = check_supernet(supernet_dir)
    space_name = opts.search.space or meta.get("space") or "small"
    if configs is None:
        front = pareto_set(run, opts, objectives)
        configs = {r["trial_id"]: json.loads(r["config"]) for _, r in front.iterrows()}
        errors = dict(zip(front["trial_id"], front["error"], strict=True))
    else:
        errors = {}
    model, space, tokenizer = None, None, None
    exported = []
    for name, config in configs.items():
        target = into / name if into is not None else run.export(name)
        if not (target / "config.json").exists():
            if model is None:
                model, _ = load_checkpoint(supernet_dir)
                space = make_space(space_name, model.config)
                tokenizer = data_lib.load_tokenizer(str(supernet_dir))
            export_lib.export_sub_network(
                model, space.to_sub_network(config), target, tokenizer,
                metadata={"config": config, "error": errors.get(name), "space": space_name,
                          "task": meta.get("task"), "supernet": str(supernet_dir)})
        if onnx and not (target / "model.onnx").exists():
            from nas_prune.onnx_export import export_onnx

            export_onnx(target)
        exported.append(target)
    return exported


# --------------------------------------------------------------------------- everything
def run(out: str | Path, opts: PipelineOptions) -> dict[str, Any]:
    """Run every stage into `out`, skipping stages already complete. Returns a summary."""
    from nas_prune import baselines as baselines_lib
    from nas_prune.models import family_of

    rundir = RunDir(out)
    if opts.compare.pool:
        raise OptionsError("compare.pool pools the comparisons of finished runs; give it to "
                           "`nas-prune compare --out POOLED --compare.pool RUN RUN ...`, not to "
                           "run")
    family, kind = family_of(opts.model), data_lib.task_kind(opts.data)
    for name in opts.baselines:  # built (and so checked) now, before hours of training
        baselines_lib.check_applies(name, family, kind)
        baselines_lib.make_options(name, opts.baseline_options.get(name))
    rundir.root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, fn, *args):
        log.info("== %s ==", name)
        t0 = time.perf_counter()
        value = fn(rundir, opts, *args)
        timings[name] = round(time.perf_counter() - t0, 1)
        return value

    stage("finetune", finetune)
    stage("supernet", supernet)
    evaluated = stage("search", search)
    front = pareto_set(rundir, opts)
    sub_networks = evaluated[(evaluated["status"] == "ok") & (evaluated["method"] != "dense")]
    log.info("Pareto set: %d of %d sub-networks", len(front), sub_networks["trial_id"].nunique())
    if opts.profile.enabled:
        stage("profile", profile)
    experiments = [opts.search_experiment]
    if opts.baselines:
        experiments += stage("baselines", baselines)
    if opts.refine.enabled:
        stage("refine", refine)
    exported = stage("export", export)
    comparison = None
    if opts.compare.enabled:
        from nas_prune.compare import CompareError

        try:
            comparison = stage("compare", compare)
        except CompareError as e:  # e.g. no model fits a budget: the rest of the run stands
            log.warning("no comparison: %s; set compare.budgets (`nas-prune compare`)", e)
    stage("report", report)
    dense = results_lib.load(rundir.results).query("method == 'dense'")
    summary = {
        "out": str(rundir.root), "experiment": opts.search_experiment,
        "evaluated": int(evaluated.loc[evaluated["status"] == "ok", "trial_id"].nunique()),
        "pareto": int(len(front)), "exported": [str(p) for p in exported],
        "dense_error": float(dense["error"].iloc[-1]) if not dense.empty else None,
        "baselines": experiments[1:],
        "comparison": str(comparison) if comparison else None,
        "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": timings,
    }
    rundir.summary.write_text(json.dumps(summary, indent=2))
    return summary
