"""The whole pipeline: fine-tune, train the supernet, search, profile, report, export.

Each stage writes under one output directory and is skipped when its output is complete, so
re-running with the same `--out` continues an interrupted run instead of starting over:

```
OUT/teacher/     fine-tuned dense model (checkpoint)          nas_prune.train.finetune
OUT/supernet/    weight-sharing supernet (checkpoint)          nas_prune.train.train_supernet
OUT/tune/        Ray Tune experiment state (resume)            nas_prune.search.run_search
OUT/results/     Parquet results: evaluations/ and latency/    nas_prune.results
OUT/baselines/   one model dir per baseline model (optional)  nas_prune.baselines
OUT/report/      pareto.png, summary.md                        nas_prune.report
OUT/export/      one Hugging Face model dir per Pareto-optimal sub-network   nas_prune.export
```

Baselines (`baselines: [pins, grain, layer_drop]`, none by default) run after the search on the
same teacher and data; their rows go to the experiments `baseline-<method>-seed<seed>` and
appear in the same report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from nas_prune import data as data_lib
from nas_prune import results as results_lib
from nas_prune.profile import ProfileSettings
from nas_prune.search.tuner import SearchOptions
from nas_prune.train import TrainOptions

log = logging.getLogger(__name__)


@dataclass
class TaskOptions:
    """Which data to prune for (see nas_prune.data.load_task)."""

    task: str = "rotten_tomatoes"
    """A built-in task, a GLUE task name, a datasets hub name, or a CSV/JSON/Parquet file."""
    data_files: dict[str, str] | None = None
    """Explicit {"train": path, "test": path} files."""
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    metric: str | None = None
    """accuracy, f1, matthews or spearman (default: the task's)."""
    max_examples: int | None = None
    """Cap on each split's size (quick runs)."""
    split_seed: int = 0
    """Seed of the train/valid/test split."""

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of nas_prune.data.load_task."""
        kwargs = dataclasses.asdict(self)
        kwargs["seed"] = kwargs.pop("split_seed")
        return kwargs


@dataclass
class ProfileOptions:
    """Latency profiling of the Pareto set."""

    enabled: bool = True
    hardware: list[str] | None = None
    """Hardware types to measure on (default: every type in the Ray cluster)."""
    batch_size: int = 1
    seq_len: int = 128
    repeats: int = 10
    threads: int = 1

    def settings(self) -> ProfileSettings:
        return ProfileSettings(batch_size=self.batch_size, seq_len=self.seq_len,
                               repeats=self.repeats, threads=self.threads)


@dataclass
class PipelineOptions:
    """Everything `nas-prune run` does, by stage."""

    model: str | None = None
    """Pre-trained BERT/RoBERTa (hub name or directory); default: the offline MiniLM."""
    data: TaskOptions = field(default_factory=TaskOptions)
    finetune: TrainOptions = field(default_factory=lambda: TrainOptions(strategy="standard"))
    supernet: TrainOptions = field(default_factory=TrainOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    profile: ProfileOptions = field(default_factory=ProfileOptions)
    workers: int = 1
    """Ray Train workers for fine-tuning and supernet training (1: in this process)."""
    experiment: str | None = None
    """Results experiment name (default: nas-<searcher>-<scheduler>-seed<seed>)."""
    baselines: list[str] = field(default_factory=list)
    """Baseline methods to run after the search on the same teacher and data (pins, grain,
    layer_drop); none by default."""
    baseline_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options of each baseline by method name, e.g. {pins: {sparsities: [0.5]}} (the names
    of `nas-prune baseline <method> --help`)."""

    def __post_init__(self) -> None:
        from nas_prune.baselines import METHODS

        for name in [*self.baselines, *self.baseline_options]:
            if name not in METHODS:
                raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(METHODS)}")


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "data": {"max_examples": 2500},
        "finetune": {"epochs": 2, "batch_size": 32, "lr": 1e-4, "max_length": 64},
        "supernet": {"strategy": "full", "epochs": 1, "batch_size": 32, "lr": 1e-4,
                     "max_length": 64},
        "search": {"searcher": "local", "num_samples": 60, "valid_examples": 500,
                   "batch_size": 100},
        "profile": {"repeats": 5, "seq_len": 64},
    },
    "default": {
        "finetune": {"epochs": 3, "batch_size": 32, "lr": 5e-5},
        "supernet": {"strategy": "full", "epochs": 5, "batch_size": 32, "lr": 5e-5},
        "search": {"searcher": "local", "num_samples": 500},
    },
}
"""Named option sets for `nas-prune run --preset`. `quick` runs end to end in well under 15
minutes on a 2-core CPU (smaller data, 1 supernet epoch, 60 trials); `default` is the
paper-like setting (whole data, 5 supernet epochs, 500 trials)."""


