"""Scoring a model on a split: the one scorer that training, search, the pipeline's dense row
and the baselines share.

`validation_subset` fixes which validation examples a search scores (a seeded shuffle, then a
prefix), so the dense model's row and every trial's row are scored on the same examples.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from nas_prune import data as data_lib
from nas_prune.errors import NasPruneError


def validation_subset(split: Any, seed: int, examples: int | None = None) -> Any:
    """The first `examples` (all if None) of `split` (a datasets.Dataset) after a shuffle
    seeded with `seed`: the examples a search scores its sub-networks on."""
    split = split.shuffle(seed=seed)
    if examples is not None:
        split = split.select(range(min(examples, len(split))))
    return split


def scored_validation(task: data_lib.TaskData, tokenizer: Any, max_length: int, seed: int,
                      examples: int | None = None) -> data_lib.TaskData:
    """`task` tokenised, its validation split replaced by `validation_subset(valid, seed,
    examples)` of the tokenised examples (token blocks, for language modelling): what a search
    with that validation seed scores, and the dense row with it."""
    import dataclasses

    if task.spec.is_lm:  # documents become blocks first: the subset is of blocks
        tokenized = data_lib.tokenize(task, tokenizer, max_length)
        return dataclasses.replace(tokenized, valid=validation_subset(tokenized.valid, seed,
                                                                      examples))
    subset = dataclasses.replace(task, valid=validation_subset(task.valid, seed, examples))
    return data_lib.tokenize(subset, tokenizer, max_length)


def selection_subset(split: Any, seed: int, examples: int | None = None) -> Any:
    """The LAST `examples` (all if None) of `split` after the same seeded shuffle as
    `validation_subset`: what a method that picks checkpoints during training (PINS) selects
    on, so that it never chooses on the examples a search with the same seed scores its
    sub-networks on (disjoint while both subsets together fit in the split)."""
    split = split.shuffle(seed=seed)
    if examples is not None:
        split = split.select(range(max(0, len(split) - examples), len(split)))
    return split


class Scorer:
    """Accumulates a model's outputs over batches and scores them with the task's metric: the
    classification metric on all logits, or (language modelling) the perplexity exp(mean
    next-token negative log-likelihood over all predicted tokens)."""

    def __init__(self, spec: data_lib.TaskSpec):
        self.spec = spec
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.loss_sum, self.examples, self.tokens = 0.0, 0, 0

    def add(self, out: Any, batch: dict[str, torch.Tensor]) -> None:
        """One batch: the model's output (with `.loss`, `.logits`) and its inputs."""
        labels = batch["labels"]
        if self.spec.is_lm:  # the loss is the mean over the predicted (shifted) tokens
            tokens = int((labels[:, 1:] != -100).sum())
            self.loss_sum += float(out.loss) * tokens
            self.tokens += tokens
        else:
            self.logits.append(out.logits.float().cpu())
            self.labels.append(labels.cpu())
            self.loss_sum += float(out.loss) * len(labels)
        self.examples += len(labels)

    def result(self) -> dict[str, float]:
        """metric, error, mean loss, examples (and tokens, for language modelling)."""
        if self.examples == 0:
            raise NasPruneError("evaluation loader yielded no examples")
        if self.spec.is_lm:
            loss = self.loss_sum / max(1, self.tokens)
            metric = math.exp(min(loss, 700.0))
            return {"metric": metric, "error": metric, "loss": loss,
                    "examples": self.examples, "tokens": self.tokens}
        metric = data_lib.compute_metric(self.spec, torch.cat(self.logits).numpy(),
                                         torch.cat(self.labels).numpy())
        return {"metric": metric, "error": data_lib.error_from_metric(metric),
                "loss": self.loss_sum / self.examples, "examples": self.examples}


@torch.no_grad()
def evaluate(model: Any, loader: Any, spec: data_lib.TaskSpec, sub: Any = None,
             max_batches: int | None = None) -> dict[str, float]:
    """Metric, error and mean loss of `model` (with sub-network `sub` selected, if given) on
    the batches of `loader` (`Scorer.result`); the model's mode and sub-network are restored
    afterwards."""
    was_training = model.training
    model.eval()
    previous = model.sub_network
    if sub is not None:
        model.set_sub_network(sub)
    device = next(model.parameters()).device
    scorer = Scorer(spec)
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            scorer.add(model(**batch), batch)
    finally:
        if previous is None:
            model.reset_super_network()
        else:
            model.set_sub_network(previous)
        model.train(was_training)
    return scorer.result()


def dense_evaluation(teacher_dir: str | os.PathLike, task: data_lib.TaskData, tokenizer: Any,
                     seed: int = 0, valid_examples: int | None = None,
                     flops_seq_len: int = 128, batch_size: int = 64) -> dict[str, Any]:
    """The evaluation row (method ``dense``) of the fine-tuned teacher at `teacher_dir` on the
    tokenised `task`'s validation subset (`validation_subset(valid, seed, valid_examples)`,
    the examples a search with that validation seed scores)."""
    from nas_prune.checkpoint import load_checkpoint
    from nas_prune.models import dense_config

    model, meta = load_checkpoint(teacher_dir)
    valid = validation_subset(task.valid, seed, valid_examples)
    t0 = time.perf_counter()
    scores = evaluate(model, data_lib.make_loader(valid, tokenizer, batch_size), task.spec)
    full = model.full_sub_network
    config = dense_config(model)
    return {
        "method": "dense", "task": task.spec.name,
        "model": meta.get("base_model", "") or str(Path(teacher_dir)),
        "seed": seed, "trial_id": "dense", "config": config,
        "fidelity": float(scores.get("tokens", scores["examples"])),
        "fidelity_unit": "tokens" if task.spec.is_lm else "examples",
        "family": getattr(model.config, "family", None),
        "error": scores["error"], "metric_name": task.spec.metric,
        "metric_value": scores["metric"], "params": model.num_params(full),
        "params_ratio": 1.0, "flops": model.flops(full, flops_seq_len),
        "wall_time_s": 0.0, "eval_time_s": time.perf_counter() - t0, "status": "ok",
    }
