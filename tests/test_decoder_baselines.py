"""Baselines on decoder language models: LLM-Pruner (Taylor group importance, prefix
extraction, parameter budgets) and layer dropping by block influence / angular distance, on a
tiny random Llama whose unimportant heads, neurons and layers are known by construction."""

from __future__ import annotations

from fractions import Fraction

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from nas_prune import baselines
from nas_prune.baselines import BaselineError, check_rows, layer_drop, llm_pruner
from nas_prune.checkpoint import save_checkpoint
from nas_prune.data import TaskData, TaskSpec
from nas_prune.decoder_loading import from_hf
from tests.test_decoder import HEAD_DIM, UNITS, VOCAB, make_hf

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BLOCK = 16


def lm_task(train: int = 12, valid: int = 6, seed: int = 0) -> TaskData:
    """Blocks of random token ids in the LM data contract (labels = input_ids)."""
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> datasets.Dataset:
        ids = torch.randint(2, VOCAB, (n, BLOCK), generator=generator).tolist()
        return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * BLOCK] * n,
                                           "labels": ids})

    spec = TaskSpec("tiny_lm", "text", None, "", 0, "perplexity", None, "file", kind="lm")
    return TaskData(spec, split(train), split(valid), split(valid))


def save_teacher(model, path, tokenizer):
    save_checkpoint(path, model, tokenizer, {"kind": "teacher", "task": "tiny_lm",
                                             "task_kind": "lm", "base_model": "tiny-llama",
                                             "finished": True})
    return path


