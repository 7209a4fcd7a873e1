"""Tests for decoders as sequence classifiers (nas_prune.decoder.DecoderForSequenceClassification):
the full model against transformers' Llama / Qwen2 `...ForSequenceClassification`, hidden
states against transformers, sliced against extracted sub-networks, exact costs, rewiring,
loading from every kind of checkpoint, and export (stock and ours) checked in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

from nas_prune.decoder import (
    DecoderForCausalLM,
    DecoderForSequenceClassification,
    DecoderSubNetwork,
    last_token,
)
from nas_prune.decoder_importance import rewire
from nas_prune.decoder_loading import from_hf, load_pretrained_decoder
from nas_prune.export import SUBNETWORK_FILE, export_sub_network
from tests.test_decoder import (  # the same tiny shapes and batches as the causal tests
    ATOL,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    LAYERS,
    UNITS,
    VOCAB,
    make_batch,
    make_hf,
)

LABELS = 3
CLASSIFIERS = {"llama": (LlamaConfig, LlamaForSequenceClassification),
               "qwen2": (Qwen2Config, Qwen2ForSequenceClassification)}
SUBS = {
    "uniform, narrower hidden": DecoderSubNetwork.uniform(LAYERS, 2, 1, 2, 20, 24),
    "non-uniform, fewer queries": DecoderSubNetwork((2, 2, 1), (1, 2, 1), (48, 0, 9)),
    "attention-only, mlp-only, hidden": DecoderSubNetwork((2, 0, 1), (2, 0, 1), (0, 30, 48), 16),
}


def make_hf_classifier(family: str = "llama", kv: int = 2, tied: bool = False, seed: int = 0,
                       num_labels: int = LABELS, **overrides):
    """A tiny random transformers sequence classifier, shaped and initialised like make_hf's
    causal LMs (pad_token_id 0, which make_batch pads with)."""
    config_cls, model_cls = CLASSIFIERS[family]
    config = config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=UNITS,
                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        num_key_value_heads=kv, head_dim=HEAD_DIM, max_position_embeddings=128,
                        tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1,
                        eos_token_id=None, num_labels=num_labels, **overrides)
    model = model_cls(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


def class_batch(seed: int = 0, num_labels: int = LABELS) -> dict[str, torch.Tensor]:
    """make_batch's right-padded token batch with class labels (floats for regression)."""
    batch = make_batch(seed)
    labels = torch.randint(0, max(num_labels, 2), (3,), generator=torch.Generator().manual_seed(
        seed))
    batch["labels"] = labels.float() if num_labels == 1 else labels
    return batch


def run(model, sub: DecoderSubNetwork | None = None, **batch):
    if sub is not None:
        model.set_sub_network(sub)
    try:
        with torch.no_grad():
            return model(**batch, output_hidden_states=True)
    finally:
        if sub is not None:
            model.reset_super_network()


# ------------------------------------------------------------------------ against transformers
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kv", [1, 2, 4])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_classifier_equals_transformers(family, kv, tied):
    hf = make_hf_classifier(family, kv, tied)
    model = from_hf(hf).eval()
    assert isinstance(model, DecoderForSequenceClassification)
    batch = class_batch()
    with torch.no_grad():
        theirs, ours = hf(**batch, output_hidden_states=True), run(model, **batch)
    assert ours.logits.shape == (3, LABELS)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == LAYERS + 1
    for mine, their in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(mine, their, atol=ATOL, rtol=0)
    # without the mask, transformers' pad_token_id rule finds the same last tokens
    no_mask = {"input_ids": batch["input_ids"]}
    torch.testing.assert_close(run(model, **no_mask).logits, theirs.logits, atol=ATOL, rtol=0)
    assert model.num_params() == sum(p.numel() for p in hf.parameters())


def test_regression_head_uses_mse_like_transformers():
    hf = make_hf_classifier("qwen2", 2, num_labels=1)
    model = from_hf(hf).eval()
    batch = class_batch(num_labels=1)
    with torch.no_grad():
        theirs, ours = hf(**batch), model(**batch)
    assert ours.logits.shape == (3, 1)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)


def test_last_token_reads_the_mask_on_either_side_and_else_the_pad_token():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 0, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert last_token(ids, mask, 0).tolist() == [2, 4, 2]  # a real token may equal the pad
    assert last_token(ids, None, 0).tolist() == [2, 4, 2]
    assert last_token(ids[:1], None, None).tolist() == [4]
    with pytest.raises(ValueError, match="attention_mask"):
        last_token(ids, None, None)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_causal_lm_hidden_states_equal_transformers(family):
    hf = make_hf(family, 2)
    model = from_hf(hf).eval()
    batch = make_batch()
    with torch.no_grad():
        theirs, ours = hf(**batch, output_hidden_states=True), run(model, **batch)
    assert len(ours.hidden_states) == LAYERS + 1
    for mine, their in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(mine, their, atol=ATOL, rtol=0)
    assert model(batch["input_ids"]).hidden_states is None  # only when asked


