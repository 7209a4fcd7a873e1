"""Fine-tune the dense teacher and train the weight-sharing supernet, through DeepSpeed.

Both are one loop around a `deepspeed.initialize` engine (Klein et al. 2024, section 4.1):
fine-tuning is the `standard` strategy on the full network; supernet training starts from the
fine-tuned teacher and updates sub-networks each step as its strategy says:

===============  ==========================================================================
standard         the full network
random           k random sub-networks (k = `num_random`, default 1)
random_linear    a random sub-network with probability t/T (rising linearly), else the full one
sandwich         the full network, k random ones (default 2) and the smallest, one update
kd               like random, but each sub-network distils from the full network's detached
                 logits: T^2 * CE(student / T, softmax(teacher / T)) + CE(student, y); MSE
                 to the teacher plus MSE to y for regression
full             sandwich + in-place distillation (the authors' final choice)
===============  ==========================================================================

Every pass of a step is one DeepSpeed micro-step on the same batch: the engine's
`gradient_accumulation_steps` is the strategy's passes per step times the user's accumulation,
so gradients of all passes are accumulated (and, with several workers, reduced) before one
optimizer step, for every ZeRO stage. On CPU the engine runs in-process with gloo and fp32; on
GPUs in bf16 with the configured ZeRO stage; with several workers inside Ray Train's
`TorchTrainer` (`train_distributed`).

A checkpoint directory (`save_checkpoint` / `load_checkpoint`) holds the model in
`save_pretrained` form, the tokenizer, `nas_prune.json` (model, task, space, strategy, options,
steps done) and DeepSpeed's optimizer / scheduler / RNG state for resuming.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nas_prune import data as data_lib
from nas_prune.space import SPACES, SearchSpace, make_space
from nas_prune.supernet import (
    POOLINGS,
    EncoderConfig,
    EncoderForSequenceClassification,
    SubNetwork,
    load_pretrained,
    rewire,
)

log = logging.getLogger(__name__)

CHECKPOINT_META = "nas_prune.json"
DEEPSPEED_DIR = "deepspeed"


class TrainingError(ValueError):
    """Training cannot start as asked (bad strategy, DeepSpeed config, teacher, checkpoint)."""


# ------------------------------------------------------------------------------- strategies
def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels, temperature: float):
    if student.shape[-1] == 1:  # regression
        return F.mse_loss(student, teacher) + F.mse_loss(student.squeeze(-1), labels.float())
    t = temperature
    soft = F.cross_entropy(student / t, F.softmax(teacher / t, dim=-1)) * t * t
    return soft + F.cross_entropy(student, labels)


@dataclass
class StepContext:
    """What a strategy needs to plan one training step."""

    space: SearchSpace | None
    rng: np.random.Generator
    step: int
    total_steps: int


@dataclass(frozen=True)
class Pass:
    """One forward/backward of a step: which sub-network, and whether it distils."""

    sub: SubNetwork | None  # None: the full network
    distil: bool = False


class Strategy:
    """Which sub-networks one training step updates (METHODS.md section 1)."""

    name: str
    kd = False

    def __init__(self, num_random: int | None = None, temperature: float = 1.0):
        self.num_random = self.default_random if num_random is None else int(num_random)
        if self.num_random < 1 and self.default_random > 0:
            raise TrainingError(f"{self.name}: num_random must be >= 1, got {self.num_random}")
        if temperature <= 0:
            raise TrainingError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    default_random = 0

    @property
    def passes_per_step(self) -> int:
        raise NotImplementedError

    def plan(self, ctx: StepContext) -> list[Pass]:
        raise NotImplementedError

    def _random(self, ctx: StepContext) -> SubNetwork:
        return ctx.space.to_sub_network(ctx.space.sample(ctx.rng))


class Standard(Strategy):
    name = "standard"

    @property
    def passes_per_step(self) -> int:
        return 1

    def plan(self, ctx):
        return [Pass(None)]


class Random(Strategy):
    name = "random"
    default_random = 1

    @property
    def passes_per_step(self) -> int:
        return self.num_random

    def plan(self, ctx):
        return [Pass(self._random(ctx), distil=self.kd) for _ in range(self.num_random)]


class RandomLinear(Strategy):
    name = "random_linear"

    @property
    def passes_per_step(self) -> int:
        return 1

    def plan(self, ctx):
        p = ctx.step / max(1, ctx.total_steps - 1)
        return [Pass(self._random(ctx) if ctx.rng.random() < p else None)]


class Sandwich(Strategy):
    name = "sandwich"
    default_random = 2

    @property
    def passes_per_step(self) -> int:
        return self.num_random + 2

    def plan(self, ctx):
        smallest = ctx.space.to_sub_network(ctx.space.smallest())
        randoms = [Pass(self._random(ctx), distil=self.kd) for _ in range(self.num_random)]
        return [Pass(None), *randoms, Pass(smallest, distil=self.kd)]


class KD(Random):
    name = "kd"
    kd = True


class Full(Sandwich):
    name = "full"
    kd = True


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (Standard, Random, RandomLinear, Sandwich, KD, Full)
}
"""Supernet training strategies by name; the CLI's choices come from here."""


