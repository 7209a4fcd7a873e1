"""GRAIN: gradient-based intra-attention structured pruning with knowledge distillation.

Yang, Cui, Yao, Wang, "Gradient-based Intra-attention Pruning on Pre-trained Language Models",
ACL 2023 (arXiv 2212.07634); METHODS.md section 3. The student starts as a copy of the
fine-tuned (dense, frozen) teacher and is trained through a DeepSpeed engine while its units
are pruned away:

* **Units** (per layer): FFN neurons (an intermediate row + bias and an output column),
  query/key dimensions of each head (a Q row + a K row, with biases) and value/output
  dimensions of each head (a V row + bias and an output-projection column).
* **Importance**: the first-order Taylor score ``|sum(grad * W)|`` over each unit's weights,
  smoothed by an EMA ``I <- beta * I + (1 - beta) * R * s`` (beta 0.998). The score needs no
  weight gradient: for the rows of ``y = W x + b`` it equals ``sum_tokens dL/dy * y`` and for
  the columns of ``z = W c`` it equals ``sum_tokens dL/dc * c``, so it is read from the
  activations (ZeRO stages 0-2; ZeRO-3 partitions the weights that backward needs).
* **Structure regularization** ``R``: an attention unit's update is scaled by
  ``tanh(rho_head / alpha) * tanh(rho_attention / alpha)``, an FFN neuron's by
  ``tanh(rho_ffn / alpha)``, where rho_head is the fraction of its head's unit parameters
  (Q/K and V/O dims) still kept, rho_attention the same over the layer's attention block and
  rho_ffn the fraction of the layer's FFN neurons still kept. Sparse heads and blocks so lose
  importance and go whole, leaving regular shapes.
* **Ranking**: every kept unit of every type in one global list, sorted by importance per
  parameter (importance / the unit's parameter count); units are kept in that order until
  their parameters fill the budget ``ratio * prunable encoder parameters``. Masks only shrink,
  and a head without V/O dims loses its Q/K dims too.
* **Gradient separation**: importance comes from the logit-distillation loss alone
  (``T^2 * CE(student / T, softmax(teacher / T)) + CE(student, y)``, T = 8), taken before the
  hidden-state loss (MSE between each layer's student output, through a learned linear
  projection, and the teacher's, over real tokens) is back-propagated; the weights are then
  updated with the gradient of the sum.
* **Schedule** (`schedule`): dense until 20% of the steps, then the kept ratio falls cubically
  to the target at 40%, fixed afterwards. Importance is gathered only until the target is
  reached.

The *encoder weight ratio* counts the prunable weights: Q, K, V, output-projection and FFN
matrices with the unit biases; LayerNorms and the output projections' biases stay and are
counted in `params`. Each target ratio is one run from the teacher (faithful to the paper's
20%/40% schedule for every target, at the cost of one training per target). Each pruned model
is physically smaller (`grain_model`), saved under ``out_dir/grain-r<target>/`` and loads with
``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nas_prune import data as data_lib
from nas_prune.baselines.grain_model import GrainConfig, GrainForSequenceClassification, Masks
from nas_prune.checkpoint import check_teacher, load_checkpoint
from nas_prune.engine import autocast, init_distributed, make_engine
from nas_prune.errors import BaselineError, NasPruneError
from nas_prune.export import save_model_dir
from nas_prune.options import TrainOptions
from nas_prune.train import hidden_mse, kd_loss

log = logging.getLogger(__name__)

UNIT_KINDS = ("qk", "vo", "ffn")
"""GRAIN's unit types: query/key dims, value/output dims (per head) and FFN neurons."""


class GrainError(BaselineError):
    """GRAIN cannot run as asked (bad option, unsuitable teacher); the message says what to do."""


