"""Tests for the GRAIN baseline (nas_prune.baselines.grain, grain_model) on tiny random models:
the per-head-size model (masked = pruned = exported), importance, structure regularization,
schedule, monotone masks, gradient separation through DeepSpeed, and an end-to-end run."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from nas_prune import data, train
from nas_prune.baselines import ROW_KEYS
from nas_prune.baselines.grain import (
    Distiller,
    GrainError,
    Options,
    Pruner,
    distillation_step,
    run,
    schedule,
)
from nas_prune.baselines.grain_model import GrainForSequenceClassification, Masks
from nas_prune.checkpoint import load_checkpoint
from nas_prune.engine import init_distributed, make_engine
from nas_prune.export import save_model_dir
from nas_prune.options import FinetuneOptions, TrainOptions
from nas_prune.results import ResultStore
from nas_prune.results import load as load_results
from nas_prune.supernet import from_hf

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ATOL = 1e-5
L, H, D, FFN, HIDDEN = 3, 4, 8, 48, 32  # tests/conftest.py TINY_SHAPE


def _dense(hf_model) -> GrainForSequenceClassification:
    return GrainForSequenceClassification.from_encoder(from_hf(hf_model)).eval()


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _irregular_masks() -> Masks:
    """Random units everywhere, plus: layer 0 head 0 keeps V/O but no Q/K dims (uniform
    attention), head 1 keeps Q/K but no V/O dims (dropped); layer 1 keeps nothing (identity);
    layer 2 keeps its FFN only."""
    g = torch.Generator().manual_seed(7)
    qk = [torch.rand(H * D, generator=g) < 0.6 for _ in range(L)]
    vo = [torch.rand(H * D, generator=g) < 0.6 for _ in range(L)]
    ffn = [torch.rand(FFN, generator=g) < 0.5 for _ in range(L)]
    qk[0][:D], vo[0][:D] = False, True
    qk[0][D:2 * D], vo[0][D:2 * D] = True, False
    qk[1][:], vo[1][:], ffn[1][:] = False, False, False
    vo[2][:] = False
    return Masks(qk, vo, ffn)


# ------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_dense_grain_model_equals_teacher_encoder(family, make_hf_bert, make_hf_roberta,
                                                  make_batch):
    hf = make_hf_bert() if family == "bert" else make_hf_roberta()
    encoder = from_hf(hf).eval()
    model = GrainForSequenceClassification.from_encoder(encoder).eval()
    batch = make_batch(pad_id=0 if family == "bert" else 1, token_types=family == "bert")
    torch.testing.assert_close(_logits(model, batch), _logits(encoder, batch), atol=ATOL,
                               rtol=0)
    torch.testing.assert_close(_logits(model, batch), _logits(hf, batch), atol=ATOL, rtol=0)
    assert model.num_params() == encoder.num_params()
    assert model.flops(128) == encoder.flops(seq_len=128)


def test_grain_model_keeps_a_mean_pooling_head(make_hf_bert, make_batch):
    encoder = from_hf(make_hf_bert(), pooling="mean").eval()
    model = GrainForSequenceClassification.from_encoder(encoder).eval()
    assert model.config.pooling == "mean"
    batch = make_batch()
    torch.testing.assert_close(_logits(model, batch), _logits(encoder, batch), atol=ATOL,
                               rtol=0)
    assert not torch.allclose(_logits(model, batch), _logits(from_hf(make_hf_bert()), batch),
                              atol=1e-3)


def test_layer_without_query_key_dims_attends_uniformly(make_hf_bert, make_batch):
    model = _dense(make_hf_bert())
    masks = model.full_masks()
    masks.qk[2][:] = False
    masks.vo[2][::3] = False
    model.set_masks(masks)
    small = model.prune(masks).eval()
    assert small.layers[2].attention.query is None and small.config.qk_dims[2] == [0] * H
    batch = make_batch()
    torch.testing.assert_close(_logits(small, batch), _logits(model, batch), atol=ATOL, rtol=0)


def test_masked_model_equals_extracted_small_model(make_hf_bert, make_batch):
    model = _dense(make_hf_bert())
    masks = _irregular_masks()
    batch = make_batch()
    dense_logits = _logits(model, batch)
    model.set_masks(masks)
    masked = model(**batch, output_hidden_states=True)
    small = model.prune(masks).eval()
    pruned = small(**batch, output_hidden_states=True)
    torch.testing.assert_close(pruned.logits, masked.logits, atol=ATOL, rtol=0)
    for a, b in zip(pruned.hidden_states, masked.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert not torch.allclose(masked.logits, dense_logits, atol=1e-3)

    c = small.config
    assert c.vo_dims[1] == [] and c.ffn_units[1] == 0  # layer 1: the identity
    assert small.layers[1].attention is None and small.layers[1].ffn is None
    torch.testing.assert_close(pruned.hidden_states[2], pruned.hidden_states[1])
    assert small.layers[2].attention is None and c.ffn_units[2] == int(masks.ffn[2].sum())
    assert len(c.vo_dims[0]) == H - 1 and c.qk_dims[0][0] == 0  # head 1 dropped, head 0 Q/K-less
    expected = {
        "vo": [int(masks.vo[0].view(H, D)[h].sum()) for h in (0, 2, 3)],
        "qk": [int(masks.qk[0].view(H, D)[h].sum()) for h in (0, 2, 3)],
    }
    assert c.vo_dims[0] == expected["vo"] and c.qk_dims[0] == expected["qk"]
    # parameters: exactly the kept rows/columns, LayerNorms and output biases
    q, v, n = sum(c.qk_dims[0]), sum(c.vo_dims[0]), sum(c.ffn_units)
    attention = 2 * q * (HIDDEN + 1) + v * (HIDDEN + 1) + v * HIDDEN + 3 * HIDDEN
    ffn = n * (2 * HIDDEN + 1) + 2 * 3 * HIDDEN  # two layers keep an FFN
    assert small.num_params(encoder_only=True) == attention + ffn
    assert sum(p.numel() for p in small.parameters()) == small.num_params()


# ------------------------------------------------------------------------------ importance
def test_importance_is_taylor_score_of_each_units_weights(make_hf_bert, make_batch):
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = _dense(make_hf_bert(num_labels=2, **no_dropout)).train()
    masks = model.full_masks()
    masks.ffn[0][:10] = False  # masked units score exactly 0
    model.set_masks(masks)
    pruner = Pruner(model.config, variant="nas_prune")
    batch = make_batch()
    labels = torch.tensor([0, 1, 1])
    with pruner.capture(model) as acts:
        loss = F.cross_entropy(model(**batch).logits, labels)
    scores = pruner.importance(loss, acts)
    loss.backward()

    for i, layer in enumerate(model.layers):
        att, ffn = layer.attention, layer.ffn
        for r in (0, 5, 13, 31):  # Q/K and V/O dims: row r = head r // D, dim r % D
            h, d = divmod(r, D)
            expected_qk = (att.query.weight.grad[r] * att.query.weight[r]).sum() \
                + att.query.bias.grad[r] * att.query.bias[r] \
                + (att.key.weight.grad[r] * att.key.weight[r]).sum() \
                + att.key.bias.grad[r] * att.key.bias[r]
            expected_vo = (att.value.weight.grad[r] * att.value.weight[r]).sum() \
                + att.value.bias.grad[r] * att.value.bias[r] \
                + (att.out.weight.grad[:, r] * att.out.weight[:, r]).sum()
            torch.testing.assert_close(scores["qk"][i, h, d], expected_qk.abs().detach(),
                                       atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(scores["vo"][i, h, d], expected_vo.abs().detach(),
                                       atol=1e-6, rtol=1e-4)
        expected_ffn = ((ffn.up.weight.grad * ffn.up.weight).sum(1) + ffn.up.bias.grad
                        * ffn.up.bias + (ffn.down.weight.grad * ffn.down.weight).sum(0))
        torch.testing.assert_close(scores["ffn"][i], expected_ffn.abs().detach(), atol=1e-6,
                                   rtol=1e-4)
    assert scores["ffn"][0, :10].eq(0).all() and scores["ffn"][0, 10:].gt(0).all()


def test_ema_update_hand_computed():
    model_config = _dense_config()
    pruner = Pruner(model_config, ema_beta=0.9, alpha=0.5, variant="nas_prune")
    raw = {k: torch.zeros(s) for k, s in pruner.shape.items()}
    raw["ffn"][0, 3], raw["qk"][1, 2, 0], raw["vo"][2, 3, 7] = 2.0, 4.0, 1.0
    pruner.update(raw)
    pruner.update(raw)
    dense = math.tanh(1 / 0.5)  # every density is 1 before pruning
    # two EMA steps from 0: 0.1 * s, then 0.9 * 0.1 * s + 0.1 * s = 0.19 * s
    assert pruner.score["ffn"][0, 3].item() == pytest.approx(0.19 * 2.0 * dense)
    assert pruner.score["qk"][1, 2, 0].item() == pytest.approx(0.19 * 4.0 * dense ** 2)
    assert pruner.score["vo"][2, 3, 7].item() == pytest.approx(0.19 * 1.0 * dense ** 2)
    assert pruner.score["ffn"].count_nonzero() == 1


def _dense_config():
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=L, num_attention_heads=H,
                        intermediate_size=FFN, vocab_size=100, max_position_embeddings=64)
    model = GrainForSequenceClassification.from_encoder(
        from_hf(BertForSequenceClassification(config)))
    return model.config


def test_structure_regularization_prefers_removing_sparse_heads():
    alpha = 0.3
    pruner = Pruner(_dense_config(), ema_beta=0.0, alpha=alpha,  # beta 0: score = this update
                    variant="nas_prune")
    pruner.keep["vo"][0, 0, 1:] = False  # head (0, 0) keeps 1 of 8 V/O and 1 of 8 Q/K dims
    pruner.keep["qk"][0, 0, 1:] = False
    raw = {k: torch.ones(s) for k, s in pruner.shape.items()}
    raw["qk"][0, 0, 0] = 1.2  # more important than a Q/K dim of the dense head (0, 1) ...
    pruner.update(raw)
    qk_size, vo_size = 2 * (HIDDEN + 1), 2 * HIDDEN + 1
    head = (qk_size + vo_size) / (D * (qk_size + vo_size))
    block = (3 + head) / H
    sparse = 1.2 * math.tanh(head / alpha) * math.tanh(block / alpha)
    dense = 1.0 * math.tanh(1 / alpha) * math.tanh(block / alpha)
    assert pruner.score["qk"][0, 0, 0].item() == pytest.approx(sparse)
    assert pruner.score["qk"][0, 1, 0].item() == pytest.approx(dense)
    assert pruner.score["qk"][1, 0, 0].item() == pytest.approx(math.tanh(1 / alpha) ** 2)
    assert sparse < dense  # ... but ranks below it after regularization
    assert pruner.score["ffn"][0, 0].item() == pytest.approx(math.tanh(1 / alpha))

    # pruning by one Q/K unit removes the sparse head's unit, not the dense head's
    budget = (pruner.kept_ratio() * pruner.total - qk_size) / pruner.total
    pruner.score["qk"] += 1.0  # only the two units under test are near the cut
    pruner.score["qk"][0, 0, 0], pruner.score["qk"][0, 1, 0] = sparse, dense
    pruner.score["vo"] += 5.0
    pruner.score["ffn"] += 5.0
    pruner.prune(budget)
    assert not pruner.keep["qk"][0, 0, 0] and pruner.keep["qk"][0, 1, 0]
    assert int((~pruner.keep["qk"]).sum()) == D - 1 + 1


def test_reference_importance_reads_one_side_of_each_unit(make_hf_bert, make_batch):
    """The authors' code scores Q/K dims by the query rows, V/O dims by the output-projection
    columns and FFN neurons by the output (down) columns."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = _dense(make_hf_bert(num_labels=2, **no_dropout)).train()
    pruner = Pruner(model.config)  # the reference variant is the default
    with pruner.capture(model) as acts:
        loss = F.cross_entropy(model(**make_batch()).logits, torch.tensor([0, 1, 1]))
    scores = pruner.importance(loss, acts)
    loss.backward()
    for i, layer in enumerate(model.layers):
        att, ffn = layer.attention, layer.ffn
        for r in (0, 5, 13, 31):
            h, d = divmod(r, D)
            expected_qk = (att.query.weight.grad[r] * att.query.weight[r]).sum() \
                + att.query.bias.grad[r] * att.query.bias[r]
            expected_vo = (att.out.weight.grad[:, r] * att.out.weight[:, r]).sum()
            torch.testing.assert_close(scores["qk"][i, h, d], expected_qk.abs().detach(),
                                       atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(scores["vo"][i, h, d], expected_vo.abs().detach(),
                                       atol=1e-6, rtol=1e-4)
        expected_ffn = (ffn.down.weight.grad * ffn.down.weight).sum(0)
        torch.testing.assert_close(scores["ffn"][i], expected_ffn.abs().detach(), atol=1e-6,
                                   rtol=1e-4)


def test_reference_regularization_scales_value_output_units_only():
    alpha = 0.3
    pruner = Pruner(_dense_config(), ema_beta=0.0, alpha=alpha)
    pruner.keep["vo"][0, 0, 2:] = False  # head (0, 0) keeps 2 of 8 V/O dims
    pruner.keep["qk"][0, 0, 1:] = False  # (Q/K density plays no part)
    raw = {k: torch.ones(s) for k, s in pruner.shape.items()}
    pruner.update(raw)
    assert pruner.score["vo"][0, 0, 0].item() == pytest.approx(math.tanh(2 / D / alpha))
    assert pruner.score["vo"][0, 1, 0].item() == pytest.approx(math.tanh(1 / alpha))
    assert pruner.score["qk"][0, 0, 0].item() == pytest.approx(1.0)
    assert pruner.score["ffn"][0, 0].item() == pytest.approx(1.0)


def test_schedule_values():
    assert schedule(0, 100, 0.1) == 1.0
    assert schedule(19, 100, 0.1) == 1.0
    assert schedule(20, 100, 0.1) == 1.0
    assert schedule(25, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.75**3)
    assert schedule(30, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5**3)
    assert schedule(39, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.05**3)
    assert schedule(40, 100, 0.1) == 0.1
    assert schedule(99, 100, 0.1) == 0.1
    assert schedule(5, 10, 0.5, start=0.0, end=0.5) == 0.5
    assert schedule(1, 10, 0.5, start=0.0, end=0.5) == pytest.approx(0.5 + 0.5 * 0.8**3)
    ratios = [schedule(s, 100, 0.2) for s in range(100)]
    assert all(a >= b for a, b in itertools.pairwise(ratios))


def test_masks_only_shrink_and_meet_the_budget():
    pruner = Pruner(_dense_config(), ema_beta=0.5, alpha=0.3)
    g = torch.Generator().manual_seed(0)
    previous = {k: v.clone() for k, v in pruner.keep.items()}
    for step, ratio in enumerate((0.9, 0.7, 0.8, 0.5, 0.3, 0.3, 0.1)):
        raw = {k: torch.rand(s, generator=g) for k, s in pruner.shape.items()}
        if step == 3:  # pruned units look most important now: they must not come back
            raw = {k: torch.where(previous[k], 0.0, 10.0) for k in raw}
        pruner.update(raw)
        pruner.prune(ratio)
        for kind in previous:
            assert not (pruner.keep[kind] & ~previous[kind]).any(), (kind, ratio)
        assert pruner.kept_ratio() <= min(ratio, 0.7 if step == 2 else 1.0) + 1e-9
        if ratio != 0.8:
            assert pruner.kept_ratio() > ratio - 2 * D * (2 * HIDDEN + 2) / pruner.total
        # a head without V/O dims keeps no Q/K dims
        dead_heads = ~pruner.keep["vo"].any(-1)
        assert not pruner.keep["qk"][dead_heads].any()
        previous = {k: v.clone() for k, v in pruner.keep.items()}
    masks = pruner.masks()
    assert [m.shape for m in masks.qk] == [torch.Size([H * D])] * L
    assert sum(int(m.sum()) for m in masks.ffn) == int(pruner.keep["ffn"].sum())


# ------------------------------------------------------------------------ gradient separation
@pytest.mark.parametrize("variant", ["reference", "nas_prune"])
def test_importance_comes_from_the_logit_loss_only(make_hf_bert, make_batch, variant):
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    student = _dense(make_hf_bert(num_labels=2, seed=0, **no_dropout)).train()
    teacher = _dense(make_hf_bert(num_labels=2, seed=1, **no_dropout))
    opts = Options(hidden_loss_weight=5.0, ema_beta=0.5, lr=1e-3, variant=variant)
    reference = variant == "reference"
    batch = {**make_batch(), "labels": torch.tensor([0, 1, 1])}
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def weight_taylor(loss_of) -> torch.Tensor:  # |sum grad * W| of layer 0's FFN neurons
        distiller = Distiller(copy.deepcopy(student))
        logits, hidden = distiller(**inputs)
        with torch.no_grad():
            target = teacher(**inputs, output_hidden_states=True)
        loss_of(logits, hidden, target).backward()
        ffn = distiller.student.layers[0].ffn
        down = (ffn.down.weight.grad * ffn.down.weight).sum(0)
        if reference:  # one side: the output columns
            return down.abs().detach()
        return ((ffn.up.weight.grad * ffn.up.weight).sum(1) + ffn.up.bias.grad * ffn.up.bias
                + down).abs().detach()

    def logit_loss(logits, hidden, target):
        if reference:  # soft cross-entropy at T, no T^2 factor, no hard-label term
            t = opts.temperature
            return F.cross_entropy(logits / t, F.softmax(target.logits / t, dim=-1))
        return train.kd_loss(logits, target.logits, batch["labels"], opts.temperature)

    def total_loss(logits, hidden, target):
        from nas_prune.train import hidden_mse
        return logit_loss(logits, hidden, target) + opts.hidden_loss_weight * hidden_mse(
            hidden, target.hidden_states[1:], batch["attention_mask"])

    from_logits, from_total = weight_taylor(logit_loss), weight_taylor(total_loss)
    assert not torch.allclose(from_logits, from_total, rtol=0.05)

    init_distributed()
    train_opts = TrainOptions(batch_size=3, lr=opts.lr, max_steps=10)
    distiller = Distiller(copy.deepcopy(student))
    engine, _ = make_engine(distiller, train_opts, 10)  # as grain.prune_to builds it
    pruner = Pruner(student.config, opts.ema_beta, opts.alpha, variant)
    before = engine.module.student.layers[0].ffn.up.weight.detach().clone()
    losses = distillation_step(engine, teacher, batch, opts, pruner)
    scale = (1 - opts.ema_beta) * (1.0 if reference else math.tanh(1 / opts.alpha))
    torch.testing.assert_close(pruner.score["ffn"][0], scale * from_logits, atol=1e-6,
                               rtol=1e-4)
    assert losses["hidden_loss"] > 0 and losses["logit_loss"] > 0
    # the total gradient updates the weights, the projections included (the learning rate
    # of engine.deepspeed_config's warm-up is 0 for the first two steps)
    for _ in range(2):
        distillation_step(engine, teacher, batch, opts, None)
    assert not torch.equal(engine.module.student.layers[0].ffn.up.weight, before)
    assert not torch.equal(engine.module.projections[0].weight.detach(), torch.eye(HIDDEN))


# ------------------------------------------------------------------------------ export
def test_export_loads_with_remote_code_in_a_fresh_process(make_hf_bert, make_batch, tmp_path,
                                                           load_in_fresh_process):
    model = _dense(make_hf_bert())
    masks = _irregular_masks()
    small = model.prune(masks).eval()
    batch = make_batch()
    expected = _logits(small, batch)
    model.set_masks(masks)
    torch.testing.assert_close(_logits(model, batch), expected, atol=ATOL, rtol=0)
    out = save_model_dir(small, tmp_path / "grain-r0.30", None, {"method": "grain"})

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nas_prune_grain"
    assert config["auto_map"] == {
        "AutoConfig": "grain_model.GrainConfig",
        "AutoModelForSequenceClassification": "grain_model.GrainForSequenceClassification",
    }
    assert config["qk_dims"] == small.config.qk_dims and config["ffn_units"][1] == 0
    assert (out / "grain_model.py").exists()

    in_process = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert (_logits(in_process, batch) - expected).abs().max() < ATOL

    remote = load_in_fresh_process(out, batch)
    assert remote["nas_prune_loaded"] is False
    assert remote["module"].startswith("transformers_modules")
    assert remote["params"] == small.num_params()
    assert (remote["logits"] - expected).abs().max() < ATOL


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_ratios": [1.5]}, "strictly between 0 and 1"),
        ({"target_ratios": []}, "at least one ratio"),
        ({"target_ratios": [0.1, 0.1]}, "repeat"),
        ({"start": 0.5, "end": 0.4}, "start <= end"),
        ({"end": 1.0}, "start <= end < 1"),
        ({"prune_every": 0}, "prune_every must be >= 1"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"ema_beta": 1.0}, "ema_beta"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"zero_stage": 3}, "ZeRO-3 does not gather"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
    ],
)
def test_bad_options_raise_grain_error(kwargs, match):
    with pytest.raises(GrainError, match=match):
        Options(**kwargs)