def make_strategy(name: str, num_random: int | None = None, temperature: float = 1.0):
    if name not in STRATEGIES:
        raise TrainingError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](num_random=num_random, temperature=temperature)


# ------------------------------------------------------------------------------- options
@dataclass
class TrainOptions:
    """How to train (fine-tuning and supernet training share these)."""

    strategy: str = "full"
    """One of STRATEGIES; fine-tuning always uses `standard`."""
    space: str = "small"
    """Search space random sub-networks are drawn from."""
    num_random: int | None = None
    """Random sub-networks per step (None: the strategy's default, 1 or 2)."""
    temperature: float = 1.0
    """Distillation temperature T for `kd` and `full`."""
    epochs: float = 3.0
    """Passes over the training split (fractions allowed); `max_steps` overrides."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides `epochs`)."""
    batch_size: int = 32
    """Examples per worker per micro-batch."""
    gradient_accumulation: int = 1
    """Batches per optimizer step (each with all of the strategy's passes)."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear learning-rate warm-up, then linear decay to 0."""
    max_length: int = 128
    """Tokens per example after truncation (batches are padded to their longest example)."""
    seed: int = 0
    """Seed of data order, dropout and sub-network sampling."""
    rewire: bool = True
    """Sort heads and neurons by importance before supernet training (DynaBERT)."""
    rewire_batches: int = 8
    """Training batches used to measure importance for rewiring."""
    log_every: int = 10
    """Log progress every this many steps."""
    checkpoint_every: int | None = None
    """Save a resumable checkpoint every this many steps (None: only at the end)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3)."""
    precision: str = "auto"
    """"auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16"."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Overrides merged into the generated DeepSpeed config (optimizer, scheduler, ZeRO, ...)."""
    pooling: str = "auto"
    """Fine-tuning only: what the new classification head reads, "cls" (first token), "mean"
    (mean of the tokens; depth-reduced sub-networks of mean-pooled sentence encoders such as
    MiniLM keep their accuracy only so) or "auto" (a new head gets the checkpoint's own pooling,
    mean for a mean-pooling sentence-transformers model; a trained classifier keeps cls)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise TrainingError(
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if self.space not in SPACES:
            raise TrainingError(f"unknown space {self.space!r}; choose one of {', '.join(SPACES)}")
        for name in ("batch_size", "gradient_accumulation", "log_every", "rewire_batches"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainingError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs <= 0 and self.max_steps is None:
            raise TrainingError(f"epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            raise TrainingError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise TrainingError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_length < 2:
            raise TrainingError(f"max_length must be >= 2 tokens, got {self.max_length}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainingError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise TrainingError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise TrainingError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.pooling not in ("auto", *POOLINGS):
            raise TrainingError(
                f"pooling must be auto, {' or '.join(POOLINGS)}, got {self.pooling!r}"
            )
        make_strategy(self.strategy, self.num_random, self.temperature)


# ------------------------------------------------------------------------------- DeepSpeed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initialise torch.distributed for DeepSpeed once per process: in-process world size 1
    (gloo on CPU) unless a launcher or Ray Train already set up a process group."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        return
    os.environ.setdefault("LOCAL_RANK", "0")
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        deepspeed.init_distributed(auto_mpi_discovery=False)
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
    )


def _merge(base: dict, override: Mapping) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def deepspeed_config(
    opts: TrainOptions, passes_per_step: int, total_steps: int, world_size: int, use_gpu: bool
) -> dict[str, Any]:
    """The DeepSpeed config for these options, with the user's overrides merged in and checked
    for contradictions (DeepSpeed's own errors on those are cryptic)."""
    bf16 = opts.precision == "bf16" or (opts.precision == "auto" and use_gpu)
    gas = opts.gradient_accumulation * passes_per_step
    config = {
        "train_micro_batch_size_per_gpu": opts.batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": opts.lr, "weight_decay": opts.weight_decay, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": opts.lr,
                "warmup_num_steps": max(1, int(opts.warmup_ratio * total_steps)),
                "total_num_steps": max(2, total_steps),
                "warmup_type": "linear",
            },
        },
        "zero_optimization": {"stage": opts.zero_stage},
        "bf16": {"enabled": bf16},
    }
    config = _merge(config, opts.deepspeed)
    micro = config["train_micro_batch_size_per_gpu"]
    gas = config["gradient_accumulation_steps"]
    if gas % passes_per_step:
        raise TrainingError(
            f"DeepSpeed gradient_accumulation_steps={gas} must be a multiple of the strategy's "
            f"{passes_per_step} passes per step; set TrainOptions.gradient_accumulation instead"
        )
    if "train_batch_size" in config and config["train_batch_size"] != micro * gas * world_size:
        raise TrainingError(
            f"DeepSpeed config contradicts itself: train_batch_size={config['train_batch_size']} "
            f"but micro batch {micro} x accumulation {gas} x {world_size} workers = "
            f"{micro * gas * world_size}; drop train_batch_size or make them agree"
        )
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        raise TrainingError("DeepSpeed config enables both fp16 and bf16; choose one")
    if not use_gpu and (config.get("fp16", {}).get("enabled") or config["bf16"].get("enabled")):
        raise TrainingError("fp16/bf16 training needs a GPU; on CPU use precision='fp32'")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise TrainingError(f"DeepSpeed zero_optimization.stage must be 0-3, got {stage}")
    if not use_gpu:
        config["optimizer"].setdefault("params", {})["torch_adam"] = True
    return config


