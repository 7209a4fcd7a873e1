"""Baselines plumbing: the registry, layer dropping, and `nas-prune baseline` end to end on a
tiny fine-tuned BERT and a tiny CSV task (rows in the Parquet results, report, errors)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from nas_prune import baselines, cli, data, pipeline, registry, report, results, train
from nas_prune.baselines import BaselineError, layer_drop
from nas_prune.checkpoint import load_checkpoint
from nas_prune.options import FinetuneOptions, PipelineOptions, replace
from nas_prune.rundir import RunDir
from nas_prune.supernet import SubNetwork
from tests.test_cli import _run
from tests.test_train import _synthetic_csv, save_tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------ registry
def test_registry_is_lazy_and_names_the_choices():
    code = ("import sys, nas_prune.baselines as b; "
            "print(sorted(m for m in sys.modules if m.startswith('nas_prune.baselines.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "[]", done.stderr
    assert list(registry.BASELINES) == ["pins", "grain", "layer_drop", "llm_pruner"]
    assert baselines.get("layer_drop") is layer_drop
    with pytest.raises(BaselineError, match="unknown baseline 'bogus'; choose one of pins, "
                                            "grain, layer_drop"):
        baselines.get("bogus")
    with pytest.raises(BaselineError, match="unknown layer_drop option.s. colour; known:"):
        baselines.make_options("layer_drop", {"colour": 1})
    assert baselines.make_options("pins", {"sparsities": [0.3]}).sparsities == [0.3]


def test_pipeline_options_take_baselines():
    opts = replace(PipelineOptions(), {"baselines": ["pins", "layer_drop"],
                                       "baseline_options": {"pins": {"sparsities": [0.5]}}})
    assert opts.baselines == ["pins", "layer_drop"]
    assert PipelineOptions().baselines == []  # the quick preset runs none
    with pytest.raises(ValueError, match="unknown baseline 'cofi'"):
        replace(PipelineOptions(), {"baselines": ["cofi"]})


def test_baseline_rows_keep_their_own_latency():
    frame = pd.DataFrame({"config": [json.dumps({"num_layers": 1}), json.dumps({"a": 1})],
                          "latency_ms": [None, 7.0], "hardware": [None, "cpu"]})
    latency = pd.DataFrame({"hardware": ["cpu"], "median_ms": [3.0],
                            "config_hash": [results.config_hash({"num_layers": 1})]})
    out = report.attach_latency(frame, latency)
    assert out["latency_ms"].tolist() == [3.0, 7.0]


def test_report_draws_one_latency_panel_per_hardware_type(tmp_path):
    """NAS configs profiled on two types and a baseline timed on the first: each type has its
    panel, with the NAS points on both and the baseline where it was measured."""
    configs = [{"num_layers": n} for n in (1, 2, 3)]
    frame = pd.DataFrame({
        "method": ["nas"] * 3 + ["pins"], "experiment": ["e"] * 3 + ["pins"],
        "status": ["ok"] * 4, "trial_id": ["a", "b", "c", "p"],
        "config": [json.dumps(c) for c in configs] + [json.dumps({"sparsity": 0.5})],
        "error": [0.3, 0.2, 0.1, 0.25], "params_ratio": [0.6, 0.8, 1.0, 0.7],
        "latency_ms": [None, None, None, 4.0], "hardware": [None, None, None, "cpu"]})
    latency = pd.DataFrame({
        "hardware": ["cpu"] * 3 + ["typeB"] * 3,
        "median_ms": [1.0, 2.0, 3.0, 10.0, 20.0, 30.0],
        "config_hash": [results.config_hash(c) for c in configs] * 2})
    on_b = report.latency_on(frame, latency, "typeB")
    assert on_b["latency_ms"].tolist()[:3] == [10.0, 20.0, 30.0]
    assert pd.isna(on_b["latency_ms"].iloc[3])  # the baseline was timed on cpu only
    on_cpu = report.latency_on(frame, latency, "cpu")
    assert on_cpu["latency_ms"].tolist() == [1.0, 2.0, 3.0, 4.0]
    import matplotlib.image

    both = report.plot_pareto(frame, tmp_path / "both.png", latency=latency)
    one = report.plot_pareto(frame, tmp_path / "one.png",
                             latency=latency[latency["hardware"] == "cpu"])
    width = {p: matplotlib.image.imread(p).shape[1] for p in (both, one)}
    assert width[both] > 1.3 * width[one]  # three panels against two


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def csv_task(tmp_path_factory):
    return _synthetic_csv(tmp_path_factory.mktemp("data") / "toy.csv")


@pytest.fixture(scope="module")
def task(csv_task, tokenizer):
    return data.tokenize(data.load_task(csv_task, seed=0), tokenizer, max_length=32)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer, task):
    tiny = save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), tokenizer)
    out = tmp_path_factory.mktemp("teacher")
    train.finetune(tiny, task, out, FinetuneOptions(max_steps=6, batch_size=16, lr=3e-3))
    return out


# ------------------------------------------------------------------------------ layer drop
def test_layer_drop_rows_and_stock_models(teacher_dir, task, tokenizer, tmp_path):
    opts = layer_drop.Options(layers=[1], max_steps=3, batch_size=16, max_length=32)
    (row,) = layer_drop.run(teacher_dir, task, tokenizer, tmp_path, opts)
    assert set(baselines.ROW_KEYS) <= set(row)
    teacher, _ = load_checkpoint(teacher_dir)
    sub = SubNetwork.uniform(2, 1, 4, 48)
    assert row["method"] == "layer_drop" and row["trial_id"] == "layers-1"
    assert row["config"] == {"num_layers": 1} and row["fidelity"] == 3.0
    assert row["params"] == teacher.num_params(sub)
    assert row["params_ratio"] == pytest.approx(teacher.num_params(sub) / teacher.num_params())
    assert row["flops"] == teacher.flops(sub, 128)
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "layers-1").eval()
    assert isinstance(saved, BertForSequenceClassification)
    assert saved.config.num_hidden_layers == 1
    loader = data.make_loader(task.valid, tokenizer, 64)
    logits = torch.cat([saved(**{k: v for k, v in b.items() if k != "labels"}).logits.detach()
                        for b in loader])
    labels = torch.cat([b["labels"] for b in loader])
    metric = data.compute_metric(task.spec, logits.numpy(), labels.numpy())
    assert metric == pytest.approx(row["metric_value"])
    assert not any(p.name.endswith(".train") for p in tmp_path.iterdir())
    with pytest.raises(BaselineError, match="cannot keep 3 layers: the teacher has 2"):
        layer_drop.run(teacher_dir, task, tokenizer, tmp_path, layer_drop.Options(layers=[3]))


def test_pipeline_runs_baselines_once(teacher_dir, csv_task, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nas_prune.baselines")
    opts = replace(PipelineOptions(), {
        "data": {"task": csv_task}, "profile": {"repeats": 2, "seq_len": 16},
        "baselines": ["layer_drop"],
        "baseline_options": {"layer_drop": {"layers": [1], "max_steps": 2, "batch_size": 16,
                                            "max_length": 32}}})
    for _ in range(2):  # the second call finds the rows and skips the method
        experiments = pipeline.baselines(RunDir(tmp_path), opts, teacher_dir)
    assert experiments == ["baseline-layer_drop-seed0"]
    frame = results.load(tmp_path / "results")
    # the method's one row, and the dense reference row the stage adds once
    assert frame["trial_id"].tolist() == ["layers-1", "dense"]
    assert frame["method"].tolist() == ["layer_drop", "dense"]
    assert frame["latency_ms"].iloc[0] > 0
    assert (tmp_path / "baselines" / "layer_drop" / "layers-1" / "config.json").exists()
    assert "kept from an earlier run: layers-1" in caplog.text


def test_an_interrupted_baseline_stage_keeps_its_finished_models(teacher_dir, csv_task,
                                                                 tmp_path, monkeypatch):
    """Ctrl-C while a method trains its second model: the first model's row is already in
    the results store; the stage run again trains only the second."""
    opts = replace(PipelineOptions(), {
        "data": {"task": csv_task}, "profile": {"repeats": 2, "seq_len": 16},
        "baselines": ["layer_drop"],
        "baseline_options": {"layer_drop": {"layers": [1, 2], "max_steps": 2, "batch_size": 16,
                                            "max_length": 32}}})
    real_train, trained = train.train, []

    def interrupted_at_the_second_model(model, *args, **kwargs):
        trained.append(model.config.num_hidden_layers)
        if len(trained) == 2:
            raise KeyboardInterrupt
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(train, "train", interrupted_at_the_second_model)
    with pytest.raises(KeyboardInterrupt):
        pipeline.baselines(RunDir(tmp_path), opts, teacher_dir)
    assert results.load(tmp_path / "results")["trial_id"].tolist() == ["layers-1"]
    first = tmp_path / "baselines" / "layer_drop" / "layers-1" / "config.json"
    stamp = first.stat().st_mtime_ns

    trained.clear()
    monkeypatch.setattr(train, "train", lambda model, *args, **kwargs: (
        trained.append(model.config.num_hidden_layers), real_train(model, *args, **kwargs))[1])
    pipeline.baselines(RunDir(tmp_path), opts, teacher_dir)
    assert trained == [2]  # only the missing model
    frame = results.load(tmp_path / "results")
    assert frame["trial_id"].tolist() == ["layers-1", "layers-2", "dense"]
    assert first.stat().st_mtime_ns == stamp
    assert (frame["latency_ms"] > 0).all()


# ------------------------------------------------------------------------------ CLI
def test_cli_pins_end_to_end(teacher_dir, csv_task, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["baseline", "pins", "--teacher", str(teacher_dir), "--out", str(out),
                     "--data.task", csv_task, "--pins.sparsities", "[0.5]",
                     "--pins.max_steps", "12", "--pins.batch_size", "16", "--pins.window", "3",
                     "--pins.eval_every", "3", "--pins.max_length", "32",
                     "--profile.seq_len", "16", "--profile.repeats", "2"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"results": str(out / "results"), "experiments": ["baseline-pins-seed0"]}
    frame = results.load(out / "results")
    pins_rows = frame[frame["method"] == "pins"]
    assert len(pins_rows) == 1 and (frame["method"] == "dense").sum() == 1
    row = pins_rows.iloc[0]
    assert row["trial_id"] == "pins-s50"
    assert row["experiment"] == "baseline-pins-seed0" and row["cfg_sparsity_pct"] == 50
    assert row["status"] == "ok" and 0 <= row["error"] <= 1
    assert row["latency_ms"] > 0 and row["hardware"] == "cpu"
    dense = frame[frame["method"] == "dense"].iloc[0]
    # half of the encoder's weight matrices are gone; embeddings, biases, head stay
    teacher, _ = load_checkpoint(teacher_dir)
    prunable = sum(p.numel() for n, p in teacher.named_parameters()
                   if n.startswith("layers.") and n.endswith("weight") and "norm" not in n)
    assert row["params"] == dense["params"] - prunable // 2
    saved = AutoModelForSequenceClassification.from_pretrained(
        out / "baselines" / "pins" / "pins-s50")
    zeros = sum(int((p == 0).sum()) for n, p in saved.named_parameters()
                if "encoder" in n and n.endswith("weight") and "LayerNorm" not in n)
    assert zeros == prunable // 2

    assert cli.main(["report", "--out", str(out)]) == 0
    summary = (out / "report" / "summary.md").read_text()
    assert "pins-s50" in summary and "dense" in summary
    assert (out / "report" / "pareto.png").stat().st_size > 0


@pytest.mark.parametrize(("args", "message"), [
    (["baseline", "bogus", "--teacher", "t", "--out", "o"], "invalid choice: 'bogus'"),
    (["baseline", "pins", "--teacher", "t", "--out", "o", "--pins.sparsities", "[1.5]"],
     "sparsities must lie strictly between 0 and 1"),
    (["baseline", "layer_drop", "--teacher", "nowhere", "--out", "o"],
     "nowhere holds no finished fine-tuned teacher"),
])
def test_baseline_user_errors_are_one_line(tmp_path, args, message):
    done = _run(args, tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if "error:" in line]) == 1