@dataclass
class Options:
    """GRAIN's settings (defaults from the paper where it gives them)."""

    target_ratios: list[float] = field(default_factory=lambda: [0.05])
    """Fractions of prunable encoder weights to keep, one pruned model (and run) each; the
    paper's main setting keeps 5%."""
    epochs: float = 20.0
    """Passes over the training split per run (fractions allowed); `max_steps` overrides."""
    max_steps: int | None = None
    """Optimizer steps per run (overrides `epochs`)."""
    batch_size: int = 32
    """Examples per batch."""
    lr: float = 3e-5
    """Peak learning rate (AdamW, linear warm-up then linear decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear learning-rate warm-up."""
    seed: int = 0
    """Seed of data order and dropout."""
    max_length: int = 128
    """Tokens per example after truncation (the caller tokenises with it)."""
    temperature: float = 8.0
    """Temperature T of the logit-distillation loss."""
    hidden_loss_weight: float = 1.0
    """Weight of the hidden-state matching loss (MSE through learned projections); 0 turns
    it off."""
    ema_beta: float = 0.998
    """EMA factor of the importance scores."""
    alpha: float = 0.3
    """Structure regularization strength: updates are scaled by tanh(density / alpha); a
    smaller alpha regularizes less."""
    start: float = 0.2
    """Fraction of training after which pruning starts."""
    end: float = 0.4
    """Fraction of training at which the target ratio is reached."""
    prune_every: int = 1
    """Update the masks every this many steps between `start` and `end`."""
    log_every: int = 10
    """Log progress every this many steps."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-2; ZeRO-3 is not supported)."""
    precision: str = "auto"
    """"auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16" (on a CPU: bf16 autocast around fp32
    weights, faster where the CPU has AVX512-BF16 or AMX)."""
    variant: str = "reference"
    """"reference": as the authors' GLUE scripts run it (logit distillation as soft
    cross-entropy at T without the T^2 factor and without hard-label CE; importance read on one
    side of each unit -- query rows, output-projection columns, FFN output columns; structure
    regularization on value/output units only, by tanh(head V/O density / alpha)); "nas_prune":
    the variant this project used before (T^2-scaled KD + hard-label CE, both sides of each
    unit, head x attention-block and FFN regularization)."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise GrainError(f"variant must be one of {', '.join(VARIANTS)}, got "
                             f"{self.variant!r}")
        if isinstance(self.target_ratios, int | float):
            self.target_ratios = [self.target_ratios]
        self.target_ratios = [float(r) for r in self.target_ratios]
        if not self.target_ratios:
            raise GrainError("target_ratios is empty; give at least one ratio, e.g. [0.1]")
        for r in self.target_ratios:
            if not 0 < r < 1:
                raise GrainError(f"target ratio {r} must lie strictly between 0 and 1 (the "
                                 "fraction of encoder weights kept, e.g. 0.1)")
        if len({trial_id(r) for r in self.target_ratios}) != len(self.target_ratios):
            raise GrainError(f"target_ratios {self.target_ratios} repeat a ratio; give each once")
        for name in ("batch_size", "prune_every", "log_every"):
            if getattr(self, name) < 1:
                raise GrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise GrainError(f"max_steps must be >= 1 (or None to use epochs), got "
                             f"{self.max_steps}")
        if self.epochs <= 0 and self.max_steps is None:
            raise GrainError(f"epochs must be > 0, got {self.epochs}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise GrainError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and "
                             f"{self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise GrainError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length < 2:
            raise GrainError(f"max_length must be >= 2 tokens, got {self.max_length}")
        if self.temperature <= 0:
            raise GrainError(f"temperature must be > 0, got {self.temperature}")
        if self.hidden_loss_weight < 0:
            raise GrainError(f"hidden_loss_weight must be >= 0, got {self.hidden_loss_weight}")
        if not 0 <= self.ema_beta < 1:
            raise GrainError(f"ema_beta must be in [0, 1), got {self.ema_beta}")
        if self.alpha <= 0:
            raise GrainError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.start <= self.end < 1:
            raise GrainError(f"need 0 <= start <= end < 1 (fractions of training), got start="
                             f"{self.start}, end={self.end}; e.g. start=0.2, end=0.4")
        if self.zero_stage not in (0, 1, 2):
            raise GrainError(
                f"zero_stage must be 0, 1 or 2, got {self.zero_stage}: GRAIN's importance "
                "backward runs outside the engine, where ZeRO-3 does not gather parameters"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise GrainError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


def trial_id(target: float) -> str:
    """The name of the model pruned to `target`, e.g. "grain-r0.10"."""
    return f"grain-r{target:.2f}" if round(target, 2) == target else f"grain-r{target:g}"


def schedule(step: int, total: int, target: float, start: float = 0.2, end: float = 0.4) -> float:
    """Kept encoder-weight ratio at `step` (0-based) of `total`: 1 before `start * total`,
    ``target + (1 - target) * (1 - progress)^3`` while pruning, `target` from `end * total` on."""
    first, last = start * total, end * total
    if step < first:
        return 1.0
    if step >= last:
        return target
    progress = (step - first) / (last - first)
    return target + (1.0 - target) * (1.0 - progress) ** 3


# ----------------------------------------------------------------------------- importance
VARIANTS = ("reference", "nas_prune")
"""GRAIN variants (Options.variant)."""


class Pruner:
    """Importance EMA, structure regularization and masks of a dense model's units.

    Per kind, `keep` (bool) and `score` (float) have shape (layers, heads, head_dim) for "qk"
    and "vo" and (layers, FFN width) for "ffn".
    """

    def __init__(self, config: GrainConfig, ema_beta: float = 0.998, alpha: float = 0.3,
                 variant: str = "reference"):
        if config.qk_dims is not None or config.vo_dims is not None or config.ffn_units is not None:
            raise GrainError("GRAIN prunes a dense model; start from the fine-tuned teacher, not "
                             "an already pruned model")
        layers, heads, dim = config.num_hidden_layers, config.num_attention_heads, config.head_dim
        hidden = config.hidden_size
        self.beta, self.alpha, self.variant = ema_beta, alpha, variant
        self.shape = {"qk": (layers, heads, dim), "vo": (layers, heads, dim),
                      "ffn": (layers, config.intermediate_size)}
        self.size = {"qk": 2 * (hidden + 1), "vo": 2 * hidden + 1, "ffn": 2 * hidden + 1}
        """Parameters per unit: Q and K rows with biases; a V row, its bias and an output
        column; an FFN intermediate row, its bias and an output column."""
        self.keep = {k: torch.ones(s, dtype=torch.bool) for k, s in self.shape.items()}
        self.score = {k: torch.zeros(s) for k, s in self.shape.items()}
        self.total = sum(self.size[k] * math.prod(s) for k, s in self.shape.items())
        self.applied = 1.0
        """The ratio of the last pruning step (1 before any)."""

    # ---------------------------------------------------------------------------- densities
    def kept_ratio(self) -> float:
        """Kept fraction of the prunable encoder weights."""
        return sum(self.size[k] * int(self.keep[k].sum()) for k in UNIT_KINDS) / self.total

    def densities(self) -> dict[str, torch.Tensor]:
        """Kept fraction of unit parameters per head ("head", (layers, heads)), per attention
        block ("attention", (layers,)) and per FFN block ("ffn", (layers,))."""
        qk, vo = self.keep["qk"].float().sum(-1), self.keep["vo"].float().sum(-1)
        dim = self.shape["qk"][-1]
        kept = qk * self.size["qk"] + vo * self.size["vo"]
        full = dim * (self.size["qk"] + self.size["vo"])
        return {"head": kept / full, "attention": kept.sum(-1) / (full * kept.shape[-1]),
                "ffn": self.keep["ffn"].float().mean(-1)}

    def regularizer(self) -> dict[str, torch.Tensor]:
        """Per kind, the factor tanh(density / alpha) that scales importance updates,
        broadcastable to the kind's shape."""
        if self.variant == "reference":  # V/O units only, by their head's V/O density
            vo_density = self.keep["vo"].float().mean(-1)
            return {"qk": torch.ones(1), "vo": torch.tanh(vo_density / self.alpha)[..., None],
                    "ffn": torch.ones(1)}
        d = self.densities()
        attention = torch.tanh(d["head"] / self.alpha) * torch.tanh(d["attention"] / self.alpha
                                                                   )[:, None]
        return {"qk": attention[..., None], "vo": attention[..., None],
                "ffn": torch.tanh(d["ffn"] / self.alpha)[:, None]}

    # ---------------------------------------------------------------------------- scores
    @contextlib.contextmanager
    def capture(self, model: GrainForSequenceClassification) -> Iterator[dict]:
        """Record, during forward passes inside the block, the activations `importance` needs:
        per layer the outputs of the Q, K, V projections and of the FFN's intermediate
        projection, and the inputs of the attention output projection and FFN output
        projection. Blocks a mask removed entirely are not run and record nothing."""
        acts: dict[tuple[int, str], torch.Tensor] = {}

        def recorder(key: tuple[int, str], use_input: bool):
            def hook(_module, args, output):
                acts[key] = args[0] if use_input else output
            return hook

        handles = []
        for i, layer in enumerate(model.layers):
            att, ffn = layer.attention, layer.ffn
            for name, module, use_input in (("q", att.query, False), ("k", att.key, False),
                                            ("v", att.value, False), ("c", att.out, True),
                                            ("u", ffn.up, False), ("h", ffn.down, True)):
                handles.append(module.register_forward_hook(recorder((i, name), use_input)))
        try:
            yield acts
        finally:
            for handle in handles:
                handle.remove()

    def importance(self, loss: torch.Tensor, acts: dict) -> dict[str, torch.Tensor]:
        """This step's Taylor score ``|sum(grad * W)|`` of `loss` for every unit, from
        activations recorded by `capture` (the graph is retained for a later backward)."""
        keys = list(acts)
        grads = torch.autograd.grad(loss, [acts[k] for k in keys], retain_graph=True,
                                    allow_unused=True)
        terms = {}
        for key, grad in zip(keys, grads, strict=True):
            if grad is not None:
                terms[key] = (grad.float() * acts[key].detach().float()).sum(dim=(0, 1)).cpu()
        out = {k: torch.zeros(s) for k, s in self.shape.items()}
        sides = ((("qk", ("q",)), ("vo", ("c",)), ("ffn", ("h",))) if self.variant == "reference"
                 else (("qk", ("q", "k")), ("vo", ("v", "c")), ("ffn", ("u", "h"))))
        for i in range(self.shape["ffn"][0]):
            for kind, names in sides:
                parts = [terms[(i, n)] for n in names if (i, n) in terms]
                if parts:
                    out[kind][i] = sum(parts).abs().view(self.shape[kind][1:])
        return out

    def update(self, raw: dict[str, torch.Tensor]) -> None:
        """Fold one step's scores into the EMA, scaled by the structure regularizer; pruned
        units stay at 0."""
        factor = self.regularizer()
        for kind in UNIT_KINDS:
            score = self.beta * self.score[kind] + (1 - self.beta) * raw[kind] * factor[kind]
            self.score[kind] = score * self.keep[kind]

    # ---------------------------------------------------------------------------- masks
    def prune(self, ratio: float) -> None:
        """Keep the most important units (per parameter, across all kinds) whose parameters
        fit in `ratio` of the prunable encoder weights; only kept units are candidates."""
        kinds = [torch.full((int(self.keep[k].sum()),), j) for j, k in enumerate(UNIT_KINDS)]
        scores = torch.cat([self.score[k][self.keep[k]] / self.size[k] for k in UNIT_KINDS])
        sizes = torch.cat([torch.full((len(t),), self.size[k]) for t, k in
                           zip(kinds, UNIT_KINDS, strict=True)])
        order = torch.argsort(scores, descending=True, stable=True)
        fits = torch.zeros_like(scores, dtype=torch.bool)
        budget = math.floor(ratio * self.total + 1e-6)  # parameters; never above the ratio
        fits[order] = torch.cumsum(sizes[order], 0) <= budget
        start = 0
        for kind, n in zip(UNIT_KINDS, (len(t) for t in kinds), strict=True):
            self.keep[kind][self.keep[kind].clone()] = fits[start:start + n]
            start += n
        # a head that keeps no V/O dimension contributes nothing: its Q/K dims go too
        self.keep["qk"] &= self.keep["vo"].any(-1, keepdim=True)
        for kind in UNIT_KINDS:
            self.score[kind] *= self.keep[kind]
        self.applied = ratio

    def masks(self) -> Masks:
        """The current keep-masks in `GrainForSequenceClassification`'s packed layout."""
        layers = self.shape["ffn"][0]
        return Masks(qk=[self.keep["qk"][i].flatten() for i in range(layers)],
                     vo=[self.keep["vo"][i].flatten() for i in range(layers)],
                     ffn=[self.keep["ffn"][i].clone() for i in range(layers)])


