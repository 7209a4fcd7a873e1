"""`nas-prune` command line: one subcommand per pipeline stage, and `run` for all of them.

The options are the dataclasses of nas_prune.options, turned into a parser by jsonargparse: one
`--<section>.<field>` per field (help from the field's docstring), the same names nested by
section in YAML files (`--config run.yaml`, and `--print_config` writes one), and every value
checked against its type and the dataclass's own validation before anything is loaded. Each
subcommand calls the nas_prune.pipeline function of the same name. A user error prints one line
saying what is wrong and exits with status 2; no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("nas_prune")

_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}

_OBJECTIVES_HELP = "Objectives: error, params, params_ratio, flops, latency:<hardware>."


class UserError(Exception):
    """Bad input found by the CLI itself: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- subcommands
# Each command: (help, sections of PipelineOptions it reads, extra arguments, handler).
def _common(p) -> None:
    from jsonargparse import ActionConfigFile

    p.add_argument("--out", required=True, help="the run's output directory (re-run to "
                   "continue; the layout is nas_prune.rundir.RunDir)")
    p.add_argument("--config", action=ActionConfigFile, help="YAML file of options, nested "
                   "by section as in --print_config")


def _json_value(text: str | None, option: str) -> Any:
    if text is None:
        return None
    path = Path(text)
    try:
        return json.loads(path.read_text() if path.is_file() else text)
    except json.JSONDecodeError as e:
        raise UserError(f"{option} is not valid JSON ({e.msg} at position {e.pos}): "
                        f"{text[:80]!r}") from None


def _configs(text: str | None, option: str) -> list[dict[str, int]] | None:
    """A JSON config or list of configs (or a file holding it), checked for shape."""
    value = _json_value(text, option)
    if value is None:
        return None
    configs = value if isinstance(value, list) else [value]
    for config in configs:
        if not isinstance(config, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in config.items()):
            raise UserError(f"{option} must be a JSON object of integer dimensions (or a list "
                            f"of them), e.g. '{{\"num_layers\": 4, \"num_heads\": 8, "
                            f"\"num_units\": 1024}}'; got {config!r}")
    return configs


def _objectives(values: list[str] | None) -> list[str] | None:
    if values is not None:
        from nas_prune.options import check_objectives

        check_objectives(values, UserError)
    return values


def cmd_run(args, opts) -> Any:
    from nas_prune import pipeline

    return pipeline.run(args.out, opts)


def cmd_finetune(args, opts) -> Any:
    from nas_prune import pipeline
    from nas_prune.checkpoint import read_meta

    path = pipeline.finetune(_rundir(args), opts)
    return {"checkpoint": str(path), "valid": read_meta(path).get("valid")}


def cmd_supernet(args, opts) -> Any:
    from nas_prune import pipeline
    from nas_prune.checkpoint import read_meta

    path = pipeline.supernet(_rundir(args), opts, args.teacher)
    return {"checkpoint": str(path), "valid": read_meta(path).get("valid")}


def cmd_search(args, opts) -> Any:
    from nas_prune import pipeline

    run = _rundir(args)
    frame = pipeline.search(run, opts, args.supernet)
    return {"results": str(run.results), "experiment": opts.search_experiment,
            "evaluations": int(len(frame)),
            "complete": int(frame.loc[frame["status"] == "ok", "trial_id"].nunique())}


def cmd_profile(args, opts) -> Any:
    from nas_prune import pipeline

    latency = pipeline.profile(_rundir(args), opts, args.supernet,
                               _configs(args.configs, "--configs"))
    return [{"hardware": r.hardware, "median_ms": round(r.median_ms, 3), "config": r.config}
            for r in latency.itertuples()]


def cmd_export(args, opts) -> Any:
    from nas_prune import pipeline
    from nas_prune.results import config_hash

    configs = _configs(args.sub_network, "--sub_network")
    named = {f"custom-{config_hash(c)[:10]}": c for c in configs} if configs else None
    paths = pipeline.export(_rundir(args), opts, args.supernet, named, args.objectives,
                            onnx=args.format == "onnx")
    return [str(p) for p in paths]


