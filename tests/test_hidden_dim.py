"""Tests for the hidden (embedding) dimension of the encoder supernet: a reduced hidden width
against a hand-written reference forward, extraction, exact costs, export, importance and
rewiring of hidden channels, and the parameter ratios it opens up on MiniLM's shape."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForSequenceClassification

from nas_prune.export import SUBNETWORK_FILE, export_sub_network, stock_shape, to_stock
from nas_prune.importance import hidden_importance, rewire
from nas_prune.space import MediumSpace, SmallSpace, make_space
from nas_prune.supernet import (
    EncoderConfig,
    EncoderForSequenceClassification,
    IllegalSubNetworkError,
    SubNetwork,
    from_hf,
)

ATOL = 1e-5
L, H, D, F_UNITS, HIDDEN = 3, 4, 8, 48, 32  # the conftest TINY_SHAPE

MIXED = SubNetwork(heads=((1, 3), 2, 0), units=(20, (0, 5, 47), 16), hidden=16)
"""Index-set and prefix heads and neurons, a layer that keeps only its FFN, half the channels."""


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _selected(model: EncoderForSequenceClassification, sub: SubNetwork, batch) -> torch.Tensor:
    model.set_sub_network(sub)
    try:
        return _logits(model, batch)
    finally:
        model.reset_super_network()


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _kept(sub: SubNetwork) -> tuple[list[list[int]], list[list[int]]]:
    def expand(selection):
        return list(range(selection)) if isinstance(selection, int) else list(selection)

    return [expand(h) for h in sub.heads], [expand(u) for u in sub.units]


def reference_forward(model: EncoderForSequenceClassification, batch, channels, heads, units):
    """Logits of a BERT-family `model` computed with plain tensor ops from its weights, keeping
    the hidden channels `channels` (indices, in any order), the heads `heads[i]` and neurons
    `units[i]` of layer i. Every LayerNorm is written out: mean and variance over the kept
    channels, their weights and biases. Also returns the residual stream after the embeddings
    and after every block (what hidden-channel importance averages)."""
    s, c, d = model.state_dict(), model.config, model.config.head_dim
    ch = torch.as_tensor(list(channels))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    types = batch.get("token_type_ids", torch.zeros_like(ids))

    def norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + c.layer_norm_eps) * s[f"{name}.weight"][ch] + s[
            f"{name}.bias"][ch]

    def linear(x, name, rows=None, cols=None):
        w, b = s[f"{name}.weight"], s[f"{name}.bias"]
        if rows is not None:
            w, b = w[rows], b[rows]
        if cols is not None:
            w = w[:, cols]
        return x @ w.T + b

    positions = torch.arange(ids.shape[1])
    x = (s["embeddings.word.weight"][ids] + s["embeddings.position.weight"][positions][None]
         + s["embeddings.token_type.weight"][types])[..., ch]
    x = norm(x, "embeddings.norm")
    stream = [x]
    additive = (1.0 - mask[:, None, :].float()) * -1e9  # [batch, 1 (query), key]
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        if heads[i]:
            contexts, cols = [], []
            for h in heads[i]:
                rows = list(range(h * d, (h + 1) * d))
                q, k, v = (linear(x, f"{p}attention.{n}", rows, ch)
                           for n in ("query", "key", "value"))
                scores = q @ k.transpose(1, 2) / math.sqrt(d) + additive
                contexts.append(torch.softmax(scores, dim=-1) @ v)
                cols += rows
            out = linear(torch.cat(contexts, -1), f"{p}attention.out", rows=ch, cols=cols)
            x = norm(x + out, f"{p}attention.norm")
            stream.append(x)
        if units[i]:
            inner = F.gelu(linear(x, f"{p}ffn.up", rows=units[i], cols=ch))
            x = norm(x + linear(inner, f"{p}ffn.down", rows=ch, cols=units[i]), f"{p}ffn.norm")
            stream.append(x)
    if c.pooling == "cls":
        pooled = x[:, 0]
    else:
        weights = mask[..., None].float()
        pooled = (x * weights).sum(1) / weights.sum(1)
    pooled = torch.tanh(linear(pooled, "head.dense", cols=ch))
    return linear(pooled, "head.out"), stream


# ------------------------------------------------------------------------ reduced hidden width


def test_reference_with_every_channel_is_transformers(make_hf_bert, make_batch):
    """Guards the reference itself: with everything kept it is the HF model."""
    hf = make_hf_bert()
    batch = make_batch()
    logits, _ = reference_forward(from_hf(hf), batch, range(HIDDEN), *_kept(
        SubNetwork.uniform(L, L, H, F_UNITS)))
    torch.testing.assert_close(logits, _logits(hf, batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("sub", [MIXED, SubNetwork.uniform(L, 2, 3, 24, hidden=8)],
                         ids=["mixed", "uniform"])
def test_reduced_hidden_matches_hand_written_reference(make_hf_bert, make_batch, pooling, sub):
    model = from_hf(make_hf_bert(), pooling=pooling).eval()
    batch = make_batch()
    expected, _ = reference_forward(model, batch, range(sub.hidden), *_kept(sub))
    selected = _selected(model, sub, batch)
    torch.testing.assert_close(selected, expected, atol=ATOL, rtol=0)
    all_channels = SubNetwork(sub.heads, sub.units)
    assert not torch.allclose(selected, _selected(model, all_channels, batch), atol=1e-2)


def test_full_hidden_equals_no_hidden_selection_exactly(make_hf_bert, make_batch):
    model = from_hf(make_hf_bert()).eval()
    batch = make_batch()
    sub = SubNetwork.uniform(L, L, 2, 30)
    torch.testing.assert_close(_selected(model, SubNetwork(sub.heads, sub.units, HIDDEN), batch),
                               _selected(model, sub, batch), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_extraction_equals_selection(make_hf_bert, make_hf_roberta, make_batch, family,
                                     pooling):
    make = make_hf_bert if family == "bert" else make_hf_roberta
    model = from_hf(make(), pooling=pooling).eval()
    batch = make_batch(pad_id=1 if family == "roberta" else 0,
                       token_types=family == "bert")
    small = model.extract_sub_network(MIXED).eval()
    c = small.config
    assert (c.hidden_size, c.pooler_size, c.head_dim) == (16, HIDDEN, D)
    assert c.layer_heads == [2, 2, 0] and c.layer_units == [20, 3, 16]
    assert small.layers[0].attention.query.weight.shape == (2 * D, 16)  # head size unchanged
    assert small.layers[0].attention.out.weight.shape == (16, 2 * D)
    assert small.embeddings.word.weight.shape == (100, 16)
    assert small.head.dense.weight.shape == (HIDDEN, 16)
    torch.testing.assert_close(_logits(small, batch), _selected(model, MIXED, batch),
                               atol=ATOL, rtol=0)


def test_gradients_reach_only_the_kept_channels(make_hf_bert, make_batch):
    model = from_hf(make_hf_bert()).eval()
    batch = {**make_batch(), "labels": torch.tensor([0, 1, 2])}
    model.set_sub_network(SubNetwork.uniform(L, L, H, F_UNITS, hidden=16))
    model(**batch).loss.backward()

    def nonzero_columns(grad: torch.Tensor) -> list[int]:
        return torch.nonzero(grad.abs().sum(0)).flatten().tolist()

    first = model.layers[0]
    assert nonzero_columns(model.embeddings.word.weight.grad) == list(range(16))
    assert nonzero_columns(first.attention.query.weight.grad) == list(range(16))
    assert nonzero_columns(first.attention.out.weight.grad.T) == list(range(16))
    assert nonzero_columns(first.ffn.up.weight.grad) == list(range(16))
    assert nonzero_columns(model.head.dense.weight.grad) == list(range(16))
    assert torch.nonzero(first.ffn.norm.weight.grad).flatten().tolist() == list(range(16))


def test_illegal_hidden_widths():
    model = EncoderForSequenceClassification(EncoderConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=L, num_attention_heads=H,
        head_dim=D, intermediate_size=F_UNITS, max_position_embeddings=64, num_labels=3))
    with pytest.raises(IllegalSubNetworkError, match="keep at least 1 channel"):
        SubNetwork.uniform(L, L, H, F_UNITS, hidden=0)
    too_wide = SubNetwork.uniform(L, L, H, F_UNITS, hidden=HIDDEN + 1)
    for call in (model.set_sub_network, model.num_params, model.extract_sub_network):
        with pytest.raises(IllegalSubNetworkError, match="hidden=33 but the model has 32"):
            call(too_wide)


# ---------------------------------------------------------------------------------- costs


@pytest.mark.parametrize("sub", [
    MIXED,
    SubNetwork.uniform(L, 1, 1, 1, hidden=8),
    SubNetwork(heads=(0, 0, 4), units=(0, 48, 0), hidden=24),
    SubNetwork.uniform(L, 0, 0, 0, hidden=8),
], ids=["mixed", "tiny", "blocks", "no-layers"])
def test_num_params_equals_extracted_model(make_hf_bert, sub):
    model = from_hf(make_hf_bert())
    small = model.extract_sub_network(sub)
    assert model.num_params(sub) == _num_params(small)
    assert model.num_params(sub, encoder_only=True) == _num_params(small.layers)


def test_num_params_by_hand():
    model = EncoderForSequenceClassification(EncoderConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=L, num_attention_heads=H,
        head_dim=D, intermediate_size=F_UNITS, max_position_embeddings=64, num_labels=3))
    sub = SubNetwork(heads=(2, 0, 0), units=(0, 10, 0), hidden=16)
    attention = 3 * (16 * 16 + 16) + 16 * 16 + 16 + 2 * 16  # Q/K/V, output, LayerNorm
    ffn = 16 * 10 + 10 + 10 * 16 + 16 + 2 * 16  # up, down, LayerNorm
    embeddings = (100 + 64 + 2) * 16 + 2 * 16  # word, position, type tables, LayerNorm
    head = 16 * 32 + 32 + 32 * 3 + 3  # dense keeps its 32 outputs, classifier
    assert model.num_params(sub) == attention + ffn + embeddings + head


@pytest.mark.parametrize("sub", [MIXED, SubNetwork.uniform(L, L, H, F_UNITS, hidden=8)],
                         ids=["mixed", "uniform"])
def test_flops_count_the_sliced_matrix_products(make_hf_bert, make_batch, sub):
    """FlopCounterMode sees the projections, the FFN and the head (not CPU attention kernels);
    they are exactly `flops` minus the attention scores and weighted values."""
    model = from_hf(make_hf_bert()).eval()
    batch = make_batch()
    n_seq, t = batch["input_ids"].shape
    attention = sum(2 * t * t * h * D * 2 for h in sub.num_heads)
    model.set_sub_network(sub)
    small = model.extract_sub_network(sub).eval()
    for module in (model, small):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(**batch)
        assert counter.get_total_flops() == n_seq * (model.flops(sub, t) - attention)


def test_flops_by_hand_at_seq_len_8(make_hf_bert):
    model = from_hf(make_hf_bert())
    t, c, labels = 8, 8, 3
    per_layer = (2 * t * c * H * D * 4  # Q, K, V, output projection: c channels in or out
                 + 2 * t * t * H * D * 2  # scores and weighted values: head size unchanged
                 + 2 * t * c * F_UNITS * 2)  # FFN up and down
    head = 2 * c * HIDDEN + 2 * HIDDEN * labels  # the dense layer keeps its 32 outputs
    sub = SubNetwork.uniform(L, L, H, F_UNITS, hidden=c)
    assert model.flops(sub, seq_len=t) == L * per_layer + head == 3 * 36864 + 704


# --------------------------------------------------------------------------------- export


def test_export_round_trip_in_a_fresh_process(tmp_path, make_hf_bert, make_batch,
                                              load_in_fresh_process):
    model = from_hf(make_hf_bert()).eval()
    sub = SubNetwork.uniform(L, L, H, F_UNITS, hidden=16)  # stock shape but for the width
    assert stock_shape(model.config, sub) is None
    assert stock_shape(model.config, SubNetwork(sub.heads, sub.units, HIDDEN)) is not None
    with pytest.raises(ValueError, match="heads x head_dim"):
        to_stock(model.extract_sub_network(sub))
    out = export_sub_network(model, sub, tmp_path / "narrow")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nas_prune_encoder"
    assert (config["hidden_size"], config["pooler_size"], config["head_dim"]) == (16, HIDDEN, D)
    info = json.loads((out / SUBNETWORK_FILE).read_text())
    assert info["stock"] is False and info["hidden"] == 16
    assert info["params"] == model.num_params(sub)

    batch = make_batch()
    expected = _selected(model, sub, batch)
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=ATOL, rtol=0)
    remote = load_in_fresh_process(out, batch)
    assert remote["nas_prune_loaded"] is False
    assert remote["params"] == model.num_params(sub)
    torch.testing.assert_close(remote["logits"], expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------- importance, rewiring


def _calibration(make_batch, n: int = 2) -> list[dict[str, torch.Tensor]]:
    batches = []
    for seed in range(n):
        batch = make_batch(seed=seed)
        batch["labels"] = torch.tensor([seed % 3, (seed + 1) % 3, (seed + 2) % 3])
        batches.append(batch)
    return batches


def test_hidden_importance_is_mean_absolute_residual_activation(make_hf_bert, make_batch):
    model = from_hf(make_hf_bert()).eval()
    batches = _calibration(make_batch)
    total, count = torch.zeros(HIDDEN), 0
    everything = _kept(SubNetwork.uniform(L, L, H, F_UNITS))
    for batch in batches:
        _, stream = reference_forward(model, batch, range(HIDDEN), *everything)
        real = batch["attention_mask"].bool()
        for x in stream:
            total += x[real].abs().sum(0)
            count += int(real.sum())
    torch.testing.assert_close(hidden_importance(model, batches), total / count,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_reordering_hidden_channels_keeps_the_function(make_hf_bert, make_hf_roberta,
                                                       make_batch, family, pooling):
    make = make_hf_bert if family == "bert" else make_hf_roberta
    model = from_hf(make(), pooling=pooling).eval()
    batch = make_batch(pad_id=1 if family == "roberta" else 0, token_types=family == "bert")
    before = _logits(model, batch)
    order = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(0))
    word = model.embeddings.word.weight.clone()
    model.reorder([torch.arange(H)] * L, [torch.arange(F_UNITS)] * L, order)
    torch.testing.assert_close(model.embeddings.word.weight, word[:, order], atol=0, rtol=0)
    torch.testing.assert_close(_logits(model, batch), before, atol=ATOL, rtol=0)


def test_rewire_sorts_hidden_channels_so_prefixes_keep_the_most_important(make_hf_bert,
                                                                          make_batch):
    model = from_hf(make_hf_bert()).eval()
    batches = _calibration(make_batch)
    batch = make_batch(seed=5)
    before = copy.deepcopy(model)
    scores = hidden_importance(model, batches)
    full_before = _logits(model, batch)

    heads, units, hidden = rewire(model, batches)
    torch.testing.assert_close(_logits(model, batch), full_before, atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden, torch.sort(scores, descending=True).values)
    torch.testing.assert_close(hidden_importance(model, batches), hidden, rtol=1e-5, atol=1e-6)

    k = 12
    top = torch.topk(scores, k).indices.tolist()
    assert top != list(range(k))  # otherwise the check below would prove nothing
    everything = _kept(SubNetwork.uniform(L, L, H, F_UNITS))
    expected, _ = reference_forward(before, batch, top, *everything)
    prefix = SubNetwork.uniform(L, L, H, F_UNITS, hidden=k)
    torch.testing.assert_close(_selected(model, prefix, batch), expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------ MiniLM's shape


def test_hidden_dimension_takes_minilm_below_forty_percent_of_its_parameters():
    """all-MiniLM-L6-v2's shape (random weights): the embeddings are half the model, so
    without the hidden dimension no sub-network goes below ~53%; with it one does."""
    config = EncoderConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                           num_attention_heads=12, head_dim=32, intermediate_size=1536,
                           max_position_embeddings=512, type_vocab_size=2, num_labels=2)
    model = EncoderForSequenceClassification(config).eval()
    full = model.num_params()
    assert full == _num_params(model)
    for cls in (SmallSpace, MediumSpace):
        plain = cls.for_model(config)
        floor = model.num_params(plain.to_sub_network(plain.smallest())) / full
        assert floor > 0.53
        space = cls.for_model(config, hidden=True)
        assert space.to_sub_network(space.smallest()).hidden == 8

    space = SmallSpace.for_model(config, hidden=True)
    choice = {"num_layers": 6, "num_heads": 12, "num_units": 1536, "hidden": 128}
    sub = space.to_sub_network(choice)  # every layer, head and neuron; a third of the width
    assert model.num_params(sub) / full < 0.40
    small = model.extract_sub_network(sub).eval()
    assert _num_params(small) == model.num_params(sub)
    batch = {"input_ids": torch.randint(1, 30522, (2, 10), generator=torch.Generator()
                                        .manual_seed(0)),
             "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    torch.testing.assert_close(_logits(small, batch), _selected(model, sub, batch),
                               atol=ATOL, rtol=0)


def test_hidden_spaces_by_name():
    """`small+hidden` / `medium+hidden` are spaces like the others: options take them, every
    stage rebuilds the same space from the name stored in checkpoints and rows."""
    from nas_prune.errors import SearchError, TrainingError
    from nas_prune.options import SearchOptions, SupernetOptions

    assert SupernetOptions(space="small+hidden").space == "small+hidden"
    assert SearchOptions(space="medium+hidden").space == "medium+hidden"
    with pytest.raises(TrainingError, match="layer space has no hidden dimension"):
        SupernetOptions(space="layer+hidden")
    with pytest.raises(SearchError, match="unknown space 'tiny'"):
        SearchOptions(space="tiny+hidden")
    config = EncoderConfig(num_hidden_layers=6, num_attention_heads=12, head_dim=32,
                           hidden_size=384, intermediate_size=1536)
    space = make_space("small+hidden", config)
    assert [d.name for d in space.dims][-1] == "hidden"
    assert space.to_sub_network(space.smallest()).hidden == 8
    assert "hidden" not in [d.name for d in make_space("small", config).dims]
