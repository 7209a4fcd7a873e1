"""Layer dropping: keep k layers of the teacher, then fine-tune briefly.

Encoders (a fine-tuned BERT/RoBERTa classifier) keep their *first* k layers. The simplest
structured baseline of Klein et al. (TMLR 2024, arXiv 2405.02267, section 5; after
Sajjad et al., "On the effect of dropping layers of pre-trained transformer models", 2023):
the top layers go, the rest keep all heads and neurons. The smaller model is a physically
extracted copy (``extract_sub_network``), fine-tuned with the ``standard`` strategy through
the same DeepSpeed loop as the teacher (``nas_prune.train.train``), and exported with
``nas_prune.export`` (a stock BERT/RoBERTa checkpoint when the teacher's head reads [CLS]).
The dense model is the reference point that ``nas-prune run`` and ``nas-prune baseline``
record as method ``dense``.

Decoder language models (a dense ``DecoderForCausalLM`` teacher and a task with
``spec.kind == "lm"``, scored by perplexity) keep the k layers whose removal changes the
residual stream least, measured on `calibration_blocks` training blocks (forward passes only):

* ``criterion="block_influence"`` (default): ShortGPT (Men et al. 2024, "ShortGPT: Layers in
  Large Language Models are More Redundant Than You Expect", arXiv 2403.03853): a layer's Block
  Influence is ``BI_i = 1 - E[cos(x_i, x_{i+1})]`` over all real tokens, x_i the stream entering
  layer i; the L - k layers of lowest BI go, wherever they are.
* ``criterion="angular"``: Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers" (arXiv 2403.17887): the contiguous block of n = L - k layers starting at the layer l
  minimising the angular distance ``arccos(cos(x_l, x_{l+n})) / pi`` (averaged over all real
  tokens) goes.

The papers heal with QLoRA (Gromov et al.) or not at all (ShortGPT); here, when `finetune` is
on, all weights of the smaller model are fine-tuned on the next-token loss of the training
blocks, through the same loop as for encoders (``llm_pruner.recover``: nas_prune.train.train,
``standard`` strategy, the same `epochs` / `max_steps`, `lr`, ... options), and the cost is
counted. Decoder rows are charged the calibration blocks plus the recovery blocks, fidelity in
tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas_prune import data as data_lib
from nas_prune.errors import BaselineError
from nas_prune.options import FinetuneOptions

log = logging.getLogger(__name__)

CRITERIA = ("block_influence", "angular")
"""How a decoder's layers to drop are chosen (see the module docstring)."""


