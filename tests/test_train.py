"""Training through a real DeepSpeed engine (CPU, gloo, fp32) on tiny random-weight models."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2Model

from nas_prune import data, train
from nas_prune.checkpoint import load_checkpoint
from nas_prune.engine import autocast, deepspeed_config, lr_factor, make_engine
from nas_prune.errors import CheckpointError, TrainingError
from nas_prune.evaluate import evaluate
from nas_prune.options import FinetuneOptions, SupernetOptions, TrainOptions
from nas_prune.space import SmallSpace, make_space
from nas_prune.strategies import StepContext, make_strategy
from nas_prune.supernet import EncoderForSequenceClassification, SubNetwork

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def save_tiny_bert(path, tokenizer, seed: int = 0) -> str:
    """Save a tiny random BERT (hidden 32, 2 layers, 4 heads, FFN 48) with the MiniLM
    vocabulary and tokenizer to `path`, like a Hugging Face checkpoint."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), tokenizer)


def _synthetic_csv(path, n=320, seed=0):
    """Sentiment a model can learn in a few steps: the label is which word the text contains."""
    rng = np.random.default_rng(seed)
    filler = ["the", "movie", "was", "a", "plot", "actor", "film", "scene"]
    rows = []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(filler, size=int(rng.integers(3, 9))))
        words.insert(int(rng.integers(len(words) + 1)), "wonderful" if label else "awful")
        rows.append(f"{' '.join(words)},{'pos' if label else 'neg'}")
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def task_kwargs(tmp_path_factory):
    return {"task": _synthetic_csv(tmp_path_factory.mktemp("data") / "toy.csv"), "seed": 0}


@pytest.fixture(scope="module")
def task(task_kwargs, tokenizer):
    return data.tokenize(data.load_task(**task_kwargs), tokenizer, max_length=32)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model_dir, task):
    out = tmp_path_factory.mktemp("teacher")
    opts = FinetuneOptions(epochs=4, batch_size=16, lr=3e-3, log_every=5)
    result = train.finetune(tiny_model_dir, task, out, opts)
    return out, result


# --------------------------------------------------------------------------------- strategies
def _plan(name, **kw):
    space = SmallSpace(2, 4, 48)
    strategy = make_strategy(name, **kw)
    ctx = StepContext(space, np.random.default_rng(0), step=5, total_steps=10)
    return strategy, strategy.plan(ctx)


@pytest.mark.parametrize(
    ("name", "kwargs", "passes", "full", "distil"),
    [
        ("standard", {}, 1, 1, 0),
        ("random", {}, 1, 0, 0),
        ("random", {"num_random": 3}, 3, 0, 0),
        ("sandwich", {}, 4, 1, 0),
        ("sandwich", {"num_random": 5}, 7, 1, 0),
        ("kd", {"num_random": 2}, 2, 0, 2),
        ("full", {}, 4, 1, 3),
        ("full", {"num_random": 1}, 3, 1, 2),
        ("largest_kd", {}, 3, 1, 2),
        ("largest_kd", {"num_random": 3}, 4, 1, 3),
    ],
)
def test_strategy_plans(name, kwargs, passes, full, distil):
    strategy, plan = _plan(name, **kwargs)
    assert strategy.passes_per_step == len(plan) == passes
    assert sum(p.sub is None for p in plan) == full
    assert sum(p.distil for p in plan) == distil


def test_sandwich_ends_with_smallest_and_starts_with_full():
    _, plan = _plan("sandwich")
    assert plan[0].sub is None
    assert plan[-1].sub == SubNetwork.uniform(2, 0, 1, 1)


