"""The `nas-prune` command line: help texts, registries as choices, one-line user errors, and
the subcommands giving the same options (and so the same results) as `run`."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from nas_prune import cli, registry
from nas_prune.errors import OptionsError
from nas_prune.options import PRESETS, PipelineOptions, SupernetOptions, replace

SUBCOMMANDS = list(cli.COMMANDS)


def test_subcommands_are_the_pipeline_stages():
    from nas_prune import pipeline

    for name in SUBCOMMANDS:
        stage = {"baseline": "baselines"}.get(name, name)
        assert callable(getattr(pipeline, stage)), f"no pipeline.{stage} for `nas-prune {name}`"


@pytest.mark.parametrize("command", SUBCOMMANDS + [f"baseline {m}" for m in registry.BASELINES])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: nas-prune" in out and command.split()[-1] in out.splitlines()[0]


def _parse(argv):
    parser = cli.build_parser(argv)
    init = parser.instantiate(parser.parse_args(argv))
    return cli._options(init.command, init[init.command])


def test_choices_are_checked_against_the_registries():
    for name in registry.STRATEGIES:
        assert _parse(["supernet", "--out", "o", "--supernet.strategy", name]
                      ).supernet.strategy == name
    with pytest.raises(Exception, match=r"unknown strategy 'bogus'.*sandwich"):
        _parse(["supernet", "--out", "o", "--supernet.strategy", "bogus"])
    for name in registry.SEARCHERS:
        assert _parse(["search", "--out", "o", "--search.searcher", name]
                      ).search.searcher == name
    with pytest.raises(Exception, match=r"unknown space 'huge'.*small, medium"):
        _parse(["search", "--out", "o", "--search.space", "huge"])


def test_field_docstrings_are_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "a datasets hub name, a CSV/JSON/Parquet file, or text files" in out
    assert "Peak learning rate (AdamW)" in out


def test_one_option_reaches_its_stage_once_through_each_layer(tmp_path):
    """--supernet.lr on the command line, in YAML, and in a preset land in the same field."""
    opts = _parse(["run", "--out", "o", "--supernet.lr", "3e-4"])
    assert opts.supernet.lr == 3e-4 and isinstance(opts.supernet, SupernetOptions)
    yaml = tmp_path / "run.yaml"
    yaml.write_text("supernet:\n  lr: 2e-4\nsearch:\n  num_samples: 7\n")
    opts = _parse(["run", "--out", "o", "--config", str(yaml)])
    assert (opts.supernet.lr, opts.search.num_samples) == (2e-4, 7)
    assert opts.search.searcher == PRESETS["quick"]["search"]["searcher"]  # preset underneath
    opts = _parse(["run", "--out", "o", "--config", str(yaml), "--search.num_samples", "9"])
    assert opts.search.num_samples == 9  # the command line beats the file
    # a stage's subcommand builds the same options as run for its sections
    same = _parse(["search", "--out", "o", "--config", str(yaml)])
    assert same.search.num_samples == 7


def test_help_answers_without_importing_torch_or_ray():
    code = ("import sys; from nas_prune import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - started < 10  # generous: it imports no torch (asserted above)


def _run(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "nas_prune.cli", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["finetune", "--out", "x", "--data.task", "no_such_task"], "no_such_task"),
        (["finetune", "--out", "x", "--data.task", "missing.csv"], "missing.csv"),
        (["run", "--out", "x", "--preset", "huge"], "unknown preset 'huge'"),
        (["run", "--out", "x", "--config", "nope.yaml"], "nope.yaml"),
        (["run", "--out", "x", "--config", "bad.yaml"], "temperature"),
        (["run", "--out", "x", "--config", "wrong_type.yaml"], "finetune.epochs"),
        (["search", "--supernet", "nowhere", "--out", "x"], "no config.json"),
        (["report", "--out", "empty"], "no results under empty"),
        (["finetune", "--out", "x", "--finetune.lr", "-1"], "lr must be > 0, got -1"),
        (["search", "--out", "x", "--search.num_samples", "0"], "num_samples must be >= 1"),
        (["finetune", "--out", "x", "--finetune.deepspeed", "{bad json"],
         "finetune.deepspeed"),
        (["finetune", "--out", "x", "--data.data_files", "{bad json"], "data.data_files"),
        (["report", "--out", "x", "--objectives", "[error, bogus]"], "unknown objective"),
        (["profile", "--out", "x", "--configs", "{\"num_layers\": \"many\"}"], "--configs"),
        (["export", "--out", "x", "--sub_network", "{not json"], "--sub_network"),
        (["finetune", "--out", "afile"], "is a file, not a directory"),
        (["compare", "--out", "x", "--compare.pool", "[one]"], "pool needs at least two"),
        (["compare", "--out", "x", "--compare.pool", "[one, two]"], "lacks comparison.csv"),
        (["run", "--out", "x", "--compare.pool", "[one, two]"], "`nas-prune compare --out"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    (tmp_path / "bad.yaml").write_text("search:\n  temperature: 2\n")
    (tmp_path / "wrong_type.yaml").write_text("finetune:\n  epochs: many\n")
    (tmp_path / "afile").write_text("not a directory")
    done = _run(args, tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_yaml_scientific_notation_is_a_number(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("finetune:\n  lr: 1e-4\n")
    assert _parse(["run", "--out", "o", "--config", str(yaml)]).finetune.lr == 1e-4


def test_presets_and_nested_replace():
    opts = replace(PipelineOptions(), PRESETS["quick"])
    opts = replace(opts, {"search": {"num_samples": 7}, "workers": 2})
    assert opts.search.num_samples == 7 and opts.workers == 2
    assert opts.search.searcher == PRESETS["quick"]["search"]["searcher"]
    with pytest.raises(OptionsError, match="unknown option.*bogus"):
        replace(PipelineOptions(), {"bogus": 1})
