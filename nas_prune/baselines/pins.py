"""PINS: unstructured pruning with principled importance and self-regularization.

Ren & Zhu, "Pruning Pre-trained Language Models with Principled Importance and
Self-regularization", Findings of ACL 2023 (arXiv 2305.12394); METHODS.md section 2.

Individual weights of the attention Q/K/V/output projections and the FFN up/down projections
are pruned while the model trains (embeddings, LayerNorms, biases and the classification head
are never pruned), with one global threshold over all their scores:

* importance of weight w with gradient g at learning rate eta: ``s = |-w*g + eta*g^2|``
  (:func:`pins_score`; the first-order loss change of zeroing w after an SGD step), averaged
  over windows of ``window`` (10) steps, then smoothed ``I = 0.85*I + 0.15*s`` and
  ``U = 0.99*U + 0.01*|s - I|`` once per window (:func:`update_ema`); the score is ``I*U``.
  ``importance="magnitude"`` scores ``|w|`` instead, for comparison;
* cubic schedule (:func:`remaining_ratio`): dense for the first ``initial_warmup`` of the
  steps, then ``r_f + (1 - r_f) * (1 - progress)^3`` of the weights remain, ``r_f`` for the last
  ``final_warmup``. Masks are recomputed every ``window`` steps, every step in the final part
  (where they change only when the scores do), and re-applied after *every* DeepSpeed optimizer
  step, so pruned weights stay exactly 0 (the reference code zeroes them only when it
  recomputes the mask, so they drift back in between);
* self-regularization: the loss is ``a*KL_T(teacher||student) + (1-a)*CE`` with T=2 and a
  per-example ``a = 1 - H(p_student)/log(num_labels)`` (:func:`self_distillation_weight`),
  where the teacher is a frozen copy of the latest best checkpoint (:class:`TeacherSnapshot`):
  the student is scored on the dev split every ``eval_every`` steps once pruning has begun and
  replaces the teacher whenever its metric improves on the best so far (the first such
  evaluation always does: until then the teacher is the starting model).

Differences from the paper, on purpose: pruning starts from the *fine-tuned* teacher, like
every other method here (the paper fine-tunes the pre-trained model while pruning), so all
methods share a starting point; and each requested sparsity is one separate run (the paper's
protocol), not a snapshot of a run to the highest one. The saved model is dense-shaped with
zeros (a stock checkpoint when the head reads [CLS]); its latency is that of the dense model,
since dense kernels gain nothing from zeros. Training runs through a DeepSpeed engine in fp32
with ZeRO stage 0: scores and masks need the full-precision weights and their gradients in
place.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nas_prune import data as data_lib
from nas_prune.checkpoint import check_teacher, load_checkpoint
from nas_prune.engine import make_engine
from nas_prune.errors import BaselineError
from nas_prune.evaluate import evaluate, selection_subset
from nas_prune.options import TrainOptions
from nas_prune.train import batches, task_loss

log = logging.getLogger(__name__)

IMPORTANCES = ("pins", "magnitude")
"""Importance scores: PINS' principled score, or weight magnitude (the comparison)."""

_PRUNED = re.compile(r"layers\.\d+\.(attention\.(query|key|value|out)|ffn\.(up|down))\.weight")