def test_options_fields_all_have_help_text():
    import ast
    import inspect

    import nas_prune.baselines.grain as grain

    tree = ast.parse(inspect.getsource(grain.Options))
    body = tree.body[0].body
    documented = {node.target.id for node, nxt in zip(body, body[1:], strict=False)
                  if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)}
    assert documented == {f.name for f in dataclasses.fields(Options)}
    assert Options(target_ratios=0.5).target_ratios == [0.5]


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_task_and_teacher(tmp_path_factory, tokenizer):
    rng = np.random.default_rng(0)
    filler = ["the", "movie", "was", "a", "plot", "actor", "film", "scene"]
    rows = []
    for i in range(120):
        words = list(rng.choice(filler, size=int(rng.integers(3, 9))))
        words.insert(int(rng.integers(len(words) + 1)), "wonderful" if i % 2 else "awful")
        rows.append(f"{' '.join(words)},{'pos' if i % 2 else 'neg'}")
    csv = tmp_path_factory.mktemp("data") / "toy.csv"
    csv.write_text("text,label\n" + "\n".join(rows) + "\n")
    task = data.tokenize(data.load_task(str(csv), seed=0), tokenizer, max_length=32)

    model_dir = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, num_hidden_layers=2,
                        num_attention_heads=H, intermediate_size=FFN, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    teacher_dir = tmp_path_factory.mktemp("teacher")
    opts = FinetuneOptions(max_steps=15, batch_size=16, lr=3e-3, log_every=5)
    train.finetune(str(model_dir), task, teacher_dir, opts)
    return task, teacher_dir, str(model_dir)


