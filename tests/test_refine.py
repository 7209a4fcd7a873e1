"""Refine: distilling a damaged sub-network of a tiny supernet from its teacher through the real
DeepSpeed engine (CPU), skipping a finished refine, resuming an interrupted one, and reloading
the saved model."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from nas_prune import baselines, data, train
from nas_prune.checkpoint import load_checkpoint, read_meta, save_checkpoint
from nas_prune.errors import OptionsError, TrainingError
from nas_prune.evaluate import evaluate
from nas_prune.export import SUBNETWORK_FILE
from nas_prune.options import FinetuneOptions, RefineOptions, SupernetOptions
from nas_prune.refine import (
    COST_KEYS,
    distillation_loss,
    hidden_weight,
    layer_map,
    layer_outputs,
    learning_rate,
    near_budgets,
    refine,
    screen_winner,
    teacher_channels,
    work_dir,
)
from nas_prune.space import make_space
from nas_prune.supernet import load_pretrained
from tests.test_train import _synthetic_csv, save_tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CONFIG = {"num_layers": 1, "num_heads": 2, "num_units": 24}
"""Half the heads and neurons of the first of two layers: not a stock BERT shape."""


# ------------------------------------------------------------------------------ units
def test_options_say_what_to_change():
    with pytest.raises(TrainingError, match=r"alpha must be in \[0, 1\]"):
        RefineOptions(alpha=1.5)
    with pytest.raises(TrainingError, match="examples must be >= 1"):
        RefineOptions(examples=0)
    with pytest.raises(TrainingError, match="hidden_weight must be >= 0"):
        RefineOptions(hidden_weight=-1)
    with pytest.raises(TrainingError, match="temperature must be > 0"):
        RefineOptions(temperature=0)
    with pytest.raises(TrainingError, match="select must be one of pareto, budgets"):
        RefineOptions(select="best")
    with pytest.raises(TrainingError, match="per_budget must be >= 1"):
        RefineOptions(per_budget=0)
    with pytest.raises(TrainingError, match="band must be > 0"):
        RefineOptions(band=0)
    with pytest.raises(TrainingError, match="set select budgets and per_budget >= 2"):
        RefineOptions(select="budgets", screen_steps=4)
    with pytest.raises(TrainingError, match="screen_steps 4 must be fewer than the refine's 4"):
        RefineOptions(select="budgets", per_budget=2, screen_steps=4, examples=100,
                      batch_size=32)
    with pytest.raises(TrainingError, match="screen_steps must be >= 1"):
        RefineOptions(select="budgets", per_budget=2, screen_steps=0)
    with pytest.raises(TrainingError, match="set examples .per model. or total_examples"):
        RefineOptions(examples=100, total_examples=1000)


def test_a_total_budget_is_split_over_the_models_refined_to_the_end():
    # three budgets, three candidates each, 8-step screens: 2 x 256 screened out per budget
    budgets = RefineOptions(select="budgets", per_budget=3, screen_steps=8, total_examples=21_600)
    assert budgets.split([3, 3, 3]).examples == (21_600 - 3 * 512) // 3 == 6688
    assert budgets.split([3, 1]).examples == (21_600 - 512) // 2 // 32 * 32
    # the whole Pareto set, no screens: whole batches, never more than the total
    pareto = RefineOptions(total_examples=1000)
    assert pareto.split([1] * 7).examples == 128 and 7 * 128 <= 1000
    assert pareto.split([1] * 7).total_examples is None
    assert RefineOptions(examples=300).split([1] * 7).examples == 300  # no total: unchanged
    with pytest.raises(TrainingError, match="leaves 0 examples for each of 40 models"):
        pareto.split([1] * 40)
    with pytest.raises(TrainingError, match="leaves 256 examples for each of 3 models"):
        RefineOptions(select="budgets", per_budget=3, screen_steps=8,
                      total_examples=3 * 512 + 3 * 256).split([3, 3, 3])


def test_which_models_select_budgets_refines(caplog):
    rows = pd.DataFrame({
        "method": "nas", "trial_id": ["a", "b", "c", "d", "e", "f"],
        "params_ratio": [0.50, 0.55, 0.60, 0.62, 0.75, 0.90],
        "error": [0.40, 0.30, 0.28, 0.28, 0.20, 0.15],
        "latency_ms": [1.0, 2.0, None, 3.0, 4.0, 5.0],
    })

    def chosen(*args, **kwargs) -> list[tuple[float, str]]:
        found = near_budgets(rows, *args, **kwargs)
        return list(zip(found["budget"], found["trial_id"], strict=True))

    # per budget the validation-best within it; a tie (c, d) goes to the smaller model
    assert chosen([0.58, 0.63, 0.77]) == [(0.58, "b"), (0.63, "c"), (0.77, "e")]
    assert chosen([0.63], per_budget=3) == [(0.63, "c"), (0.63, "d"), (0.63, "b")]
    # a band keeps the candidates close below the budget
    assert chosen([0.63], per_budget=3, band=0.05) == [(0.63, "c"), (0.63, "d")]
    assert chosen([0.77], band=0.1) == [(0.77, "e")] and chosen([0.7], band=0.05) == []
    # in the axis's units: a params-sized band on the latency axis holds no model, and says so
    with caplog.at_level("WARNING", logger="nas_prune.refine"):
        assert chosen([3.5], "latency_ms", per_budget=2, band=0.03) == []
    assert "0 of 2 candidates for budget 3.5 within refine.band 0.03" in caplog.text
    # two budgets may choose the same model; nothing fits 0.4
    assert chosen([0.4, 0.6, 0.61]) == [(0.6, "c"), (0.61, "c")]
    # on the latency axis a model without a latency is never chosen
    assert chosen([3.5], "latency_ms") == [(3.5, "d")]
    assert near_budgets(rows.drop(columns="latency_ms"), [3.5], "latency_ms").empty
    # the options that choose which models are refined do not decide a refined model
    assert RefineOptions(select="budgets", per_budget=2, band=0.03,
                         screen_steps=4).fingerprint() == RefineOptions().fingerprint()


def test_a_screen_replaces_the_searchs_choice_only_when_clearly_better():
    # tweets at 0.58 of MiniLM after 8 steps on 2,500 validation examples: a 0.099 lead
    # (z = 7.2) replaces the search's choice; Rotten Tomatoes at 0.63: a 0.0148 lead (z = 1.2)
    # does not
    assert screen_winner({"a": 0.4448, "b": 0.4432, "c": 0.3460}, "a", 2500) == "c"
    assert screen_winner({"a": 0.2584, "b": 0.2664, "c": 0.2436}, "a", 2500) == "a"
    # the same lead on 4x the examples is 2.4 standard errors: it replaces
    assert screen_winner({"a": 0.2584, "b": 0.2664, "c": 0.2436}, "a", 10_000) == "c"
    assert screen_winner({"a": 0.2584, "c": 0.2436}, "a", 2500, z=0) == "c"
    assert screen_winner({"a": 0.25, "c": 0.25}, "a", 2500, z=0) == "a"  # a tie keeps it
    # not a rate (perplexity): the lowest wins
    assert screen_winner({"a": 31.0, "c": 30.5}, "a", None) == "c"
    with pytest.raises(TrainingError, match="screen_z must be >= 0"):
        RefineOptions(screen_z=-1)


def test_hidden_states_are_distilled_by_default_for_encoders_only(make_hf_bert):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nas_prune.decoder_loading import from_hf as decoder_from_hf
    from nas_prune.supernet import from_hf

    encoder = from_hf(make_hf_bert())
    decoder = decoder_from_hf(LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)))
    assert hidden_weight(RefineOptions(), encoder) == 1.0
    assert hidden_weight(RefineOptions(), decoder) == 0.0  # logits only, as Minitron
    assert hidden_weight(RefineOptions(hidden_weight=0.5), decoder) == 0.5
    assert hidden_weight(RefineOptions(hidden_weight=0.0), encoder) == 0.0
    # the learning rate defaults per family too (measured on MiniLM; the decoder's as before)
    assert learning_rate(RefineOptions(), encoder) == 2e-4
    assert learning_rate(RefineOptions(), decoder) == 5e-5
    assert learning_rate(RefineOptions(lr=1e-3), decoder) == 1e-3


def test_layers_map_uniformly_and_the_last_matches_the_last():
    assert layer_map(3, 3) == [0, 1, 2]
    assert layer_map(2, 6) == [2, 5]
    assert layer_map(1, 4) == [3]
    assert layer_map(4, 2) == [0, 0, 1, 1]


def test_distillation_loss_terms():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 1, 0])
    same = distillation_loss(teacher, teacher, labels, 2.0, 1.0)
    assert same.item() == pytest.approx(0, abs=1e-6)
    assert distillation_loss(student, teacher, labels, 2.0, 0.0).item() == pytest.approx(
        F.cross_entropy(student, labels).item())
    t = 3.0
    p = F.softmax(teacher / t, -1)
    kl = (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert distillation_loss(student, teacher, labels, t, 1.0).item() == pytest.approx(kl.item(),
                                                                                      rel=1e-5)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def task(tmp_path_factory, tokenizer):
    csv = _synthetic_csv(tmp_path_factory.mktemp("data") / "toy.csv")
    return data.tokenize(data.load_task(csv, seed=0), tokenizer, max_length=32)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer, task):
    tiny = save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), tokenizer)
    out = tmp_path_factory.mktemp("teacher")
    train.finetune(tiny, task, out, FinetuneOptions(epochs=4, batch_size=16, lr=3e-3,
                                                    log_every=100))
    return out


@pytest.fixture(scope="module")
def supernet_dir(tmp_path_factory, teacher_dir, task, tokenizer):
    """A briefly trained supernet whose classification head is then deliberately damaged
    (its output layer negated: every prediction flipped), so every sub-network starts far
    below the teacher. Its teacher is named relative to the working directory of its
    training, as a user names it."""
    out = tmp_path_factory.mktemp("supernet")
    with contextlib.chdir(teacher_dir.parent):
        train.train_supernet(teacher_dir.name, task, out,
                             SupernetOptions(max_steps=2, batch_size=16, log_every=100))
    model, meta = load_checkpoint(out)
    with torch.no_grad():
        model.head.out.weight.neg_()
        model.head.out.bias.neg_()
    save_checkpoint(out, model, tokenizer, meta)
    return out


def test_later_stages_find_the_teacher_from_any_working_directory(
        supernet_dir, teacher_dir, tmp_path, monkeypatch, caplog):
    """The supernet's checkpoint names its teacher by an absolute path, though it was given a
    relative one; an older checkpoint that names it relative to another directory falls back
    to the run's own teacher, with a warning, and to the named path when the run has none."""
    from nas_prune import pipeline
    from nas_prune.rundir import RunDir

    meta = read_meta(supernet_dir)
    assert meta["teacher"] == str(teacher_dir.resolve())
    run = RunDir(tmp_path / "run")
    run.teacher.parent.mkdir(parents=True)
    run.teacher.symlink_to(teacher_dir)
    monkeypatch.chdir(tmp_path)
    assert pipeline._teacher_of(run, meta) == teacher_dir.resolve()
    older = {**meta, "teacher": "build/elsewhere/teacher"}
    with caplog.at_level(logging.WARNING, "nas_prune.pipeline"):
        assert pipeline._teacher_of(run, older) == run.teacher
    assert "build/elsewhere/teacher, not found" in caplog.text
    run.teacher.unlink()
    assert pipeline._teacher_of(run, older) == Path("build/elsewhere/teacher")


