"""Fine-tune the dense teacher and train the weight-sharing supernet, through DeepSpeed.

Both are one loop around the engine of nas_prune.engine.make_engine (Klein et al. 2024, section
4.1): fine-tuning is the `standard` strategy on the full network; supernet training starts from
the fine-tuned teacher and updates sub-networks each step as its strategy says
(nas_prune.strategies). Sub-networks that distil use `kd_loss`:
T^2 * CE(student / T, softmax(teacher / T)) + CE(student, y), and MSE to the teacher plus MSE to
y for regression. For language modelling (decoders, logits per token) both losses are taken at
every predicted token: the next-token cross-entropy, and the distillation over the vocabulary.

Every pass of a step is one DeepSpeed micro-step on the same batch: the engine's
`gradient_accumulation_steps` is the strategy's passes per step times the user's accumulation,
so gradients of all passes are accumulated (and, with several workers, reduced) before one
optimizer step, for every ZeRO stage. With several workers the same loop runs inside Ray
Train's `TorchTrainer` (`train_distributed`). Checkpoints (nas_prune.checkpoint) are written at
the end and every `checkpoint_every` steps; an interrupted run resumes from the last one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nas_prune import data as data_lib
from nas_prune.checkpoint import (
    DEEPSPEED_DIR,
    check_teacher,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    write_meta,
)
from nas_prune.engine import make_engine, zero_stage
from nas_prune.errors import TrainingError
from nas_prune.evaluate import evaluate
from nas_prune.models import family_space, load_pretrained, rewire
from nas_prune.options import FinetuneOptions, SupernetOptions, TaskOptions, TrainOptions
from nas_prune.space import make_space
from nas_prune.strategies import StepContext, make_strategy

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- losses
def next_token_pairs(logits: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Language modelling: (logits of positions 0..T-2, the tokens 1..T-1 they predict),
    flattened, without positions labelled -100."""
    logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    keep = labels != -100
    return logits[keep], labels[keep]


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, MSE for a regression head of one output, or (logits per token) the
    next-token cross-entropy."""
    if logits.dim() == 3:
        return F.cross_entropy(*next_token_pairs(logits, labels))
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor] | tuple[torch.Tensor, ...],
               attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over matched layer pairs of the MSE between student and teacher hidden states,
    over real (non-padding) tokens: the hidden-state distillation term of refine and GRAIN."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        squared = (s.float() - t.float()).pow(2).mean(-1)
        if attention_mask is None:
            losses.append(squared.mean())
        else:
            mask = attention_mask.float()
            losses.append((squared * mask).sum() / mask.sum().clamp(min=1))
    return torch.stack(losses).mean()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """In-place distillation loss of a sub-network from the full network's detached logits:
    T^2 * CE(student / T, softmax(teacher / T)) + CE(student, y); for regression MSE to the
    teacher plus MSE to y; for language modelling the same at every predicted token."""
    if student.dim() == 3:
        student, next_tokens = next_token_pairs(student, labels)
        teacher, _ = next_token_pairs(teacher, labels)
        labels = next_tokens
    elif student.shape[-1] == 1:  # regression
        return F.mse_loss(student, teacher) + F.mse_loss(student.squeeze(-1), labels.float())
    t = temperature
    soft = F.cross_entropy(student / t, F.softmax(teacher / t, dim=-1)) * t * t
    return soft + F.cross_entropy(student, labels)


# ------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    losses: list[float]
    """Mean loss of each step run in this call."""
    valid: dict[str, float] | None
    seconds: float
    examples_per_second: float


def batches(make_epoch_loader: Callable[[int], Any], start: int, rank: int, world: int):
    """(epoch, batch) for this rank, from this rank's batch `start` on, forever. Each epoch's
    order depends only on the epoch number, so a resumed run sees the same batches."""
    per_epoch = len(make_epoch_loader(0)) // world
    epoch, skip = divmod(start, per_epoch)
    while True:
        for i, batch in enumerate(make_epoch_loader(epoch)):
            if i // world >= per_epoch:
                break
            if i % world == rank and i // world >= skip:
                yield epoch, batch
        epoch, skip = epoch + 1, 0


def budget_sampler(model: Any, space: Any, budgets: list[float], band: float, seed: int,
                   pool: int = 512) -> Callable[[np.random.Generator], Any]:
    """Random sub-networks at the user's budgets (SupernetOptions.budgets): a budget uniformly,
    then a sub-network uniformly from a pool of up to `pool` distinct ones of `space` whose
    params ratio lies in (budget - band, budget] (drawn once, seeded, so a resumed run draws
    the same). A budget no sub-network of the space fits is an error before training."""
    rng = np.random.default_rng([seed, 2])
    pools = []
    for budget in budgets:
        configs = space.sample_below(rng, model, budget, band, pool, tries=50_000)
        if not configs:
            raise TrainingError(f"supernet: no sub-network of the {space.name} space found with "
                                f"a params ratio in ({budget - band:.3f}, {budget:.3f}]; widen "
                                "supernet.budget_band or change supernet.budgets")
        pools.append([space.to_sub_network(c) for c in configs])
    log.info("supernet: random sub-networks drawn at the budgets %s (band %.3f; %s distinct "
             "each)", budgets, band, [len(p) for p in pools])

    def sample(step_rng: np.random.Generator) -> Any:
        chosen = pools[int(step_rng.integers(len(pools)))]
        return chosen[int(step_rng.integers(len(chosen)))]

    return sample


def train(
    model: Any,
    task: data_lib.TaskData,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    opts: TrainOptions,
    *,
    meta: dict[str, Any] | None = None,
    stop_after: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `model` on tokenised `task` with DeepSpeed and strategy `opts.strategy`; write a
    checkpoint to `out_dir`. If `out_dir` holds a checkpoint of an unfinished run with the same
    options, training resumes from it (same data order, no step repeated or lost).

    Args:
        model: the network to train (the fine-tuned teacher for supernet training).
        task: tokenised task data (see `nas_prune.data.tokenize`).
        tokenizer: saved with the checkpoint; pads batches.
        out_dir: checkpoint directory.
        opts: training options.
        meta: extra metadata recorded in the checkpoint.
        stop_after: stop (with a checkpoint) after this global step, as if interrupted.
        on_step: called with (step, loss) after each optimizer step.
    """
    start_time = time.perf_counter()
    out = Path(out_dir)
    from nas_prune.engine import init_distributed

    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    strategy = make_strategy(opts.strategy, opts.num_random, opts.temperature)
    # standard training samples no sub-networks (and may train an extracted, smaller model)
    space_name = None if opts.strategy == "standard" else family_space(model.config, opts.space)
    space = None if space_name is None else make_space(space_name, model.config)
    sample = (budget_sampler(model, space, opts.budgets, opts.budget_band, opts.seed)
              if space is not None and getattr(opts, "budgets", None) else None)

    def epoch_loader(epoch: int):
        return data_lib.make_loader(task.train, tokenizer, opts.batch_size, shuffle=True,
                                    seed=opts.seed * 100_003 + epoch)

    per_epoch = len(epoch_loader(0)) // world // opts.gradient_accumulation
    if per_epoch < 1:
        raise TrainingError(
            f"{len(task.train)} training examples are too few for batch size "
            f"{opts.batch_size} x {world} workers x {opts.gradient_accumulation} accumulation"
        )
    total = opts.max_steps or (0 if opts.epochs == 0 else max(1, math.ceil(opts.epochs
                                                                            * per_epoch)))
    if total == 0 and not isinstance(opts, SupernetOptions):
        raise TrainingError("epochs 0 trains nothing; fine-tuning needs epochs > 0 (a "
                            "pre-trained causal LM is taken as the teacher as is by the "
                            "pipeline's finetune.epochs 0)")

    resume = _resumable(out, opts, total)
    torch.manual_seed(opts.seed + rank)  # dropout; a resumed run restores the saved state
    if resume is None and opts.rewire and opts.strategy != "standard":
        rewire_loader = data_lib.make_loader(task.train, tokenizer, opts.batch_size,
                                             shuffle=True, seed=opts.seed + 1)
        chosen = [b for _, b in zip(range(opts.rewire_batches), rewire_loader, strict=False)]
        meta = {**(meta or {}), "hidden_order": rewire(model, chosen)}
        log.info("rewired heads and neurons by importance on %d batches", len(chosen))
    elif resume is not None and "hidden_order" in resume:
        meta = {**(meta or {}), "hidden_order": resume["hidden_order"]}
    base_meta = {
        **(meta or {}),
        "strategy": opts.strategy,
        "space": space_name or opts.space,
        "task_kind": task.spec.kind,
        "family": getattr(model.config, "family", None),
        "options": dataclasses.asdict(opts),
        "total_steps": total,
        "num_labels": model.config.num_labels,
        "world_size": world,
    }
    if total == 0:  # supernet epochs 0: the (rewired) teacher is the supernet, untrained
        return _save_untrained(model, task, tokenizer, out, opts, base_meta, start_time)
    model.train()
    engine, ds_config = make_engine(model, opts, total, strategy.passes_per_step)
    step = 0
    if resume is not None:
        _, client = engine.load_checkpoint(str(out / DEEPSPEED_DIR), load_module_strict=True)
        step = int(client["step"])
        torch.set_rng_state(client["torch_rng"])
        log.info("resumed from %s at step %d / %d", out, step, total)

    device = engine.device
    stream = batches(epoch_loader, step * opts.gradient_accumulation, rank, world)
    losses: list[float] = []
    examples, t0, first_step = 0, time.perf_counter(), step

    zero3 = zero_stage(ds_config) == 3

    def checkpoint(step: int) -> None:
        import deepspeed

        engine.save_checkpoint(
            str(out / DEEPSPEED_DIR), tag=f"step{step}",
            client_state={"step": step, "torch_rng": torch.get_rng_state()},
        )
        params = list(engine.module.parameters())
        gathered = deepspeed.zero.GatheredParameters(params, enabled=zero3)
        with gathered:
            if rank == 0:
                _prune_old_tags(out / DEEPSPEED_DIR, keep=f"step{step}")
                save_checkpoint(out, engine.module, tokenizer,
                                {**base_meta, **cost(), "steps_done": step,
                                 "finished": step >= total})
        torch.distributed.barrier()

    done_before = resume or {}

    def cost() -> dict[str, float]:
        """Training cost so far, resumed parts included: examples processed forward + backward
        (every pass of every step, all workers) and wall time."""
        return {"train_examples": int(done_before.get("train_examples", 0)
                                      + examples * strategy.passes_per_step),
                "train_seconds": float(done_before.get("train_seconds", 0.0)
                                       + time.perf_counter() - start_time)}

    module = engine.module
    while step < total:
        ctx = StepContext(space, np.random.default_rng([opts.seed, step]), step, total, sample)
        step_loss = 0.0
        for _ in range(opts.gradient_accumulation):
            _, batch = next(stream)
            batch = {k: v.to(device) for k, v in batch.items()}
            teacher = None
            for p in strategy.plan(ctx):
                if p.distil and teacher is None:  # kd: the full network teaches, no update
                    module.reset_super_network()
                    with torch.no_grad():
                        teacher = engine(**batch).logits.detach()
                if p.sub is None:
                    module.reset_super_network()
                else:
                    module.set_sub_network(p.sub)
                logits = engine(**batch).logits.float()
                if p.distil:
                    loss = kd_loss(logits, teacher.float(), batch["labels"], strategy.temperature)
                else:
                    loss = task_loss(logits, batch["labels"])
                    if p.sub is None and strategy.kd:  # full/sandwich: reuse the full pass
                        teacher = logits.detach()
                engine.backward(loss)
                engine.step()
                step_loss += loss.item() / strategy.passes_per_step
            examples += len(batch["labels"]) * world  # blocks, for language modelling
        module.reset_super_network()
        step += 1
        losses.append(step_loss / opts.gradient_accumulation)
        if on_step is not None:
            on_step(step, losses[-1])
        if step % opts.log_every == 0 or step == total:
            elapsed = time.perf_counter() - t0
            eta = elapsed / max(1, step - first_step) * (total - step)
            lr = engine.optimizer.param_groups[0]["lr"]
            log.info("step %d/%d  loss %.4f  lr %.2e  %.1f examples/s  ETA %s", step, total,
                     losses[-1], lr, examples / max(1e-9, elapsed),
                     time.strftime("%H:%M:%S", time.gmtime(eta)))
        if step == total or (stop_after is not None and step >= stop_after):
            break
        if opts.checkpoint_every and step % opts.checkpoint_every == 0:
            checkpoint(step)
    checkpoint(step)
    elapsed = time.perf_counter() - t0
    valid = None
    if rank == 0 and step >= total:
        valid_loader = data_lib.make_loader(task.valid, tokenizer, opts.batch_size)
        valid = evaluate(module, valid_loader, task.spec)
        meta_now = {**base_meta, **cost(), "steps_done": step, "finished": True,
                    "valid": valid, "losses": losses}
        write_meta(out, meta_now)
        log.info("validation %s %.4f after %d steps", task.spec.metric, valid["metric"], step)
    return TrainResult(
        checkpoint=out,
        steps=step,
        losses=losses,
        valid=valid,
        seconds=time.perf_counter() - start_time,
        examples_per_second=examples / max(1e-9, elapsed),
    )