def test_run_end_to_end(tiny_task_and_teacher, tokenizer, tmp_path):
    task, teacher_dir, model_dir = tiny_task_and_teacher
    opts = Options(target_ratios=[0.5, 0.2], max_steps=10, batch_size=16, lr=1e-3, log_every=5)
    rows = run(teacher_dir, task, tokenizer, tmp_path / "grain", opts)
    assert [r["trial_id"] for r in rows] == ["grain-r0.50", "grain-r0.20"]
    teacher, _ = load_checkpoint(teacher_dir)
    for row, target in zip(rows, (0.5, 0.2), strict=True):
        assert set(ROW_KEYS) <= set(row)
        assert (row["method"], row["status"], row["fidelity"], row["fidelity_unit"]) == (
            "grain", "ok", 10, "steps")
        assert row["task"] == task.spec.name and row["model"] == model_dir
        assert row["metric_name"] == "accuracy"
        assert row["error"] == pytest.approx(1 - row["metric_value"])
        config = row["config"]
        assert config == {"target_permille": round(target * 1000),
                          "encoder_permille": config["encoder_permille"]}
        assert (target - 0.03) * 1000 < config["encoder_permille"] <= target * 1000
        assert row["params_ratio"] == pytest.approx(row["params"] / teacher.num_params())
        assert row["params"] < teacher.num_params() and row["flops"] < teacher.flops()
        assert row["wall_time_s"] > row["eval_time_s"] > 0
        out = tmp_path / "grain" / row["trial_id"]
        loaded = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
        assert sum(p.numel() for p in loaded.parameters()) == row["params"]
        assert {"tokenizer_config.json", "grain_model.py"} <= set(os.listdir(out))
        info = json.loads((out / "nas_prune_subnetwork.json").read_text())
        assert round(info["encoder_ratio"] * 1000) == config["encoder_permille"]
        assert info["target_ratio"] == target
    assert rows[1]["params"] < rows[0]["params"]
    # the rows are what the results store takes (flat integer configs)
    ResultStore(tmp_path / "results", "baseline-grain-seed0").append_evaluations(rows)
    stored = load_results(tmp_path / "results")
    assert list(stored["trial_id"]) == ["grain-r0.50", "grain-r0.20"]
    assert list(stored["cfg_target_permille"]) == [500, 200]