def cmd_refine(args, opts) -> Any:
    from nas_prune import pipeline

    rows = pipeline.refine(_rundir(args), opts, args.supernet, args.teacher)
    return rows[["trial_id", "metric_value", "params_ratio", "train_examples"]].to_dict("records")


def cmd_compare(args, opts) -> Any:
    from nas_prune import pipeline

    return str(pipeline.compare(_rundir(args), opts))


def cmd_report(args, opts) -> Any:
    from nas_prune import pipeline

    return str(pipeline.report(_rundir(args), opts, args.objectives))


def cmd_baseline(args, opts) -> Any:
    from nas_prune import pipeline

    experiments = pipeline.baselines(_rundir(args), opts, args.teacher)
    return {"results": str(_rundir(args).results), "experiments": experiments}


def _rundir(args):
    from nas_prune.rundir import RunDir

    return RunDir(args.out)


COMMANDS: dict[str, tuple[str, tuple[str, ...], Callable]] = {
    "run": ("the whole pipeline: fine-tune, supernet, search, profile, baselines, report, "
            "export", (), cmd_run),
    "finetune": ("fine-tune the dense teacher into OUT/teacher (DeepSpeed)",
                 ("model", "data", "finetune", "workers"), cmd_finetune),
    "supernet": ("train the weight-sharing supernet into OUT/supernet (DeepSpeed)",
                 ("data", "supernet", "workers"), cmd_supernet),
    "search": ("multi-objective search under Ray Tune into OUT/results",
               ("data", "search", "profile", "experiment"), cmd_search),
    "profile": ("measure the latency of the Pareto set (or --configs) per hardware type",
                ("profile", "experiment"), cmd_profile),
    "export": ("export the Pareto set (or --sub_network) as Hugging Face model directories",
               ("experiment",), cmd_export),
    "refine": ("distil each Pareto-optimal sub-network (or, with --refine.select budgets, "
               "those the comparison can choose) from the teacher into OUT/export",
               ("data", "search", "refine", "compare", "experiment"), cmd_refine),
    "compare": ("compare NAS, NAS + refine, the baselines and the dense model on the test "
                "split into OUT/compare", ("data", "search", "compare", "profile", "baselines",
                                            "experiment"), cmd_compare),
    "report": ("Pareto plot and Markdown summary of OUT/results into OUT/report",
               (), cmd_report),
    "baseline": ("run a published pruning method (pins, grain, layer_drop) on the teacher",
                 ("data", "profile"), cmd_baseline),
}


def _stage_parser(name: str, fields: dict[str, Any]):
    """The parser of subcommand `name`: its sections of PipelineOptions and its own inputs."""
    from jsonargparse import ArgumentParser

    from nas_prune.options import PRESETS, PipelineOptions

    help_, sections, _ = COMMANDS[name]
    p = ArgumentParser(description=help_, exit_on_error=False)
    if name == "baseline":  # the options are the method's: see _baseline_methods
        return p
    _common(p)
    if name == "run":
        p.add_argument("--preset", choices=list(PRESETS), default="quick",
                       help="named option set applied before --config and the other options: "
                       + "; ".join(PRESETS))
        p.add_class_arguments(PipelineOptions, None, as_group=False)
        return p
    sections_ = _sections()
    for section in sections:
        if section in sections_:
            p.add_class_arguments(sections_[section], section)
        else:
            f = fields[section]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            p.add_argument(f"--{section}", type=_FIELDS[section][0], default=default,
                           help=_FIELDS[section][1])
    if name == "supernet":
        p.add_argument("--teacher", help="fine-tuned teacher (default: OUT/teacher)")
    if name in ("search", "profile", "export", "refine"):
        p.add_argument("--supernet", help="trained supernet (default: OUT/supernet)")
    if name == "refine":
        p.add_argument("--teacher", help="fine-tuned teacher (default: the supernet's)")
    if name in ("profile", "export"):
        p.add_argument("--space", help="search space of the configs (default: the supernet's)")
    if name in ("profile", "export", "report"):
        p.add_argument("--objectives", type=list[str] | None, default=None,
                       help=f"{_OBJECTIVES_HELP} Default: error params_ratio.")
    if name == "profile":
        p.add_argument("--configs", help="JSON config or list of configs (or a file holding "
                       "it) instead of the Pareto set")
    if name == "export":
        p.add_argument("--format", choices=["hf", "onnx"], default="hf",
                       help="hf: Hugging Face model directories; onnx: also a model.onnx in "
                       "each, validated with onnxruntime")
        p.add_argument("--sub_network", help="JSON config (or list, or a file) to export "
                       "instead of the Pareto set; each goes to OUT/export/custom-<hash>")
    return p