def loss(model, task: TaskData) -> float:
    batch = {k: torch.tensor(task.valid[k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        return float(model(**batch).loss)


def zero_heads_(model, heads: list[int]) -> None:
    """Zero the o_proj columns of query `heads` in every layer: they contribute nothing."""
    with torch.no_grad():
        for layer in model.model.layers:
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0


def zero_neurons_(model, neurons: list[int]) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, neurons] = 0


# ------------------------------------------------------------------------------ LLM-Pruner
@pytest.mark.parametrize("unit, dead_heads", [("kv_group", [2, 3]), ("query", [1, 2])])
def test_llm_pruner_removes_the_groups_that_do_not_matter(tmp_path, tokenizer, unit, dead_heads):
    # 4 query heads in 2 KV groups ({0, 1}, {2, 3}); the dead heads and the odd neurons write
    # nothing, so their Taylor scores are 0. Pruning half of each layer's groups must remove
    # exactly those: the pruned model then computes the dense model's function.
    model = from_hf(make_hf(kv=2)).eval()
    zero_heads_(model, dead_heads)
    zero_neurons_(model, list(range(1, UNITS, 2)))
    task = lm_task()
    teacher = save_teacher(model, tmp_path / "teacher", tokenizer)
    half = llm_pruner.pruned_sub_network(model.config, Fraction(1, 2), range(3), unit)
    assert (half.kv_heads, half.queries_per_kv, half.units) == (
        ((1,) * 3, (2,) * 3, (24,) * 3) if unit == "kv_group" else ((2,) * 3, (1,) * 3, (24,) * 3))
    target = model.num_params(half) / model.num_params()
    opts = llm_pruner.Options(params_ratios=[target], first_layer=0, last_layer=3,
                              attention_unit=unit, calibration_blocks=4, batch_size=4,
                              max_length=BLOCK)
    rows = llm_pruner.run(teacher, task, tokenizer, tmp_path / "out", opts)
    check_rows(rows, "llm_pruner", tmp_path / "out")
    (row,) = rows
    assert row["params"] == model.num_params(half)
    assert row["config"]["units_0"] == 24 and row["config"]["params_pct"] == round(100 * target)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / row["trial_id"],
                                                  trust_remote_code=True).eval()
    assert sum(p.numel() for p in pruned.parameters()) == row["params"]
    assert loss(pruned, task) == pytest.approx(loss(model, task), abs=1e-5)
    assert row["metric_value"] == pytest.approx(torch.exp(torch.tensor(loss(model, task))).item(),
                                                rel=1e-4)
    # without the reordering the same shape keeps dead groups and loses live ones
    assert abs(loss(model.extract_sub_network(half), task) - loss(model, task)) > 1e-3


def test_llm_pruner_budgets_rows_and_reload(tmp_path, tokenizer):
    model = from_hf(make_hf(kv=2, seed=1)).eval()
    task = lm_task()
    teacher = save_teacher(model, tmp_path / "teacher", tokenizer)
    opts = llm_pruner.Options(params_ratios=[0.9, 0.8], calibration_blocks=5, batch_size=4,
                              max_length=BLOCK)
    layers = llm_pruner.layer_range(3, None, None)
    assert layers == range(0, 3)  # round(3 / 8) = 0 and round(3 / 16) = 0 layers stay
    assert llm_pruner.layer_range(32, None, None) == range(4, 30)  # the paper's LLaMA-7B range
    rows = llm_pruner.run(teacher, task, tokenizer, tmp_path / "out", opts)
    check_rows(rows, "llm_pruner", tmp_path / "out")
    dense = model.num_params()
    # every ratio r the sub-networks can take: (a KV group, a neuron) steps
    grid = [Fraction(j, 2 * UNITS) for j in range(2 * UNITS)]
    for row, target in zip(rows, [0.9, 0.8], strict=True):
        assert row["params_ratio"] <= target
        best = max(p for r in grid if (p := model.num_params(llm_pruner.pruned_sub_network(
            model.config, r, layers, "kv_group"))) <= target * dense)
        assert row["params"] == best  # the closest from below
        assert target - row["params_ratio"] < 0.02  # one neuron per layer is ~1% here
        assert row["metric_name"] == "perplexity" and row["error"] == row["metric_value"] > 1
        assert row["fidelity_unit"] == "tokens" and row["status"] == "ok"
        assert row["train_examples"] == 5 and row["fidelity"] == 5 * BLOCK
        assert row["flops"] < model.flops(None, BLOCK)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / row["trial_id"],
                                                        trust_remote_code=True).eval()
        assert torch.exp(torch.tensor(loss(reloaded, task))).item() == pytest.approx(
            row["metric_value"], rel=1e-4)
    assert rows[0]["params"] > rows[1]["params"]
    with pytest.raises(BaselineError, match="out of reach"):
        llm_pruner.run(teacher, task, tokenizer, tmp_path / "out2",
                       llm_pruner.Options(params_ratios=[0.05], max_length=BLOCK))


def test_llm_pruner_recovery_trains_and_counts(tmp_path, tokenizer):
    model = from_hf(make_hf(kv=2, seed=2)).eval()
    task = lm_task()
    teacher = save_teacher(model, tmp_path / "teacher", tokenizer)
    common = dict(params_ratios=[0.8], calibration_blocks=4, batch_size=4, max_length=BLOCK,
                  lr=1e-3)
    (one_shot,) = llm_pruner.run(teacher, task, tokenizer, tmp_path / "a",
                                 llm_pruner.Options(**common))
    (tuned,) = llm_pruner.run(teacher, task, tokenizer, tmp_path / "b",
                              llm_pruner.Options(**common, recovery_steps=3))
    assert tuned["params"] == one_shot["params"]
    assert tuned["train_examples"] == 4 + 3 * 4
    assert tuned["metric_value"] != one_shot["metric_value"]
    assert not list((tmp_path / "b").glob(".*.train"))  # the training checkpoint is gone


def test_llm_pruner_options_and_registry():
    assert baselines.get("llm_pruner") is llm_pruner
    assert baselines.make_options("llm_pruner", {"params_ratios": [0.6]}).params_ratios == [0.6]
    for bad in ({"params_ratios": [1.5]}, {"params_ratios": []}, {"attention_unit": "head"},
                {"calibration_blocks": 0}, {"recovery_steps": -1}):
        with pytest.raises(BaselineError):
            llm_pruner.Options(**bad)