def _save_untrained(model: torch.nn.Module, task: data_lib.TaskData, tokenizer: Any, out: Path,
                    opts: TrainOptions, base_meta: dict[str, Any],
                    start_time: float) -> TrainResult:
    """Supernet `epochs` 0: save `model` (the rewired teacher) as a finished supernet that
    cost no training, with its validation score."""
    valid = None
    if torch.distributed.get_rank() == 0:
        model.eval()
        valid = evaluate(model, data_lib.make_loader(task.valid, tokenizer, opts.batch_size),
                         task.spec)
        save_checkpoint(out, model, tokenizer, {
            **base_meta, "steps_done": 0, "train_examples": 0,
            "train_seconds": time.perf_counter() - start_time, "finished": True,
            "valid": valid, "losses": []})
        log.info("supernet: the importance-rewired teacher, untrained (epochs 0); validation "
                 "%s %.4f", task.spec.metric, valid["metric"])
    torch.distributed.barrier()
    return TrainResult(checkpoint=out, steps=0, losses=[], valid=valid,
                       seconds=time.perf_counter() - start_time, examples_per_second=0.0)


def _prune_old_tags(ds_dir: Path, keep: str) -> None:
    for tag in ds_dir.glob("step*"):
        if tag.name != keep:
            shutil.rmtree(tag, ignore_errors=True)