def _sub_network_scores(supernet_dir, task, tokenizer) -> dict:
    supernet, _ = load_checkpoint(supernet_dir)
    sub = make_space("small", supernet.config).to_sub_network(CONFIG)
    small = supernet.extract_sub_network(sub)
    return evaluate(small, data.make_loader(task.valid, tokenizer, 64), task.spec)


FAST = {"examples": 16 * 40 - 5, "batch_size": 16, "lr": 3e-3, "log_every": 100}


# ------------------------------------------------------------------------------ refine
@pytest.fixture(scope="module")
def refined(tmp_path_factory, supernet_dir, teacher_dir, task, tokenizer):
    out = tmp_path_factory.mktemp("refined") / "t1"
    row = refine(supernet_dir, teacher_dir, CONFIG, "small", task, tokenizer, out,
                 RefineOptions(**FAST))
    return out, row


def test_refine_recovers_a_damaged_sub_network(refined, supernet_dir, teacher_dir, task,
                                               tokenizer):
    out, row = refined
    before = _sub_network_scores(supernet_dir, task, tokenizer)
    teacher, _ = load_checkpoint(teacher_dir)
    dense = evaluate(teacher, data.make_loader(task.valid, tokenizer, 64), task.spec)
    assert dense["metric"] > 0.9 and before["metric"] < 0.7
    assert row["metric_value"] > max(0.85, before["metric"] + 0.2)
    assert row["error"] == pytest.approx(1 - row["metric_value"])
    # the results row: the baselines' contract plus the counted cost
    assert set(baselines.ROW_KEYS) | set(COST_KEYS) <= set(row)
    assert row["method"] == "nas+refine" and row["status"] == "ok" and row["trial_id"] == "t1"
    assert row["config"] == CONFIG and row["model_dir"] == str(out)
    assert row["train_examples"] == 16 * 40 == row["fidelity"]  # whole batches
    assert row["teacher_examples"] == row["train_examples"]
    assert row["train_time_s"] > 0 and row["wall_time_s"] == row["train_time_s"]
    assert "640 training examples" in row["message"]
    supernet, _ = load_checkpoint(supernet_dir)
    sub = make_space("small", supernet.config).to_sub_network(CONFIG)
    assert row["params"] == supernet.num_params(sub)
    assert row["params_ratio"] == pytest.approx(row["params"] / supernet.num_params())
    assert row["flops"] == supernet.flops(sub, 128)
    info = json.loads((out / SUBNETWORK_FILE).read_text())
    assert info["params_ratio"] == pytest.approx(row["params_ratio"])
    assert not (out.parent / ".t1.refine").exists()  # the resumable state is gone