# ------------------------------------------------------------------------ layer dropping
def nearly_identity_(model, layer: int, scale: float = 1e-3) -> None:
    """Shrink what `layer` writes into the stream: its output is its input plus almost 0."""
    with torch.no_grad():
        block = model.model.layers[layer]
        block.self_attn.o_proj.weight.mul_(scale)
        block.mlp.down_proj.weight.mul_(scale)


@pytest.mark.parametrize("criterion", ["block_influence", "angular"])
def test_layer_drop_removes_the_layer_that_changes_the_stream_least(tmp_path, tokenizer,
                                                                    criterion):
    model = from_hf(make_hf(kv=2, seed=3)).eval()
    nearly_identity_(model, 1)
    task = lm_task()
    teacher = save_teacher(model, tmp_path / "teacher", tokenizer)
    opts = layer_drop.Options(layers=[2, 3], criterion=criterion, finetune=False,
                              calibration_blocks=4, batch_size=4, max_length=BLOCK)
    rows = layer_drop.run(teacher, task, tokenizer, tmp_path / "out", opts)
    check_rows(rows, "layer_drop", tmp_path / "out")
    two, three = rows
    assert two["config"] == {"num_layers": 2, "layer_0": 1, "layer_1": 0, "layer_2": 1}
    assert three["params_ratio"] == 1.0 and three["config"]["layer_1"] == 1
    assert two["train_examples"] == 4 and two["fidelity_unit"] == "tokens"
    assert two["metric_name"] == "perplexity"
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "layers-2",
                                                  trust_remote_code=True).eval()
    assert pruned.config.num_hidden_layers == 2
    assert loss(pruned, task) == pytest.approx(loss(model, task), abs=0.05)
    assert torch.exp(torch.tensor(loss(pruned, task))).item() == pytest.approx(
        two["metric_value"], rel=1e-4)


def test_layer_drop_criteria_on_known_similarities():
    # boundaries 0..4 of a 4-layer stream; layer 3 barely changes it, layers 1-2 together
    # change it less than any other pair of consecutive layers
    cos = torch.tensor([[1.0, 0.5, 0.4, 0.6, 0.6],
                        [0.5, 1.0, 0.8, 0.9, 0.9],
                        [0.4, 0.8, 1.0, 0.7, 0.7],
                        [0.6, 0.9, 0.7, 1.0, 0.99],
                        [0.6, 0.9, 0.7, 0.99, 1.0]], dtype=torch.float64)
    sim = layer_drop.StreamSimilarity(cos, torch.arccos(cos) / torch.pi)
    assert sim.block_influence().tolist() == pytest.approx([0.5, 0.2, 0.3, 0.01])
    assert layer_drop.layers_to_drop(sim, 3, "block_influence") == [3]
    assert layer_drop.layers_to_drop(sim, 2, "block_influence") == [1, 3]
    assert layer_drop.layers_to_drop(sim, 2, "angular") == [1, 2]  # cos(x1, x3) = 0.9
    assert layer_drop.layers_to_drop(sim, 4, "angular") == []


def test_layer_drop_decoder_fine_tunes(tmp_path, tokenizer):
    model = from_hf(make_hf(kv=2, seed=4)).eval()
    task = lm_task()
    teacher = save_teacher(model, tmp_path / "teacher", tokenizer)
    opts = layer_drop.Options(layers=[2], max_steps=2, batch_size=4, calibration_blocks=4,
                              max_length=BLOCK)
    (row,) = layer_drop.run(teacher, task, tokenizer, tmp_path / "out", opts)
    check_rows([row], "layer_drop", tmp_path / "out")
    assert row["train_examples"] == 4 + 2 * 4
    assert "fine-tuned 2 steps" in row["message"]
    with pytest.raises(BaselineError, match="cannot keep 5 layers"):
        layer_drop.run(teacher, task, tokenizer, tmp_path / "x",
                       layer_drop.Options(layers=[5], max_length=BLOCK))
