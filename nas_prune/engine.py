"""The one place a DeepSpeed engine is set up (DESIGN.md decision 3).

`make_engine` is what fine-tuning, supernet training, PINS and GRAIN all call: it initialises
torch.distributed once per process (in-process world size 1 with gloo on CPU, or the group a
launcher / Ray Train set up), builds the DeepSpeed config from `TrainOptions` (fp32 and a torch
AdamW on CPU, bf16 and the configured ZeRO stage on GPUs, the user's overrides merged in and
checked for contradictions) and returns the engine.

bf16 means two things: on a GPU, DeepSpeed's `bf16` (the model in bf16, fp32 master weights in
the optimizer); on a CPU (`precision="bf16"`, never by default), DeepSpeed's `torch_autocast`:
the weights stay fp32 and the engine's forward runs under `torch.autocast("cpu", bfloat16)`, so
matrix products use the CPU's bf16 instructions (AVX512-BF16, AMX; MiniLM fine-tuning steps
1.46x faster on a 2-core AMD EPYC, accuracy within 0.5 points of fp32 on one seed:
benchmarks/bench_precision.py). `autocast(engine)` gives the same precision to forwards outside
the engine (a teacher's).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from nas_prune.errors import TrainingError
from nas_prune.options import TrainOptions

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initialise torch.distributed for DeepSpeed once per process: in-process world size 1
    (gloo on CPU) unless a launcher or Ray Train already set up a process group. DeepSpeed's
    own prints (an op "built successfully") go to the debug log, not to stdout."""
    import deepspeed

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        elif "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            os.environ.setdefault("LOCAL_RANK", "0")
            deepspeed.init_distributed(auto_mpi_discovery=False)
        else:
            os.environ.setdefault("LOCAL_RANK", "0")
            deepspeed.init_distributed(
                dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                auto_mpi_discovery=False,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
            )
    if printed.getvalue().strip():
        log.debug("DeepSpeed: %s", printed.getvalue().strip())


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
    # on a CPU, bf16 is torch autocast around fp32 weights (DeepSpeed's "bf16" would cast the
    # model itself, layer norms and softmax included)
    cpu_bf16 = bf16 and not use_gpu
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
        "zero_optimization": {"stage": opts.zero_stage},
        "bf16": {"enabled": bf16 and use_gpu},
        # no "lower precision safe" modules: gradients (fp32) are reduced in fp32, not bf16
        **({"torch_autocast": {"enabled": True, "dtype": "bfloat16",
                               "lower_precision_safe_modules": []}} if cpu_bf16 else {}),
    }
    config = _merge(config, opts.deepspeed)
    micro = config["train_micro_batch_size_per_gpu"]
    gas = config["gradient_accumulation_steps"]
    if gas % passes_per_step:
        raise TrainingError(
            f"DeepSpeed gradient_accumulation_steps={gas} must be a multiple of the strategy's "
            f"{passes_per_step} passes per step; set the gradient_accumulation option instead"
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
        raise TrainingError("DeepSpeed's fp16/bf16 sections need a GPU; on a CPU leave them out "
                            "and set precision='bf16' (torch autocast) or 'fp32'")
    if cpu_bf16 and not _cpu_has_bf16():
        log.warning("precision bf16 on a CPU without native bf16 instructions (AVX512-BF16 or "
                    "AMX): autocast emulates it and will be slower than fp32")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise TrainingError(f"DeepSpeed zero_optimization.stage must be 0-3, got {stage}")
    if not use_gpu:
        config["optimizer"].setdefault("params", {})["torch_adam"] = True
    return config


def _cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products natively on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(engine: Any) -> contextlib.AbstractContextManager:
    """The engine's forward precision for a forward outside it (a teacher's): bf16 autocast
    where the engine trains under torch autocast (precision bf16 on a CPU), else no change."""
    if engine.torch_autocast_enabled():
        return torch.autocast(torch.device(engine.device).type,
                              dtype=engine.torch_autocast_dtype())
    return contextlib.nullcontext()


def lr_factor(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """The learning rate of optimizer step k (0-based) as a fraction of the peak: a linear
    warm-up over the first w = int(warmup_ratio x total_steps) steps, (k + 1) / (w + 1), then
    a linear decay, (total_steps - k) / (total_steps - w). No step has learning rate 0, so even
    a one-step run updates the weights. (DeepSpeed's WarmupDecayLR, used before, makes at least
    two warm-up steps and runs the first two at learning rate 0: a two-step refine or recovery
    changed nothing.)"""
    warm = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return factor


def zero_stage(config: Mapping[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _register_sliced_parameters(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters when that module is called; our embeddings, head,
    attention and FFN blocks read their children's weights directly (to slice them: heads,
    neurons, hidden channels, LayerNorms), so register those as the block's external
    parameters."""
    import deepspeed

    if not hasattr(model, "layers"):
        return
    blocks = [getattr(model, "embeddings", None), getattr(model, "head", None)]
    blocks += [b for layer in model.layers for b in (layer.attention, layer.ffn)]
    for block in (b for b in blocks if b is not None):
        for child in block.children():
            for p in child.parameters():
                deepspeed.zero.register_external_parameter(block, p)


class _NotStartedWarning(logging.Filter):
    """Drops DeepSpeed's "learning rate from scheduler before it has started" warning, which
    its engine itself triggers on every run (its scheduler is stepped after the first update)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "before it has started" not in record.getMessage()


_DEEPSPEED_FILTER = _NotStartedWarning()


@contextlib.contextmanager
def quiet_deepspeed() -> Iterator[None]:
    """DeepSpeed's INFO logs (config dumps, op builds) off for the duration."""
    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def make_engine(model: torch.nn.Module, opts: TrainOptions, total_steps: int,
                passes_per_step: int = 1) -> tuple[Any, dict[str, Any]]:
    """A DeepSpeed engine training `model`'s trainable parameters for `total_steps` optimizer
    steps of `passes_per_step` micro-steps each (a strategy's passes are accumulated into one
    update). Returns (engine, the DeepSpeed config it was built with)."""
    import deepspeed

    init_distributed()
    logging.getLogger("DeepSpeed").addFilter(_DEEPSPEED_FILTER)  # a set: added once
    world = torch.distributed.get_world_size()
    config = deepspeed_config(opts, passes_per_step, total_steps, world,
                              torch.cuda.is_available())
    if zero_stage(config) == 3:
        _register_sliced_parameters(model)
    factor = lr_factor(total_steps, opts.warmup_ratio)
    with quiet_deepspeed():
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=config,
            # a user's own "scheduler" in opts.deepspeed replaces ours
            lr_scheduler=None if "scheduler" in config else (
                lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)),
        )
    if world == 1 and not zero_stage(config):
        engine.enable_backward_allreduce = False  # reducing over one rank only copies gradients
    return engine, config