def _register_sliced_parameters(model: EncoderForSequenceClassification) -> None:
    """ZeRO-3 gathers a module's parameters when that module is called; our attention and FFN
    blocks read their child Linear weights directly (to slice them), so register those as
    the block's external parameters."""
    import deepspeed

    for layer in model.layers:
        for block in (layer.attention, layer.ffn):
            if block is None:
                continue
            for child in block.children():
                if isinstance(child, torch.nn.Linear):
                    for p in child.parameters():
                        deepspeed.zero.register_external_parameter(block, p)


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: EncoderForSequenceClassification,
    loader,
    spec: data_lib.TaskSpec,
    sub: SubNetwork | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Metric, error and mean loss of `model` (with `sub` selected, if given) on `loader`."""
    was_training = model.training
    model.eval()
    previous = model.sub_network
    if sub is not None:
        model.set_sub_network(sub)
    device = next(model.parameters()).device
    logits, labels, loss_sum, n = [], [], 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            logits.append(out.logits.float().cpu())
            labels.append(batch["labels"].cpu())
            loss_sum += float(out.loss) * len(batch["labels"])
            n += len(batch["labels"])
    finally:
        if previous is None:
            model.reset_super_network()
        else:
            model.set_sub_network(previous)
        model.train(was_training)
    if n == 0:
        raise TrainingError("evaluation loader yielded no examples")
    metric = data_lib.compute_metric(spec, torch.cat(logits).numpy(), torch.cat(labels).numpy())
    return {
        "metric": metric,
        "error": data_lib.error_from_metric(metric),
        "loss": loss_sum / n,
        "examples": n,
    }


# ------------------------------------------------------------------------------- checkpoints
def save_checkpoint(
    out_dir: str | os.PathLike,
    model: EncoderForSequenceClassification,
    tokenizer: Any,
    meta: dict[str, Any],
) -> Path:
    """Write model weights, tokenizer and metadata to `out_dir` (replaced atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, default=str))
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()
    return out


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `nas_prune.json` of a checkpoint directory ({} for a plain Hugging Face model)."""
    meta = Path(path) / CHECKPOINT_META
    if not meta.exists():
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise TrainingError(f"{meta} is corrupt ({e}); re-create the checkpoint") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[EncoderForSequenceClassification, dict]:
    """Load a nas_prune checkpoint directory: (model in eval mode, metadata)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise TrainingError(f"{path} is not a checkpoint directory (no config.json)")
    meta = read_meta(path)
    try:
        model = load_pretrained(str(path), num_labels=meta.get("num_labels", 2))
    except Exception as e:  # safetensors, torch and transformers each raise their own types
        raise TrainingError(f"cannot load checkpoint {path}: {e}") from e
    return model.eval(), meta


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