def test_refine_in_bf16_on_a_cpu_matches_fp32(refined, supernet_dir, teacher_dir, task,
                                             tokenizer, tmp_path):
    """precision bf16 on a CPU: the student's and the teacher's forwards under bf16 autocast,
    fp32 weights; it recovers the sub-network as the fp32 refine does and saves fp32."""
    _, reference = refined
    out = tmp_path / "t1"
    row = refine(supernet_dir, teacher_dir, CONFIG, "small", task, tokenizer, out,
                 RefineOptions(**FAST, precision="bf16"))
    assert row["metric_value"] == pytest.approx(reference["metric_value"], abs=0.05)
    assert row["train_examples"] == reference["train_examples"]
    model = load_pretrained(str(out))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert row["params"] == reference["params"]


def test_refined_model_reloads_with_the_same_logits(refined, task, tokenizer,
                                                    load_in_fresh_process):
    out, row = refined
    info = json.loads((out / SUBNETWORK_FILE).read_text())
    assert info["stock"] is False  # half the heads: our encoder, with its remote code
    model = load_pretrained(str(out)).eval()
    assert model.num_params() == row["params"]
    again = evaluate(model, data.make_loader(task.valid, tokenizer, 64), task.spec)
    # the loss is the mean over the validation split of the refined model's logits
    assert again["metric"] == row["metric_value"]
    assert again["loss"] == pytest.approx(info["refine"]["valid"]["loss"], abs=1e-6)
    batch = next(iter(data.make_loader(task.valid, tokenizer, 8)))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ours = model(**batch).logits
    fresh = load_in_fresh_process(out, batch)
    assert not fresh["nas_prune_loaded"]
    torch.testing.assert_close(fresh["logits"], ours, atol=1e-5, rtol=1e-5)