def test_largest_kd_starts_with_full_and_draws_the_rest_from_the_sampler():
    """Unlike `full`, no pass is forced onto the smallest sub-network: with budgets, every
    pass but the full one comes from the budget sampler."""
    space = SmallSpace(2, 4, 48)
    near_budget = SubNetwork.uniform(2, 2, 3, 30)
    drawn = []

    def sample(rng):
        drawn.append(rng)
        return near_budget

    for name, expected in [("largest_kd", [None, near_budget, near_budget]),
                           ("full", [None, near_budget, space.to_sub_network(space.smallest())])]:
        plan = make_strategy(name, num_random=2 if name == "largest_kd" else 1).plan(
            StepContext(space, np.random.default_rng(0), 0, 1, sample))
        assert [p.sub for p in plan] == expected
        assert [p.distil for p in plan] == [False, True, True]  # the full pass teaches
    assert len(drawn) == 3


def test_random_linear_probability_rises():
    space = SmallSpace(2, 4, 48)
    strategy = make_strategy("random_linear")
    rng = np.random.default_rng(0)

    def share(step):
        ctx = StepContext(space, rng, step=step, total_steps=101)
        return np.mean([strategy.plan(ctx)[0].sub is not None for _ in range(400)])

    assert share(0) == 0.0
    assert 0.35 < share(50) < 0.65
    assert share(100) == 1.0


def test_kd_loss_formula_and_temperature():
    student = torch.tensor([[1.0, -1.0, 0.5]])
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    labels = torch.tensor([2])
    for t in (1.0, 4.0):
        p_teacher = torch.softmax(teacher / t, -1)
        log_p_student = torch.log_softmax(student / t, -1)
        soft = -(p_teacher * log_p_student).sum() * t * t
        hard = -torch.log_softmax(student, -1)[0, 2]
        got = train.kd_loss(student, teacher, labels, t)
        assert got.item() == pytest.approx((soft + hard).item(), rel=1e-6)
    assert train.kd_loss(student, teacher, labels, 1.0) != train.kd_loss(
        student, teacher, labels, 4.0
    )


def test_kd_loss_regression_uses_mse():
    student, teacher = torch.tensor([[0.5]]), torch.tensor([[1.5]])
    got = train.kd_loss(student, teacher, torch.tensor([2.0]), 2.0)
    assert got.item() == pytest.approx(1.0 + 2.25)


# --------------------------------------------------------------------------------- bad input
def test_unknown_strategy_is_rejected():
    with pytest.raises(TrainingError, match="unknown strategy 'bogus'.*sandwich"):
        SupernetOptions(strategy="bogus")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train_batch_size": 999}, "contradicts itself"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "both fp16 and bf16"),
        ({"zero_optimization": {"stage": 7}}, "stage must be 0-3"),
        ({"gradient_accumulation_steps": 3}, "multiple of the strategy"),
    ],
)
def test_contradictory_deepspeed_config(override, message):
    opts = SupernetOptions(strategy="sandwich", deepspeed=override)
    with pytest.raises(TrainingError, match=message):
        deepspeed_config(opts, passes_per_step=4, total_steps=10, world_size=1, use_gpu=False)


def test_deepspeed_config_accumulates_every_pass():
    opts = SupernetOptions(strategy="full", num_random=3, gradient_accumulation=2)
    strategy = make_strategy("full", 3)
    config = deepspeed_config(opts, strategy.passes_per_step, 10, 1, use_gpu=False)
    assert config["gradient_accumulation_steps"] == 2 * 5
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["bf16"]["enabled"] is False
    gpu = deepspeed_config(opts, strategy.passes_per_step, 10, 1, use_gpu=True)
    assert gpu["bf16"]["enabled"] is True


def test_lr_schedule_warms_up_and_decays_without_a_zero_step():
    factor = lr_factor(10, 0.3)  # 3 warm-up steps
    assert [round(factor(k), 4) for k in range(10)] == [
        0.25, 0.5, 0.75, 1.0, 0.8571, 0.7143, 0.5714, 0.4286, 0.2857, 0.1429]
    assert lr_factor(1, 0.1)(0) == 1.0 and lr_factor(2, 0.5)(0) == 0.5