@dataclass
class Options:
    """Layer-dropping options."""

    layers: list[int] = field(default_factory=lambda: [2, 4])
    """Numbers of layers k to keep (encoders: the first k); one model each."""
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
    criterion: str = "block_influence"
    """Decoders: which layers go, "block_influence" (ShortGPT) or "angular" (Gromov et al.,
    one contiguous block)."""
    calibration_blocks: int = 10
    """Decoders: training blocks on which the layers' effect on the stream is measured."""
    finetune: bool = True
    """Decoders: fine-tune each smaller model (false: the pruned model as it is). Encoders are
    always fine-tuned."""

    def __post_init__(self) -> None:
        self.layers = [int(k) for k in self.layers]
        if not self.layers or min(self.layers) < 1:
            raise BaselineError(f"layers must list layer counts >= 1 to keep, e.g. 2 4; got "
                                f"{self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise BaselineError(f"layers lists a count twice: {self.layers}")
        if self.criterion not in CRITERIA:
            raise BaselineError(f"criterion must be one of {', '.join(CRITERIA)}, got "
                                f"{self.criterion!r}")
        if self.calibration_blocks < 1:
            raise BaselineError(f"calibration_blocks must be >= 1, got "
                                f"{self.calibration_blocks}")
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
        out_dir: str | os.PathLike, opts: Options, *, done: Collection[str] = (),
        on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Keep k layers of the teacher for each k in `opts.layers` (encoders: the first k;
    decoders: :func:`run_decoder`), fine-tune, save a checkpoint (stock when the head reads
    [CLS]) to ``out_dir/layers-<k>/`` and return one evaluation row per model trained now
    (validation split). Models whose trial id is in `done` (already stored) are not trained
    again; `on_row` gets each new row as soon as its model is saved."""
    if task.spec.is_lm:
        return run_decoder(teacher_dir, task, tokenizer, out_dir, opts, done=done,
                           on_row=on_row)
    if not opts.finetune:
        raise BaselineError("finetune false applies to decoders; encoder layer dropping "
                            "always fine-tunes")
    from nas_prune.checkpoint import check_teacher, load_checkpoint
    from nas_prune.evaluate import evaluate
    from nas_prune.export import export_sub_network
    from nas_prune.supernet import SubNetwork
    from nas_prune.train import train

    started = time.perf_counter()
    out = Path(out_dir)
    rows = []
    for k in opts.layers:
        trial_id = f"layers-{k}"
        if trial_id in done:
            continue
        teacher, meta = load_checkpoint(teacher_dir)
        check_teacher(meta, teacher.config.num_labels, task, teacher_dir)
        c = teacher.config
        if k > c.num_hidden_layers:
            raise BaselineError(f"cannot keep {k} layers: the teacher has "
                                f"{c.num_hidden_layers}; choose layers <= {c.num_hidden_layers}")
        sub = SubNetwork.uniform(c.num_hidden_layers, k, c.num_attention_heads,
                                 c.intermediate_size)
        small = teacher.extract_sub_network(sub)
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
        row = {
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
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
        log.info("%s: %s %.4f, %.3f of the dense parameters", trial_id, task.spec.metric,
                 scores["metric"], params / dense)
    return rows


# ------------------------------------------------------------------------------ decoders
@dataclass(frozen=True)
class StreamSimilarity:
    """Mean similarity of the residual stream between layer boundaries (boundary i enters
    layer i; boundary L leaves the last layer), over all real calibration tokens."""

    cosine: Any
    """(L + 1, L + 1): mean cosine similarity of the stream at boundaries a and b."""
    angular: Any
    """(L + 1, L + 1): mean angular distance arccos(cosine) / pi, per token then averaged."""

    def block_influence(self) -> Any:
        """ShortGPT's Block Influence of each layer, 1 - E[cos(x_i, x_{i+1})]."""
        import torch

        return 1 - torch.diagonal(self.cosine, 1)


def stream_similarity(model: Any, batches: Any) -> StreamSimilarity:
    """Cosine similarities and angular distances between every pair of layer boundaries of the
    full decoder `model`'s residual stream over `batches` (forward passes, no gradients)."""
    import torch

    model.reset_super_network()
    was_training = model.training
    model.eval()
    states: list[torch.Tensor] = []

    def keep(_module, _inputs, out):
        states.append((out[0] if isinstance(out, tuple) else out).detach().float())

    hooks = [model.model.embed_out.register_forward_hook(keep)]
    hooks += [layer.register_forward_hook(keep) for layer in model.model.layers]
    n = len(model.model.layers) + 1
    cosine, angular = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n,
                                                                          dtype=torch.float64)
    tokens = 0.0
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                states.clear()
                model(input_ids=ids, attention_mask=mask)
                real = mask.bool()
                tokens += float(real.sum())
                for a in range(n):
                    for b in range(a + 1, n):
                        cos = torch.nn.functional.cosine_similarity(
                            states[a], states[b], dim=-1)[real].double().clamp(-1, 1)
                        cosine[a, b] += cos.sum().cpu()
                        angular[a, b] += (torch.arccos(cos) / math.pi).sum().cpu()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if tokens == 0:
        raise BaselineError("no calibration tokens: the training split has no real tokens")
    cosine, angular = cosine / tokens, angular / tokens
    return StreamSimilarity(cosine + cosine.T + torch.eye(n, dtype=torch.float64),
                            angular + angular.T)


