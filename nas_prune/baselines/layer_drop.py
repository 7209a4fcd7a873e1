"""Layer dropping: keep the first k layers of the fine-tuned teacher, then fine-tune briefly.

The simplest structured baseline of Klein et al. (TMLR 2024, arXiv 2405.02267, section 5; after
Sajjad et al., "On the effect of dropping layers of pre-trained transformer models", 2023):
the top layers go, the rest keep all heads and neurons. The smaller model is a physically
extracted copy (``extract_sub_network``), fine-tuned with the ``standard`` strategy through
the same DeepSpeed loop as the teacher (``nas_prune.train.train``), and exported with
``nas_prune.export`` (a stock BERT/RoBERTa checkpoint when the teacher's head reads [CLS]).
The dense model is the reference point that ``nas-prune run`` and ``nas-prune baseline``
record as method ``dense``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas_prune import data as data_lib
from nas_prune.errors import BaselineError
from nas_prune.options import FinetuneOptions

log = logging.getLogger(__name__)


@dataclass
class Options:
    """Layer-dropping options."""

    layers: list[int] = field(default_factory=lambda: [2, 4])
    """Numbers of layers k to keep (the first k); one model each."""
    epochs: float = 1.0
    """Fine-tuning passes over the training split per model; `max_steps` overrides."""
    max_steps: int | None = None
    """Fine-tuning optimizer steps per model (overrides `epochs`)."""
    batch_size: int = 32
    """Examples per optimizer step."""
    lr: float = 5e-5
    """Peak learning rate (AdamW; linear warm-up then linear decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear learning-rate warm-up."""
    max_length: int = 128
    """Tokens per example after truncation."""
    seed: int = 0
    """Seed of data order and dropout."""
    log_every: int = 50
    """Log progress every this many steps."""

    def __post_init__(self) -> None:
        self.layers = [int(k) for k in self.layers]
        if not self.layers or min(self.layers) < 1:
            raise BaselineError(f"layers must list layer counts >= 1 to keep, e.g. 2 4; got "
                                f"{self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise BaselineError(f"layers lists a count twice: {self.layers}")
        try:
            self.train_options()
        except ValueError as e:
            raise BaselineError(str(e)) from None

    def train_options(self):
        """The equivalent fine-tuning options."""
        return FinetuneOptions(epochs=self.epochs, max_steps=self.max_steps,
                               batch_size=self.batch_size, lr=self.lr,
                               weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                               max_length=self.max_length, seed=self.seed,
                               log_every=self.log_every)


def run(teacher_dir: str | os.PathLike, task: data_lib.TaskData, tokenizer: Any,
        out_dir: str | os.PathLike, opts: Options) -> list[dict[str, Any]]:
    """Keep the first k layers of the teacher for each k in `opts.layers`, fine-tune, save a
    checkpoint (stock when the head reads [CLS]) to ``out_dir/layers-<k>/`` and return one
    evaluation row per model (validation split)."""
    from nas_prune.checkpoint import check_teacher, load_checkpoint
    from nas_prune.evaluate import evaluate
    from nas_prune.export import export_sub_network
    from nas_prune.supernet import SubNetwork
    from nas_prune.train import train

    started = time.perf_counter()
    out = Path(out_dir)
    rows = []
    for k in opts.layers:
        teacher, meta = load_checkpoint(teacher_dir)
        check_teacher(meta, teacher.config.num_labels, task, teacher_dir)
        c = teacher.config
        if k > c.num_hidden_layers:
            raise BaselineError(f"cannot keep {k} layers: the teacher has "
                                f"{c.num_hidden_layers}; choose layers <= {c.num_hidden_layers}")
        sub = SubNetwork.uniform(c.num_hidden_layers, k, c.num_attention_heads,
                                 c.intermediate_size)
        small = teacher.extract_sub_network(sub)
        trial_id = f"layers-{k}"
        work = out / f".{trial_id}.train"  # DeepSpeed checkpoint, removed once exported
        shutil.rmtree(work, ignore_errors=True)
        # train()'s own end-of-training validation runs on one batch; the row's metric
        # comes from the whole validation split below
        quick = dataclasses.replace(task, valid=task.valid.select(range(min(
            opts.batch_size, len(task.valid)))))
        log.info("layer dropping: keep %d of %d layers, fine-tune", k, c.num_hidden_layers)
        result = train(small.train(), quick, tokenizer, work, opts.train_options(),
                       meta={"kind": "layer_drop", "task": task.spec.name})
        t_eval = time.perf_counter()
        scores = evaluate(small, data_lib.make_loader(task.valid, tokenizer, 64),
                                    task.spec)
        eval_time = time.perf_counter() - t_eval
        params, dense = teacher.num_params(sub), teacher.num_params()
        export_sub_network(small.eval(), small.full_sub_network, out / trial_id, tokenizer,
                           metadata={"method": "layer_drop", "layers": k,
                                     "params_ratio": params / dense, "task": task.spec.name,
                                     "teacher": str(teacher_dir), "steps": result.steps,
                                     "valid": scores})
        shutil.rmtree(work, ignore_errors=True)
        rows.append({
            "method": "layer_drop", "task": task.spec.name,
            "model": str(meta.get("base_model", "")), "seed": opts.seed, "trial_id": trial_id,
            "config": {"num_layers": k}, "fidelity": float(result.steps),
            "fidelity_unit": "steps", "error": scores["error"], "metric_name": task.spec.metric,
            "metric_value": scores["metric"], "params": params, "params_ratio": params / dense,
            "flops": teacher.flops(sub, 128), "wall_time_s": time.perf_counter() - started,
            "train_examples": result.steps * opts.batch_size, "train_time_s": result.seconds,
            "eval_time_s": eval_time, "status": "ok",
            "message": f"first {k} of {c.num_hidden_layers} layers, fine-tuned "
                       f"{result.steps} steps",
        })
        log.info("%s: %s %.4f, %.3f of the dense parameters", trial_id, task.spec.metric,
                 scores["metric"], params / dense)
    return rows