def test_a_finished_refine_is_skipped(refined, supernet_dir, teacher_dir, task, tokenizer):
    out, row = refined
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = refine(supernet_dir, teacher_dir, CONFIG, "small", task, tokenizer, out,
                   RefineOptions(**{**FAST, "log_every": 5}))  # logging is free to change
    assert again == row
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(TrainingError, match="another config or with other options"):
        refine(supernet_dir, teacher_dir, CONFIG, "small", task, tokenizer, out,
               RefineOptions(**{**FAST, "lr": 1e-3}))
    with pytest.raises(TrainingError, match="holds no refined sub-network"):
        refine(supernet_dir, teacher_dir, CONFIG, "small", task, tokenizer, teacher_dir,
               RefineOptions(**FAST))


def test_a_refine_replaces_the_unrefined_export_of_its_config(refined, supernet_dir,
                                                              teacher_dir, task, tokenizer,
                                                              tmp_path):
    """The pipeline exports the whole Pareto set; a later refine (e.g. at other budgets) of one
    of those sub-networks writes over its unrefined export, and over nothing else."""
    from nas_prune.export import export_sub_network
    from nas_prune.space import make_space

    model, _ = load_checkpoint(supernet_dir)
    space = make_space("small", model.config)
    out = tmp_path / "t1"
    export_sub_network(model, space.to_sub_network(CONFIG), out, tokenizer,
                       metadata={"config": CONFIG})
    row = refine(supernet_dir, teacher_dir, CONFIG, "small", task, tokenizer, out,
                 RefineOptions(**FAST))
    assert row["method"] == "nas+refine" and row["params"] == refined[1]["params"]
    assert json.loads((out / SUBNETWORK_FILE).read_text())["refine"]["row"] == row
    other = {**CONFIG, "num_units": 12}
    mine = tmp_path / "t2"
    export_sub_network(model, space.to_sub_network(other), mine, tokenizer,
                       metadata={"config": other})
    with pytest.raises(TrainingError, match="holds no refined sub-network of this config"):
        refine(supernet_dir, teacher_dir, CONFIG, "small", task, tokenizer, mine,
               RefineOptions(**FAST))