def _resumable(out: Path, opts: TrainOptions, total: int) -> dict | None:
    """Metadata of an unfinished run in `out` to resume, None to start fresh."""
    meta = read_meta(out)
    if not meta or not (out / DEEPSPEED_DIR / "latest").exists():
        return None
    if meta.get("finished"):
        raise TrainingError(
            f"{out} already holds a finished training run; choose another output directory"
        )
    # options added after the run started count as their defaults
    defaults, saved = dataclasses.asdict(type(opts)()), meta.get("options", {})
    changed = sorted(k for k, v in dataclasses.asdict(opts).items()
                     if k not in opts.RESUME_FREE and saved.get(k, defaults[k]) != v)
    if changed or meta.get("total_steps") != total:
        raise TrainingError(
            f"{out} holds an unfinished run with other options ({', '.join(changed) or 'steps'}); "
            "resume with the same options or choose another output directory"
        )
    return meta


# ------------------------------------------------------------------------------- stages
def finetune(
    model_name_or_path: str,
    task: data_lib.TaskData,
    out_dir: str | os.PathLike,
    opts: FinetuneOptions | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> TrainResult:
    """Fine-tune the dense model (the teacher) on `task` with the `standard` strategy."""
    opts = opts or FinetuneOptions()
    tokenizer = tokenizer or data_lib.load_tokenizer(model_name_or_path)
    if read_meta(out_dir):  # an interrupted run: its weights (train() checks its options)
        model, _ = load_checkpoint(out_dir)
    else:
        model = load_pretrained(model_name_or_path, task.spec.kind,
                                num_labels=task.spec.num_labels, pooling=opts.pooling)
    if task.spec.label_names is not None:  # exported models answer with the data's words
        model.config.id2label = dict(enumerate(task.spec.label_names))
        model.config.label2id = {name: i for i, name in enumerate(task.spec.label_names)}
    meta = {"kind": "teacher", "task": task.spec.name, "base_model": str(model_name_or_path),
            "family": model.config.family}
    return train(model, task, tokenizer, out_dir, opts, meta=meta, **kwargs)


def train_supernet(
    teacher_dir: str | os.PathLike,
    task: data_lib.TaskData,
    out_dir: str | os.PathLike,
    opts: SupernetOptions | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Train the weight-sharing supernet, starting from the fine-tuned teacher at
    `teacher_dir`, with strategy `opts.strategy` (default `full`)."""
    opts = opts or SupernetOptions()
    source = Path(out_dir) if read_meta(out_dir) else Path(teacher_dir)
    model, meta = load_checkpoint(source)
    check_teacher(meta, model.config.num_labels, task, source)
    tokenizer = data_lib.load_tokenizer(str(source))
    # absolute: later stages find the teacher from any working directory
    new_meta = {"kind": "supernet", "task": task.spec.name,
                "teacher": str(Path(teacher_dir).resolve()),
                "base_model": meta.get("base_model"), "family": model.config.family}
    return train(model.train(), task, tokenizer, out_dir, opts, meta=new_meta, **kwargs)


# ------------------------------------------------------------------------------- many workers
def _worker(config: dict[str, Any]) -> None:
    """Ray Train worker: load the task, run one training stage, report the result."""
    import ray.train

    logging.basicConfig(level=logging.INFO)
    task = data_lib.load_task(config["task"])
    tokenizer = data_lib.load_tokenizer(config["tokenizer"])
    task = data_lib.tokenize(task, tokenizer, max_length=config["opts"].max_length)
    stage = finetune if config["stage"] == "finetune" else train_supernet
    result = stage(config["source"], task, config["out_dir"], config["opts"], **config["kwargs"])
    metrics = {"steps": result.steps, "examples_per_second": result.examples_per_second}
    if result.losses:
        metrics["final_loss"] = result.losses[-1]
    if result.valid:
        metrics.update({f"valid_{k}": v for k, v in result.valid.items()})
    ray.train.report(metrics)


def train_distributed(
    stage: str,
    source: str | os.PathLike,
    task_options: TaskOptions,
    out_dir: str | os.PathLike,
    opts: TrainOptions,
    num_workers: int = 2,
    use_gpu: bool = False,
    tokenizer: str | None = None,
    storage_path: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run `finetune` (stage "finetune", `source` = pre-trained model) or `train_supernet`
    (stage "supernet", `source` = teacher checkpoint) on `num_workers` Ray Train workers, each
    running the same DeepSpeed training function (data split between workers by rank).

    `out_dir` must be reachable by every worker (a shared filesystem on a cluster). Returns the
    checkpoint's metadata (steps, validation metric, losses of the last call).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if stage not in ("finetune", "supernet"):
        raise TrainingError(f"unknown stage {stage!r}; choose finetune or supernet")
    if num_workers < 1:
        raise TrainingError(f"num_workers must be >= 1, got {num_workers}")
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    need = "GPU" if use_gpu else "CPU"
    if resources.get(need, 0) < num_workers:
        raise TrainingError(
            f"{num_workers} workers need {num_workers} {need}s but the Ray cluster has "
            f"{resources.get(need, 0):g}; lower num_workers or add nodes"
        )
    config = {
        "stage": stage,
        "source": str(source),
        "task": task_options.resolved(),
        "tokenizer": str(tokenizer or source),
        "out_dir": str(Path(out_dir).resolve()),
        "opts": opts,
        "kwargs": kwargs,
    }
    trainer = TorchTrainer(
        _worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"nas_prune_{stage}",
            storage_path=storage_path or str(Path(out_dir).resolve().parent / "ray_train"),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return read_meta(out_dir)