def _batches(make_epoch_loader: Callable[[int], Any], start: int, rank: int, world: int):
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


def train(
    model: EncoderForSequenceClassification,
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
    import deepspeed

    start_time = time.perf_counter()
    out = Path(out_dir)
    init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    use_gpu = torch.cuda.is_available()
    strategy = make_strategy(opts.strategy, opts.num_random, opts.temperature)
    # standard training samples no sub-networks (and may train an extracted, smaller model)
    space = None if opts.strategy == "standard" else make_space(opts.space, model.config)

    def epoch_loader(epoch: int):
        return data_lib.make_loader(task.train, tokenizer, opts.batch_size, shuffle=True,
                                    seed=opts.seed * 100_003 + epoch)

    per_epoch = len(epoch_loader(0)) // world // opts.gradient_accumulation
    if per_epoch < 1:
        raise TrainingError(
            f"{len(task.train)} training examples are too few for batch size "
            f"{opts.batch_size} x {world} workers x {opts.gradient_accumulation} accumulation"
        )
    total = opts.max_steps or max(1, math.ceil(opts.epochs * per_epoch))
    ds_config = deepspeed_config(opts, strategy.passes_per_step, total, world, use_gpu)

    resume = _resumable(out, opts, total)
    torch.manual_seed(opts.seed + rank)  # dropout; a resumed run restores the saved state
    if resume is None and opts.rewire and opts.strategy != "standard":
        rewire_loader = data_lib.make_loader(task.train, tokenizer, opts.batch_size,
                                             shuffle=True, seed=opts.seed + 1)
        batches = [b for _, b in zip(range(opts.rewire_batches), rewire_loader, strict=False)]
        rewire(model, batches)
        log.info("rewired heads and neurons by importance on %d batches", len(batches))
    if ds_config["zero_optimization"].get("stage", 0) == 3:
        _register_sliced_parameters(model)
    model.train()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )
    if world == 1 and not ds_config["zero_optimization"].get("stage", 0):
        engine.enable_backward_allreduce = False  # reducing over one rank only copies gradients
    step = 0
    if resume is not None:
        _, client = engine.load_checkpoint(str(out / DEEPSPEED_DIR), load_module_strict=True)
        step = int(client["step"])
        torch.set_rng_state(client["torch_rng"])
        log.info("resumed from %s at step %d / %d", out, step, total)

    device = engine.device
    stream = _batches(epoch_loader, step * opts.gradient_accumulation, rank, world)
    losses: list[float] = []
    examples, t0 = 0, time.perf_counter()
    base_meta = {
        **(meta or {}),
        "strategy": opts.strategy,
        "space": opts.space,
        "options": dataclasses.asdict(opts),
        "total_steps": total,
        "num_labels": model.config.num_labels,
        "world_size": world,
    }

    zero3 = ds_config["zero_optimization"].get("stage", 0) == 3

    def checkpoint(step: int) -> None:
        engine.save_checkpoint(
            str(out / DEEPSPEED_DIR), tag=f"step{step}",
            client_state={"step": step, "torch_rng": torch.get_rng_state()},
        )
        params = list(engine.module.parameters())
        gathered = deepspeed.zero.GatheredParameters(params) if zero3 else contextlib.nullcontext()
        with gathered:
            if rank == 0:
                _prune_old_tags(out / DEEPSPEED_DIR, keep=f"step{step}")
                save_checkpoint(out, engine.module, tokenizer,
                                {**base_meta, "steps_done": step, "finished": step >= total})
        torch.distributed.barrier()

    module = engine.module
    while step < total:
        ctx = StepContext(space, np.random.default_rng([opts.seed, step]), step, total)
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
                    loss = _kd_loss(logits, teacher.float(), batch["labels"], strategy.temperature)
                else:
                    loss = _task_loss(logits, batch["labels"])
                    if p.sub is None and strategy.kd:  # full/sandwich: reuse the full pass
                        teacher = logits.detach()
                engine.backward(loss)
                engine.step()
                step_loss += loss.item() / strategy.passes_per_step
            examples += len(batch["labels"]) * world
        module.reset_super_network()
        step += 1
        losses.append(step_loss / opts.gradient_accumulation)
        if on_step is not None:
            on_step(step, losses[-1])
        if step % opts.log_every == 0 or step == total:
            rate = examples / max(1e-9, time.perf_counter() - t0)
            log.info("step %d/%d  loss %.4f  lr %.2e  %.1f examples/s", step, total,
                     losses[-1], engine.get_lr()[0], rate)
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
        meta_now = {**base_meta, "steps_done": step, "finished": True, "valid": valid,
                    "losses": losses}
        (out / CHECKPOINT_META).write_text(json.dumps(meta_now, indent=2, default=str))
        log.info("validation %s %.4f after %d steps", task.spec.metric, valid["metric"], step)
    return TrainResult(
        checkpoint=out,
        steps=step,
        losses=losses,
        valid=valid,
        seconds=time.perf_counter() - start_time,
        examples_per_second=examples / max(1e-9, elapsed),
    )