def test_run_in_bf16_on_a_cpu_prunes_like_fp32(tiny_task_and_teacher, tokenizer, tmp_path):
    """precision bf16 on a CPU (torch autocast, the teacher's forward too): the same budget
    met, fp32 weights saved, accuracy near the fp32 run's."""
    task, teacher_dir, _ = tiny_task_and_teacher
    base = {"target_ratios": [0.5], "max_steps": 10, "batch_size": 16, "lr": 1e-3}
    (fp32,) = run(teacher_dir, task, tokenizer, tmp_path / "fp32", Options(**base))
    (bf16,) = run(teacher_dir, task, tokenizer, tmp_path / "bf16",
                  Options(**base, precision="bf16"))
    assert bf16["config"] == fp32["config"] and bf16["params"] == fp32["params"]
    assert bf16["metric_value"] == pytest.approx(fp32["metric_value"], abs=0.1)
    loaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "bf16" / bf16["trial_id"], trust_remote_code=True)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_run_rejects_teacher_of_another_task(tiny_task_and_teacher, tokenizer, tmp_path):
    task, teacher_dir, _ = tiny_task_and_teacher
    other = dataclasses.replace(task, spec=dataclasses.replace(task.spec, name="sst2"))
    with pytest.raises(GrainError, match="fine-tuned for task"):
        run(teacher_dir, other, tokenizer, tmp_path, Options(max_steps=2))