@dataclass
class Options:
    """PINS options; the defaults are the paper's (20 epochs, lr 3e-5, batch 16)."""

    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8])
    """Target sparsities (fraction of the pruned encoder weights set to 0); one run each."""
    importance: str = "pins"
    """"pins" (|-w*g + lr*g^2|, windowed, EMA x uncertainty) or "magnitude" (|w|)."""
    self_distillation: bool = True
    """Distil from the latest best checkpoint (self-regularization); false: plain CE."""
    temperature: float = 2.0
    """Distillation temperature T of the KL term."""
    epochs: float = 20.0
    """Passes over the training split per run; `max_steps` overrides."""
    max_steps: int | None = None
    """Optimizer steps per run (overrides `epochs`)."""
    batch_size: int = 16
    """Examples per optimizer step."""
    lr: float = 3e-5
    """Peak learning rate (AdamW; linear warm-up then linear decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear learning-rate warm-up."""
    initial_warmup: float = 0.1
    """Fraction of steps trained dense before pruning starts."""
    final_warmup: float = 0.2
    """Fraction of steps at the end trained at the final sparsity."""
    window: int = 10
    """Steps per score window; masks are recomputed every `window` steps."""
    beta_importance: float = 0.85
    """EMA factor of the importance I (I = beta*I + (1-beta)*s)."""
    beta_uncertainty: float = 0.99
    """EMA factor of the uncertainty U (U = beta*U + (1-beta)*|s - I|)."""
    eval_every: int = 100
    """Dev evaluation interval (steps) for the self-distillation teacher."""
    eval_examples: int | None = 1000
    """Dev examples scored by those evaluations (None: all); the final metric uses all."""
    max_length: int = 128
    """Tokens per example after truncation."""
    seed: int = 0
    """Seed of data order and dropout."""
    log_every: int = 50
    """Log progress (step/total, loss, sparsity, lr) every this many steps."""

    def __post_init__(self) -> None:
        self.sparsities = [float(s) for s in self.sparsities]
        if not self.sparsities or any(not 0 < s < 1 for s in self.sparsities):
            raise BaselineError(f"sparsities must lie strictly between 0 and 1, e.g. 0.5 0.8; "
                                f"got {self.sparsities}")
        if self.importance not in IMPORTANCES:
            raise BaselineError(f"importance must be one of {', '.join(IMPORTANCES)}, got "
                                f"{self.importance!r}")
        if self.temperature <= 0:
            raise BaselineError(f"temperature must be > 0, got {self.temperature}")
        if self.max_steps is None and self.epochs <= 0:
            raise BaselineError(f"epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "window", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise BaselineError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BaselineError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise BaselineError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, "
                                f"{self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise BaselineError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if (self.initial_warmup < 0 or self.final_warmup < 0
                or self.initial_warmup + self.final_warmup >= 1):
            raise BaselineError(
                f"initial_warmup and final_warmup must be >= 0 with a sum below 1 (time left to "
                f"prune), got {self.initial_warmup} + {self.final_warmup}")
        for name in ("beta_importance", "beta_uncertainty"):
            if not 0 <= getattr(self, name) < 1:
                raise BaselineError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_length < 2:
            raise BaselineError(f"max_length must be >= 2 tokens, got {self.max_length}")