# ------------------------------------------------------------------------ sub-networks
@pytest.mark.parametrize("sub", SUBS.values(), ids=SUBS.keys())
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sliced_sub_network_equals_extracted(family, sub):
    model = from_hf(make_hf_classifier(family, 2, seed=3)).eval()
    small = model.extract_sub_network(sub).eval()
    assert isinstance(small, DecoderForSequenceClassification)
    assert small.score.weight.shape == (LABELS, sub.hidden or HIDDEN)
    batch = class_batch(seed=1)
    sliced, extracted = run(model, sub, **batch), run(small, **batch)
    torch.testing.assert_close(sliced.logits, extracted.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(sliced.loss, extracted.loss, atol=ATOL, rtol=0)
    assert len(sliced.hidden_states) == sum(sub.layers) + 1
    for mine, theirs in zip(sliced.hidden_states, extracted.hidden_states, strict=True):
        assert mine.shape[-1] == (sub.hidden or HIDDEN)
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    full = run(model, **batch).logits
    assert (sliced.logits - full).abs().max() > 1e-3  # the selection changes the function


@pytest.mark.parametrize("sub", [*SUBS.values(), None], ids=[*SUBS, "full"])
def test_params_and_flops_are_exact(sub):
    model = from_hf(make_hf_classifier("llama", 2, attention_bias=True, mlp_bias=True)).eval()
    small = model.extract_sub_network(sub or model.full_sub_network)
    assert model.num_params(sub) == sum(p.numel() for p in small.parameters())
    assert small.num_params() == model.num_params(sub)
    seq_len = 12
    input_ids = torch.randint(2, VOCAB, (1, seq_len))
    for network, selection in ((model, sub), (small, None)):
        if selection is not None:
            network.set_sub_network(selection)
        with FlopCounterMode(display=False) as counter, torch.no_grad(), \
                sdpa_kernel(SDPBackend.MATH):
            network(input_ids)
        network.reset_super_network()
        assert counter.get_total_flops() == model.flops(sub, seq_len)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rewiring_keeps_the_classifier_function(family):
    model = from_hf(make_hf_classifier(family, 2, seed=4)).eval()
    batch = class_batch(seed=9)
    before = run(model, **batch).logits
    scores = rewire(model, [class_batch(seed=s) for s in range(3)])  # labels are ignored
    torch.testing.assert_close(run(model, **batch).logits, before, atol=ATOL, rtol=0)
    assert torch.all(scores.hidden[:-1] >= scores.hidden[1:])
    assert len(set(scores.hidden.tolist())) > 1


# ------------------------------------------------------------------------ loading
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_causal_checkpoint_loads_as_a_classifier_with_a_new_head(tmp_path, tied):
    hf = make_hf("llama", 2, tied)
    hf.save_pretrained(tmp_path / "causal")
    model = load_pretrained_decoder(str(tmp_path / "causal"), num_labels=LABELS)
    assert isinstance(model, DecoderForSequenceClassification) and not model.training
    assert model.config.num_labels == LABELS and len(model.config.id2label) == LABELS
    batch = make_batch()
    batch.pop("labels")
    with torch.no_grad():  # the body is the causal LM's
        theirs = hf(**batch, output_hidden_states=True).hidden_states
    for mine, their in zip(run(model, **batch).hidden_states, theirs, strict=True):
        torch.testing.assert_close(mine, their, atol=ATOL, rtol=0)
    std = float(model.score.weight.detach().std())
    assert model.score.weight.shape == (LABELS, HIDDEN)
    assert 0.5 * model.config.initializer_range < std < 2 * model.config.initializer_range
    causal = load_pretrained_decoder(str(tmp_path / "causal"))  # no num_labels: the LM
    assert isinstance(causal, DecoderForCausalLM)


def test_classifier_checkpoints_load_theirs_and_ours(tmp_path):
    hf = make_hf_classifier("qwen2", 2)
    hf.config.id2label = {0: "neg", 1: "mid", 2: "pos"}
    hf.config.label2id = {v: k for k, v in hf.config.id2label.items()}
    hf.save_pretrained(tmp_path / "hf")
    batch = class_batch()
    expected = run(hf, **batch).logits
    for num_labels in (None, LABELS):  # a classifier checkpoint is a classifier either way
        model = load_pretrained_decoder(str(tmp_path / "hf"), num_labels=num_labels)
        assert isinstance(model, DecoderForSequenceClassification)
        assert model.config.id2label[2] == "pos"
        torch.testing.assert_close(run(model, **batch).logits, expected, atol=ATOL, rtol=0)
    small = model.extract_sub_network(SUBS["non-uniform, fewer queries"]).eval()
    small.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["DecoderForSequenceClassification"]
    assert config["auto_map"]["AutoModelForSequenceClassification"] == \
        "decoder.DecoderForSequenceClassification"
    again = load_pretrained_decoder(str(tmp_path / "ours"))
    auto = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours",
                                                              trust_remote_code=True).eval()
    for loaded in (again, auto):
        assert isinstance(loaded, DecoderForSequenceClassification)
        torch.testing.assert_close(run(loaded, **batch).logits, run(small, **batch).logits,
                                   atol=0, rtol=0)