def test_the_engine_follows_the_schedule_and_one_step_updates(tiny_model_dir):
    """Each optimizer step runs at lr x lr_factor(step): with DeepSpeed's WarmupDecayLR the
    first two ran at 0, so a run of one or two steps changed nothing."""
    model = EncoderForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = TrainOptions(lr=1e-3, warmup_ratio=0.5)
    engine, _ = make_engine(model, opts, total_steps=4)
    batch = {"input_ids": torch.randint(5, 50, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    lrs = []
    for _ in range(4):
        lrs.append(engine.optimizer.param_groups[0]["lr"])
        engine.backward(engine(**batch).loss)
        engine.step()
        if len(lrs) == 1:
            assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert lrs == pytest.approx([1e-3 * lr_factor(4, 0.5)(k) for k in range(4)])
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 5e-4])


def test_bf16_on_a_cpu_is_torch_autocast_not_deepspeeds_bf16():
    cpu = deepspeed_config(TrainOptions(precision="bf16"), 1, 10, 1, use_gpu=False)
    assert cpu["bf16"]["enabled"] is False
    assert cpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16",
                                     "lower_precision_safe_modules": []}
    gpu = deepspeed_config(TrainOptions(precision="bf16"), 1, 10, 1, use_gpu=True)
    assert gpu["bf16"]["enabled"] is True and "torch_autocast" not in gpu
    assert "torch_autocast" not in deepspeed_config(TrainOptions(), 1, 10, 1, use_gpu=False)
    # DeepSpeed's own bf16 section would cast the whole model: on a CPU it says what to use
    with pytest.raises(TrainingError, match="need a GPU.*precision='bf16'"):
        deepspeed_config(TrainOptions(deepspeed={"bf16": {"enabled": True}}), 1, 10, 1,
                         use_gpu=False)


def test_a_bf16_engine_on_a_cpu_computes_in_bf16_and_learns_like_fp32(tiny_model_dir):
    torch.manual_seed(0)
    model = EncoderForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    twin, other = copy.deepcopy(model), copy.deepcopy(model).eval()
    batch = {"input_ids": torch.randint(5, 50, (8, 12)), "labels": torch.tensor([0, 1] * 4)}
    inputs = {"input_ids": batch["input_ids"]}

    def train_on_batch(engine) -> list[float]:
        losses = []
        for _ in range(12):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        return losses

    fp32, _ = make_engine(twin, TrainOptions(lr=3e-3), total_steps=12)
    reference = train_on_batch(fp32)
    engine, _ = make_engine(model, TrainOptions(lr=3e-3, precision="bf16"), total_steps=12)
    assert engine(**batch).logits.dtype == torch.bfloat16
    with torch.no_grad(), autocast(engine):  # a teacher's forward, outside the engine
        assert other(**inputs).logits.dtype == torch.bfloat16
    with torch.no_grad():
        assert other(**inputs).logits.dtype == torch.float32
    losses = train_on_batch(engine)
    assert losses[-1] < 0.6 * losses[0]
    assert losses == pytest.approx(reference, abs=0.02)  # fp32 master weights: same course
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    # gradients are reduced in fp32: DeepSpeed marked no weight for bf16 communication
    assert not any(hasattr(p, "comm_dtype") for p in model.parameters())
    # an fp32 engine after it (DeepSpeed keeps autocast state process-wide) does not autocast
    fp32, _ = make_engine(model, TrainOptions(lr=1e-3), total_steps=2)
    assert fp32(**batch).logits.dtype == torch.float32
    with torch.no_grad(), autocast(fp32):
        assert other(**inputs).logits.dtype == torch.float32


def test_teacher_must_be_finetuned_for_the_task(tiny_model_dir, task, tmp_path, teacher_dir):
    with pytest.raises(CheckpointError, match="not a fine-tuned nas_prune model"):
        train.train_supernet(tiny_model_dir, task, tmp_path / "a", SupernetOptions())
    other = data.TaskData(
        data.TaskSpec("other_task", "text", None, "label", 2, "accuracy"),
        task.train, task.valid, task.test,
    )
    with pytest.raises(CheckpointError, match="fine-tuned for task"):
        train.train_supernet(teacher_dir[0], other, tmp_path / "b", SupernetOptions())
    three = data.TaskData(
        data.TaskSpec(task.spec.name, "text", None, "label", 3, "accuracy"),
        task.train, task.valid, task.test,
    )
    with pytest.raises(CheckpointError, match="predicts 2 labels"):
        train.train_supernet(teacher_dir[0], three, tmp_path / "c", SupernetOptions())