# ------------------------------------------------------------------------------ formulas
def pins_score(weight: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """PINS' importance ``|-w*g + lr*g^2|`` of each weight (one step's sample)."""
    return (-weight * grad + lr * grad * grad).abs()


def update_ema(importance: torch.Tensor, uncertainty: torch.Tensor, score: torch.Tensor,
               beta_importance: float = 0.85, beta_uncertainty: float = 0.99
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One smoothing step: ``I' = bi*I + (1-bi)*s`` and ``U' = bu*U + (1-bu)*|s - I'|``."""
    new_importance = beta_importance * importance + (1 - beta_importance) * score
    new_uncertainty = (beta_uncertainty * uncertainty
                       + (1 - beta_uncertainty) * (score - new_importance).abs())
    return new_importance, new_uncertainty


def remaining_ratio(step: int, total_steps: int, final_ratio: float, warmup_steps: int,
                    final_steps: int) -> float:
    """Fraction of the pruned weights kept after optimizer step `step` (1-based): 1 during
    the first `warmup_steps`, ``r_f + (1 - r_f)*(1 - progress)^3`` while pruning, `final_ratio`
    (r_f) in the last `final_steps`; progress runs from 0 to 1 between the two."""
    if step <= warmup_steps:
        return 1.0
    span = total_steps - warmup_steps - final_steps
    if step > total_steps - final_steps or span <= 0:
        return final_ratio
    progress = (step - warmup_steps) / span
    return final_ratio + (1 - final_ratio) * (1 - progress) ** 3


def self_distillation_weight(student_logits: torch.Tensor) -> torch.Tensor:
    """Per-example weight ``a = 1 - H(p)/log(C)`` of the distillation term, p the student's
    (detached, T=1) class probabilities: confident students lean on the teacher."""
    logp = F.log_softmax(student_logits.detach().float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return 1 - entropy / math.log(student_logits.shape[-1])


def self_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           labels: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Mean over the batch of ``a*KL(p_t^T || p_s^T) + (1-a)*CE(student, y)``, with
    :func:`self_distillation_weight` a. Regression (one output): a = 1/2, MSE to the teacher
    and to y."""
    if student_logits.shape[-1] == 1:
        return 0.5 * F.mse_loss(student_logits, teacher_logits) + 0.5 * F.mse_loss(
            student_logits.squeeze(-1), labels.float())
    t = temperature
    log_s = F.log_softmax(student_logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    ce = F.cross_entropy(student_logits, labels, reduction="none")
    a = self_distillation_weight(student_logits)
    return (a * kl + (1 - a) * ce).mean()


# ------------------------------------------------------------------------------ pruning state
def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight matrices PINS prunes: attention Q/K/V/output and FFN up/down, every layer."""
    return {n: p for n, p in model.named_parameters() if _PRUNED.fullmatch(n)}


class Pruner:
    """Scores, masks and the global threshold over `weights` (name -> parameter).

    Call :meth:`accumulate` after each backward pass (before the optimizer step, while the
    gradients are there), :meth:`prune` to recompute the masks at a kept ratio, and
    :meth:`apply` after each optimizer step.
    """

    def __init__(self, weights: dict[str, nn.Parameter], importance: str = "pins",
                 window: int = 10, beta_importance: float = 0.85,
                 beta_uncertainty: float = 0.99) -> None:
        if importance not in IMPORTANCES:
            raise BaselineError(f"importance must be one of {', '.join(IMPORTANCES)}")
        self.weights = weights
        self.importance_kind = importance
        self.window = window
        self.betas = (beta_importance, beta_uncertainty)
        self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in weights.items()}
        self.total = sum(p.numel() for p in weights.values())
        self.window_steps = 0
        self.updates = 0
        """Score updates so far (one per full window)."""
        if importance == "pins":
            self.window_sum = {n: torch.zeros_like(p) for n, p in weights.items()}
            self.importance = {n: torch.zeros_like(p) for n, p in weights.items()}
            self.uncertainty = {n: torch.zeros_like(p) for n, p in weights.items()}

    @torch.no_grad()
    def accumulate(self, lr: float) -> bool:
        """Add this step's PINS scores to the window; at a full window, average it into the
        EMAs. Returns True when the scores changed. No-op for magnitude importance."""
        if self.importance_kind != "pins":
            return False
        for name, p in self.weights.items():
            if p.grad is not None:
                self.window_sum[name] += pins_score(p.detach(), p.grad.detach(), lr)
        self.window_steps += 1
        if self.window_steps < self.window:
            return False
        for name in self.weights:
            mean = self.window_sum[name] / self.window_steps
            self.importance[name], self.uncertainty[name] = update_ema(
                self.importance[name], self.uncertainty[name], mean, *self.betas)
            self.window_sum[name].zero_()
        self.window_steps = 0
        self.updates += 1
        return True

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        """Current score of every weight: ``I*U`` (pins) or ``|w|`` (magnitude)."""
        if self.importance_kind == "magnitude":
            return {n: p.detach().abs() for n, p in self.weights.items()}
        return {n: self.importance[n] * self.uncertainty[n] for n in self.weights}

    @torch.no_grad()
    def prune(self, ratio: float) -> None:
        """Keep exactly ``round(ratio * total)`` weights, those of the highest scores over all
        tensors (ties broken by position), and zero the rest."""
        scores = self.scores()
        flat = torch.cat([scores[n].flatten().float() for n in self.weights])
        keep = int(round(ratio * self.total))
        if keep >= self.total:
            kept = torch.ones_like(flat, dtype=torch.bool)
        elif keep <= 0:
            kept = torch.zeros_like(flat, dtype=torch.bool)
        else:
            threshold = flat.kthvalue(self.total - keep).values
            kept = flat > threshold
            missing = keep - int(kept.sum())
            if missing > 0:
                ties = (flat == threshold).nonzero().flatten()[:missing]
                kept[ties] = True
        offset = 0
        for name, p in self.weights.items():
            self.masks[name] = kept[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every masked weight (after each optimizer step)."""
        for name, p in self.weights.items():
            p.masked_fill_(~self.masks[name], 0.0)

    @property
    def pruned(self) -> int:
        """Number of weights masked to 0."""
        return sum(int((~m).sum()) for m in self.masks.values())

    @property
    def sparsity(self) -> float:
        """Fraction of the prunable weights masked to 0."""
        return self.pruned / self.total


class TeacherSnapshot:
    """The self-regularization teacher: a frozen copy of the latest best checkpoint."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.best: float | None = None
        """Best dev metric offered so far (None: the teacher is still the starting model)."""
        self.step = 0
        """Step at which the current teacher was taken (0: the starting model)."""
        self.replacements = 0

    @torch.no_grad()
    def offer(self, model: nn.Module, metric: float, step: int) -> bool:
        """Make `model` (at `step`, with dev `metric`, higher is better) the teacher if its
        metric beats the best so far (or it is the first offer); returns whether it did."""
        if self.best is not None and not metric > self.best:
            return False
        self.model.load_state_dict(model.state_dict())
        self.best, self.step = float(metric), step
        self.replacements += 1
        return True

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).logits.float()


# ------------------------------------------------------------------------------ training
def prune_model(model, task: data_lib.TaskData, tokenizer: Any, sparsity: float,
                opts: Options,
                on_step: Callable[[int, Pruner, TeacherSnapshot | None], None] | None = None,
                ) -> dict[str, Any]:
    """Prune `model` in place to `sparsity` while training it on `task` with PINS through a
    DeepSpeed engine; `on_step(step, pruner, teacher)` is called after each optimizer step
    (masks applied, teacher updated). Returns facts of the run (steps, pruned count, teacher
    updates)."""
    def epoch_loader(epoch: int):
        return data_lib.make_loader(task.train, tokenizer, opts.batch_size, shuffle=True,
                                    seed=opts.seed * 100_003 + epoch)

    total = opts.max_steps or max(1, math.ceil(opts.epochs * len(epoch_loader(0))))
    warmup_steps = int(opts.initial_warmup * total)
    final_steps = int(opts.final_warmup * total)
    train_opts = TrainOptions(max_steps=total, batch_size=opts.batch_size, lr=opts.lr,
                              weight_decay=opts.weight_decay, warmup_ratio=opts.warmup_ratio,
                              seed=opts.seed, zero_stage=0, precision="fp32")
    torch.manual_seed(opts.seed)
    model.reset_super_network()
    model.train()
    engine, _ = make_engine(model, train_opts, total)
    module, device = engine.module, engine.device
    pruner = Pruner(prunable_weights(module), opts.importance, opts.window,
                    opts.beta_importance, opts.beta_uncertainty)
    teacher = TeacherSnapshot(module) if opts.self_distillation else None
    # checkpoints are chosen on the end of the shuffled validation split, not on the
    # examples a NAS search with the same seed scores its sub-networks on (its start)
    dev = selection_subset(task.valid, opts.seed, opts.eval_examples)
    dev_loader = data_lib.make_loader(dev, tokenizer, 64)
    stream = batches(epoch_loader, 0, 0, 1)
    masked_at: tuple[float, int] | None = None  # (ratio, score updates) of the current masks
    t0, loss_sum, losses = time.perf_counter(), 0.0, 0
    for step in range(1, total + 1):
        _, batch = next(stream)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = engine(**batch).logits.float()
        if teacher is not None:
            loss = self_distillation_loss(logits, teacher.logits(batch), batch["labels"],
                                          opts.temperature)
        else:
            loss = task_loss(logits, batch["labels"])
        engine.backward(loss)
        lr = engine.optimizer.param_groups[0]["lr"]  # this update's learning rate
        pruner.accumulate(lr)
        engine.step()
        ratio = remaining_ratio(step, total, 1 - sparsity, warmup_steps, final_steps)
        due = step % opts.window == 0 or step > total - final_steps or step == total
        if ratio < 1 and due and masked_at != (ratio, pruner.updates):
            pruner.prune(ratio)
            masked_at = (ratio, pruner.updates)
        pruner.apply()
        loss_sum, losses = loss_sum + loss.item(), losses + 1
        if teacher is not None and step > warmup_steps and (
                step % opts.eval_every == 0 or step == total):
            metric = evaluate(module, dev_loader, task.spec)["metric"]
            if teacher.offer(module, metric, step):
                log.info("step %d: dev %s %.4f is the best so far; it is the teacher now",
                         step, task.spec.metric, metric)
        if on_step is not None:
            on_step(step, pruner, teacher)
        if step % opts.log_every == 0 or step == total:
            log.info("%s s=%.2f step %d/%d  loss %.4f  sparsity %.4f  lr %.2e  %.1f s",
                     opts.importance, sparsity, step, total, loss_sum / losses,
                     pruner.sparsity, lr, time.perf_counter() - t0)
            loss_sum, losses = 0.0, 0
    module.eval()
    return {"steps": total, "pruned": pruner.pruned, "prunable": pruner.total,
            "sparsity": pruner.sparsity,
            "teacher_replacements": teacher.replacements if teacher else 0,
            "teacher_step": teacher.step if teacher else None}


def run(teacher_dir: str | os.PathLike, task: data_lib.TaskData, tokenizer: Any,
        out_dir: str | os.PathLike, opts: Options, *, done: Collection[str] = (),
        on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Prune the teacher at `teacher_dir` to each of `opts.sparsities` (one run each), save
    every model (dense-shaped, with zeros) to ``out_dir/<trial_id>/`` and return one
    evaluation row per model trained now (validation split; params = all parameters minus the
    pruned weights; FLOPs of the dense model that is stored). Models whose trial id is in
    `done` (already stored) are not trained again; `on_row` gets each new row as soon as its
    model is saved."""
    from nas_prune.export import export_sub_network

    started = time.perf_counter()
    method = "pins" if opts.importance == "pins" else "magnitude"
    rows = []
    for sparsity in opts.sparsities:
        pct = int(round(100 * sparsity))
        trial_id = f"{method}-s{pct}"
        if trial_id in done:
            continue
        run_started = time.perf_counter()
        model, meta = load_checkpoint(teacher_dir)
        check_teacher(meta, model.config.num_labels, task, teacher_dir)
        dense_params = model.num_params()
        facts = prune_model(model, task, tokenizer, sparsity, opts)
        t_eval = time.perf_counter()
        scores = evaluate(model, data_lib.make_loader(task.valid, tokenizer, 64),
                                    task.spec)
        eval_time = time.perf_counter() - t_eval
        params = dense_params - facts["pruned"]
        flops = model.flops(seq_len=128)
        export_sub_network(model, model.full_sub_network, Path(out_dir) / trial_id, tokenizer,
                           metadata={"method": method, "params": params,
                                     "params_ratio": params / dense_params, **facts,
                                     "target_sparsity": sparsity, "task": task.spec.name,
                                     "teacher": str(teacher_dir), "valid": scores})
        row = {
            "method": method, "task": task.spec.name, "model": str(meta.get("base_model", "")),
            "seed": opts.seed, "trial_id": trial_id, "config": {"sparsity_pct": pct},
            "fidelity": float(facts["steps"]), "fidelity_unit": "steps",
            "error": scores["error"], "metric_name": task.spec.metric,
            "metric_value": scores["metric"], "params": params,
            "params_ratio": params / dense_params, "flops": flops,
            "wall_time_s": time.perf_counter() - started, "eval_time_s": eval_time,
            "train_examples": facts["steps"] * opts.batch_size,
            "train_time_s": t_eval - run_started,
            "status": "ok",
            "message": (f"{opts.importance} importance, sparsity {facts['sparsity']:.4f} of "
                        f"{facts['prunable']:,} encoder weights"
                        + (f", teacher replaced {facts['teacher_replacements']} times (last at "
                           f"step {facts['teacher_step']})" if opts.self_distillation else "")),
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
        log.info("%s: %s %.4f at sparsity %.4f", trial_id, task.spec.metric, scores["metric"],
                 facts["sparsity"])
    return rows