def test_an_interrupted_refine_resumes_where_it_stopped(supernet_dir, teacher_dir, task,
                                                        tokenizer, tmp_path):
    opts = RefineOptions(examples=16 * 6, batch_size=16, lr=3e-3, checkpoint_every=2,
                         log_every=100)
    straight = refine(supernet_dir, teacher_dir, CONFIG, "small", task, tokenizer,
                      tmp_path / "straight", opts)
    partial = refine(supernet_dir, teacher_dir, CONFIG, "small", task, tokenizer,
                     tmp_path / "resumed", opts, stop_after=3)
    assert partial["status"] == "rung" and partial["train_examples"] == 48
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.refine").exists()
    with pytest.raises(TrainingError, match="interrupted refine with other options"):
        refine(supernet_dir, teacher_dir, CONFIG, "small", task, tokenizer,
               tmp_path / "resumed", RefineOptions(**{**opts.__dict__, "alpha": 0.9}))
    resumed = refine(supernet_dir, teacher_dir, CONFIG, "small", task, tokenizer,
                     tmp_path / "resumed", opts)
    assert resumed["train_examples"] == straight["train_examples"] == 96
    assert resumed["metric_value"] == straight["metric_value"]
    assert resumed["train_time_s"] > partial["train_time_s"]  # the interrupted part counts
    a = load_pretrained(str(tmp_path / "straight")).state_dict()
    b = load_pretrained(str(tmp_path / "resumed")).state_dict()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=1e-6, rtol=1e-5)


