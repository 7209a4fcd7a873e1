"""Label names (strings in the data) survive fine-tuning, the supernet and export: every
exported model answers with the data's words, not LABEL_0/LABEL_1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from nas_prune import data, train
from nas_prune.checkpoint import load_checkpoint
from nas_prune.export import export_sub_network
from nas_prune.options import FinetuneOptions, SupernetOptions
from nas_prune.supernet import SubNetwork, load_pretrained

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ID2LABEL = {0: "fresh", 1: "rotten"}
"""Class ids are the label values in sorted order."""


@pytest.fixture(scope="module")
def task(tmp_path_factory, tokenizer):
    rng = np.random.default_rng(0)
    filler = ["the", "movie", "was", "a", "plot", "actor"]
    rows = []
    for i in range(64):
        words = list(rng.choice(filler, size=4))
        rows.append(f"{' '.join(words)} {'great' if i % 2 else 'dull'},"
                    f"{'fresh' if i % 2 else 'rotten'}")
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    path.write_text("text,verdict\n" + "\n".join(rows) + "\n")
    loaded = data.load_task(str(path), label_column="verdict", seed=0)
    return data.tokenize(loaded, tokenizer, max_length=16)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """A tiny random BERT checkpoint with the default LABEL_0/LABEL_1 names."""
    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _labels(config) -> tuple[dict, dict]:
    return dict(config.id2label), dict(config.label2id)


def test_task_spec_names_the_classes(task):
    assert task.spec.label_names == ("fresh", "rotten")


def test_label_names_flow_from_data_to_every_export(task, base_dir, tokenizer, tmp_path):
    teacher = tmp_path / "teacher"
    train.finetune(base_dir, task, teacher, FinetuneOptions(epochs=1, batch_size=16))
    model, _ = load_checkpoint(teacher)
    assert _labels(model.config) == (ID2LABEL, {"fresh": 0, "rotten": 1})
    assert json.loads((teacher / "config.json").read_text())["id2label"] == {
        "0": "fresh", "1": "rotten"}

    supernet = tmp_path / "supernet"
    train.train_supernet(teacher, task, supernet,
                         SupernetOptions(strategy="sandwich", max_steps=2, batch_size=16,
                                         rewire=False))
    model, _ = load_checkpoint(supernet)
    assert _labels(model.config) == (ID2LABEL, {"fresh": 0, "rotten": 1})

    stock = SubNetwork(heads=(4, 0), units=(24, 0))  # fits a stock BertConfig
    custom = SubNetwork(heads=(2, 4), units=(16, 8))  # needs our EncoderConfig
    for name, sub, model_type in (("stock", stock, "bert"),
                                  ("custom", custom, "nas_prune_encoder")):
        out = export_sub_network(model, sub, tmp_path / name, tokenizer=tokenizer)
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == model_type
        loaded = AutoModelForSequenceClassification.from_pretrained(out)
        assert _labels(loaded.config) == (ID2LABEL, {"fresh": 0, "rotten": 1}), name


def test_task_without_names_keeps_the_checkpoint_labels(base_dir):
    model = load_pretrained(base_dir, num_labels=2)
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}


def test_a_teacher_of_other_label_names_is_refused(tmp_path):
    import dataclasses

    from nas_prune.checkpoint import check_teacher
    from nas_prune.data import TaskData, TaskSpec
    from nas_prune.errors import CheckpointError

    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "1": "pos"}}))
    spec = TaskSpec(name="toy", text_column="text", text_pair_column=None, label_column="label",
                    num_labels=2, metric="accuracy",
                    label_names=("fresh", "rotten"))
    task = TaskData(spec, None, None, None)
    meta = {"kind": "teacher", "task": "toy"}
    with pytest.raises(CheckpointError, match=r"predicts the labels \['neg', 'pos'\]"):
        check_teacher(meta, 2, task, tmp_path)
    check_teacher(meta, 2, dataclasses.replace(
        task, spec=dataclasses.replace(spec, label_names=("neg", "pos"))), tmp_path)