# ----------------------------------------------------------------------------- training
class Distiller(nn.Module):
    """The student plus one learned projection per layer (initialised to the identity) that
    maps its hidden states onto the teacher's; trained together by the DeepSpeed engine.

    The engine hooks the tensors `forward` returns to run its backward bookkeeping (ZeRO
    reduction, gradient scaling) in the next backward through them. Importance needs a
    backward of its own first, so `forward` returns a view of the logits and keeps the
    logits themselves in `logits`: a gradient taken from those leaves the engine's hooks alone.
    """

    def __init__(self, student: GrainForSequenceClassification):
        super().__init__()
        self.student = student
        hidden = student.config.hidden_size
        self.projections = nn.ModuleList(
            nn.Linear(hidden, hidden) for _ in range(student.config.num_hidden_layers)
        )
        with torch.no_grad():
            for p in self.projections:
                p.weight.copy_(torch.eye(hidden))
                p.bias.zero_()
        self.logits: torch.Tensor | None = None

    def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.student(**inputs, output_hidden_states=True)
        self.logits = out.logits
        layers = out.hidden_states[1:]
        projected = [p(h) for p, h in zip(self.projections, layers, strict=True)]
        return out.logits.view_as(out.logits), projected


def distillation_step(engine: Any, teacher: GrainForSequenceClassification,
                      batch: dict[str, torch.Tensor], opts: Options,
                      pruner: Pruner | None) -> dict[str, float]:
    """One GRAIN training step on `batch` through DeepSpeed `engine` (wrapping a Distiller).

    With a `pruner`, the logit loss's importance scores are folded into it first (gradient
    separation); then the total loss (logit + weighted hidden-state loss) is back-propagated
    and the optimizer steps.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), autocast(engine):
        target = teacher(**inputs, output_hidden_states=True)
    capture = pruner.capture(engine.module.student) if pruner else contextlib.nullcontext({})
    with capture as acts:
        logits, hidden = engine(**inputs)

    def logit_loss(student_logits: torch.Tensor) -> torch.Tensor:
        if opts.variant == "nas_prune":
            return kd_loss(student_logits.float(), target.logits.float(), batch["labels"],
                           opts.temperature)
        if student_logits.shape[-1] == 1:  # regression: match the teacher's prediction
            return F.mse_loss(student_logits.float(), target.logits.float())
        t = opts.temperature  # the reference: soft cross-entropy at T, no T^2, no hard labels
        return F.cross_entropy(student_logits.float() / t,
                               F.softmax(target.logits.float() / t, dim=-1))

    if pruner is not None:  # from the logits outside the engine's hooks, see Distiller
        pruner.update(pruner.importance(logit_loss(engine.module.logits), acts))
    engine.module.logits = None
    distil = logit_loss(logits)
    state_loss = hidden_mse(hidden, target.hidden_states[1:], batch.get("attention_mask"))
    engine.backward(distil + opts.hidden_loss_weight * state_loss)
    engine.step()
    return {"logit_loss": distil.item(), "hidden_loss": state_loss.item()}


def _batches(task: data_lib.TaskData, tokenizer: Any, opts: Options) -> Iterator[dict]:
    for epoch in itertools.count():
        yield from data_lib.make_loader(task.train, tokenizer, opts.batch_size, shuffle=True,
                                        seed=opts.seed * 100_003 + epoch)


def total_steps(task: data_lib.TaskData, opts: Options) -> int:
    """Optimizer steps of one run: `max_steps`, else `epochs` passes over the training split."""
    per_epoch = math.ceil(len(task.train) / opts.batch_size)
    return opts.max_steps or max(1, math.ceil(opts.epochs * per_epoch))


def prune_to(teacher: GrainForSequenceClassification, task: data_lib.TaskData, tokenizer: Any,
             opts: Options, target: float) -> tuple[GrainForSequenceClassification, Pruner, int]:
    """Distil and prune a copy of the dense `teacher` down to `target` of its prunable
    encoder weights; returns the physically pruned model, the pruner and the steps run."""
    init_distributed()
    if torch.distributed.get_world_size() != 1:
        raise GrainError("GRAIN runs on one worker; launch it without a multi-worker group")
    total = total_steps(task, opts)
    train_opts = TrainOptions(
        epochs=opts.epochs, max_steps=total, batch_size=opts.batch_size, lr=opts.lr,
        weight_decay=opts.weight_decay, warmup_ratio=opts.warmup_ratio,
        max_length=opts.max_length, seed=opts.seed, zero_stage=opts.zero_stage,
        precision=opts.precision,
    )
    torch.manual_seed(opts.seed)
    distiller = Distiller(copy.deepcopy(teacher).requires_grad_(True)).train()
    pruner = Pruner(teacher.config, opts.ema_beta, opts.alpha, opts.variant)
    engine, _ = make_engine(distiller, train_opts, total)
    student = engine.module.student
    dtype = next(student.parameters()).dtype
    teacher = teacher.to(engine.device, dtype).eval()
    stream = _batches(task, tokenizer, opts)
    t0 = time.perf_counter()
    for step in range(total):
        ratio = target if step == total - 1 else schedule(step, total, target, opts.start,
                                                          opts.end)
        if ratio < pruner.applied and (step % opts.prune_every == 0 or ratio == target):
            pruner.prune(ratio)
            student.set_masks(pruner.masks())
        batch = {k: v.to(engine.device) for k, v in next(stream).items()}
        collect = pruner.applied > target  # importance matters until the target is reached
        losses = distillation_step(engine, teacher, batch, opts, pruner if collect else None)
        if (step + 1) % opts.log_every == 0 or step + 1 == total:
            log.info("grain r=%g step %d/%d  logit loss %.4f  hidden loss %.4f  kept %.3f of "
                     "encoder weights  %.1f steps/s", target, step + 1, total,
                     losses["logit_loss"], losses["hidden_loss"], pruner.kept_ratio(),
                     (step + 1) / max(1e-9, time.perf_counter() - t0))
    return student.prune(pruner.masks()).eval(), pruner, total


# ----------------------------------------------------------------------------- entry point
@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Any, tokenizer: Any, spec: data_lib.TaskSpec,
             batch_size: int) -> dict[str, float]:
    """Metric and error of `model` on a tokenised split."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for batch in data_lib.make_loader(dataset, tokenizer, batch_size):
        labels.append(batch.pop("labels"))
        logits.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    metric = data_lib.compute_metric(spec, torch.cat(logits).numpy(), torch.cat(labels).numpy())
    return {"metric": metric, "error": data_lib.error_from_metric(metric)}