def test_hidden_states_are_the_layer_outputs(teacher_dir, task, tokenizer):
    model, _ = load_checkpoint(teacher_dir)
    batch = next(iter(data.make_loader(task.valid, tokenizer, 4)))
    with torch.no_grad(), layer_outputs(model) as states:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert sorted(states) == [0, 1]
    # the head reads the last layer's output (first token): recompute the logits from it
    with torch.no_grad():
        logits = model.head(states[1], batch["attention_mask"])
        torch.testing.assert_close(logits, model(**batch).logits)
    assert read_meta(teacher_dir)["kind"] == "teacher"


@pytest.fixture(scope="module")
def rewired(tmp_path_factory, task, tokenizer):
    """(teacher, supernet) directories: a tiny dropout-free BERT teacher and its untrained
    (epochs 0) rewired supernet, whose hidden channels are sorted by importance."""
    tmp_path = tmp_path_factory.mktemp("rewired")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    teacher_dir = tmp_path / "teacher"
    train.finetune(str(tmp_path / "bert"), task, teacher_dir,
                   FinetuneOptions(max_steps=4, batch_size=16, lr=3e-3, log_every=100))
    supernet_dir = tmp_path / "supernet"
    train.train_supernet(teacher_dir, task, supernet_dir,
                         SupernetOptions(epochs=0, batch_size=16, rewire_batches=2))
    return teacher_dir, supernet_dir


def _first_loss(rewired, config, space, task, tokenizer, out, weight, caplog) -> float:
    """The loss of the first step of a one-step refine of `config` (logits by KL alone, the
    hidden-state term at `weight`)."""
    teacher_dir, supernet_dir = rewired
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nas_prune.refine"):
        refine(supernet_dir, teacher_dir, config, space, task, tokenizer, out,
               RefineOptions(examples=16, batch_size=16, alpha=1.0, hidden_weight=weight,
                             log_every=1))
    (loss,) = re.findall(r"step 1/1 +loss ([0-9.e+-]+)", caplog.text)
    return float(loss)


def test_hidden_states_are_matched_in_the_rewired_channel_order(rewired, tmp_path, task,
                                                                 tokenizer, caplog):
    """Rewiring sorts the supernet's hidden channels, so the full sub-network of an untrained
    (epochs 0) supernet computes the teacher's function with its channels permuted. Without
    dropout its first distillation loss (logits and hidden states) is zero only if the
    teacher's states are compared in the supernet's channel order."""
    order = read_meta(rewired[1])["hidden_order"]
    assert sorted(order) == list(range(32)) and order != list(range(32))
    full = {"num_layers": 2, "num_heads": 4, "num_units": 48}
    # the logits are the teacher's, and so are the states, channel for channel
    for weight in (0.0, 1.0):
        assert _first_loss(rewired, full, "small", task, tokenizer, tmp_path / f"r{weight}",
                           weight, caplog) < 1e-6