def test_checkpoint_of_another_family_or_corrupt(tmp_path, teacher_dir):
    gpt = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(gpt)
    with pytest.raises(CheckpointError, match="BERT and RoBERTa"):
        load_checkpoint(gpt)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in teacher_dir[0].iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------------- training
def test_finetune_loss_falls_and_checkpoint_loads(teacher_dir, task, tokenizer):
    out, result = teacher_dir
    assert result.steps == 4 * math.ceil(len(task.train) / 16)
    assert np.mean(result.losses[-5:]) < 0.5 * np.mean(result.losses[:5])
    model, meta = load_checkpoint(out)
    assert meta["kind"] == "teacher" and meta["finished"] and meta["steps_done"] == result.steps
    valid = evaluate(model, data.make_loader(task.valid, tokenizer, 32), task.spec)
    assert valid["metric"] == pytest.approx(result.valid["metric"])
    assert valid["metric"] > 0.9
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()


def test_finished_run_is_not_silently_overwritten(teacher_dir, tiny_model_dir, task):
    with pytest.raises(TrainingError, match="already holds a finished"):
        train.finetune(tiny_model_dir, task, teacher_dir[0],
                       FinetuneOptions(epochs=4, batch_size=16, lr=3e-3, log_every=5))


def _forward_counter(monkeypatch):
    calls = []
    original = EncoderForSequenceClassification.forward

    def counting(self, *args, **kwargs):
        calls.append(self.sub_network)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EncoderForSequenceClassification, "forward", counting)
    return calls


@pytest.mark.parametrize(("strategy", "num_random", "forwards"),
                         [("sandwich", 1, 3), ("sandwich", 3, 5), ("kd", 2, 3),
                          ("largest_kd", 2, 3)])
def test_num_random_changes_training(teacher_dir, task, tmp_path, monkeypatch, strategy,
                                     num_random, forwards):
    calls = _forward_counter(monkeypatch)
    opts = SupernetOptions(strategy=strategy, num_random=num_random, max_steps=2,
                           batch_size=16, rewire=False)
    steps = []
    train.train_supernet(teacher_dir[0], task, tmp_path / "sn", opts,
                         on_step=lambda s, _: steps.append((s, len(calls))))
    assert [n for _, n in steps] == [forwards, 2 * forwards]


def test_supernet_budgets_draw_random_subnetworks_at_the_budgets(teacher_dir, task, tmp_path,
                                                                 monkeypatch):
    model, _ = load_checkpoint(teacher_dir[0])
    full, space = model.num_params(), make_space("small", model.config)
    low = model.num_params(space.to_sub_network(space.smallest())) / full
    budget, band = low + 0.6 * (1 - low), 0.15 * (1 - low)
    calls = _forward_counter(monkeypatch)
    opts = SupernetOptions(strategy="sandwich", num_random=2, max_steps=4, batch_size=16,
                           rewire=False, budgets=[budget], budget_band=band)
    train.train_supernet(teacher_dir[0], task, tmp_path / "sn", opts)
    randoms = [sub for step in range(4) for sub in calls[4 * step + 1: 4 * step + 3]]
    ratios = [model.num_params(sub) / full for sub in randoms]
    assert len(ratios) == 8 and all(budget - band < r <= budget for r in ratios), ratios
    assert len(set(randoms)) > 1  # drawn, not one fixed sub-network


