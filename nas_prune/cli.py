"""`nas-prune` command line: one subcommand per stage, and `run` for the whole pipeline.

Options come from the stage's option dataclass (their field docstrings are the help text), can
be given on the command line (`--lr 1e-4`) or in a YAML file (`--config run.yaml`, the same
names, nested by section for `run`), and every choice list comes from the registries
(STRATEGIES, SPACES, SEARCHERS, SCHEDULERS, TASKS, baselines.METHODS). A user error prints one
line saying what is wrong and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import logging
import os
import sys
import textwrap
import typing
from functools import cache
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("nas_prune")

_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "DS_ACCELERATOR": None,  # set below: cpu when no GPU
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- dataclass args
@cache
def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string under each field) of a dataclass, from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(element type, is_list) of a field annotation such as `int | None` or `list[str]`."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"dict": dict, "list": list, "Any": Any})  # noqa: S307
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is list:
        return args[0] if args else str, True
    if args and origin is not dict:
        return _base_type(args[0])
    return (annotation if isinstance(annotation, type) else str), False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_args(parser, cls: type, prefix: str = "", choices: dict | None = None,
                       skip: tuple[str, ...] = ()) -> None:
    """One `--option` per field of dataclass `cls`, typed, with the field's docstring as help.
    Defaults stay None so that only options given on the command line override YAML."""
    # argparse %-formats help text: a literal "5%" in a docstring must reach it as "5%%"
    docs = {name: doc.replace("%", "%%") for name, doc in _field_docs(cls).items()}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, is_list = _base_type(hints[f.name])
        if kind is dict:
            parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{prefix}{f.name}",
                                type=json.loads, default=None,
                                help=f"{docs.get(f.name, '')} (JSON)")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kwargs: dict[str, Any] = {
            "dest": f"{prefix}{f.name}", "default": None,
            "help": f"{docs.get(f.name, '')} [default: {default}]",
            "type": _parse_bool if kind is bool else kind,
        }
        if is_list:
            kwargs["nargs"] = "+"
        if choices and f.name in choices:
            kwargs["choices"] = list(choices[f.name])
            kwargs.pop("type", None) if kind is str else None
        parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", **kwargs)


def collect(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The options of `cls` given on the command line."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f"{prefix}{f.name}", None)
        if value is not None:
            out[f.name] = value
    return out


def build(cls: type, values: dict[str, Any], what: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown {what} option(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(known))}")
    return cls(**values)


def read_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    return values


# ----------------------------------------------------------------------------- subcommands
def _task_args(parser) -> None:
    from nas_prune.pipeline import TaskOptions

    add_dataclass_args(parser, TaskOptions)


def _train_args(parser, strategy: bool) -> None:
    from nas_prune.space import SPACES
    from nas_prune.supernet import POOLINGS
    from nas_prune.train import STRATEGIES, TrainOptions

    skip = ("pooling",) if strategy else ("strategy", "space", "num_random", "temperature",
                                          "rewire", "rewire_batches")
    choices = {"strategy": STRATEGIES, "space": SPACES, "pooling": ("auto", *POOLINGS)}
    add_dataclass_args(parser, TrainOptions, choices=choices, skip=skip)
    parser.add_argument("--workers", type=int, default=None,
                        help="Ray Train workers (1: train in this process) [default: 1]")


def _search_choices() -> dict[str, Any]:
    from nas_prune.search.searchers import SEARCHERS
    from nas_prune.search.tuner import SCHEDULERS
    from nas_prune.space import SPACES

    return {"searcher": SEARCHERS, "scheduler": SCHEDULERS, "space": SPACES}


def cmd_finetune(args) -> None:
    from nas_prune import data, train
    from nas_prune.pipeline import TaskOptions

    cfg = read_yaml(args.config)
    task_opts = build(TaskOptions, {**cfg.get("data", {}), **collect(args, TaskOptions)}, "data")
    opts = build(train.TrainOptions, {**cfg.get("finetune", {}),
                                      **collect(args, train.TrainOptions), "strategy": "standard"},
                 "finetune")
    model = args.model or cfg.get("model") or data.default_model_path()
    workers = args.workers or 1
    if workers > 1:
        meta = train.train_distributed("finetune", model, task_opts.load_kwargs(), args.out,
                                       opts, num_workers=workers)
        print(json.dumps(meta.get("valid"), indent=2))
        return
    tokenizer = data.load_tokenizer(model)
    task = data.tokenize(data.load_task(**task_opts.load_kwargs()), tokenizer, opts.max_length)
    result = train.finetune(model, task, args.out, opts, tokenizer=tokenizer)
    print(json.dumps({"checkpoint": str(result.checkpoint), "steps": result.steps,
                      "valid": result.valid}, indent=2))


def cmd_supernet(args) -> None:
    from nas_prune import data, train
    from nas_prune.pipeline import TaskOptions

    cfg = read_yaml(args.config)
    task_opts = build(TaskOptions, {**cfg.get("data", {}), **collect(args, TaskOptions)}, "data")
    opts = build(train.TrainOptions, {**cfg.get("supernet", {}),
                                      **collect(args, train.TrainOptions)}, "supernet")
    workers = args.workers or 1
    if workers > 1:
        meta = train.train_distributed("supernet", args.teacher, task_opts.load_kwargs(),
                                       args.out, opts, num_workers=workers)
        print(json.dumps(meta.get("valid"), indent=2))
        return
    tokenizer = data.load_tokenizer(args.teacher)
    task = data.tokenize(data.load_task(**task_opts.load_kwargs()), tokenizer, opts.max_length)
    result = train.train_supernet(args.teacher, task, args.out, opts)
    print(json.dumps({"checkpoint": str(result.checkpoint), "steps": result.steps,
                      "valid": result.valid}, indent=2))


def cmd_search(args) -> None:
    from nas_prune.pipeline import TaskOptions
    from nas_prune.search.tuner import SearchOptions, run_search

    cfg = read_yaml(args.config)
    task_opts = build(TaskOptions, {**cfg.get("data", {}), **collect(args, TaskOptions)}, "data")
    opts = build(SearchOptions, {**cfg.get("search", {}), **collect(args, SearchOptions)},
                 "search")
    out = Path(args.out)
    experiment = args.experiment or f"nas-{opts.searcher}-{opts.scheduler}-seed{opts.seed}"
    frame = run_search(args.supernet, task_opts.load_kwargs(), out / "results", experiment,
                       opts, storage_path=out / "tune")
    print(f"{len(frame)} results in {out / 'results'} (experiment {experiment})")


def cmd_profile(args) -> None:
    from nas_prune import results
    from nas_prune.profile import ProfileSettings, profile_configs

    settings = build(ProfileSettings, collect(args, ProfileSettings), "profile")
    if args.configs:
        configs = json.loads(Path(args.configs).read_text()) if Path(args.configs).exists() \
            else json.loads(args.configs)
        configs = configs if isinstance(configs, list) else [configs]
        ids = [None] * len(configs)
    else:
        frame = results.load(args.results, experiment=args.experiment)
        front = _front(frame, args.objectives)
        configs = [json.loads(c) for c in front["config"]]
        ids = list(front["trial_id"])
    store = results.ResultStore(args.results, args.experiment or "profile")
    rows = profile_configs(args.supernet, args.space, configs, hardware=args.hardware,
                           settings=settings, store=store, trial_ids=ids)
    for row in rows:
        print(f"{row['hardware']:>10} {row['median_ms']:9.2f} ms  {json.dumps(row['config'])}")


def _front(frame, objectives):
    from nas_prune import report

    rows = report.final_rows(frame[frame["method"] == "nas"])
    if rows.empty:
        raise UserError("no finished search results found; run `nas-prune search` first")
    return report.front(rows, objectives)


def cmd_export(args) -> None:
    from nas_prune import data, export, results, train
    from nas_prune.space import make_space

    model, meta = train.load_checkpoint(args.supernet)
    space = make_space(args.space or meta.get("space") or "small", model.config)
    tokenizer = data.load_tokenizer(args.supernet)
    if args.sub_network:
        targets = [("custom", json.loads(args.sub_network))]
    else:
        frame = results.load(args.results, experiment=args.experiment)
        front = _front(frame, args.objectives)
        targets = [(r["trial_id"], json.loads(r["config"])) for _, r in front.iterrows()]
    for name, config in targets:
        path = export.export_sub_network(model, space.to_sub_network(config),
                                         Path(args.out) / name, tokenizer,
                                         metadata={"config": config})
        print(path)


def cmd_report(args) -> None:
    from nas_prune import report, results

    frame = results.load(args.results)
    if frame.empty:
        raise UserError(f"no results under {args.results}")
    rows = report.final_rows(frame)
    dense = rows[rows["method"] == "dense"]
    latency = results.load(args.results, table="latency")
    out = report.write_report(rows, args.out, args.objectives, latency=latency,
                              dense=dense.iloc[-1] if not dense.empty else None)
    print(out / "summary.md")


def cmd_baseline(args) -> None:
    from nas_prune import baselines, data, results
    from nas_prune.pipeline import TaskOptions, dense_evaluation
    from nas_prune.profile import ProfileSettings

    module = baselines.get(args.method)
    cfg = read_yaml(args.config)
    task_opts = build(TaskOptions, {**cfg.get("data", {}), **collect(args, TaskOptions)}, "data")
    opts = baselines.make_options(args.method, {**cfg.get(args.method, {}),
                                                **collect(args, module.Options)})
    given = {k: getattr(args, f"latency_{k}") for k in ("seq_len", "repeats", "threads")
             if getattr(args, f"latency_{k}") is not None}
    latency = build(ProfileSettings, {**cfg.get("latency", {}), **given}, "latency")
    teacher = Path(args.teacher)
    if not (teacher / "config.json").exists():
        raise UserError(f"--teacher {teacher} is not a checkpoint directory (no config.json); "
                        "fine-tune one with `nas-prune finetune` first")
    tokenizer = data.load_tokenizer(str(teacher))
    task = data.tokenize(data.load_task(**task_opts.load_kwargs()), tokenizer,
                         getattr(opts, "max_length", 128))
    out = Path(args.out)
    experiment = args.experiment or baselines.experiment_name(args.method, opts)
    rows = baselines.run_method(args.method, teacher, task, tokenizer,
                                out / "baselines" / args.method, opts, out / "results",
                                latency=latency, experiment=experiment)
    stored = results.load(out / "results")
    if not (stored["method"] == "dense").any():  # the reference point, once per results dir
        dense = dense_evaluation(teacher, task, tokenizer, getattr(opts, "seed", 0))
        dense.update(baselines.measure_latency(teacher, latency))
        results.ResultStore(out / "results", experiment).append_evaluations([dense])
    for row in rows:
        print(f"{row['trial_id']:>14}  {row['metric_name']} {row['metric_value']:.4f}  "
              f"params {row['params_ratio']:.3f}  {row['latency_ms']:.2f} ms  "
              f"{out / 'baselines' / args.method / row['trial_id']}")
    print(f"{len(rows)} results in {out / 'results'} (experiment {experiment})")


def _unavailable(name: str, error: ImportError):
    def fail(args) -> None:
        raise UserError(f"baseline {name} is unavailable: {error}")

    return fail


def _baseline_parsers(sub) -> None:
    """`nas-prune baseline <method>`: one sub-command per registered method, its options from
    the method's Options dataclass."""
    from nas_prune import baselines

    p = sub.add_parser("baseline", help="run a published pruning method on the teacher "
                       f"({', '.join(baselines.METHODS)})",
                       description=(baselines.__doc__ or "").strip().split("\n\n")[0])
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name in baselines.METHODS:
        try:
            module = baselines.get(name)
        except ImportError as e:
            m = methods.add_parser(name, help=f"unavailable ({e})")
            m.set_defaults(func=_unavailable(name, e))
            continue
        doc = (module.__doc__ or "").strip()
        m = methods.add_parser(name, help=doc.splitlines()[0] if doc else name,
                               description=doc.split("\n\n")[0])
        m.add_argument("--teacher", required=True, help="fine-tuned checkpoint (from finetune)")
        m.add_argument("--out", required=True, help="output directory: models go to "
                       f"OUT/baselines/{name}/, rows to OUT/results")
        m.add_argument("--experiment", help="results experiment (default: "
                       f"baseline-{name}-seed<seed>)")
        m.add_argument("--config", help=f"YAML file (sections data, {name}, latency)")
        _task_args(m)
        add_dataclass_args(m, module.Options)
        for field_name, what in (("seq_len", "tokens per input"), ("repeats", "timed runs"),
                                 ("threads", "CPU threads")):
            m.add_argument(f"--latency-{field_name.replace('_', '-')}",
                           dest=f"latency_{field_name}", type=int, default=None,
                           help=f"latency of each saved model: {what} (batch 1)")
        m.set_defaults(func=cmd_baseline)