def test_a_narrowed_hidden_size_distils_the_teachers_kept_channels(rewired, tmp_path, task,
                                                                    tokenizer, caplog):
    """A sub-network that keeps 16 of the 32 hidden channels keeps the supernet's first 16,
    i.e. the teacher's channels order[:16]: its states are compared with those (the hidden
    term is on, not dropped for the narrower width), and they are closer to them than to any
    other 16 of the teacher's channels, e.g. the 16 it drops."""
    teacher_dir, supernet_dir = rewired
    order = read_meta(supernet_dir)["hidden_order"]
    assert teacher_channels(order, 32, 16).tolist() == order[:16]
    assert teacher_channels(None, 32, 16).tolist() == list(range(16))
    narrow = {"num_layers": 2, "num_heads": 4, "num_units": 48, "hidden": 16}
    losses = [_first_loss(rewired, narrow, "small+hidden", task, tokenizer,
                          tmp_path / f"r{weight}", weight, caplog) for weight in (0.0, 1.0)]
    assert losses[1] > losses[0] + 1e-4, losses

    supernet, _ = load_checkpoint(supernet_dir)
    teacher, _ = load_checkpoint(teacher_dir)
    student = supernet.extract_sub_network(
        make_space("small+hidden", supernet.config).to_sub_network(narrow)).eval()
    assert student.config.hidden_size == 16
    batch = next(iter(data.make_loader(task.valid, tokenizer, 16)))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), layer_outputs(student) as mine, layer_outputs(teacher.eval()) as theirs:
        student(**inputs)
        teacher(**inputs)

    def distance(channels: list[int]) -> float:
        return sum(F.mse_loss(mine[i], theirs[i][..., channels]).item() for i in (0, 1))

    assert distance(order[:16]) < 0.5 * distance(order[16:]), (distance(order[:16]),
                                                               distance(order[16:]))


# no layer: the head sees the [CLS] embedding alone, whatever the text, so it cannot learn
SEARCHED = {"narrow": {"num_layers": 0, "num_heads": 1, "num_units": 4},
            "middle": CONFIG,
            "full": {"num_layers": 2, "num_heads": 4, "num_units": 48}}


def _search_rows(run, errors):
    """The search experiment "nas-x" of `run` with one complete evaluation of each SEARCHED
    sub-network (params ratios 0.5 / 0.7 / 0.9), with these validation errors."""
    from nas_prune import results as results_lib
    from tests.test_results import eval_row

    store = results_lib.ResultStore(run.results, "nas-x")
    store.append_evaluations([
        eval_row(trial, config, error=error, params_ratio=ratio)
        for (trial, config), error, ratio in zip(SEARCHED.items(), errors, (0.5, 0.7, 0.9),
                                                 strict=True)])
    return store


def test_screening_refines_each_budgets_best_candidate_to_the_end(
        tmp_path, tmp_path_factory, supernet_dir, teacher_dir):
    """refine.screen_steps: the three candidates within the budget are each refined for 20
    steps and scored on validation; the search's choice (the lowest unrefined error), which
    cannot learn, is replaced by the best of them by that score, and only that one is refined
    to the end and exported refined; the others
    keep a "rung" row whose cost the compare stage charges to every refined model, and no
    checkpoint. A second run redoes nothing."""
    from nas_prune import pipeline
    from nas_prune import results as results_lib
    from nas_prune.options import PipelineOptions, replace
    from nas_prune.rundir import RunDir

    run = RunDir(tmp_path / "run")
    # the unrefined errors rank the full sub-network last and the narrow one first
    _search_rows(run, (0.30, 0.40, 0.50))
    csv = _synthetic_csv(tmp_path_factory.mktemp("screen_data") / "toy.csv")
    opts = replace(PipelineOptions(), {
        "experiment": "nas-x", "data": {"task": csv, "seed": 0},
        "refine": {**FAST, "examples": None, "max_length": 32, "select": "budgets",
                   # the winner's 40 steps and two 20-step screens
                   "total_examples": 16 * 40 + 2 * 16 * 20, "per_budget": 3,
                   "screen_steps": 20},
        "compare": {"budgets": [0.95]}})
    # a screen as long as the refine (one pass: 179 training examples, 12 steps of 16) is an
    # error before anything is trained
    whole = replace(opts, {"refine": {"total_examples": None, "screen_steps": 12}})
    with pytest.raises(OptionsError, match="screen_steps 12 must be fewer than the refine's 12"):
        pipeline.refine(run, whole, supernet_dir, teacher_dir)
    assert results_lib.load(run.results, experiment="refine-nas-x").empty
    rows = pipeline.refine(run, opts, supernet_dir, teacher_dir)
    screens = rows[rows["status"] == "rung"].set_index("trial_id")
    assert sorted(screens.index) == sorted(SEARCHED)
    assert (screens["fidelity"] == 320).all() and (screens["train_examples"] == 320).all()
    best = screens["error"].idxmin()
    finished = rows[rows["status"] == "ok"]
    assert list(finished["trial_id"]) == [best] and finished["train_examples"].item() == 16 * 40
    # refine.total_examples: the winner's whole refine (its screen is its start) and the
    # two screened-out candidates'
    assert (finished["train_examples"].sum() + screens.drop(index=best)["train_examples"].sum()
            == 16 * 40 + 2 * 16 * 20)
    assert best != "narrow", screens["error"]  # the screen, not the unrefined error, chose
    info = json.loads((run.export(best) / SUBNETWORK_FILE).read_text())
    assert info["refine"]["config"] == SEARCHED[best]
    for trial in SEARCHED:  # no checkpoint is left behind
        assert not work_dir(run.export(trial)).exists()
        assert (run.export(trial) / SUBNETWORK_FILE).exists() == (trial == best)
    again = pipeline.refine(run, opts, supernet_dir, teacher_dir)
    assert len(again) == len(rows)
    # the compare stage: one candidate, charged the shared cost plus the screened-out steps
    refined = pipeline.refined_candidates(run, again, {"shared_train_examples": 1000,
                                                       "shared_train_time_s": 10.0})
    assert list(refined["trial_id"]) == [best]
    assert refined["shared_train_examples"].item() == 1000 + 2 * 320
    assert refined["shared_train_time_s"].item() == pytest.approx(
        10.0 + screens.drop(index=best)["train_time_s"].sum())