def test_supernet_budget_no_subnetwork_fits_fails_before_training(teacher_dir, task, tmp_path,
                                                                  monkeypatch):
    calls = _forward_counter(monkeypatch)
    opts = SupernetOptions(strategy="sandwich", max_steps=2, batch_size=16, rewire=False,
                           budgets=[0.05], budget_band=0.01)
    with pytest.raises(TrainingError, match="no sub-network of the small space.*budget_band"):
        train.train_supernet(teacher_dir[0], task, tmp_path / "sn", opts)
    assert calls == []
    with pytest.raises(TrainingError, match="budgets are params ratios"):
        SupernetOptions(budgets=[1.5])


def _state(path):
    model, _ = load_checkpoint(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_supernet_resume_repeats_and_loses_no_step(teacher_dir, task, tmp_path):
    opts = SupernetOptions(strategy="full", max_steps=6, batch_size=16, lr=1e-3,
                           rewire_batches=2)
    straight = []
    train.train_supernet(teacher_dir[0], task, tmp_path / "straight", opts,
                         on_step=lambda s, loss: straight.append((s, loss)))
    resumed = []
    first = train.train_supernet(teacher_dir[0], task, tmp_path / "resumed", opts, stop_after=3,
                                 on_step=lambda s, loss: resumed.append((s, loss)))
    assert first.steps == 3 and first.valid is None
    meta = json.loads((tmp_path / "resumed" / "nas_prune.json").read_text())
    assert meta["steps_done"] == 3 and not meta["finished"]
    second = train.train_supernet(teacher_dir[0], task, tmp_path / "resumed", opts,
                                  on_step=lambda s, loss: resumed.append((s, loss)))
    assert second.steps == 6
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6] == [s for s, _ in straight]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in straight])
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    teacher = _state(teacher_dir[0])
    assert any(not torch.equal(a[k], teacher[k]) for k in a)


def test_supernet_epochs_zero_is_the_rewired_teacher_untrained(teacher_dir, tiny_model_dir,
                                                                task, tokenizer, tmp_path):
    result = train.train_supernet(teacher_dir[0], task, tmp_path / "sn",
                                  SupernetOptions(epochs=0, batch_size=16, rewire_batches=2))
    assert result.steps == 0 and result.losses == []
    meta = json.loads((tmp_path / "sn" / "nas_prune.json").read_text())
    assert meta["kind"] == "supernet" and meta["finished"]
    assert meta["train_examples"] == 0 and meta["total_steps"] == 0
    supernet, _ = load_checkpoint(tmp_path / "sn")
    teacher, _ = load_checkpoint(teacher_dir[0])
    # rewiring permutes heads and neurons: the same function, other weights
    batch = next(iter(data.make_loader(task.valid, tokenizer, 32)))
    with torch.no_grad():
        assert torch.allclose(supernet.eval()(**batch).logits, teacher.eval()(**batch).logits,
                              atol=1e-5)
    a, b = supernet.state_dict(), teacher.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert meta["valid"]["metric"] == pytest.approx(
        evaluate(teacher, data.make_loader(task.valid, tokenizer, 16), task.spec)["metric"])
    # without rewiring there is nothing to make of the teacher; fine-tuning always trains
    with pytest.raises(TrainingError, match="epochs 0 .* rewire true"):
        SupernetOptions(epochs=0, rewire=False)
    with pytest.raises(TrainingError, match="epochs 0 trains nothing"):
        train.finetune(tiny_model_dir, task, tmp_path / "ft",
                       FinetuneOptions(epochs=0, batch_size=16))
    assert not (tmp_path / "ft" / "nas_prune.json").exists()


def test_resume_with_other_options_is_rejected(teacher_dir, task, tmp_path):
    opts = SupernetOptions(strategy="random", max_steps=4, batch_size=16, rewire=False)
    train.train_supernet(teacher_dir[0], task, tmp_path / "sn", opts, stop_after=1)
    other = SupernetOptions(strategy="sandwich", max_steps=4, batch_size=16, rewire=False)
    with pytest.raises(TrainingError, match="other options.*strategy"):
        train.train_supernet(teacher_dir[0], task, tmp_path / "sn", other)