def cmd_run(args) -> None:
    from nas_prune import pipeline

    if args.preset not in pipeline.PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; choose {', '.join(pipeline.PRESETS)}")
    try:
        opts = pipeline.options_from_dict(pipeline.PRESETS[args.preset])
        opts = pipeline.options_from_dict(read_yaml(args.config), opts)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.model:
        opts = dataclasses.replace(opts, model=args.model)
    if args.task:
        opts = dataclasses.replace(opts, data=dataclasses.replace(opts.data, task=args.task))
    if args.workers:
        opts = dataclasses.replace(opts, workers=args.workers)
    summary = pipeline.run(args.out, opts)
    print(json.dumps(summary, indent=2))


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from nas_prune import __version__
    from nas_prune.pipeline import PRESETS
    from nas_prune.profile import ProfileSettings
    from nas_prune.search.tuner import STATIC_OBJECTIVES, SearchOptions

    parser = argparse.ArgumentParser(
        prog="nas-prune",
        description="Prune a fine-tuned BERT/RoBERTa by multi-objective NAS on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"nas_prune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    objectives = ("Objectives to minimise: " + ", ".join(STATIC_OBJECTIVES)
                  + ", latency:<hardware>")

    p = sub.add_parser("run", help="the whole pipeline: fine-tune, supernet, search, profile, "
                       "baselines, report, export", description=pipeline_doc())
    p.add_argument("--out", required=True, help="output directory (re-run to continue)")
    p.add_argument("--preset", default="quick", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--config", help="YAML file with options by section (data, finetune, "
                   "supernet, search, profile, model, workers, experiment, baselines, "
                   "baseline_options)")
    p.add_argument("--model", help="pre-trained model name or directory")
    p.add_argument("--task", help="task name or data file")
    p.add_argument("--workers", type=int, help="Ray Train workers for training")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("finetune", help="fine-tune the dense teacher (DeepSpeed)")
    p.add_argument("--model", help="pre-trained model (default: offline MiniLM)")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--config", help="YAML file (sections data, finetune)")
    _task_args(p)
    _train_args(p, strategy=False)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("supernet", help="train the weight-sharing supernet (DeepSpeed)")
    p.add_argument("--teacher", required=True, help="fine-tuned checkpoint (from finetune)")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--config", help="YAML file (sections data, supernet)")
    _task_args(p)
    _train_args(p, strategy=True)
    p.set_defaults(func=cmd_supernet)

    p = sub.add_parser("search", help="multi-objective search under Ray Tune")
    p.add_argument("--supernet", required=True, help="supernet checkpoint")
    p.add_argument("--out", required=True, help="directory for results/ and tune/")
    p.add_argument("--experiment", help="experiment name in the results")
    p.add_argument("--config", help="YAML file (sections data, search)")
    _task_args(p)
    add_dataclass_args(p, SearchOptions, choices=_search_choices())
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("profile", help="measure latency of sub-networks per hardware type")
    p.add_argument("--supernet", required=True, help="supernet checkpoint")
    p.add_argument("--space", default="small", help="space the configs belong to")
    p.add_argument("--results", required=True, help="results directory (reads the Pareto "
                   "set unless --configs; latency rows are appended)")
    p.add_argument("--experiment", help="experiment to read / write")
    p.add_argument("--configs", help="JSON config or list (or a file holding it)")
    p.add_argument("--hardware", nargs="+", help="hardware types (default: all present)")
    p.add_argument("--objectives", nargs="+", default=["error", "params_ratio"],
                   help=objectives)
    add_dataclass_args(p, ProfileSettings)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("export", help="export sub-networks as Hugging Face model directories")
    p.add_argument("--supernet", required=True, help="supernet checkpoint")
    p.add_argument("--out", required=True, help="directory for the exported models")
    p.add_argument("--results", help="results directory: export its Pareto set")
    p.add_argument("--experiment", help="experiment to read")
    p.add_argument("--sub-network", help="one config as JSON instead of the Pareto set")
    p.add_argument("--space", help="search space of the configs")
    p.add_argument("--objectives", nargs="+", default=["error", "params_ratio"],
                   help=objectives)
    p.set_defaults(func=cmd_export)

    _baseline_parsers(sub)

    p = sub.add_parser("report", help="Pareto plot and Markdown summary from results")
    p.add_argument("--results", required=True, help="results directory")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--objectives", nargs="+", default=["error", "params_ratio"],
                   help=objectives)
    p.set_defaults(func=cmd_report)
    return parser


def pipeline_doc() -> str:
    from nas_prune import pipeline

    return (pipeline.__doc__ or "").strip()


def _user_error_types() -> tuple[type[BaseException], ...]:
    from nas_prune.baselines import BaselineError
    from nas_prune.data import DataError
    from nas_prune.profile import ProfileError
    from nas_prune.results import ResultsError
    from nas_prune.search.tuner import SearchError
    from nas_prune.space import SearchSpaceError
    from nas_prune.supernet import IllegalSubNetworkError
    from nas_prune.train import TrainingError

    return (UserError, DataError, TrainingError, SearchError, SearchSpaceError,
            IllegalSubNetworkError, ResultsError, ProfileError, BaselineError,
            FileNotFoundError)


def setup_environment() -> None:
    """Defaults that make the CPU path work out of the box (each can be overridden)."""
    for key, value in _ENV_DEFAULTS.items():
        if value is not None:
            os.environ.setdefault(key, value)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          str(Path.home() / ".cache" / "nas_prune" / "torch_extensions"))


def main(argv: list[str] | None = None) -> int:
    setup_environment()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "transformers", "datasets", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except _user_error_types() as e:
        print(f"nas-prune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        if args.verbose:
            raise
        print(f"nas-prune {args.command}: error: {e} (run with -v for the traceback)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
