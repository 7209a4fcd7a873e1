"""The `nas-prune` command line: help texts, registries as choices, one-line user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nas_prune import cli, pipeline
from nas_prune.baselines import METHODS
from nas_prune.search.searchers import SEARCHERS
from nas_prune.space import SPACES
from nas_prune.train import STRATEGIES

SUBCOMMANDS = ["run", "finetune", "supernet", "search", "profile", "export", "report",
               "baseline"]


@pytest.mark.parametrize("command", SUBCOMMANDS + [f"baseline {m}" for m in METHODS])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: nas-prune {command}" in out


def test_choices_come_from_the_registries():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    strategy = next(a for a in sub["supernet"]._actions if a.dest == "strategy")
    assert list(strategy.choices) == list(STRATEGIES)
    searcher = next(a for a in sub["search"]._actions if a.dest == "searcher")
    assert list(searcher.choices) == list(SEARCHERS)
    space = next(a for a in sub["search"]._actions if a.dest == "space")
    assert list(space.choices) == list(SPACES)


def test_field_docstrings_are_the_help():
    docs = cli._field_docs(pipeline.TaskOptions)
    assert "CSV/JSON/Parquet" in docs["task"]


def _run(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "nas_prune.cli", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["finetune", "--out", "x", "--task", "no_such_task"], "no_such_task"),
        (["finetune", "--out", "x", "--task", "missing.csv"], "missing.csv"),
        (["run", "--out", "x", "--preset", "huge"], "unknown preset 'huge'"),
        (["run", "--out", "x", "--config", "nope.yaml"], "nope.yaml does not exist"),
        (["run", "--out", "x", "--config", "bad.yaml"],
         "unknown option(s) temperature in 'search'"),
        (["search", "--supernet", "nowhere", "--out", "x"], "no config.json"),
        (["report", "--results", "empty", "--out", "r"], "no results under empty"),
        (["finetune", "--out", "x", "--lr", "-1"], "lr must be > 0, got -1"),
        (["search", "--supernet", "s", "--out", "x", "--num-samples", "0"],
         "num_samples must be >= 1"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    (tmp_path / "bad.yaml").write_text("search:\n  temperature: 2\n")
    done = _run(args, tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1


def test_bad_option_value_is_rejected_by_the_parser(tmp_path):
    done = _run(["supernet", "--teacher", "t", "--out", "o", "--strategy", "bogus"], tmp_path)
    assert done.returncode == 2
    assert "invalid choice: 'bogus'" in done.stderr


def test_presets_and_yaml_merge():
    opts = pipeline.options_from_dict(pipeline.PRESETS["quick"])
    opts = pipeline.options_from_dict({"search": {"num_samples": 7}, "workers": 2}, opts)
    assert opts.search.num_samples == 7 and opts.workers == 2
    assert opts.search.searcher == pipeline.PRESETS["quick"]["search"]["searcher"]
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        pipeline.options_from_dict({"bogus": 1})