def test_resume_of_a_run_saved_before_an_option_existed(tiny_model_dir, task, tmp_path):
    """A run whose saved options lack an option added later resumes when today's value is
    that option's default."""
    # pooling (added later) is a fine-tuning option now, so the interrupted run is a fine-tuning
    opts = FinetuneOptions(max_steps=2, batch_size=16)
    train.finetune(tiny_model_dir, task, tmp_path / "ft", opts, stop_after=1)
    meta_file = tmp_path / "ft" / "nas_prune.json"
    meta = json.loads(meta_file.read_text())
    del meta["options"]["pooling"]
    meta_file.write_text(json.dumps(meta))
    resumed = train.finetune(tiny_model_dir, task, tmp_path / "ft", opts)
    assert resumed.steps == 2 and len(resumed.losses) == 1  # step 1 was not run again


def test_pooling_is_chosen_at_fine_tuning_and_kept_by_the_supernet(tiny_model_dir, task,
                                                                    tmp_path):
    with pytest.raises(TrainingError, match="unknown pooling 'max'; choose one of auto, cls, mean"):
        FinetuneOptions(pooling="max")
    opts = FinetuneOptions(max_steps=1, batch_size=16, pooling="mean")
    train.finetune(tiny_model_dir, task, tmp_path / "teacher", opts)
    teacher, _ = load_checkpoint(tmp_path / "teacher")
    assert teacher.config.pooling == "mean"
    supernet_opts = SupernetOptions(strategy="sandwich", max_steps=1, batch_size=16)
    train.train_supernet(tmp_path / "teacher", task, tmp_path / "sn", supernet_opts)
    supernet, _ = load_checkpoint(tmp_path / "sn")
    assert supernet.config.pooling == "mean"
    default, _ = load_checkpoint(train.finetune(
        tiny_model_dir, task, tmp_path / "cls", FinetuneOptions(max_steps=1, batch_size=16)
    ).checkpoint)
    assert default.config.pooling == "cls"  # a plain transformers checkpoint reads [CLS]


def test_full_supernet_improves_small_subnetworks(teacher_dir, task, tokenizer, tmp_path):
    """`full` training makes small sub-networks better than cutting them from the teacher."""
    teacher, _ = load_checkpoint(teacher_dir[0])
    small = SubNetwork.uniform(2, 1, 1, 6)
    loader = data.make_loader(task.valid, tokenizer, 64)
    before = evaluate(teacher, loader, task.spec, small)["loss"]
    opts = SupernetOptions(strategy="full", epochs=3, batch_size=16, lr=3e-3, rewire=True)
    train.train_supernet(teacher_dir[0], task, tmp_path / "sn", opts)
    supernet, meta = load_checkpoint(tmp_path / "sn")
    assert meta["kind"] == "supernet" and meta["strategy"] == "full"
    after = evaluate(supernet, loader, task.spec, small)["loss"]
    assert after < before


def test_zero3_equals_zero0(teacher_dir, task, tmp_path):
    """ZeRO-3 partitions the parameters our blocks slice; training must not change."""
    results = {}
    for stage in (0, 3):
        opts = SupernetOptions(strategy="sandwich", max_steps=4, batch_size=16, lr=1e-3,
                               zero_stage=stage, rewire=False)
        result = train.train_supernet(teacher_dir[0], task, tmp_path / f"z{stage}", opts)
        results[stage] = (result.losses, _state(tmp_path / f"z{stage}"))
    teacher = _state(teacher_dir[0])
    assert results[3][0] == pytest.approx(results[0][0], rel=1e-5)
    assert any(not torch.equal(results[3][1][k], teacher[k]) for k in teacher)
    for k in teacher:  # atol: Adam divides by sqrt(v), so a gradient near 0 whose last bits
        # differ between the stages' reduction orders moves its weight by up to ~1e-6 more
        torch.testing.assert_close(results[3][1][k], results[0][1][k], rtol=1e-5, atol=1e-5)