def _sections() -> dict[str, type]:
    """The dataclass sections of PipelineOptions by name."""
    from nas_prune.options import PipelineOptions

    return {f.name: f.default_factory().__class__ for f in dataclasses.fields(PipelineOptions)
            if f.default_factory is not dataclasses.MISSING
            and dataclasses.is_dataclass(f.default_factory())}


_FIELDS: dict[str, tuple[Any, str]] = {
    "model": (str | None, "pre-trained BERT/RoBERTa or Llama-family decoder (hub name or "
              "directory; smollm2: the offline SmolLM2-135M); default: the offline MiniLM"),
    "workers": (int, "Ray Train workers for training (1: in this process)"),
    "experiment": (str | None, "results experiment of the search (default: "
                   "nas-<searcher>-<scheduler>-seed<seed>, or the only one in OUT/results)"),
    "baselines": (list[str], "the baselines whose models the comparison includes (pins, grain, "
                  "layer_drop)"),
}
"""The plain (non-section) fields of PipelineOptions a stage takes, with their CLI help."""


def _baseline_methods(p) -> None:
    """`nas-prune baseline <method>`: one subcommand per registered method, its options from
    the method's Options dataclass (imported only for `baseline`: the methods need torch)."""
    from jsonargparse import ArgumentParser

    from nas_prune import registry

    sections = _sections()
    methods = p.add_subcommands(dest="method", required=True)
    for name in registry.BASELINES:
        m = ArgumentParser(exit_on_error=False)
        _common(m)
        m.add_argument("--teacher", help="fine-tuned teacher (default: OUT/teacher)")
        for section in COMMANDS["baseline"][1]:
            m.add_class_arguments(sections[section], section)
        try:
            module = registry.load(registry.BASELINES, name, "baseline")
        except ImportError as e:
            methods.add_subcommand(name, m, help=f"unavailable ({e})")
            continue
        doc = (module.__doc__ or name).strip()
        m.description = doc.split("\n\n")[0]
        m.add_class_arguments(module.Options, name)
        methods.add_subcommand(name, m, help=doc.splitlines()[0])