def test_our_causal_checkpoint_asked_for_labels_gets_a_new_head(tmp_path):
    lm = from_hf(make_hf("llama", 2)).eval()
    lm.save_pretrained(tmp_path / "lm")
    model = load_pretrained_decoder(str(tmp_path / "lm"), num_labels=2)
    assert isinstance(model, DecoderForSequenceClassification)
    assert model.score.weight.shape == (2, HIDDEN)
    torch.testing.assert_close(model.model.norm.weight, lm.model.norm.weight, atol=0, rtol=0)


def test_unsupported_architecture_says_what_to_use(tmp_path):
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not a supported decoder.*Llama.*Qwen2.*BERT"):
        load_pretrained_decoder(str(tmp_path), num_labels=2)


# ------------------------------------------------------------------------ export
EXPORTS = {  # name: (family, kv, tied, sub, the stock class or None for ours)
    "llama stock, narrower hidden": (
        "llama", 2, False, DecoderSubNetwork.uniform(LAYERS, 2, 1, 2, 20, 24),
        "LlamaForSequenceClassification"),
    "qwen2 stock, tied": (
        "qwen2", 4, True, DecoderSubNetwork.uniform(LAYERS, 3, 3, 1, 30, 16),
        "Qwen2ForSequenceClassification"),
    "llama non-uniform": (
        "llama", 2, False, DecoderSubNetwork((2, 0, 1), (1, 0, 2), (0, 30, 48), 24), None),
    "qwen2 non-uniform, fewer queries": (
        "qwen2", 2, True, DecoderSubNetwork((2, 2, 2), (1, 2, 1), (48, 1, 9)), None),
}

_FRESH_LOADER = """
import json, sys
sys.modules["nas_prune"] = None  # any import of nas_prune now raises ImportError
import torch
from transformers import AutoModelForSequenceClassification
cases = json.loads(open(sys.argv[1]).read())
inputs = torch.load(sys.argv[2])
results = {}
for name, (path, stock) in cases.items():
    # a stock checkpoint must load without remote code; ours needs it
    model = AutoModelForSequenceClassification.from_pretrained(
        path, trust_remote_code=not stock).eval()
    with torch.no_grad():
        results[name] = {
            "logits": model(**inputs).logits,
            "logits_without_mask": model(inputs["input_ids"]).logits,
            "class": type(model).__name__, "module": type(model).__module__,
            "params": sum(p.numel() for p in model.parameters()),
        }
torch.save(results, sys.argv[3])
"""


def test_export_loads_in_a_fresh_process_and_equals_the_sub_network(tmp_path):
    """Stock shapes become transformers classifiers (no remote code), others our class; every
    one gives the supernet's logits with the sub-network selected, with and without the mask
    (right padding with the pad token)."""
    batch = make_batch(seed=2)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    models, dirs, cases = {}, {}, {}
    for i, (name, (family, kv, tied, sub, stock)) in enumerate(EXPORTS.items()):
        models[name] = model = from_hf(make_hf_classifier(family, kv, tied, seed=i)).eval()
        dirs[name] = export_sub_network(model, sub, tmp_path / f"model{i}",
                                        metadata={"case": name})
        cases[name] = (str(dirs[name]), stock is not None)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
               TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, "-c", _FRESH_LOADER, "cases.json", "inputs.pt",
                             "results.pt"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt")
    for name, (family, _, _, sub, stock) in EXPORTS.items():
        loaded, model, out = results[name], models[name], dirs[name]
        config = json.loads((out / "config.json").read_text())
        info = json.loads((out / SUBNETWORK_FILE).read_text())
        if stock:
            assert loaded["class"] == stock and loaded["module"].startswith("transformers.")
            assert config["model_type"] == family and "auto_map" not in config
        else:
            assert loaded["class"] == "DecoderForSequenceClassification"
            assert config["auto_map"]["AutoModelForSequenceClassification"] == \
                "decoder.DecoderForSequenceClassification"
        assert info["stock"] is (stock is not None) and info["case"] == name
        assert info["params"] == model.num_params(sub) == loaded["params"]
        expected = run(model, sub, **inputs).logits
        torch.testing.assert_close(loaded["logits"], expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(loaded["logits_without_mask"], expected, atol=ATOL, rtol=0)