def layers_to_drop(similarity: StreamSimilarity, keep: int, criterion: str) -> list[int]:
    """The layers (ascending) a decoder drops to keep `keep` of them under `criterion`."""
    import torch

    total = similarity.cosine.shape[0] - 1
    drop = total - keep
    if drop == 0:
        return []
    if criterion == "block_influence":
        order = torch.argsort(similarity.block_influence(), stable=True)
        return sorted(int(i) for i in order[:drop])
    distances = torch.stack([similarity.angular[start, start + drop]
                             for start in range(total - drop + 1)])
    start = int(torch.argmin(distances))
    return list(range(start, start + drop))


def run_decoder(teacher_dir: str | os.PathLike, task: data_lib.TaskData, tokenizer: Any,
                out_dir: str | os.PathLike, opts: Options, *, done: Collection[str] = (),
                on_row: Callable[[dict[str, Any]], None] | None = None
                ) -> list[dict[str, Any]]:
    """Drop the layers `opts.criterion` chooses from the dense decoder at `teacher_dir` to
    keep each k in `opts.layers`, optionally fine-tune, save each model to
    ``out_dir/layers-<k>/`` and return one row per model trained now (validation perplexity).
    Models whose trial id is in `done` (already stored) are not trained again (nor is the
    block influence measured when none is left); `on_row` gets each new row as soon as its
    model is saved."""
    from nas_prune.baselines.llm_pruner import (
        calibration_batches,
        load_decoder_teacher,
        pruned_model_row,
    )
    from nas_prune.decoder import DecoderSubNetwork

    started = time.perf_counter()
    teacher, meta = load_decoder_teacher(teacher_dir, task)
    c = teacher.config
    too_many = [k for k in opts.layers if k > c.num_hidden_layers]
    if too_many:
        raise BaselineError(f"cannot keep {too_many[0]} layers: the teacher has "
                            f"{c.num_hidden_layers}; choose layers <= {c.num_hidden_layers}")
    todo = [k for k in opts.layers if f"layers-{k}" not in done]
    if not todo:
        return []
    calibration = calibration_batches(task.train, tokenizer, opts.calibration_blocks,
                                      opts.batch_size, opts.seed)
    blocks = sum(len(b["input_ids"]) for b in calibration)
    similarity = stream_similarity(teacher, calibration)
    calibration_s = time.perf_counter() - started
    log.info("layer dropping (%s): block influence per layer %s", opts.criterion,
             [round(float(v), 4) for v in similarity.block_influence()])
    full, out, rows = teacher.full_sub_network, Path(out_dir), []
    for k in todo:
        dropped = layers_to_drop(similarity, k, opts.criterion)
        sub = DecoderSubNetwork(*([0 if i in dropped else v for i, v in enumerate(values)]
                                  for values in (full.kv_heads, full.queries_per_kv, full.units)))
        trial_id = f"layers-{k}"
        log.info("layer dropping: drop layers %s of %d%s", dropped, c.num_hidden_layers,
                 ", fine-tune" if opts.finetune else "")
        rows.append(pruned_model_row(
            teacher, sub, trial_id, task, tokenizer, out, opts, method="layer_drop",
            recovery=opts.finetune, meta=meta, teacher_dir=teacher_dir, started=started,
            calibration=(blocks, calibration_s),
            config={"num_layers": k, **{f"layer_{i}": int(i not in dropped)
                                        for i in range(c.num_hidden_layers)}},
            metadata={"layers": k, "dropped": dropped, "criterion": opts.criterion},
            steps_key="steps",
            message=lambda steps, dropped=dropped, n=c.num_hidden_layers: (
                f"dropped layers {dropped} of {n} by "
                f"{opts.criterion.replace('_', ' ')}, fine-tuned {steps} steps")))
        if on_row is not None:
            on_row(rows[-1])
        log.info("%s: perplexity %.3f, %.3f of the dense parameters", trial_id,
                 rows[-1]["metric_value"], rows[-1]["params_ratio"])
    return rows