def test_latency_budgets_choose_by_timings_taken_in_the_refine_stage(
        tmp_path, tmp_path_factory, supernet_dir, teacher_dir):
    """On the latency axis refine times every evaluated sub-network itself (as the compare
    stage times the models it compares), so stale profile-stage timings do not decide: the
    validation-best sub-network is refined although the search's latency table says it is
    far over the budget, and one with no timing there is a candidate too."""
    from nas_prune import pipeline
    from nas_prune import results as results_lib
    from nas_prune.options import PipelineOptions, replace
    from nas_prune.rundir import RunDir
    from tests.test_results import latency_row

    run = RunDir(tmp_path / "run")
    store = _search_rows(run, (0.50, 0.40, 0.30))
    # the profile stage's (stale) timings: "full" far over the budget, "middle" not timed
    store.append_latency([latency_row(SEARCHED["full"], median_ms=1e6, seq_len=8,
                                      batch_size=1),
                          latency_row(SEARCHED["narrow"], median_ms=1e-6, seq_len=8,
                                      batch_size=1)])
    csv = _synthetic_csv(tmp_path_factory.mktemp("retime_data") / "toy.csv")
    opts = replace(PipelineOptions(), {
        "experiment": "nas-x", "data": {"task": csv, "seed": 0},
        "refine": {**FAST, "examples": 16 * 4, "max_length": 32, "select": "budgets"},
        "profile": {"repeats": 1, "warmup": 0, "seq_len": 8, "batch_size": 1},
        "compare": {"budgets": [1e3], "axis": "latency_ms"}})
    rows = pipeline.refine(run, opts, supernet_dir, teacher_dir)
    assert list(rows.loc[rows["status"] == "ok", "trial_id"]) == ["full"]
    timed = results_lib.ResultStore(run.results, "refine-nas-x").latency()
    assert len(timed) == 3 and set(timed["trial_id"]) == set(SEARCHED)
    assert (timed["median_ms"] < 1e3).all() and (timed["median_ms"] > 1e-3).all()
    # a second run neither times nor refines again
    pipeline.refine(run, opts, supernet_dir, teacher_dir)
    assert len(results_lib.ResultStore(run.results, "refine-nas-x").latency()) == 3