def load_teacher(teacher_dir: str | os.PathLike, task: data_lib.TaskData
                 ) -> tuple[GrainForSequenceClassification, dict[str, Any]]:
    """The fine-tuned teacher at `teacher_dir` as a dense GRAIN model, and its metadata."""
    try:
        encoder, meta = load_checkpoint(teacher_dir)
        check_teacher(meta, encoder.config.num_labels, task, teacher_dir)
    except NasPruneError as e:
        raise GrainError(str(e)) from e
    if encoder.config.layer_heads is not None or encoder.config.layer_units is not None:
        raise GrainError(f"{teacher_dir} holds a pruned sub-network; GRAIN starts from the "
                         "dense fine-tuned teacher (`nas-prune finetune`)")
    teacher = GrainForSequenceClassification.from_encoder(encoder).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, meta


def run(teacher_dir: str | os.PathLike, task: data_lib.TaskData, tokenizer: Any,
        out_dir: str | os.PathLike, opts: Options, *, done: Collection[str] = (),
        on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Prune the fine-tuned teacher at `teacher_dir` with GRAIN, once per target ratio.

    Args:
        teacher_dir: teacher checkpoint written by `nas_prune.train.finetune`.
        task: the task, tokenised (`nas_prune.data.tokenize`) with `opts.max_length`.
        tokenizer: saved beside every pruned model; pads batches.
        out_dir: each pruned model goes to ``out_dir/<trial_id>/``.
        opts: GRAIN options.
        done: trial ids of models already stored: not trained again.
        on_row: called with each new model's row as soon as the model is saved.

    Returns:
        One row per target trained now (see `nas_prune.baselines.ROW_KEYS`), scored on
        `task.valid`.
    """
    teacher, meta = load_teacher(teacher_dir, task)
    dense_params = teacher.num_params()
    rows = []
    for target in opts.target_ratios:
        name = trial_id(target)
        if name in done:
            continue
        start = time.perf_counter()
        small, pruner, steps = prune_to(teacher, task, tokenizer, opts, target)
        t_eval = time.perf_counter()
        valid = evaluate(small, task.valid, tokenizer, task.spec, opts.batch_size)
        eval_time = time.perf_counter() - t_eval
        c = small.config
        ratio = pruner.kept_ratio()
        params = small.num_params()
        # the results store takes flat dict[str, int] configs (cfg_<key> columns): ratios in
        # per mille; the per-layer shape goes to the exported model's metadata
        config = {"target_permille": round(target * 1000), "encoder_permille": round(ratio * 1000)}
        shape = {
            "target_ratio": target,
            "encoder_ratio": ratio,
            "encoder_params_ratio": small.num_params(encoder_only=True)
            / teacher.num_params(encoder_only=True),
            "heads": [len(v) for v in c.vo_dims],
            "qk_dims": [sum(q) for q in c.qk_dims],
            "vo_dims": [sum(v) for v in c.vo_dims],
            "ffn_units": list(c.ffn_units),
        }
        message = (f"kept {ratio:.2%} of prunable encoder weights (target {target:.2%}); heads "
                   f"per layer {shape['heads']}, FFN units per layer {shape['ffn_units']}")
        info = {"method": "grain", **shape, "qk_dims_per_head": c.qk_dims,
                "vo_dims_per_head": c.vo_dims, "params": params,
                "params_ratio": params / dense_params, "flops": small.flops(128),
                "flops_seq_len": 128, "teacher": str(teacher_dir), "steps": steps,
                "metric_name": task.spec.metric, "metric_value": valid["metric"]}
        save_model_dir(small, Path(out_dir) / name, tokenizer, info)
        row = {
            "method": "grain", "task": task.spec.name, "model": meta.get("base_model"),
            "seed": opts.seed, "trial_id": name, "config": config, "fidelity": steps,
            "fidelity_unit": "steps", "error": valid["error"], "metric_name": task.spec.metric,
            "metric_value": valid["metric"], "params": params,
            "params_ratio": params / dense_params, "flops": small.flops(128),
            "wall_time_s": time.perf_counter() - start, "eval_time_s": eval_time,
            "train_examples": steps * opts.batch_size, "train_time_s": t_eval - start,
            "status": "ok", "message": message,
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
        log.info("grain %s: %s %.4f, %s, %d params (%.3f of dense)", name, task.spec.metric,
                 valid["metric"], message, params, params / dense_params)
    return rows