def build_parser(argv: list[str]):
    """The `nas-prune` parser. Only the subcommand named in `argv` gets its options (building
    them is what costs time), so `nas-prune --help` answers at once."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    from nas_prune import __version__
    from nas_prune.options import PRESETS, PipelineOptions

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    fields = {f.name: f for f in dataclasses.fields(PipelineOptions)}
    parser = ArgumentParser(prog="nas-prune", exit_on_error=False, description=(
        "Prune a BERT/RoBERTa encoder or a Llama-family decoder by multi-objective NAS on Ray. "
        "Every stage writes under --out; `nas-prune <stage> --help` lists its options."))
    parser.add_argument("--version", action="version", version=f"nas_prune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subcommands(dest="command", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (help_, _, _) in COMMANDS.items():
        if name != chosen:
            sub.add_subcommand(name, ArgumentParser(description=help_), help=help_)
            continue
        p = _stage_parser(name, fields)
        if name == "run":
            preset = _preset(argv)
            p.set_defaults({f"{section}.{k}" if isinstance(values, dict) else section: v
                            for section, values in PRESETS[preset].items()
                            for k, v in (values.items() if isinstance(values, dict)
                                         else [(None, values)])})
        sub.add_subcommand(name, p, help=help_)
        if name == "baseline":
            _baseline_methods(p)
    return parser


def _own_sections(argv: list[str], command: str) -> list[str]:
    """`argv` with each `--config FILE` of a stage subcommand narrowed to the sections that
    stage takes, so one YAML file serves `run` and every stage (as `nas-prune run
    --print_config` writes it)."""
    if command not in COMMANDS or command == "run":
        return argv
    import yaml

    from nas_prune import registry

    keep = {*COMMANDS[command][1], *(registry.BASELINES if command == "baseline" else ())}
    out = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config" and Path(argv[i + 1]).is_file():
            try:
                values = yaml.safe_load(Path(argv[i + 1]).read_text()) or {}
            except yaml.YAMLError as e:
                raise UserError(f"--config {argv[i + 1]} is not valid YAML: {e}") from None
            if isinstance(values, dict):
                values = {**(values.pop("baseline_options", None) or {}), **values}
                out[i + 1] = yaml.safe_dump({k: v for k, v in values.items() if k in keep})
    return out


def _preset(argv: list[str]) -> str:
    from nas_prune.options import PRESETS

    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--preset" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--preset=") else None)
        if value is not None:
            if value not in PRESETS:
                raise UserError(f"unknown preset {value!r}; choose {', '.join(PRESETS)}")
            return value
    return "quick"


def _method_namespace(sub):
    """`nas-prune baseline <method>`'s options, which its method's own parser holds."""
    method = sub.method
    namespace = sub[method]
    namespace.method = method
    return namespace


def _options(command: str, init) -> Any:
    """The PipelineOptions of a parsed subcommand (sections it does not take keep defaults)."""
    from nas_prune.options import PipelineOptions, SearchOptions

    values = {f.name: init[f.name] for f in dataclasses.fields(PipelineOptions)
              if f.name in init and init[f.name] is not None}
    if command == "baseline":
        method = init["method"]
        values["baselines"] = [method]
        values["baseline_options"] = {method: dataclasses.asdict(init[method])}
    if command in ("profile", "export", "report"):
        search = {k: init[k] for k in ("objectives", "space") if init.get(k) is not None}
        values["search"] = SearchOptions(**search)
    return PipelineOptions(**values)


# ----------------------------------------------------------------------------- main
def _user_error_types() -> tuple[type[BaseException], ...]:
    from jsonargparse import ArgumentError

    from nas_prune.errors import NasPruneError

    types: list[type[BaseException]] = [UserError, NasPruneError, ArgumentError,
                                         FileNotFoundError]
    if "nas_prune.supernet" in sys.modules:
        types.append(sys.modules["nas_prune.supernet"].IllegalSubNetworkError)
    return tuple(types)


def setup_environment() -> None:
    """Defaults that make the CPU path work out of the box (each can be overridden)."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          str(Path.home() / ".cache" / "nas_prune" / "torch_extensions"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), "nas-prune")
    try:
        parser = build_parser(argv)
        cfg = parser.parse_args(_own_sections(argv, command))
        init = parser.instantiate(cfg)
        sub = init[init.command]
        if init.command == "baseline":  # the method's own parser holds every option
            sub = _method_namespace(sub)
        opts = _options(init.command, sub)
    except _user_error_types() as e:
        print(f"nas-prune {command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if init.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "transformers", "datasets", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    setup_environment()
    try:
        result = COMMANDS[init.command][2](sub, opts)
    except _user_error_types() as e:
        print(f"nas-prune {command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nas-prune {command}: interrupted; run the same command again to continue "
              "where it stopped", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