def options_from_dict(values: dict[str, Any], base: PipelineOptions | None = None):
    """PipelineOptions from nested dicts (a preset, a YAML file), naming unknown keys."""
    base = base or PipelineOptions()
    sections = {f.name: f for f in dataclasses.fields(PipelineOptions)}
    updates: dict[str, Any] = {}
    for key, value in values.items():
        if key not in sections:
            raise ValueError(f"unknown option {key!r}; known: {', '.join(sections)}")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"option {key!r} takes a mapping of its own options")
            known = {f.name for f in dataclasses.fields(current)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(
                    f"unknown option(s) {', '.join(unknown)} in {key!r}; known: "
                    f"{', '.join(sorted(known))}"
                )
            updates[key] = dataclasses.replace(current, **value)
        else:
            updates[key] = value
    return dataclasses.replace(base, **updates)


def _load_task(opts: PipelineOptions, tokenizer, max_length: int):
    task = data_lib.load_task(**opts.data.load_kwargs())
    return data_lib.tokenize(task, tokenizer, max_length)


def _finished(path: Path) -> bool:
    from nas_prune.train import read_meta

    return bool(read_meta(path).get("finished")) if path.exists() else False


def run(out: str | Path, opts: PipelineOptions) -> dict[str, Any]:
    """Run every stage into `out`, skipping stages already complete. Returns a summary."""
    from nas_prune import baselines as baselines_lib
    from nas_prune import export as export_lib
    from nas_prune import report as report_lib
    from nas_prune import train as train_lib
    from nas_prune.search.tuner import run_search

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_path = opts.model or data_lib.default_model_path()
    # built (and so checked) now, before hours of training
    baseline_opts = {name: baselines_lib.make_options(name, opts.baseline_options.get(name))
                     for name in opts.baselines}
    timings: dict[str, float] = {}

    def stage(name: str):
        log.info("== %s ==", name)
        timings[name] = time.perf_counter()

    def done(name: str):
        timings[name] = time.perf_counter() - timings[name]

    teacher_dir, supernet_dir = out / "teacher", out / "supernet"
    stage("fine-tune teacher")
    if _finished(teacher_dir):
        log.info("teacher already fine-tuned in %s", teacher_dir)
    else:
        _train("finetune", model_path, teacher_dir, opts, opts.finetune)
    done("fine-tune teacher")

    stage("train supernet")
    if _finished(supernet_dir):
        log.info("supernet already trained in %s", supernet_dir)
    else:
        _train("supernet", teacher_dir, supernet_dir, opts, opts.supernet)
    done("train supernet")

    stage("search")
    search = opts.search
    experiment = opts.experiment or f"nas-{search.searcher}-{search.scheduler}-seed{search.seed}"
    space = search.space or opts.supernet.space
    search = dataclasses.replace(search, space=space)
    frame = run_search(supernet_dir, opts.data.load_kwargs(), out / "results", experiment,
                       search, storage_path=out / "tune",
                       max_length=opts.supernet.max_length)
    done("search")

    store = results_lib.ResultStore(out / "results", experiment)
    dense = _dense_row(store, teacher_dir, opts, experiment)
    rows = report_lib.final_rows(frame[frame["method"] == "nas"])
    front = report_lib.front(rows, search.objectives)
    log.info("Pareto set: %d of %d sub-networks", len(front), len(rows))

    latency = None
    if opts.profile.enabled and not front.empty:
        stage("profile")
        latency = _profile(supernet_dir, space, front, dense, store, opts)
        done("profile")

    experiments = [experiment]
    if baseline_opts:
        stage("baselines")
        experiments += _baselines(teacher_dir, store, opts, baseline_opts, out)
        done("baselines")

    stage("report")
    everything = results_lib.load(out / "results")
    frame_now = report_lib.final_rows(everything[everything["experiment"].isin(experiments)])
    if latency is not None and not latency.empty:
        frame_now = _attach_latency(frame_now, latency)
        dense = _attach_latency(dense.to_frame().T, latency).iloc[0]
    report_lib.write_report(frame_now, out / "report", search.objectives, latency=latency,
                            dense=dense)
    done("report")

    stage("export")
    supernet, _ = train_lib.load_checkpoint(supernet_dir)
    tokenizer = data_lib.load_tokenizer(str(supernet_dir))
    from nas_prune.space import make_space

    space_obj = make_space(space, supernet.config)
    exported = []
    for _, row in front.iterrows():
        config = json.loads(row["config"])
        target = out / "export" / f"{row['trial_id']}"
        if not (target / "config.json").exists():
            export_lib.export_sub_network(
                supernet, space_obj.to_sub_network(config), target, tokenizer,
                metadata={"config": config, "error": row["error"], "experiment": experiment,
                          "space": space, "task": opts.data.task})
        exported.append(str(target))
    done("export")
    summary = {
        "out": str(out), "experiment": experiment, "evaluated": int(len(rows)),
        "pareto": int(len(front)), "exported": exported,
        "dense_error": float(dense["error"]), "baselines": experiments[1:],
        "seconds": time.perf_counter() - started,
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _train(stage: str, source, out_dir: Path, opts: PipelineOptions, train_opts: TrainOptions):
    from nas_prune import train as train_lib

    if opts.workers > 1:
        train_lib.train_distributed(stage, source, opts.data.load_kwargs(), out_dir, train_opts,
                                    num_workers=opts.workers)
        return
    tokenizer = data_lib.load_tokenizer(str(source))
    task = _load_task(opts, tokenizer, train_opts.max_length)
    if stage == "finetune":
        train_lib.finetune(str(source), task, out_dir, train_opts, tokenizer=tokenizer)
    else:
        train_lib.train_supernet(source, task, out_dir, train_opts)


def _dense_row(store, teacher_dir: Path, opts: PipelineOptions, experiment: str) -> pd.Series:
    """The dense (unpruned, fine-tuned) model's validation result; stored once."""
    existing = store.evaluations()
    if not existing.empty and (existing["method"] == "dense").any():
        return existing[existing["method"] == "dense"].iloc[-1]
    tokenizer = data_lib.load_tokenizer(str(teacher_dir))
    task = _load_task(opts, tokenizer, opts.finetune.max_length)
    row = dense_evaluation(teacher_dir, task, tokenizer, opts.search.seed,
                           opts.search.valid_examples, opts.search.flops_seq_len)
    store.append_evaluations([row])
    return store.evaluations().query("method == 'dense'").iloc[-1]


def dense_evaluation(teacher_dir: str | Path, task: data_lib.TaskData, tokenizer,
                     seed: int = 0, valid_examples: int | None = None,
                     flops_seq_len: int = 128) -> dict[str, Any]:
    """The evaluation row (method ``dense``) of the fine-tuned teacher at `teacher_dir` on the
    tokenised `task`'s validation split (a seeded subset of `valid_examples`, if given)."""
    from nas_prune import train as train_lib

    model, meta = train_lib.load_checkpoint(teacher_dir)
    valid = task.valid.shuffle(seed=seed)
    if valid_examples:
        valid = valid.select(range(min(valid_examples, len(valid))))
    t0 = time.perf_counter()
    scores = train_lib.evaluate(model, data_lib.make_loader(valid, tokenizer, 64), task.spec)
    full = model.full_sub_network
    config = {"num_layers": model.config.num_hidden_layers,
              "num_heads": model.config.num_attention_heads,
              "num_units": model.config.intermediate_size}
    return {
        "method": "dense", "task": task.spec.name, "model": meta.get("base_model", ""),
        "seed": seed, "trial_id": "dense", "config": config,
        "fidelity": float(scores["examples"]), "fidelity_unit": "examples",
        "error": scores["error"], "metric_name": task.spec.metric,
        "metric_value": scores["metric"], "params": model.num_params(full),
        "params_ratio": 1.0, "flops": model.flops(full, flops_seq_len),
        "wall_time_s": 0.0, "eval_time_s": time.perf_counter() - t0, "status": "ok",
    }


def _baselines(teacher_dir: Path, store, opts: PipelineOptions, baseline_opts: dict[str, Any],
               out: Path) -> list[str]:
    """Run each baseline whose experiment holds no rows yet; return their experiments."""
    from nas_prune import baselines as baselines_lib

    tokenizer = data_lib.load_tokenizer(str(teacher_dir))
    experiments = []
    for name, method_opts in baseline_opts.items():
        experiment = baselines_lib.experiment_name(name, method_opts)
        experiments.append(experiment)
        done = results_lib.ResultStore(store.root, experiment).evaluations()
        if not done.empty:
            log.info("baseline %s already in %s (%d rows)", name, experiment, len(done))
            continue
        task = _load_task(opts, tokenizer, getattr(method_opts, "max_length", 128))
        baselines_lib.run_method(name, teacher_dir, task, tokenizer, out / "baselines" / name,
                                 method_opts, store.root, latency=opts.profile.settings(),
                                 experiment=experiment)
    return experiments


def _profile(supernet_dir: Path, space: str, front: pd.DataFrame, dense: pd.Series, store,
             opts: PipelineOptions) -> pd.DataFrame:
    from nas_prune.profile import profile_configs

    configs = [json.loads(c) for c in front["config"]]
    ids = list(front["trial_id"])
    if space == "small":  # the dense model is the largest small-space config
        configs.append(json.loads(dense["config"]))
        ids.append("dense")
    profile_configs(str(supernet_dir), space, configs, hardware=opts.profile.hardware,
                    settings=opts.profile.settings(), store=store, trial_ids=ids)
    return store.latency()


def _attach_latency(frame: pd.DataFrame, latency: pd.DataFrame) -> pd.DataFrame:
    """Set `latency_ms` / `hardware` (first hardware type measured) of the rows whose config
    was profiled."""
    if latency.empty:
        return frame
    hardware = latency["hardware"].iloc[0]
    lat = latency[latency["hardware"] == hardware].drop_duplicates("config_hash", keep="last")
    by_hash = dict(zip(lat["config_hash"], lat["median_ms"], strict=True))
    frame = frame.copy()
    hashes = [results_lib.config_hash(json.loads(c)) for c in frame["config"]]
    measured = [h in by_hash for h in hashes]
    old_ms = frame["latency_ms"] if "latency_ms" in frame else [None] * len(frame)
    old_hw = frame["hardware"] if "hardware" in frame else [None] * len(frame)
    # rows measured elsewhere (baselines time their saved models) keep their own latency
    frame["latency_ms"] = [by_hash[h] if m else v
                           for h, m, v in zip(hashes, measured, old_ms, strict=True)]
    frame["hardware"] = [hardware if m else v
                         for m, v in zip(measured, old_hw, strict=True)]
    return frame
