"""PINS (Ren & Zhu 2023): formulas against hand-computed values, masks and the teacher snapshot,
and pruning through a real DeepSpeed engine on a tiny random-weight BERT."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nas_prune import data
from nas_prune.baselines import BaselineError, pins
from nas_prune.supernet import load_pretrained
from tests.test_train import _synthetic_csv, save_tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------ formulas
def test_score_by_hand():
    w = torch.tensor([1.0, -2.0, 0.5])
    g = torch.tensor([0.5, 0.25, -2.0])
    # |-w*g + lr*g^2| with lr = 0.1: |-0.5 + 0.025|, |0.5 + 0.00625|, |1.0 + 0.4|
    expected = torch.tensor([0.475, 0.50625, 1.4])
    assert torch.allclose(pins.pins_score(w, g, 0.1), expected)


def test_ema_and_uncertainty_by_hand():
    importance, uncertainty = pins.update_ema(torch.tensor([1.0]), torch.tensor([0.5]),
                                              torch.tensor([3.0]))
    assert importance.item() == pytest.approx(0.85 * 1 + 0.15 * 3)  # 1.3
    assert uncertainty.item() == pytest.approx(0.99 * 0.5 + 0.01 * abs(3 - 1.3))  # 0.512


def test_window_average_feeds_the_ema():
    weight = nn.Parameter(torch.tensor([2.0, -1.0]))
    pruner = pins.Pruner({"w": weight}, window=2)
    scores = []
    for grad, lr in ((torch.tensor([1.0, 1.0]), 0.5), (torch.tensor([3.0, -1.0]), 0.25)):
        weight.grad = grad
        scores.append(pins.pins_score(weight.detach(), grad, lr))
        changed = pruner.accumulate(lr)
    assert changed and pruner.updates == 1
    # [(|-2 + 0.5| + |-6 + 2.25|) / 2, (|1 + 0.5| + |-1 + 0.25|) / 2]
    mean = (scores[0] + scores[1]) / 2
    assert torch.allclose(mean, torch.tensor([2.625, 1.125]))
    assert torch.allclose(pruner.importance["w"], 0.15 * mean)
    assert torch.allclose(pruner.uncertainty["w"], 0.01 * (mean - 0.15 * mean).abs())
    assert torch.allclose(pruner.scores()["w"], 0.15 * mean * 0.01 * 0.85 * mean)
    assert torch.count_nonzero(pruner.window_sum["w"]) == 0  # a fresh window starts


@pytest.mark.parametrize(("step", "expected"), [
    (1, 1.0), (10, 1.0),                       # dense warm-up (10 steps)
    (17, 0.2 + 0.8 * (1 - 7 / 70) ** 3),       # 0.7832
    (45, 0.2 + 0.8 * 0.5 ** 3),                # half way: 0.3
    (80, 0.2), (81, 0.2), (100, 0.2),          # final 20 steps at r_f
])
def test_cubic_schedule(step, expected):
    ratio = pins.remaining_ratio(step, total_steps=100, final_ratio=0.2, warmup_steps=10,
                                 final_steps=20)
    assert ratio == pytest.approx(expected)


def test_self_distillation_weight_and_loss_by_hand():
    student = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p = (3/4, 1/4); uniform
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    a = 1 - entropy / math.log(2)
    weights = pins.self_distillation_weight(student)
    assert weights.tolist() == pytest.approx([a, 0.0])  # a = 0.188722
    teacher = torch.zeros(2, 2)
    labels = torch.tensor([0, 1])
    # example 1: KL(t || s) at T = 2, p_s^T = (sqrt3, 1) / (sqrt3 + 1), p_t = (1/2, 1/2)
    s1 = math.sqrt(3) / (math.sqrt(3) + 1)
    kl = 0.5 * math.log(0.5 / s1) + 0.5 * math.log(0.5 / (1 - s1))
    first = a * kl + (1 - a) * -math.log(0.75)
    second = 0.0 * 0.0 + 1.0 * -math.log(0.5)  # student = teacher; a = 0
    loss = pins.self_distillation_loss(student, teacher, labels, temperature=2.0)
    assert loss.item() == pytest.approx((first + second) / 2)


# ------------------------------------------------------------------------------ masks
def test_global_threshold_keeps_exactly_the_top_scores():
    a = nn.Parameter(torch.tensor([[0.1, 5.0], [0.3, 0.2]]))
    b = nn.Parameter(torch.tensor([4.0, -0.05, -3.0, 0.4]))
    pruner = pins.Pruner({"a": a, "b": b}, importance="magnitude")
    pruner.prune(0.5)  # one threshold over both tensors: 5, 4, 3, 0.4 stay
    assert pruner.masks["a"].tolist() == [[False, True], [False, False]]
    assert pruner.masks["b"].tolist() == [True, False, True, True]
    assert a.detach().tolist() == [[0.0, 5.0], [0.0, 0.0]]
    assert pruner.sparsity == 0.5


def test_ties_still_give_the_exact_count():
    w = nn.Parameter(torch.zeros(8))
    pruner = pins.Pruner({"w": w}, importance="pins")  # all scores 0
    pruner.prune(0.25)
    assert int(pruner.masks["w"].sum()) == 2 and pruner.pruned == 6


def test_teacher_is_replaced_only_when_the_metric_improves():
    torch.manual_seed(0)
    student = nn.Linear(3, 2)
    teacher = pins.TeacherSnapshot(student)
    start = student.weight.detach().clone()
    assert teacher.best is None and teacher.step == 0

    def set_student(value: float) -> None:
        with torch.no_grad():
            student.weight.fill_(value)

    set_student(1.0)
    assert teacher.offer(student, 0.6, step=10)  # the first evaluation always installs
    assert torch.equal(teacher.model.weight, torch.full((2, 3), 1.0))
    set_student(2.0)
    assert not teacher.offer(student, 0.5, step=20)  # worse: the teacher stays
    assert not teacher.offer(student, 0.6, step=30)  # equal is no improvement
    assert torch.equal(teacher.model.weight, torch.full((2, 3), 1.0))
    set_student(3.0)
    assert teacher.offer(student, 0.7, step=40)
    assert torch.equal(teacher.model.weight, torch.full((2, 3), 3.0))
    assert (teacher.best, teacher.step, teacher.replacements) == (0.7, 40, 2)
    assert not torch.equal(start, teacher.model.weight)
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_options_say_what_to_change():
    with pytest.raises(BaselineError, match="sparsities must lie strictly between 0 and 1"):
        pins.Options(sparsities=[1.0])
    with pytest.raises(BaselineError, match="importance must be one of pins, magnitude"):
        pins.Options(importance="random")
    with pytest.raises(BaselineError, match="sum below 1"):
        pins.Options(initial_warmup=0.5, final_warmup=0.5)


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def task(tmp_path_factory, tokenizer):
    raw = data.load_task(_synthetic_csv(tmp_path_factory.mktemp("data") / "toy.csv"), seed=0)
    return data.tokenize(raw, tokenizer, max_length=32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), tokenizer)


@pytest.mark.parametrize("importance", ["pins", "magnitude"])
def test_pruned_weights_stay_zero_through_deepspeed_steps(tiny_dir, task, tokenizer, importance):
    model = load_pretrained(tiny_dir)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts = pins.Options(sparsities=[0.6], importance=importance, max_steps=30, batch_size=16,
                        lr=1e-3, initial_warmup=0.2, final_warmup=0.2, window=5, eval_every=5,
                        log_every=10)
    seen = []

    def check(step, pruner, teacher):
        expected = 1 - pins.remaining_ratio(step - step % 5 if step <= 24 else step, 30, 0.4,
                                            6, 6)
        for name, p in pruner.weights.items():
            assert torch.count_nonzero(p[~pruner.masks[name]]) == 0, (step, name)
        seen.append((step, pruner.sparsity, expected, teacher.best if teacher else None))

    facts = pins.prune_model(model, task, tokenizer, 0.6, opts, on_step=check)
    assert [s for s, *_ in seen] == list(range(1, 31))
    for step, sparsity, expected, _ in seen:
        # masks recomputed every 5 steps while pruning (and each final step): the schedule's
        # ratio at the last recompute, to one weight
        assert sparsity == pytest.approx(expected, abs=1 / facts["prunable"]), step
    one = 1 / facts["prunable"]
    assert seen[5][1] == 0.0 and seen[-1][1] == pytest.approx(0.6, abs=one)
    assert facts["sparsity"] == seen[-1][1]
    # only the pruned tensors lost weights; the others still train
    prunable = set(pins.prunable_weights(model))
    assert len(prunable) == 2 * 6 and all("norm" not in n for n in prunable)
    for name, p in model.named_parameters():
        if name not in prunable and name.endswith("weight") and "norm" not in name:
            zeros_now = int((p == 0).sum())
            assert zeros_now <= int((start[name] == 0).sum()), name
    kept = pins.prunable_weights(model)["layers.0.ffn.up.weight"]
    assert not torch.equal(kept[kept != 0], start["layers.0.ffn.up.weight"][kept != 0])
    # the teacher followed the dev metric: evaluations start after warm-up (6 steps)
    bests = [b for *_, b in seen if b is not None]
    assert seen[5][3] is None and bests and bests == sorted(bests)
    assert facts["teacher_replacements"] >= 1


def test_pins_selects_on_examples_a_search_does_not_score():
    import datasets

    from nas_prune.evaluate import selection_subset, validation_subset

    valid = datasets.Dataset.from_dict({"i": list(range(3000))})
    searched = set(validation_subset(valid, 0, 500)["i"])
    selected = set(selection_subset(valid, 0, 1000)["i"])
    assert len(searched) == 500 and len(selected) == 1000
    assert not searched & selected