def _task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


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
    # Options added after the run started count as their defaults.
    saved = {**dataclasses.asdict(TrainOptions()), **meta.get("options", {})}
    saved = {k: v for k, v in saved.items() if k not in _RESUME_FREE}
    now = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _RESUME_FREE}
    if saved != now or meta.get("total_steps") != total:
        changed = sorted(k for k in now if saved.get(k) != now[k])
        raise TrainingError(
            f"{out} holds an unfinished run with other options ({', '.join(changed) or 'steps'}); "
            "resume with the same options or choose another output directory"
        )
    return meta


_RESUME_FREE = {"log_every", "checkpoint_every"}


@contextlib.contextmanager
def _quiet_deepspeed() -> Iterator[None]:
    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------- stages
def finetune(
    model_name_or_path: str,
    task: data_lib.TaskData,
    out_dir: str | os.PathLike,
    opts: TrainOptions | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> TrainResult:
    """Fine-tune the dense model (the teacher) on `task` with the `standard` strategy."""
    opts = dataclasses.replace(opts or TrainOptions(), strategy="standard", rewire=False)
    tokenizer = tokenizer or data_lib.load_tokenizer(model_name_or_path)
    num_labels = task.spec.num_labels
    if (Path(out_dir) / CHECKPOINT_META).exists():
        model, _ = load_checkpoint(out_dir)
    else:
        model = load_pretrained(model_name_or_path, num_labels=num_labels, pooling=opts.pooling)
    meta = {"kind": "teacher", "task": task.spec.name, "base_model": str(model_name_or_path),
            "family": model.config.family}
    with _quiet_deepspeed():
        return train(model, task, tokenizer, out_dir, opts, meta=meta, **kwargs)


def check_teacher(meta: dict[str, Any], config: EncoderConfig, task: data_lib.TaskData,
                  path: str | os.PathLike) -> None:
    """Raise TrainingError unless the checkpoint at `path` is a model fine-tuned for `task`."""
    if meta.get("kind") not in ("teacher", "supernet"):
        raise TrainingError(
            f"{path} is not a fine-tuned nas_prune model (no teacher metadata); fine-tune it "
            "first with `nas-prune finetune`"
        )
    if meta.get("task") != task.spec.name:
        raise TrainingError(
            f"{path} was fine-tuned for task {meta.get('task')!r}, not {task.spec.name!r}"
        )
    if config.num_labels != task.spec.num_labels:
        raise TrainingError(
            f"{path} predicts {config.num_labels} labels but task {task.spec.name!r} has "
            f"{task.spec.num_labels}"
        )


def train_supernet(
    teacher_dir: str | os.PathLike,
    task: data_lib.TaskData,
    out_dir: str | os.PathLike,
    opts: TrainOptions | None = None,
    **kwargs: Any,
) -> TrainResult:
    """Train the weight-sharing supernet, starting from the fine-tuned teacher at
    `teacher_dir`, with strategy `opts.strategy` (default `full`)."""
    opts = opts or TrainOptions()
    resume_dir = Path(out_dir)
    source = resume_dir if (resume_dir / CHECKPOINT_META).exists() else Path(teacher_dir)
    model, meta = load_checkpoint(source)
    check_teacher(meta, model.config, task, source)
    tokenizer = data_lib.load_tokenizer(str(source))
    new_meta = {"kind": "supernet", "task": task.spec.name, "teacher": str(teacher_dir),
                "base_model": meta.get("base_model"), "family": model.config.family}
    with _quiet_deepspeed():
        return train(model.train(), task, tokenizer, out_dir, opts, meta=new_meta, **kwargs)


# ------------------------------------------------------------------------------- many workers
def _worker(config: dict[str, Any]) -> None:
    """Ray Train worker: load the task, run one training stage, report the result."""
    import ray.train

    logging.basicConfig(level=logging.INFO)
    task = data_lib.load_task(**config["task"])
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
    task_kwargs: dict[str, Any],
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
        "task": task_kwargs,
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
